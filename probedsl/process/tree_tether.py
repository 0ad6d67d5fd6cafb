"""A tether (probedsl.process.tether) that also holds each child process it follows at that
child's exit, every thread stopped with its memory intact, calls on_child_exit(pid, paused,
execed) in the tether's thread (a scan), and lets it finish exiting. A child that execs is held
at the exit of its last image (an exec is no exit). Without on_child_exit it is a plain tether.

The hold is taken in the tether's thread, where the exit stop is seen: no round trip through
the session, so a tree of short-lived processes costs one scan each and nothing more.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Set

from probedsl.process import ptrace
from probedsl.process.tether import Paused, Tether, Thread, all_exited

ChildExit = Callable[[int, Paused, bool], None]


class TreeTether(Tether):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_child_exit: Optional[ChildExit] = None
        self.execed: Set[int] = set()  # children that exec'd since their fork: every block is theirs

    def _event(self, tid: int, status: int) -> None:
        thread = self._threads.get(tid)
        if thread is not None and os.WIFSTOPPED(status) and status >> 16 == ptrace.EVENT_EXEC:
            self.execed.add(thread.process)
        super()._event(tid, status)

    def _holds_exit(self, thread: Thread) -> bool:
        if thread.process == self.pid:
            return super()._holds_exit(thread)
        return self.on_child_exit is not None

    def _exit_complete(self) -> None:
        super()._exit_complete()
        if self.on_child_exit is None:
            return
        groups: Dict[int, Dict[int, Thread]] = {}
        for tid, th in self._threads.items():
            if th.process != self.pid:
                groups.setdefault(th.process, {})[tid] = th
        for process, group in groups.items():
            if all_exited(group.values()):
                self._scan_child(process, group)

    def _scan_child(self, process: int, group: Dict[int, Thread]) -> None:
        registers, vectors = ptrace.stopped_registers(tid for tid, th in group.items() if th.state == "exit")
        try:
            if registers and self.on_child_exit is not None:
                self.on_child_exit(process, Paused(registers, (), vectors), process in self.execed)
        finally:
            self.execed.discard(process)
            for tid, th in group.items():
                if th.state == "exit":
                    self._go(tid, th)
                    th.state = "gone"  # its end (WIFEXITED) takes it out
