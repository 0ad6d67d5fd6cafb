"""A process whose main thread ends alone (pthread_exit) while another thread goes on: what
that thread allocates afterwards is recorded, with its stack (docs/reachability.md, Limits).
tree_leaks mainexit's last thread keeps 2 x 72 B (lose) and 1 x 88 B (keep) after the main
thread ended. A process found with its main thread ended already (leaderless) is traced too."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from conftest import MEMLEAK, MEMLEAK_UPROBES, Held, probedsl, report_json, start_run, uprobes_open
from probedsl.drivers.bcc_uprobes import links_available

AFTER_MAIN = {"lose": (144, 2), "keep": (88, 1)}  # frame under last_thread -> (bytes, blocks)
KEPT = "kept them in every process"  # BCC's links after a main thread ended alone (bcc_moves)


def after_main(report: dict, thread: str = "last_thread") -> dict:
    """The outstanding heap of the thread (its start function), by the function that called the allocator."""
    got: dict = {}
    for entry in report["reports"][0]["entries"]:
        names = [f.get("function") for f in entry["stack"]]
        if thread in names:
            caller = names[names.index(thread) - 1]
            bytes_, blocks = got.get(caller, (0, 0))
            got[caller] = (bytes_ + entry["bytes"], blocks + entry["blocks"])
    return got


@pytest.fixture(scope="module")
def tree_leaks(build):
    return build("tree_leaks")


@pytest.mark.parametrize("backend, how", [("bcc", "command"), ("bcc", "pid"), ("bpftrace", "command")])
def test_allocations_after_the_main_thread_ended_are_recorded(backend, how, tree_leaks, root_required):
    """BCC's perf events: opened again on the thread that goes on, at the main thread's exit
    (they are bound to the main thread's task); its links: their breakpoints kept in every
    process from then on (said); bpftrace 0.17 probes every process and its filter keeps the
    process traced while any thread of it lives."""
    run = (MEMLEAK, "--backend", backend, "--format", "json")
    if how == "command":
        result = probedsl("run", *run, "--", tree_leaks, "mainexit", timeout=300)
        out, err = result.stdout, result.stderr
    else:
        held = Held([tree_leaks, "mainexit", "go"])  # the main thread ends once told
        try:
            tracer = start_run(*run, "--pid", str(held.pid))
            held.go()
            out, err = tracer.communicate(timeout=300)
        finally:
            held.end()
    report = report_json(out)
    assert after_main(report) == AFTER_MAIN, err
    kept = [n for n in report["notes"] if KEPT in n]
    assert len(kept) == (backend == "bcc" and links_available()), report["notes"]
    assert not [n for n in report["notes"] if "main thread" in n and n not in kept], report["notes"]


def zombie_leader(held: Held) -> bool:
    """Wait (up to 60 s) until the program's main thread has ended alone: its leader a zombie."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and held.proc.poll() is None:
        with open(f"/proc/{held.pid}/status") as f:
            if any(line.startswith("State:") and "Z" in line.split()[1] for line in f):
                return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("backend, scope", [("bcc", "pid"), ("bpftrace", "pid"), ("bcc", "per-process")])
def test_a_process_whose_main_thread_had_ended_is_traced(backend, scope, build, root_required):
    """leaderless's main thread ends at once (pthread_exit); found so, its /proc/PID shows no
    maps, root or exe and its leader matches no uprobe: its libraries are found through a thread
    that runs, BCC's uprobes opened on that thread. Told to go, the thread keeps 3 x 48 B (kept)
    and frees 2 x 24 B (passing): exactly those are outstanding."""
    exe = build("leaderless")
    held = Held([exe])  # its thread allocates once told
    try:
        assert zombie_leader(held), "leaderless's main thread did not end within 60 s"
        target = ["--pid", str(held.pid)] if scope == "pid" else ["--comm", "leaderless", "--per-process"]
        tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", *target)
        held.go()
        if scope != "pid":  # --comm runs until told to end
            held.proc.wait(timeout=60)
            tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=300)
    finally:
        held.end()
    report = report_json(out)
    assert after_main(report, "worker") == {"kept": (144, 3)}, err
    everywhere = [n for n in report["notes"] if KEPT in n]
    assert len(everywhere) == (backend == "bcc" and links_available()), report["notes"]
    unsaid = [n for n in report["notes"] if n not in everywhere and ("main thread" in n or "not recorded" in n)]
    assert not unsaid, report["notes"]


