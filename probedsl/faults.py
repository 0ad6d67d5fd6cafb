"""Faults injected by the lifecycle tests: PROBEDSL_FAULTS=name[,name...] turns points on.

A point that waits says so on stderr ("probedsl: fault NAME reached") and waits until the file
PROBEDSL_FAULT_GATE exists (at most GATE_S), so a test acts at that moment (kills the target,
sends a signal) and then lets the run go on: tests wait for signals, never for time. Unset
(always, outside the tests), every point is a no-op.
"""

from __future__ import annotations

import os
import sys
import time

GATE_S = 60.0

# the points, where they sit, and what they do
POINTS = {
    "slow-listener": "the unwinder's mapping listener sleeps 0.2 s before each write from the tracker's thread",
    "listener-raises": "the mapping listener raises at its first call once tracing has begun",
    "attach": "waits before the driver attaches its probes",
    "exec-hold": "waits while a launched command is held at its exec",
    "final": "waits before the final snapshot",
    "report": "waits before each interval report's snapshot",
    "mapping-hold": "waits while a launched process is stopped by the mapping hold, before it is continued",
    "python-finalizing": "waits while a launched CPython is stopped as it begins finalization, before it is continued",
    "unwinder-busy": "the unwinder's scratch is marked busy on every CPU: each acquisition takes the path of one that preempted another's walk",
    "image-sweep": "says (without waiting) each time BCC's loader freed entries of ended process images",
}


def _active() -> frozenset:
    return frozenset(filter(None, os.environ.get("PROBEDSL_FAULTS", "").split(",")))


def on(name: str) -> bool:
    return name in _active()


def wait(name: str) -> None:
    """If the point is on: say so, then wait for the test's gate file."""
    if not on(name):
        return
    print(f"probedsl: fault {name} reached", file=sys.stderr, flush=True)
    gate = os.environ.get("PROBEDSL_FAULT_GATE", "")
    deadline = time.monotonic() + GATE_S
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


def say(name: str, detail: str) -> None:
    """If the point is on: say that it was reached, and what happened there (no wait)."""
    if on(name):
        print(f"probedsl: fault {name} reached: {detail}", file=sys.stderr, flush=True)
