"""`-- CMD`'s held command, run for real: held at its exec while something is loaded, then let
go whatever happens; signals that arrive while it is held reach it."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from probedsl.process import procfs
from probedsl.process.launcher import HeldCommand
from probedsl.process.tether import Tether


def test_a_command_held_at_exec_is_let_go_when_the_callback_fails():
    held = HeldCommand(["sh", "-c", "exit 7"])
    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("loading failed")

    with pytest.raises(RuntimeError):
        held.release(at_exec=fail)
    assert calls == [1]
    assert held.wait() == 7  # it ran to its end after all


@pytest.mark.parametrize("by", ["launcher", "tether"])
def test_a_command_is_held_at_its_exec_while_at_exec_runs(by):
    """Stopped at the exec: its new image is in, its loader has mapped nothing yet (the mapping
    hold holds each library later, probedsl.process.mapping_hold); by the launcher alone, or by
    the tether that follows it (then a signal sent meanwhile reaches it once it goes on)."""
    held = HeldCommand(["sh", "-c", "sleep 30; exit 3"])
    shell = os.path.realpath(held.exe)
    seen = []

    def at_exec() -> None:
        with open(f"/proc/{held.pid}/maps") as f:
            maps = f.read()
        seen.append((procfs.status_field(held.pid, "State")[0], shell in maps, "libc.so" in maps))
        if by == "tether":
            os.kill(held.pid, signal.SIGTERM)

    tether = None
    if by == "tether":
        tether = Tether(held.pid, hold_exit=False, launched=True, purpose="following forks")
        tether.hold_exec(at_exec)
        tether.start()
    try:
        held.release(at_exec=at_exec, tether=tether)  # (as the session does: back once at_exec ran)
        if by == "launcher":
            os.kill(held.pid, signal.SIGTERM)
        assert seen == [("t", True, False)], seen
        assert held.wait() == 128 + signal.SIGTERM
    finally:
        if tether is not None:
            tether.close()


def test_a_signal_sent_while_held_reaches_the_command():
    held = HeldCommand(["sleep", "30"])
    held.release(at_exec=lambda: os.kill(held.pid, signal.SIGTERM))
    assert held.wait() == 128 + signal.SIGTERM


@pytest.mark.parametrize("ended_by", ["kill", "close", "kill, abandoned at once"])
def test_a_followed_command_killed_before_release_is_reaped_by_its_tether(ended_by):
    """The tether that follows a command from before its exec reaps it when it is killed; the
    command abandoned (the probes failed) then takes its status from the tether, whether the
    tether ended with it or was closed first (the session's cleanup order)."""
    held = HeldCommand(["true"])
    tether = Tether(held.pid, hold_exit=False, launched=True, purpose="following forks")
    tether.start()
    held.tether = tether
    os.kill(held.pid, signal.SIGKILL)
    if ended_by == "close":
        tether.close()
    if ended_by != "kill, abandoned at once":  # else: while the tether may be reaping it
        assert tether.ended.wait(30)
    held.abandon()
    assert held.status == 128 + signal.SIGKILL
    if ended_by == "kill":
        assert tether.exit_status == 128 + signal.SIGKILL  # the tether reaped it, not abandon
    tether.close()


def test_the_run_loop_wakes_as_the_traced_process_ends():
    """procfs.Ending: the loop's pause ends as the process does (its pidfd becomes readable),
    then short pauses while whoever reaps it has not yet; nothing to wake on without a pid."""
    child = subprocess.Popen(["sleep", "600"])
    end = procfs.Ending(child.pid)
    try:
        pause, wake = end.turn(0.05)
        assert pause == 0.05 and wake is not None
        child.kill()
        procfs.pause(600, wake)  # returns as it ends (else the test times out)
        assert end.turn(0.05) == (procfs.Ending.QUICK_S, None)
        child.wait()
    finally:
        end.close()
        child.kill()
        child.wait()
    assert procfs.Ending(0).turn(0.05) == (0.05, None)


def test_a_wait_for_a_child_returns_as_it_ends():
    """procfs.await_end (the report's addr2line runs): back as the child ends, not reaped yet;
    back after the time while it runs."""
    child = subprocess.Popen(["sleep", "600"])
    try:
        procfs.await_end(child.pid, 0.01)
        assert child.poll() is None
        child.kill()
        procfs.await_end(child.pid, 600)  # returns as it ends (else the test times out)
        assert os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    finally:
        child.kill()
        child.wait()
