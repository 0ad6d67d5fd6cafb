"""Per-process attach (BCC's --per-process): the named processes traced and bystanders spared
the uprobe trap, ended processes' uprobes closed, a process refusing uprobes retried then said.
Speed targets are measured in bench/, not here; these assert behaviour with wide margins."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

from probedsl.drivers import bcc as bcc_driver
from probedsl.drivers import bcc_loader
from probedsl.drivers import bcc_compat, bcc_uprobes

from conftest import (
    MEMLEAK,
    MEMLEAK_UPROBES,
    Held,
    by_site,
    probedsl,
    report_json,
    start_run,
    uprobes_open,
    wait_uprobes,
)


def start_tracer(*args, env=None):
    return start_run(MEMLEAK, "--format", "json", *args, env=env)


def loop_seconds(exe, calls=100_000):
    out = subprocess.run([exe, "1", str(calls), "0"], capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def test_per_process_comm_traces_the_named_process_and_spares_the_others(build, mallocfree, root_required):
    tracer = start_tracer("--backend", "bcc", "--comm", "leak_delayed", "--per-process")
    target = None
    try:
        # ~3 us per trapped call: 200,000 calls would take ~0.6 s if this process paid the trap
        bystander = loop_seconds(mallocfree)
        before = uprobes_open(tracer.pid)
        target = Held([build("leak_delayed"), "wait", "0"])
        wait_uprobes(tracer, before + MEMLEAK_UPROBES)  # (a new process is not held: let go once on)
        target.go()
        assert target.proc.wait(timeout=60) == 0
    finally:
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=60)
        if target is not None:
            target.end()
    assert tracer.returncode == 0, err
    assert bystander < 0.2, f"an untraced process took {bystander:.3f} s: it paid the uprobe trap"
    assert by_site(report_json(out)).get("wrapper1") == (40, 5)
    assert "pays a uprobe trap" not in err


def test_per_process_closes_the_uprobes_of_processes_that_ended(build, tmp_path, root_required):
    # each traced process holds 17 uprobes, and BCC allows BCC_PROBE_LIMIT in all (1,000 by
    # default). Detaching used to resolve the library through /proc/PID, gone by then: every
    # ended process's uprobes stayed open, and past the limit no new process was traced.
    churn, final = tmp_path / "a" / "pp_churn", tmp_path / "b" / "pp_churn"
    churn.parent.mkdir()
    final.parent.mkdir()
    churn.symlink_to(shutil.which("sleep"))
    shutil.copy(build("leak_delayed"), final)
    tracer = start_tracer(
        "--backend", "bcc", "--comm", "pp_churn", "--per-process", env={**os.environ, "BCC_PROBE_LIMIT": "60"}
    )  # room for 3 processes
    target = None
    try:
        idle = uprobes_open(tracer.pid)
        for _ in range(4):
            sleeper = subprocess.Popen([str(churn), "600"])
            try:
                wait_uprobes(tracer, idle + MEMLEAK_UPROBES)  # traced: its uprobes are on
            finally:
                sleeper.kill()
                sleeper.wait()
            deadline = time.monotonic() + 60  # (perf events: ~90 ms each, some after a quiet 3 s)
            while (now_open := uprobes_open(tracer.pid)) > idle and time.monotonic() < deadline:
                time.sleep(0.1)
            assert now_open <= idle, "the uprobes of an ended process are still open"
        target = Held([str(final), "wait", "0"])
        wait_uprobes(tracer, idle + MEMLEAK_UPROBES)
        target.go()
        assert target.proc.wait(timeout=60) == 0
    finally:
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
        if target is not None:
            target.end()
    assert tracer.returncode == 0, err
    assert "not traced" not in err, err
    assert by_site(report_json(out)).get("wrapper1") == (40, 5)


def test_tracefs_uprobes_libbcc_left_behind_are_removed(root_required):
    # libbcc names a tracefs fallback event ..._bcc_<its pid> and keeps it when attaching
    # fails (a --per-process target ending during attach); the loader removes its own at close
    libc = os.path.realpath("/lib/x86_64-linux-gnu/libc.so.6")
    ours, other = f"probedsl_test_bcc_{os.getpid()}", f"probedsl_test_bcc_{os.getpid()}0"
    events = bcc_compat.TRACEFS_UPROBES[0]
    fd = os.open(events, os.O_WRONLY | os.O_APPEND)
    try:
        for name in (ours, other):
            os.write(fd, f"p:uprobes/{name} {libc}:0x1000\n".encode())
        assert bcc_compat.remove_tracefs_uprobes(os.getpid()) == 1
        left = [line.split()[0] for line in open(events)]
        assert f"p:uprobes/{ours}" not in left and f"p:uprobes/{other}" in left  # not another's
    finally:
        os.write(fd, f"-:uprobes/{other}\n".encode())
        os.close(fd)


def test_per_process_skips_a_process_that_cannot_take_uprobes(root_required):
    # kthreadd (pid 2) refuses uprobes with EINVAL like a process exiting past exit_mm does,
    # which is what a --comm process ending during attach looks like (a red CI run once)
    tracer = start_tracer("--backend", "bcc", "--comm", "kthreadd", "--per-process")
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate(timeout=60)
    assert tracer.returncode == 0, err
    assert "cannot attach" not in err and "error" not in err
    assert report_json(out)["final"]


class RefusingBpf:
    """Stands in for bcc.BPF: every uprobe attach fails, as libbcc's does, after printing."""

    def __init__(self):
        self.attempts, self.uprobe_fds = 0, {}

    def attach_uprobe(self, **kw):
        self.attempts += 1
        os.write(2, b"cannot attach uprobe, Invalid argument\n")
        raise Exception("Failed to attach BPF to uprobe")


def test_a_live_process_refusing_uprobes_is_retried_then_said(capfd):
    loader = object.__new__(bcc_driver.BccLoader)
    loader.bpf, loader.attached, loader.refusals = RefusingBpf(), {}, {}
    loader.uprobes = bcc_uprobes.PerfEvents(None, loader.bpf)
    loader.manifest = {"probes": [{"path": "/lib/libc.so.6", "function": "free", "entry": "e", "return": None}]}
    me = os.getpid()  # has memory, so a refusal is not an exit in progress
    for _ in range(bcc_loader.ATTACH_TRIES):
        assert not capfd.readouterr().err
        loader._attach_process(me)
    assert loader.bpf.attempts == bcc_loader.ATTACH_TRIES and not loader.attached and not loader.refusals
    err = capfd.readouterr().err
    assert err.count("\n") == 1, err
    assert f"warning: pid {me} is not traced: cannot attach to free" in err and "Invalid argument" in err
    loader._attach_process(2)  # kthreadd: no memory, skipped without a word
    assert not loader.refusals and not capfd.readouterr().err


def test_per_process_needs_bcc():
    result = probedsl("run", MEMLEAK, "--comm", "x", "--per-process")
    assert result.returncode == 1 and "cannot attach uprobes per process; use --backend bcc" in result.stderr
