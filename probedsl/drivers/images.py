"""Entries whose process image ended: an exec replaces a process's address space, and every
heap block, mapping or stream of the old image goes with it. They are not leaks.

The kernel cannot walk its live table at an exec, so it stamps each entry of such a resource
(layout.ends_with_image) with its image and keys the tallies by (pid, image) too; an entry a
recipe says outlives the exec (a descriptor without close-on-exec: `until exec when COND` did
not hold) is stamped 0, an image no exec ends. A process's
first acquisition registers its image as the process's start time (one number per process,
whichever thread comes first; a new process reusing the pid has another, so it never inherits
an ended image); each exec of a registered process adds (pid, the image it ended) to a set and
registers the new image as the exec's time. Processes that never acquired anything are never
registered, so their execs (every exec on the machine, for --comm and --all) are not recorded;
the registration is forgotten when the process's last thread ends. A record a full table
refused is counted (image_lost): that image's entries may then read as leaks. At a snapshot the groups of ended images are taken out here and counted as
ended_by_exec, and the rest folded to the report's own groups. An acquisition by the new image
under a key an old one left live counts there in the kernel (not as `replaced`), so a release
only ever matches an entry of its own image."""

from __future__ import annotations

from typing import Dict, Iterable, Set, Tuple

from probedsl.ir.layout import ResourceLayout
from probedsl.drivers.rundata import Snapshot

Ended = Set[Tuple[int, int]]  # (pid, image)


def settle(
    layouts: Iterable[ResourceLayout], snapshot: Snapshot, ended: Iterable[Tuple[int, int]], lost: int = 0
) -> Snapshot:
    """Take the entries of ended images out of the snapshot (in place): its tallies are then
    keyed by the report's fields (Tally.shown), and each resource's ended_by_exec counts them.
    lost: the kernel's count of image records refused."""
    ended = set(ended)
    for lay in layouts:
        if not lay.ends_with_image:
            continue
        name = lay.name
        stored = snapshot.tallies.get(name, {})
        folded: Dict[Tuple[str, ...], dict] = {}
        gone_tallied = None
        for tally in lay.tallies:
            pid_at, image_at = tally.keys.index("pid"), tally.keys.index("image")
            keep = [tally.keys.index(k) for k in tally.shown]
            out, gone = {}, 0
            for group, (nbytes, count, seen) in stored.get(tally.keys, {}).items():
                if (group[pid_at], group[image_at]) in ended:
                    gone += count
                    continue
                shown = tuple(group[i] for i in keep)
                b, n, s = out.get(shown, (0, 0, 0))
                out[shown] = (b + nbytes, n + count, max(s, seen))
            folded[tally.shown] = out
            if gone_tallied is None:  # every tally counts every entry: the first one says
                gone_tallied = gone
        snapshot.tallies[name] = folded
        gone = gone_tallied or 0
        if snapshot.live is not None:
            kept = [l for l in snapshot.live if l.resource != name or (l.pid, l.image) not in ended]
            gone = len(snapshot.live) - len(kept)
            snapshot.live = kept
        totals = snapshot.totals.get(name)
        if totals is not None:
            totals.ended_by_exec += gone
            totals.images_ended, totals.image_lost = len(ended), lost
    return snapshot
