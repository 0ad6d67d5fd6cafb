"""Processes a run targets but cannot trace: on a tracer that probes the libraries of the roots
it saw at start (bpftrace), a process of the target in a root that appeared later (a container
started after tracing began) loads other library files, which carry no probes. A listener of
the mapping tracker (called for every process on the machine as its mappings change) names
each such process, so that the report counts them instead of saying nothing."""

from __future__ import annotations

import threading
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

from probedsl.process import procfs, roots

SHOWN = 10  # processes named in the note; the JSON lists them all


class UnprobedRoots:
    """comm: the target's name (None: every process, --all); probed: the roots (roots.stat_key)
    whose files the probes were placed on, besides ours; say: told of each one found."""

    def __init__(self, comm: Optional[str], probed: Iterable[Tuple[int, int]], say: Callable[[str], None]):
        self.comm, self.say = comm, say
        # takes a process found (pid, root key, comm, root) and traces it: True when it will be
        # traced, False when it cannot, None when not yet (asked again at its next mapping change)
        self.adopt: Optional[Callable[[int, Tuple[int, int], str, str], Optional[bool]]] = None
        self.probed: Set[Tuple[int, int]] = {k for k in (roots.stat_key("/"), *probed) if k}
        self.found: Dict[int, dict] = {}
        self._checked: Dict[int, Tuple[int, int]] = {}  # pid -> the root it had when checked
        self._lock = threading.Lock()

    def __call__(self, pid: int, _mappings) -> None:
        key = roots.root_key(pid)
        if key is None or key in self.probed or self._checked.get(pid) == key:
            return
        name = procfs.comm(pid)
        if name is None or (self.comm is not None and name != self.comm):
            return  # checked again at its next change (an exec may give it the name)
        try:
            root = roots.root_link(pid)
        except OSError:
            return
        taken = self.adopt(pid, key, name, root) if self.adopt else False
        if taken is None:
            return
        self._checked[pid] = key
        if not taken:
            self.record(pid, name, root)

    def record(self, pid: int, name: str, root: str) -> None:
        """A process of the target that is not traced: named now, counted in the report."""
        with self._lock:
            self.found[pid] = {"pid": pid, "comm": name, "root": root}
        self.say(
            f"note: pid {pid} ({name}) runs in a root none of the target's processes had at start "
            f"({root}): its libraries are not probed, so it is not traced; --backend bcc follows it"
        )

    def processes(self) -> List[dict]:
        with self._lock:
            return [dict(p) for p in self.found.values()]

    def note(self) -> Optional[str]:
        found = self.processes()
        if not found:
            return None
        named = ", ".join(f"{p['pid']} ({p['comm']}, root {p['root']})" for p in found[:SHOWN])
        more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        return (
            f"{len(found)} process(es) of the target ran in a root that appeared after tracing began, whose "
            f"libraries are not probed, and were not traced: pid {named}{more}; --backend bcc follows them"
        )
