"""Allocations of a process's other threads after its main thread ended alone (pthread_exit):
kept recorded where the backend can move its uprobes (probedsl.process.rebind), named in a
note where it cannot."""

from __future__ import annotations

import time
from typing import List


def watch(tether, driver, backend: str, scoped: bool, notes: List[str]) -> None:
    """The tether's bearer hook for this run. scoped: the backend's uprobes for the traced
    process are opened on one of its threads (else they match every process, and no thread's
    end loses anything for the process itself). BCC opens them again on a thread that runs on;
    bpftrace cannot: the loss is said, naming the process and when."""
    rebind = getattr(driver, "rebind", None)
    if tether is not None and getattr(driver, "bearer", 0):  # not its main thread, if that had ended
        tether.bearers.setdefault(tether.pid, driver.bearer)
    if tether is None or tether.on_bearer_end is not None or (rebind is None and not scoped):
        return
    started, said = time.monotonic(), set()

    def ended(pid: int, tid: int) -> None:
        lost = f"allocations after pid {pid}'s main thread ended ({time.monotonic() - started:.1f} s into the run)"
        if rebind is None:
            if pid == tether.pid and pid not in said:  # (children are traced by uprobes on every process)
                said.add(pid)
                notes.append(
                    f"{lost} are not recorded: {backend}'s uprobes are bound to that thread "
                    "(--backend bcc moves them to a thread that runs on)"
                )
            return
        if not tid:
            notes.append(f"{lost} are not recorded: no other thread of it stopped within 2 s to take its uprobes")
            return
        try:
            rebind(pid, tid)
        except Exception as exc:  # BCC raises bare Exception
            notes.append(f"{lost} are not recorded: {exc}")

    tether.on_bearer_end = ended
