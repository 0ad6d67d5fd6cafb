"""Several tracers' snapshots of one run as one: bpftrace probes only the files named when it
starts, so a root that appears later gets a bpftrace of its own (probedsl.run.late_roots), and
the report is built from the sum of what each saw. Their probes sit on different files, so a
block is recorded by one tracer only: counters and tallies add up, live entries are joined."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

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
