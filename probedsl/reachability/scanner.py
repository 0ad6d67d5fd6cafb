"""--reachability for a run: hold the traced process (probedsl.process.tether), and at each report
and at its exit pause it, take the tracer's snapshot, classify its blocks (probedsl.reachability.heapscan)."""

from __future__ import annotations

import threading
import time
from typing import Callable, List, Optional, Tuple

from probedsl import ir, report
from probedsl.errors import ProbedslError
from probedsl.process.procfs import process_alive
from probedsl.drivers.rundata import Live, Snapshot, Totals
from probedsl.process.tether import Paused, Tether
from probedsl.process.tree_tether import TreeTether
from probedsl.reachability import tree


def check_options(reachability: bool, leaks_only: bool, pid: Optional[int], command: List[str], sample: int) -> None:
    """Refuse, in one line, what --reachability cannot do (before a command is started)."""
    if leaks_only and not reachability:
        raise ProbedslError("--leaks-only goes with --reachability (it hides the blocks a scan finds still reachable)")
    if not reachability:
        return
    if pid is None and not command:
        raise ProbedslError(
            "--reachability goes with --pid PID or -- CMD: it holds and scans that process and its children"
        )
    if sample > 1:
        raise ProbedslError("--reachability needs every block (--sample 1): a block not recorded cannot be classified")


def check_program(program: ir.Program) -> None:
    if not any(r.block_address is not None for r in program.resources):
        raise ProbedslError(
            f"--reachability: {program.name} has no resource of memory blocks (keyed by "
            "(pid, address), with a size, acquired by uprobes)"
        )


class Serialized:
    """The driver, its tables read one at a time: a child's exit scan reads them from the
    tether's thread while the session may take a snapshot (or stop) from its own."""

    def __init__(self, driver):
        self._driver, self._lock = driver, threading.Lock()

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        with self._lock:
            return self._driver.snapshot(timeout)

    def stop(self, timeout: float = 30) -> Optional[Snapshot]:
        with self._lock:
            return self._driver.stop(timeout)

    def live_of(self, pid: int):
        live_of = getattr(self._driver, "live_of", None)
        if live_of is None:
            return None
        with self._lock:
            return live_of(pid)


