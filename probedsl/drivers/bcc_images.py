"""BCC: the kernel's entries of ended process images freed between reports (probedsl/drivers/images.py).

An exec cannot walk the live table, so the entries of the image it ended stay in it, with their
tally groups and the (pid, image) pair: a long run of programs that exec (shells, wrappers)
would fill the tables. The loader frees them in two steps, a sweep apart:
1. the live entries of images ended since the last sweep are deleted; their tally groups still
   count them, so every report reads the same;
2. at the next sweep those images' tally groups are folded into a count kept here (reports add
   it to ended_by_exec), then deleted with their pairs. Nothing touches them by then: an ended
   image acquires nothing, and a new image's acquisition under one of their keys finds no entry.
With --read-live (reachability, ages) every report reads each live entry and counts ended ones
from them: there is no sweep. bpftrace's maps cannot be changed from outside: its entries stay
(docs/design.md).
"""

from __future__ import annotations

import time
from typing import Dict, Iterable, Set, Tuple

from probedsl import faults
from probedsl.ir.layout import ResourceLayout
from probedsl.drivers.rundata import Snapshot

SWEEP_S = 1.0  # at most one sweep this often (reading the set of ended images)


class EndedImages:
    def __init__(self, bpf, layouts: Iterable[ResourceLayout], items, front):
        self.bpf, self.items = bpf, items  # items: the driver's batched table reader
        self.front = front  # a resource's front (bcc_front.Front), from its layout
        self.layouts = [lay for lay in layouts if lay.ends_with_image]
        self.cleared: Set[Tuple[int, int]] = set()  # step 1 done, step 2 at the next sweep
        self.folded: Dict[str, int] = {lay.name: 0 for lay in self.layouts}
        self.forgotten = 0  # pairs deleted in step 2
        self.next_s = 0.0

    def due(self) -> bool:
        return bool(self.layouts) and time.monotonic() >= self.next_s

    def sweep(self) -> None:
        self.next_s = time.monotonic() + SWEEP_S
        ended_table = self.bpf["probedsl_ended"]
        ended = {(k.pid, k.image): k for k, _ in self.items(ended_table)}
        ripe = self.cleared & set(ended)
        if ripe:
            self._fold(ripe)
            for pair in ripe:
                _delete(ended_table, ended[pair])
            self.forgotten += len(ripe)
        fresh = set(ended) - self.cleared
        freed = self._free_live(fresh) if fresh else 0
        self.cleared = fresh
        if freed:
            faults.say("image-sweep", f"{freed} live entries of {len(fresh)} ended images freed")

    def _free_live(self, pairs: Set[Tuple[int, int]]) -> int:
        freed = 0
        for lay in self.layouts:
            if lay.front:
                front = self.front(lay)
                freed += sum(front.free(i, e) for i, e in front.items() if (e.v.pid, e.v.image) in pairs)
            table = self.bpf[lay.live]
            for k, v in self.items(table):
                if (v.pid, v.image) in pairs:
                    # looked up again: a new image's acquisition may have just taken the key
                    again = table.get(k)
                    if again is not None and (again.pid, again.image) in pairs and _delete(table, k):
                        freed += 1
        return freed

    def _fold(self, pairs: Set[Tuple[int, int]]) -> None:
        for lay in self.layouts:
            for i, tally in enumerate(lay.tallies):
                table = self.bpf[tally.map]
                for k, per_cpu in table.items():
                    if (k.pid, k.image) in pairs:
                        if i == 0:  # every tally counts every entry: the first one says
                            self.folded[lay.name] += sum(v.count for v in per_cpu)
                        _delete(table, k)

    def add_to(self, snapshot: Snapshot) -> None:
        """The folded entries and forgotten images, into a snapshot already settled."""
        for name, count in self.folded.items():
            totals = snapshot.totals.get(name)
            if totals is not None:
                totals.ended_by_exec += count
                totals.images_ended += self.forgotten


def _delete(table, key) -> bool:
    try:
        del table[key]
        return True
    except KeyError:
        return False
