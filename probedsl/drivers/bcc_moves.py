"""--comm --per-process: the uprobes of a process whose bearing thread ended alone, moved.

Each process's perf-event uprobes are opened on one of its threads, its main thread at first,
and match nothing once that thread has ended (probedsl.process.rebind says why). Without a tether there
is no stop at that thread's exit: the program notes the end (probedsl_bearer_ended, rung on the
doorbell), and at its next turn the loader opens the uprobes on a thread that runs. What the
process's threads did in between is not recorded; a note says so, with how long that was.
Links (probedsl.drivers.bcc_uprobes) are the whole process's: they need no move.
"""

from __future__ import annotations

import ctypes
import time
from typing import List

from probedsl.process.procfs import live_threads


class Moves:
    def __init__(self) -> None:
        self.notes: List[str] = []

    def bear(self, loader, pid: int, tid: int) -> None:
        """The process's uprobes were opened on thread tid: not its main thread when that had
        ended alone before the process was found, and then tid's end is the one watched."""
        if tid != pid and loader.per_process and not loader.uprobes.links:
            loader.bpf["probedsl_bearers"][ctypes.c_uint32(pid)] = ctypes.c_uint32(tid)

    def everywhere(self, pid: int) -> None:
        """Links: pid's main thread ended alone (or had ended when it was found)."""
        self.notes.append(
            f"pid {pid}'s main thread ended alone: the kernel keeps a uprobe link's breakpoints only in "
            "the memory of its process's main thread, so from then on probedsl kept them in every process "
            f"mapping the probed files (nothing of pid {pid} is lost; other processes pay the uprobe's trap, "
            "~1-2 us a call, until the run ends)"
        )

    def check(self, loader) -> None:
        """Once a turn: each attached process whose bearer ended while other threads run gets
        its uprobes on the first of those (BccLoader.rebind)."""
        ended = loader.bpf["probedsl_bearer_ended"]
        for key, when in list(ended.items()):
            pid = key.value
            del ended[key]
            if loader.uprobes.links:  # matched by thread group: kept in its memory (bcc_uprobes.Links)
                with loader.lock:
                    loader._keep_everywhere(pid)
                continue
            bearer = loader.bpf["probedsl_bearers"].get(ctypes.c_uint32(pid))
            who = f"thread {bearer.value}" if bearer else "main thread"
            lost = f"allocations of pid {pid}'s other threads after its {who} ended alone"
            live = live_threads(pid) if pid in loader.attached else []
            try:
                if live:
                    loader.rebind(pid, live[0])
                    loader.bpf["probedsl_bearers"][ctypes.c_uint32(pid)] = ctypes.c_uint32(live[0])
            except Exception as exc:  # BCC raises bare Exception
                self.notes.append(f"{lost} (pthread_exit) are not recorded: {exc}")
                continue
            ms = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - when.value) / 1e6
            if live:
                self.notes.append(
                    f"{lost} (pthread_exit), for the {ms:.0f} ms until probedsl moved its uprobes to thread "
                    f"{live[0]}, are not recorded: they were bound to that thread (--comm --per-process "
                    "holds no process; --comm alone, --pid and -- CMD lose nothing)"
                )
            elif pid in loader.attached:
                self.notes.append(
                    f"{lost} (pthread_exit) are not recorded: its uprobes were bound to that thread, and the "
                    f"process ended within {ms:.0f} ms (--comm --per-process holds no process; --comm alone, "
                    "--pid and -- CMD lose nothing)"
                )
