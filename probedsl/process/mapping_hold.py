"""Processes held at each mmap of a file's code until the unwinder has that file's rows.

A launched command's code that was just mapped (a library dlopen'd by ctypes, the libraries
of a new image after an exec through `sh -c`, `env` or a shim) would otherwise run before the
mapping tracker has told the unwinder about it, and its stacks would fall back to the
frame-pointer walk. The BPF program (bcc.c.j2, sys_exit_mmap) sends such a process SIGSTOP
as its mmap returns and marks it in probedsl_unw_held; each turn of the mapping tracker's
thread continues the marked ones once what the kernel reported is applied.

Order is what makes it safe: BPF sends the stop before it marks, and this reads the marks
before it drains the tracker (the kernel writes the mmap record before the system call
returns), so a process continued here has its new mapping in its unwind entry, and every
process stopped has a mark that is read at the next turn (20 ms at most). Ending the run
clears the switch the BPF program reads (no new stops), then continues every marked process,
those the Python frames' finalization hold marked too (probedsl_py_held: probedsl.drivers.bcc_python
continues them while the run lasts).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from typing import Callable, Dict, List

from probedsl import faults
from probedsl.process import hold_guard


FINALIZING_BOUND_S = 2.0  # the longest a CPython waits at its finalization for its names


class MappingHold:
    def __init__(self, bpf):
        self.marks = bpf["probedsl_unw_held"]
        self.switch = bpf["probedsl_unw_holding"]
        self.finalizing = bpf["probedsl_py_held"]  # the switch stops these too
        self._lock = threading.Lock()  # the tracker's thread and close() both release
        self.closed = False
        self.released = 0  # stops ended here (how many times code waited)
        self.longest_ns = 0  # the longest of them, from the stop to SIGCONT
        self.finalizing_bounded = 0  # CPythons let go at their finalization by the bound
        self._guard = -1  # the write end of the guard's pipe (probedsl.process.hold_guard)
        self._tracker = None  # the mapping tracker whose turns run this hold
        self._lost = 0  # its records lost, as of the last turn

    def start(self, tracker) -> None:
        self._tracker = tracker
        # before the first stop: whatever ends probedsl, a stopped process is continued
        self._guard = hold_guard.start((self.marks.map_fd, self.finalizing.map_fd), self.switch.map_fd)
        self.switch[ctypes.c_int(0)] = ctypes.c_uint32(1)

    def turn(self, drain: Callable[[], None]) -> None:
        """Continue the processes marked so far, after applying the mappings reported before
        their marks (drain tells the unwinder, which writes their entries)."""
        with self._lock:
            if self.closed:
                return
            self._bound_finalizing()
            pids = self._marked()
        if not pids:
            return
        faults.wait("mapping-hold")
        drain()
        lost = self._tracker.lost if self._tracker is not None else 0
        if lost > self._lost:  # records lost since: each one held is read whole (stopped: exact)
            self._lost = lost
            for pid in pids:
                self._tracker.snapshot(pid)
        with self._lock:
            if not self.closed:
                self._release(pids)

    def close(self) -> None:
        """No new stop; every marked process goes on. Safe to call twice."""
        with self._lock:
            if not self.closed:
                self.closed = True
                try:
                    self.switch[ctypes.c_int(0)] = ctypes.c_uint32(0)
                except Exception:  # BCC raises bare Exception: the maps are gone
                    pass
            self._release_all()
            if self._guard >= 0:
                # a stop sent just before the switch went off is marked just after
                hold_guard.stops_in_flight_done()
                self._release_all()
                hold_guard.done(self._guard)
                self._guard = -1

    def notes(self) -> List[str]:
        out = []
        if self.released:
            out.append(
                f"the command waited {self.released} times after mapping a file's code, until the unwinder "
                f"had its rows (longest {self.longest_ns / 1e6:.0f} ms)"
            )
        if self.finalizing_bounded:
            out.append(
                f"{self.finalizing_bounded} Python process(es) went on after {FINALIZING_BOUND_S:.0f} s held at "
                "their finalization before their frames were all named: stacks first seen then may read unreadable"
            )
        return out

    def _marked(self) -> Dict[int, int]:
        return marked(self.marks)

    def _bound_finalizing(self) -> None:
        """A CPython held at its finalization longer than FINALIZING_BOUND_S goes on (its
        frames' naming lags that much, or its thread died): counted, never left stopped."""
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        late = {p: t for p, t in marked(self.finalizing).items() if now - t > FINALIZING_BOUND_S * 1e9}
        if late:
            self.finalizing_bounded += len(release(self.finalizing, late, unless=self.marks))

    def _release_all(self) -> None:
        self._release(self._marked())
        release(self.finalizing, marked(self.finalizing))

    def _release(self, pids: Dict[int, int]) -> None:
        waited = release(self.marks, pids, unless=self.finalizing)
        self.released += len(waited)
        self.longest_ns = max([self.longest_ns, *waited])


def marked(marks) -> Dict[int, int]:
    """pid -> CLOCK_MONOTONIC ns of its stop, from a table of marks."""
    try:
        return {k.value: v.value for k, v in marks.items()}
    except Exception:  # BCC raises bare Exception: the maps are gone
        return {}


def release(marks, pids: Dict[int, int], unless=None) -> List[int]:
    """Unmarks and continues them (one still marked in unless, the other hold's table, is left
    to that hold: each unmarks before it looks, so one of the two continues it): how long each
    had waited (ns)."""
    now, waited = time.clock_gettime_ns(time.CLOCK_MONOTONIC), []
    for pid in pids:
        try:
            del marks[marks.Key(pid)]
        except Exception:  # BCC: KeyError, or bare Exception once closed
            pass
    held_there = marked(unless) if unless is not None else {}  # read after unmarking: see above
    for pid, stopped in pids.items():
        if pid in held_there:
            continue
        try:
            os.kill(pid, signal.SIGCONT)
            waited.append(now - stopped)
        except ProcessLookupError:  # it ended meanwhile (killed while stopped)
            pass
    return waited
