"""What the session asks of a backend's driver (one running program)."""

from __future__ import annotations

from typing import List, Optional, Protocol

from probedsl.drivers.rundata import Snapshot


class Driver(Protocol):
    def start(self, timeout: float = 60) -> None:
        """Load and attach everything; returns once every probe is attached (tracing has begun)."""

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        """The tracing state now; None if the tracer could not give it in time."""

    def idle(self, seconds: float, wake: Optional[int] = None) -> None:
        """The run loop's pause between turns (a driver may do its own work meanwhile), ended
        early when wake (a descriptor) becomes readable."""

    def alive(self) -> bool:
        """Whether the tracer still runs."""

    def stop(self, timeout: float = 30) -> Optional[Snapshot]:
        """The final snapshot; None if the tracer died without one."""

    def kill(self) -> None:
        """Detach and release everything; safe to call twice, and after a failed start."""

    def unwind_memory(self) -> int:
        """Bytes of kernel memory its stack unwinder's tables hold (0: none)."""

    def unwinds_stacks(self) -> bool:
        """Whether it unwinds user stacks itself (and so needs each process's mappings)."""

    def follow_mappings(self, tracker, preload: List[str], wanted=None, python: bool = True) -> None:
        """Be told of processes' mappings (probedsl.process.mappings.MappingTracker); preload: files a
        command about to start will map; wanted(pid): whether a process is traced (None: all);
        python: whether CPython processes get their Python frames walked.
        For a tracer that unwinds stacks itself."""

    def stop_following(self, tracker) -> None:
        """No more writes from mappings (the run is ending); one in progress has finished."""

    def notes(self) -> List[str]:
        """What the report should say of the driver's own losses (one line each)."""

    def map_memory(self) -> int:
        """Bytes of kernel memory its BPF maps hold."""

    def explain_failure(self) -> str:
        """One line on why the tracer ended or failed, for the user."""
