"""Several tracers' snapshots of one run as one: bpftrace probes only the files named when it
starts, so a root that appears later gets a bpftrace of its own (probedsl.run.late_roots), and
the report is built from the sum of what each saw. Their probes sit on different files, so a
block is recorded by one tracer only: counters and tallies add up, live entries are joined."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

from probedsl.drivers.rundata import Snapshot, Tally, Totals

_COUNTERS = [f.name for f in dataclasses.fields(Totals) if f.name != "lifetime"]


def _add_buckets(into: Dict[Tuple, List[Tuple[int, int, int]]], more: Dict[Tuple, List[Tuple[int, int, int]]]) -> None:
    for key, buckets in more.items():
        counts: Dict[Tuple[int, int], int] = {}
        for lo, hi, n in into.get(key, []) + list(buckets):
            counts[(lo, hi)] = counts.get((lo, hi), 0) + n
        into[key] = [(lo, hi, n) for (lo, hi), n in sorted(counts.items())]


def _add_tally(into: Tally, more: Tally) -> None:
    """A group two tracers both counted (the same stack and process) adds up; seen: the later."""
    for group, (nbytes, count, seen) in more.items():
        had = into.get(group, (0, 0, 0))
        into[group] = (had[0] + nbytes, had[1] + count, max(had[2], seen))


def merged(snaps: List[Snapshot]) -> Snapshot:
    """One snapshot holding what every snapshot in snaps holds (the first is the main tracer's)."""
    if len(snaps) == 1:
        return snaps[0]
    out = Snapshot(
        now_ns=max(s.now_ns for s in snaps),
        live=None if any(s.live is None for s in snaps) else [e for s in snaps for e in s.live or []],
        totals={},
        final=all(s.final for s in snaps),
        tallies={},
        incomplete=list(dict.fromkeys(why for s in snaps for why in s.incomplete)),
    )
    for snap in snaps:
        for name, t in snap.totals.items():
            total = out.totals.setdefault(name, Totals())
            for counter in _COUNTERS:
                setattr(total, counter, getattr(total, counter) + getattr(t, counter))
            _add_buckets(total.lifetime, t.lifetime)
        for name, by_keys in snap.tallies.items():
            for keys, tally in by_keys.items():
                _add_tally(out.tallies.setdefault(name, {}).setdefault(keys, {}), tally)
    return out


class MergedDriver:
    """The run's driver when several tracers trace it: the first (main) and children (each
    with .driver, .number, .root, .ended_said), read as one. What is not about reading them
    together is the first one's (__getattr__)."""

    def __init__(self, main):
        self.main = main
        self.children: List[Any] = []
        self.notes_: List[str] = []

    def __getattr__(self, name):
        return getattr(self.main, name)

    def _drivers(self) -> list:
        return [self.main] + [c.driver for c in self.children]

    def _ask(self) -> None:
        """One getpgid() asks every tracer for its maps."""
        for d in self._drivers():
            d.expect()
        os.getpgid(0)

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        """One ask answered by every tracer within timeout, merged; None if the first gave none."""
        if not self.children:
            return self.main.snapshot(timeout)
        self._ask()
        deadline = time.monotonic() + timeout
        return self._merge([d.received(_left(deadline)) for d in self._drivers()])

    def stop_all(self, timeout: float = 30) -> Optional[Snapshot]:
        """Each tracer's final snapshot within timeout, then all ended; merged."""
        self._ask()
        deadline = time.monotonic() + timeout
        return self._merge([d.stop(_left(deadline), asked=True) for d in self._drivers()])

    def _merge(self, snaps: List[Optional[Snapshot]]) -> Optional[Snapshot]:
        """The first tracer's snapshot is its driver's too (.last): the notes go on a copy."""
        if snaps[0] is None:
            return None
        first = dataclasses.replace(snaps[0], incomplete=list(snaps[0].incomplete))
        got = [first]
        for child, snap in zip(self.children, snaps[1:]):
            if snap is None:
                first.incomplete.append(f"bpftrace #{child.number} (root {child.root}) gave no snapshot")
            else:
                got.append(snap)
        return merged(got)

    def alive(self) -> bool:
        """The run lasts while the first tracer does; a child that ends is a note."""
        for c in self.children:
            if not c.ended_said and not c.driver.alive():
                c.ended_said = True
                self.notes_.append(f"bpftrace #{c.number} (root {c.root}) ended early: {c.driver.explain_failure()}")
        return self.main.alive()

    def map_memory(self) -> int:
        return sum(d.map_memory() for d in self._drivers())


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
