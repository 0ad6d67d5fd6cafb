"""Recipes checked against the kernel's own record: fdleak's live descriptors against
/proc/PID/fd of a process held before its exit (tests/fixtures/fdpaths.c opens through every
path: stdio, directory streams, popen, the dup family, fcntl, pipes, sockets, eventfd, epoll,
memfd, timerfd, signalfd, inotify, raw system calls, close-on-exec set at the open, by fcntl
F_SETFD and ioctl FIOCLEX and cleared again, then an exec that closes those)."""

from __future__ import annotations

import os
import select
import subprocess

import pytest

from conftest import BACKENDS, report_json, start_run

pytestmark = pytest.mark.usefixtures("root_required")

BOUND_S = 300  # only a failing run waits this long: the fixture says when it is ready


def lines_until_ready(fd: int):
    """(word, [numbers]) of each line a fixture prints up to `ready PID`, read from its stdout a
    byte at a time (the rest of that stream, a report, is read later by communicate())."""
    line = b""
    while True:
        ready, _, _ = select.select([fd], [], [], BOUND_S)
        byte = os.read(fd, 1) if ready else b""
        if not byte:
            pytest.fail(f"the fixture did not get ready: {line!r}")
        if byte != b"\n":
            line += byte
            continue
        word, *numbers = line.decode().split()
        line = b""
        yield word, numbers
        if word == "ready":
            return


def fixture_lines(fd: int) -> dict:
    """tests/fixtures/fdpaths.c's lines: {word: [numbers]}, "opened": {function: [fds]}."""
    said = {}
    for word, numbers in lines_until_ready(fd):
        if word == "opened":
            said.setdefault("opened", {})[numbers[0]] = [int(n) for n in numbers[1:]]
        else:
            said[word] = [int(n) for n in numbers]
    return said


def descriptors(pid: int) -> set:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def expected_live(said: dict, truth: set) -> set:
    """What fdleak reports live: the kernel's descriptors less those the program inherited
    (acquired before tracing); the close-on-exec descriptors the exec closed are not live."""
    return truth - set(said["inherited"])


def live_fds(report: dict, pid: int) -> set:
    """The descriptor numbers fdleak reports live for that pid: each entry's live keys (pid, fd),
    listed because every live entry is read (--ages)."""
    by_pid = next(r for r in report["reports"] if r["by"] == ["pid"])
    keys = [k for e in by_pid["entries"] for k in e["keys"] if k[0] == pid]
    assert len(keys) == sum(e["fds"] for e in by_pid["entries"] if e["pid"] == pid), by_pid
    return {fd for _, fd in keys}


def opened_by(report: dict, pid: int) -> dict:
    """{innermost function of the fixture in the stack: its live descriptors} for that pid."""
    by_site = {}
    for e in next(r for r in report["reports"] if r["by"] == ["ustack"])["entries"]:
        if e["pids"] == [pid]:
            frame = next((f for f in e["stack"] if (f["module"] or "").endswith("/fdpaths")), None)
            name = frame["function"] if frame else "?"
            by_site.setdefault(name, set()).update(fd for _, fd in e["keys"])
    return by_site


def check(report: dict, said: dict, truth: set, backend: str) -> None:
    pid = said["ready"][0]
    kept = truth - set(said["inherited"])
    assert len(kept) >= 20, f"the fixture kept too few descriptors to compare: {sorted(truth)}"
    assert not kept & (set(said["exec-closed"]) | set(said["range-closed"])), (sorted(truth), said)
    # what the fixture says each function left open is what the kernel has
    opened = said["opened"]
    assert {fd for fds in opened.values() for fd in fds} - set(said["exec-closed"]) == kept, (opened, sorted(truth))
    # the very descriptors, per process and (where stacks are whole: BCC's unwinder) per function
    # that opened them, against the kernel's set
    want = expected_live(said, truth)
    assert live_fds(report, pid) == want, (sorted(live_fds(report, pid)), sorted(want), report["resources"])
    by_function = opened_by(report, pid)
    if backend == "bcc" and "?" not in by_function:  # whole stacks (else cut and marked: test_recipes)
        per_function = {fn: set(fds) & want for fn, fds in opened.items()}
        assert by_function == {fn: fds for fn, fds in per_function.items() if fds}, by_function
    assert report["resources"]["fd"]["untracked"] == 0
    # every descriptor the exec closed ended with the image (other processes', popen's children,
    # may add theirs)
    assert len(said["exec-closed"]) >= 15, said["exec-closed"]
    assert report["resources"]["fd"]["ended_by_exec"] >= len(said["exec-closed"]), report["resources"]["fd"]


