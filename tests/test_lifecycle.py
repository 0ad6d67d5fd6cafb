"""The run's lifecycle under faults: every way a run can end ends with a report (or a one-line
error before tracing began), the documented exit status, no traceback, and the target running
or reaped, never stopped. Faults are injected at named points (probedsl.faults): the run says
when it reached one and waits for the test's gate file; the test acts, then opens the gate.
No fixed waits."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import BACKENDS, MEMLEAK, Held, by_site, report_json, stderr_line
from test_memleak_habits import json_documents
from test_tracing import child_named, wait_for_sleep

pytestmark = [pytest.mark.usefixtures("root_required"), pytest.mark.lifecycle]

INCOMPLETE = 3  # docs/usage.md: the report says "complete": false


class Gate:
    """PROBEDSL_FAULTS points held until open() (a file the run polls for)."""

    def __init__(self, *points):
        self.path = os.path.join(tempfile.mkdtemp(prefix="probedsl-gate-"), "open")
        self.env = dict(os.environ, PROBEDSL_FAULTS=",".join(points), PROBEDSL_FAULT_GATE=self.path)

    def open(self) -> None:
        with open(self.path, "w"):
            pass


def wait_said(proc, text: str) -> list:
    """stderr lines of proc up to the one containing text (fails if proc ends first)."""
    said = []
    while not said or text not in said[-1]:
        said.append(stderr_line(proc))
        if not said[-1]:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before saying {text!r}: {''.join(said) + err}")
    return said


def hangup_default() -> None:
    """SIGHUP as a terminal's process has it: the suite may itself run under nohup (SIGHUP
    ignored, inherited), where probedsl rightly keeps ignoring it."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def run_tracer(*args, env=None, stdin=None):
    return subprocess.Popen(
        [sys.executable, "-m", "probedsl", "run", MEMLEAK, "--format", "json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=stdin,
        text=True,
        env=env,
        preexec_fn=hangup_default,
    )


def stop(target: Held) -> None:
    """End a Held target whatever it was told (go() leaves it sleeping for its AFTER_S)."""
    if target.proc.poll() is None:
        target.proc.kill()
    target.end()


@contextlib.contextmanager
def pid_run(exe: str, after_s: str, backend: str, env=None, said: str = "probedsl: tracing"):
    """A leak_delayed target traced by pid: (target, tracer) once the run said `said`; the
    target is ended afterwards, whatever it was told."""
    target = Held([exe, "wait", after_s])
    tracer = run_tracer("--backend", backend, "--pid", str(target.pid), env=env)
    try:
        wait_said(tracer, said)
        yield target, tracer
    finally:
        stop(target)


def assert_clean(err: str) -> None:
    assert "Traceback" not in err and "Exception in thread" not in err, err


def state(pid: int) -> str:
    """The process's state letter (R, S, T, Z...), '' once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def assert_not_stopped(pid: int) -> None:
    assert state(pid) not in ("T", "t"), f"pid {pid} was left stopped"


# --- threads that feed the kernel maps ---------------------------------------------------


def test_a_slow_mapping_listener_does_not_outlive_the_maps(build):
    """The shutdown race: the tracker's thread hands mappings to the unwinder while the run
    ends; each write waits 0.2 s, so some are still queued when the command has exited."""
    result = subprocess.run(
        [sys.executable, "-m", "probedsl", "run", MEMLEAK, "--backend", "bcc", "--format", "json", "--", build("leak")],
        input="\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=Gate("slow-listener").env,
    )
    assert_clean(result.stderr)
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert by_site(report).get("wrapper1") == (40, 5)
    assert report["complete"] is True, report["incomplete"]


def test_a_listener_that_raises_is_a_note_and_an_incomplete_report(build):
    result = subprocess.run(
        [sys.executable, "-m", "probedsl", "run", MEMLEAK, "--backend", "bcc", "--format", "json", "--", build("leak")],
        input="\n",
        capture_output=True,
        text=True,
        timeout=300,
        env=Gate("listener-raises").env,
    )
    assert_clean(result.stderr)
    assert result.returncode == INCOMPLETE, result.stderr
    report = report_json(result.stdout)
    assert by_site(report).get("wrapper1") == (40, 5)  # what was measured is unchanged
    assert report["complete"] is False
    assert any("mapping listener" in why and "injected listener fault" in why for why in report["incomplete"])


# --- the target ends at each stage -------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_target_exits_during_attach(backend, build):
    gate = Gate("attach")
    with pid_run(build("leak_delayed"), "0", backend, gate.env, said="fault attach reached") as (target, tracer):
        target.proc.kill()
        target.proc.wait()
        gate.open()
        out, err = tracer.communicate(timeout=120)
    assert_clean(err)
    if "probedsl: tracing" in err:  # attached before it was gone: a report, as usual
        assert tracer.returncode == 0, err
        report_json(out)
    else:  # a one-line error, before tracing began
        assert tracer.returncode == 1, err
        assert err.strip().splitlines()[-1].startswith("probedsl: error: "), err


def test_the_held_command_killed_during_attach(build):
    """`-- CMD` on BCC: the command (a copy of probedsl blocked before its exec, followed by the
    fork tether) is killed while the probes go on: a one-line error or a report, never a
    traceback (the tether may have reaped it first)."""
    gate = Gate("attach")
    tracer = run_tracer("--backend", "bcc", "--", build("leak_delayed"), "0", "0", env=gate.env)
    try:
        wait_said(tracer, "fault attach reached")
        with open(f"/proc/{tracer.pid}/task/{tracer.pid}/children") as f:
            (held,) = [int(p) for p in f.read().split()]
        os.kill(held, signal.SIGKILL)
        gate.open()
        out, err = tracer.communicate(timeout=120)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.communicate()
    assert_clean(err)
    if "probedsl: tracing" in err:  # attached before it was gone: a report; the command's status
        assert tracer.returncode == 128 + signal.SIGKILL, err
        report_json(out)
    else:  # a one-line error, before tracing began
        assert tracer.returncode == 1, err
        assert err.strip().splitlines()[-1].startswith("probedsl: error: "), err


def test_the_command_exits_during_the_loader_hold(build):
    """BCC with dwarf stacks holds `-- CMD` at its exec until its libraries have rows."""
    gate = Gate("exec-hold")
    tracer = run_tracer("--backend", "bcc", "--", build("leak_delayed"), "0", "60", env=gate.env)
    command = 0
    try:
        wait_said(tracer, "fault exec-hold reached")
        command = child_named(tracer.pid, "leak_delayed")
        os.kill(command, signal.SIGKILL)
        gate.open()
        out, err = tracer.communicate(timeout=120)
    finally:
        for pid in (tracer.pid, command):
            if pid and state(pid):
                os.kill(pid, signal.SIGKILL)
    assert_clean(err)
    assert tracer.returncode == 128 + signal.SIGKILL, err  # the command's status, as always
    report = report_json(out)
    assert report["exit_status"] == 128 + signal.SIGKILL and report["final"] is True
    assert state(command) == ""  # reaped


def test_the_target_exits_while_a_slow_listener_writes_rows(build):
    with pid_run(build("leak_delayed"), "0", "bcc", Gate("slow-listener").env) as (target, tracer):
        target.go()  # allocates, then exits; the listener lags
        out, err = tracer.communicate(timeout=300)
    assert_clean(err)
    assert tracer.returncode == 0, err
    assert by_site(report_json(out)).get("wrapper1") == (40, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_target_exits_during_the_final_snapshot(backend, build):
    gate = Gate("final")
    with pid_run(build("leak_delayed"), "600", backend, gate.env) as (target, tracer):
        target.go()
        tracer.send_signal(signal.SIGTERM)
        wait_said(tracer, "fault final reached")
        target.proc.kill()
        target.proc.wait()
        gate.open()
        out, err = tracer.communicate(timeout=120)
    assert_clean(err)
    assert tracer.returncode == 0, err
    report = report_json(out)
    assert report["final"] is True and report["complete"] is True, report["incomplete"]


# --- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_sigint_during_the_final_report_does_not_lose_it(backend, build):
    gate = Gate("final")
    with pid_run(build("leak_delayed"), "600", backend, gate.env) as (target, tracer):
        tracer.send_signal(signal.SIGINT)
        wait_said(tracer, "fault final reached")
        tracer.send_signal(signal.SIGINT)
        wait_said(tracer, "writing the final report")
        gate.open()
        out, err = tracer.communicate(timeout=120)
        assert_not_stopped(target.pid)
        assert state(target.pid) != "", "the target was ended"
    assert_clean(err)
    assert tracer.returncode == 0, err
    assert report_json(out)["final"] is True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_and_sighup_end_a_pid_run_with_its_report(backend, signum, build):
    with pid_run(build("leak_delayed"), "600", backend) as (target, tracer):
        target.go()
        tracer.send_signal(signum)
        out, err = tracer.communicate(timeout=120)
        assert_not_stopped(target.pid)
        assert state(target.pid) != "", "the target runs on"
    assert_clean(err)
    assert tracer.returncode == 0, err
    assert report_json(out)["final"] is True


# --- the tracer and the outputs fail ---------------------------------------------------------


def test_bpftrace_killed_mid_run_ends_with_an_incomplete_report(build):
    with pid_run(build("leak_delayed"), "600", "bpftrace") as (target, tracer):
        os.kill(child_named(tracer.pid, "bpftrace"), signal.SIGKILL)
        out, err = tracer.communicate(timeout=120)
        assert_not_stopped(target.pid)
        assert state(target.pid) != "", "the target runs on"
    assert_clean(err)
    assert tracer.returncode == INCOMPLETE, err
    report = report_json(out)
    assert report["complete"] is False
    assert any("bpftrace" in why and "ended early" in why for why in report["incomplete"]), report["incomplete"]


def test_a_killed_probedsl_leaves_no_bpftrace_behind(build):
    """SIGKILL (the OOM killer, a harness's timeout) gives probedsl no chance to end bpftrace:
    the kernel ends it (PR_SET_PDEATHSIG), or its probes would stay on every process."""
    with pid_run(build("leak_delayed"), "600", "bpftrace") as (target, tracer):
        child = child_named(tracer.pid, "bpftrace")
        ended = os.pidfd_open(child)  # readable once that process has ended
        try:
            tracer.kill()
            tracer.wait(timeout=120)
            assert select.select([ended], [], [], 120)[0], f"bpftrace {child} outlived its probedsl"
        finally:
            os.close(ended)
        assert_not_stopped(target.pid)
        assert state(target.pid) != "", "the target runs on"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 64 KiB tmpfs (made full by the test) and a read-only one."""
    full, ro = tmp_path / "full", tmp_path / "ro"
    full.mkdir()
    ro.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "probedsl-full", str(full)], check=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "probedsl-ro", str(ro)], check=True)
        yield full, ro
    finally:
        for d in (full, ro):
            subprocess.run(["umount", str(d)], stderr=subprocess.DEVNULL, check=False)


