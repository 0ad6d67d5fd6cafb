"""The mapping hold's end (probedsl.process.hold_guard): its stops in flight are awaited."""

from __future__ import annotations

from probedsl.process import hold_guard


def test_stops_in_flight_are_awaited_by_a_grace_period_or_else_a_pause(monkeypatch):
    """Ending a hold: after the switch goes off, the second pass waits for an RCU grace period
    (membarrier), which every BPF program that read the switch on has ended by; where the kernel
    refuses it (nohz_full) or has one CPU online (no grace period waited), the pause instead."""
    calls, pauses = [], []
    monkeypatch.setattr(hold_guard.time, "sleep", pauses.append)
    monkeypatch.setattr(hold_guard.os, "sysconf", lambda name: 2)  # (whatever CPUs this machine has)
    monkeypatch.setattr(hold_guard, "_libc", type("L", (), {"syscall": lambda self, *a: calls.append(a) or 0})())
    hold_guard.stops_in_flight_done()
    assert calls == [(hold_guard._SYS_MEMBARRIER, 1, 0, 0)] and pauses == []
    monkeypatch.setattr(hold_guard, "_libc", type("L", (), {"syscall": lambda self, *a: -1})())
    hold_guard.stops_in_flight_done()
    assert pauses == [hold_guard.AGAIN_S]
    monkeypatch.setattr(hold_guard.os, "sysconf", lambda name: 1)
    monkeypatch.setattr(hold_guard, "_libc", type("L", (), {"syscall": lambda self, *a: calls.append(a) or 0})())
    hold_guard.stops_in_flight_done()
    assert pauses == [hold_guard.AGAIN_S] * 2 and len(calls) == 1
