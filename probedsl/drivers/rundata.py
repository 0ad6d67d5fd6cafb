"""The normalized data every backend driver produces: one snapshot of the tracing state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Live:
    """One live resource (a heap block, an fd...) as the kernel recorded it at acquire."""

    resource: str
    key: Tuple[int, ...]
    time_ns: int  # CLOCK_MONOTONIC at acquire
    size: int = 0
    pid: int = 0
    tid: int = 0
    ustack: Tuple[int, ...] = ()  # raw return addresses, innermost first
    kstack: Tuple[int, ...] = ()
    comm: str = ""
    image: int = 0  # its process image (probedsl.drivers.images), when it ends with it


@dataclass
class Totals:
    acquired: int = 0
    released: int = 0
    unknown_releases: int = 0  # releases of keys never seen acquired (e.g. before attach)
    untracked: int = 0  # acquisitions lost because the live table was full
    replaced: int = 0  # keys acquired again with no release seen in between
    ungrouped: int = 0  # live entries the full tally table could not count
    ended_by_exec: int = 0  # entries whose process image an exec ended (not leaks)
    # (not kernel counters) of a resource that ends with its image: the images execs ended, and
    # image records a full table refused (probedsl.drivers.images)
    images_ended: int = 0
    image_lost: int = 0
    # log2 histograms of released lifetimes, (min_ns, max_ns, count) buckets, per group key:
    # the values of the lifetime report's keys (ustack addresses, pid, comm), () when ungrouped
    lifetime: Dict[Tuple, List[Tuple[int, int, int]]] = field(default_factory=dict)


# live entries per group, as the kernel tallies them at every acquire and release:
# {group key values in layout Tally.keys order: (bytes, count, seen)}; seen: CLOCK_MONOTONIC
# ns of one of its acquisitions (which process image its stack belongs to)
Tally = Dict[Tuple, Tuple[int, int, int]]


@dataclass
class Snapshot:
    now_ns: int  # CLOCK_MONOTONIC when taken
    live: Optional[List[Live]]  # every live entry; None when not read (the default)
    totals: Dict[str, Totals]
    final: bool = False
    # resource -> tally fields (layout Tally.keys) -> Tally
    tallies: Dict[str, Dict[Tuple[str, ...], Tally]] = field(default_factory=dict)
    incomplete: List[str] = field(default_factory=list)  # why it may miss something
