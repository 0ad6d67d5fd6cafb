"""A launched CPython command held at its exit until its stacks are read: their Python frames
are named from its memory (probedsl.stacks.pyframes), and a code object can be freed as the
program ends (its __main__ module's is). --reachability's scan holds it the same way."""

from __future__ import annotations

import os
from typing import List, Optional

from probedsl.errors import ProbedslError
from probedsl.process import procfs
from probedsl.process.tether import Tether
from probedsl.stacks import pyframes


class ExitHold:
    def __init__(self, tether: Tether):
        self.tether = tether

    @classmethod
    def start(
        cls, pid: int, exe: str, exec_hold, notes: List[str], follower: Optional[Tether] = None
    ) -> Optional["ExitHold"]:
        """Holds the command (blocked before its exec) when it is a CPython; a refusal is a note.
        follower: the tether already holding it (following its forks), which then holds its exit."""
        if not pyframes.is_interpreter(exe):
            return None
        if follower is not None:
            follower.hold_exit = True
            return cls(follower)
        tether = Tether(pid, exec_hold, purpose="naming Python frames")
        try:
            tether.start()
        except ProbedslError as exc:
            notes.append(f"{exc}: Python frames of code that ended with the command may be unnamed")
            return None
        return cls(tether)

    def at_exit(self, driver) -> None:
        """Held at its exit: its stacks read (named), then it goes."""
        if self.tether.at_exit.is_set():
            try:
                driver.snapshot(timeout=30)
            finally:
                self.tether.release_exit()

    def close(self) -> None:
        self.tether.close()


def bpftrace_note(backend: str, mode: str, pid: int, exe: str) -> str:
    """bpftrace's frame-pointer stacks cannot carry Python frames: said once for a CPython."""
    if backend != "bpftrace" or mode not in ("pid", "cmd"):
        return ""
    if exe:
        return pyframes.bpftrace_note(exe)
    try:
        exe = f"{procfs.proc_dir(pid)}/exe"  # (a live thread's once the leader ended alone)
        name = os.readlink(exe)
    except OSError:  # it ended as tracing began (an exiting process has no exe)
        return ""
    # read through the magic link: the path names a file in the process's own root
    return pyframes.bpftrace_note(exe, name=name)