class Scanner:
    def __init__(
        self,
        program: ir.Program,
        driver,
        pid: int,
        leaks_only: bool,
        exec_hold=None,
        tether: Optional[Tether] = None,
        children: bool = False,
    ):
        """Attach to `pid` (ProbedslError, one line, when the system refuses), or use the
        tether already holding it (one that follows its forks). children: hold each process it
        forks (and theirs) at its exit too, and scan it there (driver: a Serialized one)."""
        self.program, self.driver, self.leaks_only = program, driver, leaks_only
        if tether is None:
            tether = TreeTether(pid, exec_hold, forks=children)
            tether.start()
            if children:
                tether.follow(lambda child: None)
        if children and isinstance(tether, TreeTether):
            tether.on_child_exit = self._child_exit
        self.tether = tether
        self.pid = pid
        self.notes: List[str] = []  # for the final report: why there are no kinds
        self.exit_kinds: Optional[report.Reachability] = None
        self.tree = tree.Tree()
        self.heaps = [r for r in program.resources if r.block_address is not None]
        from probedsl.reachability import heapscan

        heapscan.prepare(pid)  # libc's symbols, read now rather than in a pause

    def close(self) -> None:
        self.tether.close()

    def at_exit(self) -> None:
        """When the process is held at its exit with its memory: scan it for the final report."""
        if self.tether.at_exit.is_set():
            _, self.exit_kinds = self.scan(lambda: self.driver.snapshot(timeout=30), at_exit=True)

    def final(self, stop: Callable[[], Optional[Snapshot]]) -> Tuple[Optional[Snapshot], Optional[report.Reachability]]:
        """The final snapshot (stop()) and its kinds: from the exit scan, or scanned now if the
        process runs on (Ctrl-C, --duration); then the process is let go."""
        try:
            self.at_exit()
        except Exception as exc:  # (BCC raises bare Exception) the final snapshot is still taken
            self._failed(f"the scan at its exit failed ({exc})")
        kinds = self.exit_kinds
        if kinds is None and self.tether.attached and process_alive(self.pid):
            snap, kinds = self.scan(stop)  # with the children's kinds, when the scan is done
            self.tether.close()
            if kinds is None and self.tree.scans:
                kinds = self.tree.merged(None, snap, self.heaps, self.leaks_only)
            return snap, kinds
        snap = stop()
        self.tether.close()
        if kinds is None and not self.notes:
            self.notes.append(
                f"--reachability: process {self.pid} ended without stopping at its exit (killed by "
                "SIGKILL?): its blocks were not scanned"
            )
        if kinds is None and not self.tree.scans:
            return snap, None
        return snap, self.tree.merged(kinds, snap, self.heaps, self.leaks_only)

    def _child_exit(self, pid: int, paused: Paused, execed: bool) -> None:
        """A child held at its exit (in the tether's thread): its blocks classified, kept in the tree."""
        from probedsl.reachability import heapscan

        started = time.monotonic()
        try:
            snap = self._live_of(pid)
            if snap is None or snap.live is None:
                self.tree.failed(pid, "the tracer gave no snapshot at its exit")
                return
            blocks = self._blocks(snap, pid)
            untracked = sum(t.untracked for t in snap.totals.values())
            # a forked copy that did not exec holds its parent's blocks, unknown as its own
            known = execed and not untracked
            result = heapscan.classify(pid, paused, [a for a, _ in blocks], [n for _, n in blocks], known)
        except Exception as exc:  # the child goes on exiting; its blocks are said not scanned
            self.tree.failed(pid, f"its scan failed ({exc})")
            return
        kinds = {(pid, a): report.KINDS[k] for (a, _), k in zip(blocks, result.kinds.tolist())}
        scan = self._scan_record(pid, "exit", blocks, result, started, snap, kinds)
        scan["command"] = tree.command_of(heapscan.memory_of(pid, paused))
        if not known:
            scan["known"] = False
        self.tree.add(kinds, scan)

    def _live_of(self, pid: int) -> Optional[Snapshot]:
        """The process's live blocks: read alone where the driver can (BCC), else a snapshot."""
        live_of = getattr(self.driver, "live_of", None)
        got = live_of(pid) if live_of is not None else None
        if got is None:
            return self.driver.snapshot(timeout=30)
        entries, untracked = got
        live = [Live(resource=r, key=key, time_ns=0, size=size, pid=pid) for r, key, size in entries]
        return Snapshot(time.monotonic_ns(), live, {"": Totals(untracked=untracked)})

    def _blocks(self, snap: Snapshot, pid: int) -> List[Tuple[int, int]]:
        return [
            (l.key[r.block_address], l.size)
            for r in self.heaps
            for l in snap.live
            if l.resource == r.name and l.pid == pid
        ]

    def _scan_record(self, pid, at, blocks, result, started, snap, kinds) -> dict:
        """The JSON's reachability_scans entry of one process."""
        return {
            "pid": pid,
            "at": at,
            "blocks": len(blocks),
            "scanned_bytes": result.scanned_bytes,
            "scan_s": round(result.seconds, 3),
            "pause_ms": round((time.monotonic() - started) * 1000, 1),
            "resources": tree.per_resource(
                self.program,
                lambda r: [
                    (l.pid, l.key[r.block_address], l.size) for l in snap.live if l.resource == r.name and l.pid == pid
                ],
                kinds,
            ),
        }

    def scan(self, take_snapshot, at_exit: bool = False) -> Tuple[Optional[Snapshot], Optional[report.Reachability]]:
        """Pause every thread, take the snapshot, classify the process's blocks, let it go
        (whatever happens meanwhile): (snapshot, kinds or None)."""
        from probedsl.reachability import heapscan

        tether, pid = self.tether, self.pid
        started = time.monotonic()
        paused = tether.pause()
        if paused is None:
            self._failed(f"process {pid} ended before it could be scanned")
            return take_snapshot(), None
        task = heapscan.memory_of(pid, paused)
        command = tree.command_of(task)  # while it is held (at its exit, gone once let go)
        try:
            snap = take_snapshot()
            if snap is None or snap.live is None:
                self._failed("the tracer gave no snapshot")
                return snap, None
            blocks = self._blocks(snap, pid)
            untracked = sum(t.untracked for t in snap.totals.values())
            # --pid: what it allocated before the probes were attached is unknown
            known = self.program.scope.mode == "cmd" and not untracked
            try:
                result = heapscan.classify(pid, paused, [a for a, _ in blocks], [n for _, n in blocks], known)
            except OSError as exc:
                self._failed(f"process {pid} ended during the scan ({exc.strerror})")
                return snap, None
            if not process_alive(task):
                self._failed(f"process {pid} ended during the scan (killed?)")
                return snap, None
        finally:
            (tether.release_exit if at_exit else tether.resume)()
        kinds = {(pid, a): report.KINDS[k] for (a, _), k in zip(blocks, result.kinds.tolist())}
        scan = self._scan_record(pid, "exit" if at_exit else "report", blocks, result, started, snap, kinds)
        scan["command"] = command
        notes = list(result.notes)
        if not known:
            why = f"{untracked} were not tracked" if untracked else "it allocated before probedsl attached"
            notes.append(
                f"--reachability: some blocks of process {pid} may be unknown ({why}): the heap outside "
                "the known blocks counts as roots, so none is called lost because of them (a freed "
                "chunk's stale word may keep one reachable)"
            )
        own = report.Reachability(kinds, scan, self.leaks_only, notes)
        return snap, (own if at_exit else self.tree.merged(own, snap, self.heaps, self.leaks_only))

    def _failed(self, why: str) -> None:
        self.notes.append(f"--reachability: {why}: no leak kinds")
