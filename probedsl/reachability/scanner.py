"""--reachability for a run: hold the traced process (probedsl.process.tether), and at each report
and at its exit pause it, take the tracer's snapshot, classify its blocks (probedsl.reachability.heapscan)."""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple

from probedsl import ir, report
from probedsl.errors import ProbedslError
from probedsl.process.procfs import process_alive
from probedsl.drivers.rundata import Snapshot
from probedsl.process.tether import Tether


def check_options(reachability: bool, leaks_only: bool, pid: Optional[int], command: List[str], sample: int) -> None:
    """Refuse, in one line, what --reachability cannot do (before a command is started)."""
    if leaks_only and not reachability:
        raise ProbedslError("--leaks-only goes with --reachability (it hides the blocks a scan finds still reachable)")
    if not reachability:
        return
    if pid is None and not command:
        raise ProbedslError("--reachability goes with --pid PID or -- CMD: it pauses and scans one process")
    if sample > 1:
        raise ProbedslError("--reachability needs every block (--sample 1): a block not recorded cannot be classified")


def check_program(program: ir.Program) -> None:
    if not any(r.block_address is not None for r in program.resources):
        raise ProbedslError(
            f"--reachability: {program.name} has no resource of memory blocks (keyed by "
            "(pid, address), with a size, acquired by uprobes)"
        )


class Scanner:
    def __init__(
        self, program: ir.Program, driver, pid: int, leaks_only: bool, exec_hold=None, tether: Optional[Tether] = None
    ):
        """Attach to `pid` (ProbedslError, one line, when the system refuses), or use the
        tether already holding it (one that follows its forks)."""
        self.program, self.driver, self.leaks_only = program, driver, leaks_only
        if tether is None:
            tether = Tether(pid, exec_hold)
            tether.start()
        self.tether = tether
        self.pid = pid
        self.notes: List[str] = []  # for the final report: why there are no kinds
        self.exit_kinds: Optional[report.Reachability] = None
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
        self.at_exit()
        kinds = self.exit_kinds
        if kinds is None and self.tether.attached and process_alive(self.pid):
            snap, kinds = self.scan(stop)
        else:
            snap = stop()
        self.tether.close()
        if kinds is None and not self.notes:
            self.notes.append(
                f"--reachability: process {self.pid} ended without stopping at its exit (killed by "
                "SIGKILL?): its blocks were not scanned"
            )
        return snap, kinds

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
        try:
            snap = take_snapshot()
            if snap is None or snap.live is None:
                self._failed("the tracer gave no snapshot")
                return snap, None
            heaps = [r for r in self.program.resources if r.block_address is not None]
            blocks = [
                (l.key[r.block_address], l.size)
                for r in heaps
                for l in snap.live
                if l.resource == r.name and l.pid == pid
            ]
            untracked = sum(t.untracked for t in snap.totals.values())
            # --pid: what it allocated before the probes were attached is unknown
            known = self.program.scope.mode == "cmd" and not untracked
            try:
                result = heapscan.classify(pid, paused, [a for a, _ in blocks], [n for _, n in blocks], known)
            except OSError as exc:
                self._failed(f"process {pid} ended during the scan ({exc.strerror})")
                return snap, None
            if not process_alive(pid):
                self._failed(f"process {pid} ended during the scan (killed?)")
                return snap, None
        finally:
            (tether.release_exit if at_exit else tether.resume)()
        kinds = {(pid, a): report.KINDS[k] for (a, _), k in zip(blocks, result.kinds.tolist())}
        scan = {
            "pid": pid,
            "at": "exit" if at_exit else "report",
            "blocks": len(blocks),
            "scanned_bytes": result.scanned_bytes,
            "scan_s": round(result.seconds, 3),
            "pause_ms": round((time.monotonic() - started) * 1000, 1),
        }
        names = {r.name for r in heaps}
        others = sum(1 for l in snap.live if l.pid != pid and l.resource in names)
        notes = list(result.notes)
        if others:
            notes.append(
                f"--reachability scans process {pid} only: {others} live blocks of other processes are not_scanned"
            )
        if not known:
            why = f"{untracked} were not tracked" if untracked else "it allocated before probedsl attached"
            notes.append(
                f"--reachability: some blocks of process {pid} may be unknown ({why}): the heap outside "
                "the known blocks counts as roots, so none is called lost because of them (a freed "
                "chunk's stale word may keep one reachable)"
            )
        return snap, report.Reachability(kinds, scan, self.leaks_only, notes)

    def _failed(self, why: str) -> None:
        self.notes.append(f"--reachability: {why}: no leak kinds")
