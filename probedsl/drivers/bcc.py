"""The BCC driver: its program compiled (drivers.bcc_compile) while the session starts, loaded and
attached by drivers.bcc_loader, read by drivers.bcc_read; and the standalone loader's entry point."""

from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

from probedsl.drivers.bcc_compile import Compilation
from probedsl.process import procfs
from probedsl.process.procfs import map_memory
from probedsl.drivers.rundata import Snapshot
from probedsl.drivers.bcc_compat import _import_bcc
from probedsl.drivers.bcc_loader import BccLoader
from probedsl.trust import cachedir


class BccDriver:
    def __init__(self, program, generated):
        self.program, self.generated = program, generated
        self.loader: Optional[BccLoader] = None
        self._told = None  # the listener given to the mapping tracker
        self.held_forks = False  # set before start: a tether holds each child at its fork
        scope = program.scope
        self.pid = scope.pid if scope.mode in ("pid", "cmd") else 0
        # compiled while the session starts its tracker and the rest; loaded and attached in start()
        self.compiled = Compilation(_import_bcc(), generated.text, self.pid, cachedir.Kept("bcc-programs"))

    def start(self, timeout: float = 60) -> None:
        self.loader = BccLoader(self.generated.text, self.generated.manifest, self.pid, self.held_forks, self.compiled)
        self.compiled.keep()

    def trace_from_exec(self, pid: int) -> None:
        if self.loader is not None:
            self.loader.trace_from_exec(pid)

    def attach_child(self, pid: int) -> None:
        loader = self.loader
        if loader is not None:
            loader.attach_child(pid)

    @property
    def bearer(self) -> int:
        """The thread the traced process's uprobes were opened on (0: not scoped to one)."""
        return self.loader.bearer if self.loader is not None else 0

    def rebind(self, pid: int, tid: int) -> None:
        """A process's uprobes opened on its thread tid too (BccLoader.rebind)."""
        if self.loader is not None:
            self.loader.rebind(pid, tid)

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        return self.loader.snapshot()

    def live_of(self, pid: int):
        """One process's live entries, for --reachability's scan at its exit (BccReading.live_of)."""
        return self.loader.live_of(pid) if self.loader is not None else None

    def idle(self, seconds: float, wake: Optional[int] = None) -> None:
        """The run loop's pause between turns; with --per-process it ends as soon as a process
        takes the name, which is then attached at once."""
        if self.loader is not None and self.loader.ended_images is not None and self.loader.ended_images.due():
            self.loader.ended_images.sweep()
        if self.loader is not None and (self.loader.per_process or self.loader.watch_roots):
            self.loader.admit(wait_s=seconds)
        elif self.loader is not None and self.loader.held_forks:
            self.loader.reap(seconds, wake)
        else:
            procfs.pause(seconds, wake)

    def alive(self) -> bool:
        return self.loader is not None

    def stop(self, timeout: float = 30) -> Optional[Snapshot]:
        """The final snapshot; detaching waits for kill(), after the report is out (and goes
        on in the background: probedsl.drivers.teardown)."""
        return self.loader.snapshot(final=True) if self.loader is not None else None

    def unwind_memory(self) -> int:
        return self.loader.unwind.memory() if self.unwinds_stacks() else 0

    def unwinds_stacks(self) -> bool:
        return self.loader is not None and self.loader.unwind is not None

    def follow_mappings(self, tracker, preload, wanted=None, python=True) -> None:
        if self.loader is not None and self.loader.unwind is not None:
            unwind = self.loader.unwind
            unwind.preload(preload)
            python, walks = self.loader.python, python

            def told(pid, maps):
                if wanted is None or wanted(pid):
                    unwind.process(pid, maps)
                    python.process(pid, maps, walks)

            self._told = told
            tracker.listen(told)
            unwind.following = True
            if self.loader.hold is not None:
                tracker.on_turn(self.loader.hold.turn)
                self.loader.hold.start(tracker)

    def stop_following(self, tracker) -> None:
        if self.loader is not None and self.loader.unwind is not None:
            tracker.unlisten(self._told)
            if self.loader.hold is not None:
                tracker.off_turn(self.loader.hold.turn)
                self.loader.hold.close()
            self.loader.unwind.close()

    def notes(self) -> List[str]:
        if self.loader is not None and self.loader.per_process:
            self.loader.moves.check(self.loader)  # an end the last turn did not see yet
        moved = self.loader.moves.notes if self.loader is not None else []
        if not self.unwinds_stacks():
            return moved
        hold = self.loader.hold.notes() if self.loader.hold is not None else []
        return moved + self.loader.unwind.notes() + self.loader.python.notes() + hold

    def map_memory(self) -> int:
        return map_memory(os.getpid())

    def explain_failure(self) -> str:
        return "the BCC loader was closed" if self.loader is None else "no data"

    def kill(self) -> None:
        if self.loader is not None:
            self.loader.close(background=True)
            self.loader = None


def run_standalone(c_text: str, manifest: dict, argv: List[str]) -> int:
    """Entry point of a loader written by `probedsl compile --target bcc`: --pid PID
    (optional), until Ctrl-C, then the live totals."""
    pid = int(argv[argv.index("--pid") + 1]) if "--pid" in argv else 0
    loader = BccLoader(c_text, manifest, pid)
    print("tracing; Ctrl-C to print live resources", file=sys.stderr)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    snap = loader.snapshot(final=True)
    for name, t in snap.totals.items():
        groups = next(iter(snap.tallies.get(name, {}).values()), {})  # any tally covers every entry
        print(
            f"{name}: {sum(g[1] for g in groups.values())} live, {sum(g[0] for g in groups.values())} bytes; "
            f"{t.acquired} acquired, {t.released} released, {t.unknown_releases} unknown releases"
        )
    loader.close()
    return 0
