"""The normalized data every backend driver produces: one snapshot of the tracing state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class Live:
    """One live resource (a heap block, an fd...) as the kernel recorded it at acquire."""
    resource: str
    key: Tuple[int, ...]
    time_ns: int                       # CLOCK_MONOTONIC at acquire
    size: int = 0
    pid: int = 0
    tid: int = 0
    ustack: Tuple[int, ...] = ()       # raw return addresses, innermost first
    kstack: Tuple[int, ...] = ()
    comm: str = ""


@dataclass
class Totals:
    acquired: int = 0
    released: int = 0
    unknown_releases: int = 0          # releases of keys never seen acquired (e.g. before attach)
    untracked: int = 0                 # acquisitions lost because the live table was full
    # log2 histograms of released lifetimes, (min_ns, max_ns, count) buckets, per group key:
    # the values of the lifetime report's keys (ustack addresses, pid, comm), () when ungrouped
    lifetime: Dict[Tuple, List[Tuple[int, int, int]]] = field(default_factory=dict)


@dataclass
class Snapshot:
    now_ns: int                        # CLOCK_MONOTONIC when taken
    live: List[Live]
    totals: Dict[str, Totals]
    final: bool = False
