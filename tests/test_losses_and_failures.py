"""Nothing lost, nothing silent: a full table counts what it could not track, a crashing command
still gets its report, a killed tracer is said, no tracer outlives a run, a soak keeps the
tracer's memory flat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import BACKENDS, MEMLEAK, by_site, probedsl, report_json, start_run

pytestmark = pytest.mark.usefixtures("root_required")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_full_table_counts_what_it_could_not_track(backend, build):
    n = 1_200_000
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--format",
        "json",
        "--max-live",
        "1000",
        "--",
        build("many_live"),
        str(n),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    heap = report["resources"]["heap"]
    assert heap["live_blocks"] == 1000  # the table, full
    assert heap["live_blocks"] + heap["untracked"] == heap["acquired"] - heap["released"]
    assert heap["acquired"] >= n + 1 and heap["untracked"] >= n + 1 - 1000
    assert any("not tracked (table full" in note for note in report["notes"])


@pytest.mark.parametrize(
    "recipe,resource,program,status", [("memleak", "heap", "allocs", 3), ("fdleak", "fd", "fdleak", 0)]
)
def test_an_acquisition_that_preempted_another_walk_is_stored_without_a_stack(recipe, resource, program, status, build):
    """BCC --stacks dwarf: an acquire program that finds the unwinder's scratch busy (it preempted
    another program's walk on the same CPU) hands its entries to its resource's unstacked program,
    which stores them without a stack; nothing is lost. The fault marks the scratch busy on every
    CPU, so each acquisition of the run goes that way: uprobes (memleak), system calls (fdleak)."""
    runs = {}
    for fault in ("", "unwinder-busy"):
        env = dict(os.environ, PROBEDSL_FAULTS=fault)
        result = probedsl(
            "run", recipe, "--backend", "bcc", "--stacks", "dwarf", "--format", "json", "--", build(program), env=env
        )
        assert result.returncode == status, result.stderr
        runs[fault] = report_json(result.stdout)["resources"][resource]
    stacked, unstacked = runs[""], runs["unwinder-busy"]
    assert stacked["live_blocks"] >= 9 and stacked["no_stack"] == 0, stacked
    for field in ("live_blocks", "acquired", "released"):
        assert unstacked[field] == stacked[field], (field, stacked, unstacked)
    assert unstacked["no_stack"] == unstacked["live_blocks"] and unstacked["untracked"] == 0, unstacked


def test_no_system_call_is_counted_untracked_while_bcc_loads(build):
    """BCC would attach a system call's tracepoint program as it compiles it, before the loader
    has put the unwinder in its array, and descriptors opened meanwhile by a process already
    running would be counted untracked: the loader attaches it after (bcc_tracepoints)."""
    looping = subprocess.Popen([build("fdloop")], stdout=subprocess.PIPE)
    try:
        assert looping.stdout.readline() == b"looping\n"
        result = probedsl(
            "run",
            "fdleak",
            "--backend",
            "bcc",
            "--stacks",
            "dwarf",
            "--format",
            "json",
            "--no-follow-forks",
            "--pid",
            str(looping.pid),
            "--duration",
            "0.5",
        )
    finally:
        looping.kill()
        looping.wait()
    assert result.returncode == 0, result.stderr
    fd = report_json(result.stdout)["resources"]["fd"]
    assert fd["acquired"] > 1000 and fd["untracked"] == 0, fd


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how,status", [("abort", 128 + signal.SIGABRT), ("segv", 128 + signal.SIGSEGV)])
def test_a_crashing_command_still_gets_its_report(backend, how, status, build):
    result = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--", build("crash"), how)
    assert result.returncode == status, result.stderr
    report = report_json(result.stdout)
    assert report["exit_status"] == status
    assert by_site(report).get("leak_then") == (96, 3)


def children(pid: int, name: str = ""):
    """pid's children (those named `name`, if given): bpftrace, the command, addr2lines started
    ahead of the report."""
    out = subprocess.run(["pgrep", "-P", str(pid), *(["-x", name] if name else [])], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_tracer_is_reported_and_nothing_is_left_behind(build):
    tracer = start_run(MEMLEAK, "--comm", "nosuchprog")
    try:  # (a tracer left running by a failure would slow every later test: --comm is machine-wide)
        (child,) = children(tracer.pid, "bpftrace")
        os.kill(child, signal.SIGKILL)
        out, err = tracer.communicate(timeout=60)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    assert tracer.returncode == 3, err  # a report, marked incomplete (docs/usage.md)
    assert "the report is incomplete: bpftrace" in err and "ended early" in err, err
    assert "Traceback" not in err
    assert children(tracer.pid) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tracer_process_outlives_a_run(backend, build):
    tracer = start_run(MEMLEAK, "--backend", backend, "--", build("leak"), stdin=subprocess.PIPE)
    started = children(tracer.pid)  # the command, bpftrace, addr2lines
    tracer.communicate(input="\n", timeout=120)
    assert tracer.returncode == 0
    # bpftrace is killed, not waited for: it ends by itself once the kernel has removed its
    # probes (a condition, bounded for a busy machine)
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{p}") for p in started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in started if os.path.exists(f"/proc/{p}")] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_short_interval_soak_keeps_the_tracers_memory_flat(backend, build):
    """bench/soak.py runs this for an hour; here up to 15 reports over ~15 s."""
    from bench.soak import soak

    samples = soak(backend, seconds=15, interval=1, exe=build("drip"))
    assert len(samples) >= 8  # (a late report skips the times it overran)
    # after warm-up (caches, first symbolization), RSS may not keep climbing
    settled = [s["rss_kb"] for s in samples[3:]]
    assert max(settled) - min(settled) < 8 * 1024, json.dumps(samples)
