"""The kinds of a process tree: each process followed is scanned at its own exit (the traced
one by probedsl.reachability.scanner, its descendants as the tether holds them,
probedsl.process.tree_tether); here their kinds are kept, per process and together, and the
blocks no scan saw are said per process with the reason."""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

from probedsl import report
from probedsl.process import procfs

MAX_NAMED = 10  # processes named in a note before "and N more"


def command_of(pid: int) -> str:
    """The process's command line (its name when it has none), read while it is held."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read(4096).split(b"\0") if a]
    except OSError:
        argv = []
    return " ".join(argv)[:200] if argv else procfs.comm(pid) or ""


def per_resource(program, blocks_of, kinds: Dict[Tuple[int, int], str]) -> Dict[str, dict]:
    """{resource: {kind: {bytes, blocks}}} of one process's blocks (blocks_of(resource) ->
    [(pid, address, size)])."""
    out = {}
    for res in program.resources:
        if res.block_address is None:
            continue
        out[res.name] = report.kind_totals((kinds.get((p, a)), n) for p, a, n in blocks_of(res))
    return out


class Tree:
    """What the scans of the run's processes found; children are added from the tether's thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.kinds: Dict[Tuple[int, int], str] = {}  # (pid, address) of every process scanned
        self.scans: List[dict] = []  # one a process scanned at its exit (not the traced one)
        self.unscanned: Dict[int, str] = {}  # pid -> why its blocks have no kind

    def add(self, kinds: Dict[Tuple[int, int], str], scan: dict) -> None:
        with self.lock:
            self.kinds.update(kinds)
            self.scans.append(scan)
            self.unscanned.pop(scan["pid"], None)

    def failed(self, pid: int, why: str) -> None:
        with self.lock:
            self.unscanned[pid] = why

    def merged(self, root: Optional[report.Reachability], snap, heaps, leaks_only: bool) -> report.Reachability:
        """The traced process's kinds (root, None when it had none) with every child's; a note
        for the live blocks of processes no scan saw, the reason per process."""
        with self.lock:
            kinds = dict(self.kinds)
            scans = list(self.scans)
            unscanned = dict(self.unscanned)
        notes: List[str] = []
        if root is not None:
            kinds.update(root.kinds)
            notes = list(root.notes)
            if root.scan is not None:
                scans.insert(0, root.scan)
        names = {r.name: r.block_address for r in heaps}
        missed: Dict[int, int] = {}
        for live in snap.live if snap is not None and snap.live is not None else []:
            at = names.get(live.resource)
            if at is not None and (live.pid, live.key[at]) not in kinds:
                missed[live.pid] = missed.get(live.pid, 0) + 1
        scanned = {s["pid"] for s in scans}
        whys: Dict[str, List[str]] = {}
        for pid, count in sorted(missed.items()):
            why = unscanned.get(pid) or (
                "still running when the run ended (a process is scanned at its exit)"
                if procfs.process_alive(pid)
                else "scanned before these blocks were allocated"
                if pid in scanned
                else "not held at its exit (not followed: forked before probedsl attached, or "
                "--no-follow-forks, or held by another tracer)"
            )
            whys.setdefault(why, []).append(f"{pid} ({count} blocks)")
        for why, pids in whys.items():
            more = f" and {len(pids) - MAX_NAMED} more" if len(pids) > MAX_NAMED else ""
            notes.append(f"--reachability: not_scanned: process {', '.join(pids[:MAX_NAMED])}{more}: {why}")
        first = root.scan if root is not None and root.scan is not None else (scans[0] if scans else None)
        return report.Reachability(kinds, first, leaks_only, notes, scans)