def per_process_run(exe, mode: str, links: bool = True):
    """`--comm EXE --per-process` on BCC while exe MODE go runs, let go once its uprobes are on:
    (the report, the tracer's stderr, the program's pid). links: False, BCC's perf events."""
    env = dict(os.environ, PROBEDSL_UPROBE_LINKS="1" if links else "0")
    tracer = start_run(MEMLEAK, "--backend", "bcc", "--format", "json", "--comm", exe.name, "--per-process", env=env)
    held, on = None, False
    try:
        before = uprobes_open(tracer.pid)
        held = Held([str(exe), mode, "go"])  # it goes on once told
        deadline = time.monotonic() + 120
        while not on and time.monotonic() < deadline:
            on = uprobes_open(tracer.pid) >= before + MEMLEAK_UPROBES
            time.sleep(0.01)  # until its uprobes are on
        held.go()
        held.proc.wait(timeout=60)
    finally:
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
        if held is not None:
            held.end()
    assert held is not None and on, f"the uprobes were not on within 120 s: {err}"
    return report_json(out), err, held.pid


def test_per_process_says_what_it_lost_after_the_main_thread_ended(tree_leaks, tmp_path, root_required):
    """--comm --per-process holds no process. With perf events (bound to a thread) the main
    thread's end is seen by the program, the uprobes moved at the loader's next turn, and what
    was lost meanwhile said, naming the pid."""
    exe = tmp_path / "mainexit_pp"
    shutil.copy(tree_leaks, exe)
    report, _, pid = per_process_run(exe, "mainexit", links=False)  # the main thread ends once told
    notes = report["notes"]
    said = [n for n in notes if f"allocations of pid {pid}'s other threads after its main thread ended" in n]
    assert len(said) == 1 and "are not recorded" in said[0], notes


@pytest.mark.skipif(not links_available(), reason="Linux < 6.12: BCC uses perf events, bound to a thread")
def test_per_process_links_lose_nothing_when_the_main_thread_ends(tree_leaks, tmp_path, root_required):
    """A link fires for its whole thread group: after the main thread's end, with the
    breakpoints kept everywhere, its other threads' blocks are all recorded, and no note
    speaks of a loss."""
    exe = tmp_path / "mainexit_pp"
    shutil.copy(tree_leaks, exe)
    report, err, pid = per_process_run(exe, "mainexit")
    assert after_main(report) == AFTER_MAIN, err
    kept = [n for n in report["notes"] if KEPT in n]
    assert len(kept) == 1 and f"pid {pid}'s main thread ended alone" in kept[0], report["notes"]
    assert not [n for n in report["notes"] if "not recorded" in n], report["notes"]


def test_per_process_notes_no_loss_when_the_process_exits_as_a_group(tree_leaks, tmp_path, root_required):
    """exit() with four threads waiting: exit_group kills them, the main thread often ending
    first while they still run. That is no thread ending alone: nothing was lost, no note says so,
    and the workers' blocks are all there (worker i loses i+1 x 40 B and keeps 56 B: 624 B in 14)."""
    exe = tmp_path / "pool_pp"
    shutil.copy(tree_leaks, exe)
    report, err, _ = per_process_run(exe, "pool")  # the workers start once told
    assert not [n for n in report["notes"] if "ended alone" in n or "main thread ended" in n], report["notes"]
    workers = [e for e in report["reports"][0]["entries"] if "worker" in [f.get("function") for f in e["stack"]]]
    assert (sum(e["bytes"] for e in workers), sum(e["blocks"] for e in workers)) == (400 + 224, 14), err