@pytest.mark.debian13  # bpftrace 0.23 and BCC 0.31 there: the close-on-exec stamps on each
@pytest.mark.parametrize("backend", BACKENDS)
def test_fdleak_live_descriptors_are_the_kernels_for_a_command(backend, build):
    tracer = start_run(
        "fdleak", "--backend", backend, "--format", "json", "--ages", "--", build("fdpaths"), stdin=subprocess.PIPE
    )
    try:
        said = fixture_lines(tracer.stdout.fileno())
        truth = descriptors(said["ready"][0])
    except BaseException:
        tracer.kill()
        tracer.communicate()
        raise
    # the fixture reads to the end of its input (closed here), then exits
    out, err = tracer.communicate(input="", timeout=BOUND_S)
    assert tracer.returncode == 0, err
    assert "Traceback" not in err, err
    check(report_json(out), said, truth, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fdleak_live_descriptors_are_the_kernels_for_a_pid(backend, build):
    target = subprocess.Popen([build("fdpaths"), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        tracer = start_run("fdleak", "--backend", backend, "--format", "json", "--ages", "--pid", str(target.pid))
        target.stdin.write(b"go\n")
        target.stdin.flush()
        said = fixture_lines(target.stdout.fileno())
        assert said["ready"] == [target.pid]
        truth = descriptors(target.pid)
        target.stdin.close()
        target.wait(timeout=BOUND_S)
        out, err = tracer.communicate(timeout=BOUND_S)
    finally:
        if target.poll() is None:
            target.kill()
            target.wait()
    assert tracer.returncode == 0, err
    assert "Traceback" not in err, err
    check(report_json(out), said, truth, backend)


# --- mmapleak against /proc/PID/maps ----------------------------------------------------------
def anonymous_pages(pid: int) -> set:
    """Page addresses of the process's anonymous mappings (no file, not [stack], [vdso]...)."""
    pages = set()
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                pages.update(range(start, end, 4096))
    return pages


def mapped_lines(fd: int) -> dict:
    """tests/fixtures/mmappaths.c's lines: {"seen": [(start, length)], "raw": [...], "ready": pid}."""
    said = {"seen": [], "raw": []}
    for word, numbers in lines_until_ready(fd):
        if word == "ready":
            said["ready"] = int(numbers[0])
        else:
            said[word].append((int(numbers[0]), int(numbers[1])))
    return said


@pytest.mark.parametrize("mode", ["command", "pid"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmapleak_live_mappings_are_the_kernels(backend, mode, build):
    options = ("--backend", backend, "--format", "json", "--top", "100")
    target = None
    if mode == "command":
        tracer = start_run("mmapleak", *options, "--", build("mmappaths"), stdin=subprocess.PIPE)
        stream = tracer.stdout
    else:
        target = subprocess.Popen([build("mmappaths"), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        tracer = start_run("mmapleak", *options, "--pid", str(target.pid))
        target.stdin.write(b"go\n")
        target.stdin.flush()
        stream = target.stdout
    try:
        said = mapped_lines(stream.fileno())
        pages = anonymous_pages(said["ready"])
        if target:
            target.stdin.close()
            target.wait(timeout=BOUND_S)
            out, err = tracer.communicate(timeout=BOUND_S)
        else:
            out, err = tracer.communicate(input="", timeout=BOUND_S)
    except BaseException:
        for proc in (target, tracer):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    assert tracer.returncode == 0, err
    # the kernel has every region the fixture says it kept
    for start, length in said["seen"] + said["raw"]:
        assert set(range(start, start + length, 4096)) <= pages, (hex(start), length)
    report = report_json(out)
    entries = [e for e in report["reports"][0]["entries"] if e["pids"] == [said["ready"]]]
    # mmapleak probes libc's mmap: every region mapped through it, at its length; a raw
    # syscall(SYS_mmap) is not seen (docs/writing-recipes.md, "What the bundled recipes cannot see")
    assert sorted((e["bytes"], e["mappings"]) for e in entries) == sorted((length, 1) for _, length in said["seen"]), (
        entries,
        said,
    )
    assert report["resources"]["mapping"]["untracked"] == 0