def test_output_on_a_full_filesystem_says_so_and_prints_the_report(build, small_tmpfs):
    full, _ = small_tmpfs
    with open(full / "filler", "wb") as f:  # fill it, leaving less than a report needs
        try:
            f.write(b"\0" * (64 << 10))
        except OSError:
            pass
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "probedsl",
            "run",
            MEMLEAK,
            "--backend",
            "bcc",
            "--format",
            "json",
            "-o",
            str(full / "run.json"),
            "--",
            build("leak"),
        ],
        input="\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clean(result.stderr)
    assert result.returncode == 1, result.stderr
    assert f"cannot write the report to {full / 'run.json'}" in result.stderr
    assert by_site(report_json(result.stdout)).get("wrapper1") == (40, 5)  # nothing lost
    assert sorted(os.listdir(full)) == ["filler"]  # no half file


def test_output_on_a_read_only_filesystem_is_refused_before_tracing(build, small_tmpfs):
    _, ro = small_tmpfs
    result = subprocess.run(
        [sys.executable, "-m", "probedsl", "run", MEMLEAK, "-o", str(ro / "run.json"), "--", build("leak")],
        input="\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_clean(result.stderr)
    assert result.returncode == 1
    assert result.stderr.strip() == f"probedsl: error: -o {ro / 'run.json'}: not writable"


def test_a_taken_prometheus_port_is_refused_before_the_command_runs(build, tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    marker = tmp_path / "ran"
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "probedsl",
                "run",
                MEMLEAK,
                "--prometheus",
                f"127.0.0.1:{taken.getsockname()[1]}",
                "--",
                "touch",
                str(marker),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        taken.close()
    assert_clean(result.stderr)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("probedsl: error: --prometheus") and "cannot listen" in line, result.stderr
    assert not marker.exists(), "the command ran although tracing never began"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closed_terminal_ends_the_run_with_its_report_saved(backend, build, tmp_path):
    """The terminal probedsl runs in goes away (SIGHUP, then EIO on every write to it): the
    report still reaches -o, and the target runs on."""
    import fcntl
    import pty
    import termios

    target = Held([build("leak_delayed"), "wait", "600"])
    saved = tmp_path / "run.json"
    master, slave = pty.openpty()

    def own_terminal():
        hangup_default()
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    tracer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "probedsl",
            "run",
            MEMLEAK,
            "--backend",
            backend,
            "--format",
            "json",
            "-o",
            str(saved),
            "--pid",
            str(target.pid),
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=own_terminal,
    )
    os.close(slave)
    try:
        said = b""
        while b"probedsl: tracing" not in said:
            chunk = os.read(master, 4096)
            assert chunk, said
            said += chunk
        target.go()
        wait_for_sleep(target.pid, 600)  # its allocations are done
        os.close(master)  # the terminal is gone: SIGHUP
        assert tracer.wait(timeout=120) == 0
        assert_not_stopped(target.pid)
        assert state(target.pid) != "", "the target runs on"
    finally:
        stop(target)
        if tracer.poll() is None:
            tracer.kill()
    report = report_json(saved.read_text())
    assert report["final"] is True and by_site(report).get("wrapper1") == (40, 5)


def test_output_to_a_device_writes_it_in_place(build):
    """-o /dev/null (bench does it) must not replace the device by a file (as root it could)."""
    import stat

    result = subprocess.run(
        [sys.executable, "-m", "probedsl", "run", MEMLEAK, "--format", "json", "-o", "/dev/null", "--", build("leak")],
        input="\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_clean(result.stderr)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and not os.path.exists("/dev/null.tmp")


@pytest.mark.parametrize("hold", ["mapping-hold", "python-finalizing"])
def test_a_killed_probedsl_leaves_no_process_stopped_by_a_hold(hold):
    """SIGKILL while a launched command is stopped by BPF's SIGSTOP, at a mapping of code (until
    the unwinder has the file's rows) or as a CPython begins finalization (until its frames are
    named): the guard continues it, and it runs to its end."""
    gate = Gate(hold)
    code = "import ctypes; print('imported', flush=True)"  # _ctypes and libffi: mapped code
    tracer = run_tracer("--backend", "bcc", "--", "/usr/bin/python3", "-c", code, env=gate.env)
    command = 0
    try:
        wait_said(tracer, f"fault {hold} reached")
        with open(f"/proc/{tracer.pid}/task/{tracer.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        (command,) = [p for p in children if code.encode() in open(f"/proc/{p}/cmdline", "rb").read()]
        # marked as the stop is sent: it enters the stop on its way back to user space
        deadline = time.monotonic() + 30
        while state(command) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.001)
        assert state(command) in ("T", "t"), f"the command was not stopped by the {hold}"
        pidfd = os.pidfd_open(command)
        tracer.kill()
        tracer.wait()  # not its pipes: the command holds them until it ends
        ended = select.poll()
        ended.register(pidfd, select.POLLIN)
        assert ended.poll(60_000), f"pid {command} was left stopped ({state(command)})"
        os.close(pidfd)
    finally:
        if tracer.poll() is None:
            tracer.kill()
        if command and state(command) in ("T", "t"):
            os.kill(command, signal.SIGKILL)
        tracer.communicate()


def reports_with_a_late_first(*args) -> list:
    """The json reports of `probedsl run MEMLEAK --format json ARGS`, its first interval report
    held 2.5 s at its fault point."""
    gate = Gate("report")
    argv = [sys.executable, "-m", "probedsl", "run", MEMLEAK, "--format", "json", *args]
    run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=gate.env)
    try:
        wait_said(run, "fault report reached")
        late = time.monotonic() + 2.5
        while time.monotonic() < late:  # the report's lateness, not a wait for the run
            time.sleep(0.05)
        gate.open()
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, err
    return json_documents(out)


def test_a_late_interval_report_skips_the_times_it_overran(build):
    """Reports every second, the first held 2.5 s more: the next comes an interval after it, not
    the ones it overran back to back (each would show nothing changed)."""
    times = [
        d["duration_s"]
        for d in reports_with_a_late_first("--interval", "1", "--", build("drip"), "7")
        if not d["final"]
    ]
    assert len(times) >= 3, times
    assert times[0] >= 3.4  # the late one
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.8, times


def test_count_gives_count_reports_however_late_one_is(build):
    """memleak -p PID 1 3 with its first report held 2.5 s: still three reports, the third final
    (COUNT counts reports; a time limit of 3 s would end the run after two)."""
    held = Held([build("leak_delayed"), "wait", "600"])
    try:
        docs = reports_with_a_late_first("--backend", "bcc", "-p", str(held.pid), "1", "3")
    finally:
        held.proc.kill()
        held.end()
    assert [(d["sequence"], d["final"]) for d in docs] == [(1, False), (2, False), (3, True)]
