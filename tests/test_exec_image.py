"""An exec ends a process image: the old program's heap goes with its address space (counted as
ended_by_exec, never reported), its descriptors without close-on-exec stay. Both backends."""

from __future__ import annotations

import os
import select
import signal
import subprocess

import pytest

from conftest import BACKENDS, MEMLEAK, ROOT, Held, by_site, probedsl, report_json, start_run, stderr_line

pytestmark = pytest.mark.usefixtures("root_required")

FDLEAK = str(ROOT / "recipes" / "fdleak.probe")


def run(backend, *command, recipe=MEMLEAK, input=None):
    result = probedsl(
        "run", recipe, "--backend", backend, "--format", "json", "--top", "100", "--", *command, input=input
    )
    assert "Traceback" not in result.stderr, result.stderr
    report = report_json(result.stdout)
    assert result.returncode == 0, (result.stderr, report.get("incomplete"), report["notes"])
    for name, res in report["resources"].items():  # the counters agree with what is shown
        assert res["unaccounted"] == 0, (name, res, report["notes"])
    return report


def heap(report) -> dict:
    return report["resources"]["heap"]


def pids_shown(report) -> set:
    return {
        pid for rep in report["reports"] if rep["kind"] == "outstanding" for e in rep["entries"] for pid in e["pids"]
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wrapper_that_execs_leaves_nothing_of_its_own(backend):
    """env allocates ~140 blocks, then execs /bin/true: none of them is a leak."""
    alone, wrapped = run(backend, "/bin/true"), run(backend, "env", "/bin/true")
    assert heap(wrapped)["ended_by_exec"] > 0, heap(wrapped)
    assert (heap(wrapped)["live_blocks"], heap(wrapped)["live_bytes"]) == (
        heap(alone)["live_blocks"],
        heap(alone)["live_bytes"],
    ), (heap(alone), heap(wrapped))
    assert heap(alone)["ended_by_exec"] == 0
    assert any("ended with their process image at exec" in n for n in wrapped["notes"]), wrapped["notes"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shell", ["exec {}", "{}"])
def test_the_program_a_shell_starts_is_reported_exactly(backend, shell, build):
    """sh -c 'exec LEAK' replaces the shell; sh -c 'LEAK' forks a child that execs (dash): either
    way the program's leaks are exactly those it has alone, under its own pid, and what the
    shell's image held when it was replaced is ended_by_exec."""
    leak = build("leak")
    alone = run(backend, leak, input="\n")
    wrapped = run(backend, "sh", "-c", shell.format(leak), input="\n")
    assert by_site(alone).get("wrapper1") == (40, 5), by_site(alone)
    (leak_pid,) = {
        e["pids"][0] for e in wrapped["reports"][0]["entries"] if any(f["function"] == "wrapper1" for f in e["stack"])
    }
    mine = [e for e in wrapped["reports"][0]["entries"] if e["pids"] == [leak_pid]]
    assert (sum(e["bytes"] for e in mine), sum(e["blocks"] for e in mine)) == (
        heap(alone)["live_bytes"],
        heap(alone)["live_blocks"],
    ), (mine, heap(alone))
    if shell.startswith("exec"):  # nothing but the program's own image
        assert pids_shown(wrapped) == {leak_pid}
        assert heap(wrapped)["live_blocks"] == heap(alone)["live_blocks"]
        assert heap(wrapped)["ended_by_exec"] > 0, heap(wrapped)
    # (the forked child execs at once: what it allocates first depends on the environment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_program_that_leaks_then_execs_itself(backend, build):
    """execer leaks 48 bytes, execs itself, leaks 2 x 56: one pid, two images."""
    report = run(backend, build("execer"))
    sites = by_site(report)
    assert "before_exec" not in sites and sites.get("after_exec") == (112, 2), sites
    assert heap(report)["ended_by_exec"] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_image_reusing_an_old_images_address(backend, build):
    """Without address randomization the second image's first block takes the address of the
    first image's (the heap starts at the same place): the kernel counts the old entry as ended
    by the exec, not as replaced, and the new one is reported."""
    report = run(backend, "setarch", "-R", build("execer"))
    sites = by_site(report)
    assert "before_exec" not in sites and sites.get("after_exec") == (112, 2), sites
    assert heap(report)["replaced"] == 0 and heap(report)["ended_by_exec"] >= 1, heap(report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_traced_pid_that_execs(backend, build):
    """--pid on a shell that execs the program once told to: the report is the program's."""
    leak = build("leak")
    alone = run(backend, leak, input="\n")
    shell = Held(["sh", "-c", f"read line; exec {leak}"])
    try:
        tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--top", "100", "--pid", str(shell.pid))
        shell.proc.stdin.write(b"go\n\n")
        shell.go()
        shell.proc.wait(timeout=60)
        out, err = tracer.communicate(timeout=120)
    finally:
        shell.end()
    assert tracer.returncode == 0 and "Traceback" not in err, err
    report = report_json(out)
    assert by_site(report).get("wrapper1") == (40, 5), by_site(report)
    assert (heap(report)["live_blocks"], heap(report)["live_bytes"]) == (
        heap(alone)["live_blocks"],
        heap(alone)["live_bytes"],
    ), (heap(report), heap(alone))
    assert heap(report)["unaccounted"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_descriptor_without_close_on_exec_survives_the_exec(backend, build):
    """fd_exec opens /dev/null (no O_CLOEXEC), mallocs, execs itself: the descriptor is still
    open in the new image (a leak of the program), the first image's block is not."""
    exe = build("fd_exec")
    fds = run(backend, exe, recipe=FDLEAK)
    fd = fds["resources"]["fd"]
    assert fd["ended_by_exec"] == 0 and fd["live_blocks"] == 1, (fd, fds["notes"])
    (entry,) = fds["reports"][0]["entries"]
    if backend == "bcc":  # (bpftrace's frame-pointer walk ends in libc, which keeps none)
        assert any(f["function"] == "keep_open" for f in entry["stack"]), entry["stack"]
    blocks = run(backend, exe)
    assert by_site(blocks) == {"after_exec": (24, 1)}, by_site(blocks)
    assert heap(blocks)["ended_by_exec"] >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_process_traced_by_name_that_execs(backend, build):
    """--comm execer: its first image leaks 48 bytes, then it execs /proc/self/exe (named
    "exe" from then on, so not traced): the block ended with the image it belonged to."""
    exe = build("execer")
    tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--comm", "execer")
    try:
        assert subprocess.run([exe], timeout=60).returncode == 0
    finally:
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
    assert tracer.returncode == 0 and "Traceback" not in err, err
    report = report_json(out)
    assert "before_exec" not in by_site(report), by_site(report)
    assert heap(report)["ended_by_exec"] >= 1 and heap(report)["unaccounted"] == 0, heap(report)


def reused_pid_report(backend: str, mode: str, exe: str) -> tuple:
    """pidreuse's report: its first child leaks in old_image() then execs; a second child at the
    same pid leaks in reused_pid(). --comm: while it runs, 20 `env /bin/true` (env allocates, is
    not traced) exec elsewhere on the machine. Returns (report, the fixture's words)."""
    if mode == "cmd":
        result = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--", exe)
        out, err, status = result.stdout, result.stderr, result.returncode
    else:
        tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--comm", "pidreuse")
        try:
            subprocess.run(["sh", "-c", "for i in $(seq 20); do env /bin/true; done"], check=True, timeout=120)
            fixture = subprocess.run([exe], capture_output=True, text=True, timeout=120)
        finally:
            tracer.send_signal(signal.SIGINT)
            out, err = tracer.communicate(timeout=120)
        out, status = fixture.stdout + out, tracer.returncode
    assert status == 0 and "Traceback" not in err, err
    said = (
        out.split("\n", 1)[0]
        if out.startswith(("reused", "not-reused"))
        else next(line for line in out.splitlines() if line.startswith(("reused", "not-reused")))
    )
    assert said.startswith("reused "), f"the pid was not reused: {said}"
    return report_json(out), said


@pytest.mark.parametrize("mode", ["cmd", "comm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_process_at_an_ended_images_pid_reports_its_leaks(backend, mode, build, tmp_path):
    """A pid whose process exec'd (its image ended) and exited is taken by a new process that
    leaks without exec: it has an image of its own, so its leak is reported, not counted as the
    old image's end. --comm: only the traced process's exec is recorded, not the machine's."""
    exe = tmp_path / "pidreuse"
    exe.write_bytes(open(build("pidreuse"), "rb").read())
    exe.chmod(0o755)
    report, said = reused_pid_report(backend, mode, str(exe))
    pid = int(said.split()[1])
    sites = by_site(report)
    assert sites.get("reused_pid") == (40, 1) and "old_image" not in sites, (sites, heap(report))
    assert pids_shown(report) >= {pid}, report["reports"]
    assert heap(report)["ended_by_exec"] >= 1 and heap(report)["unaccounted"] == 0, heap(report)
    # the first child's exec alone (the fixture's own start, env's execs: never registered)
    assert heap(report)["images_ended"] == 1 and heap(report)["image_lost"] == 0, heap(report)


def test_bcc_frees_the_entries_of_ended_images_while_tracing():
    """A shell runs env (~140 blocks left at its exec) once per line given, the next line only
    once the loader has freed an ended image's entries: 8 of them (~1,100 entries) through a
    live table of 400, with nothing untracked, and the report exact."""
    env = {**os.environ, "PROBEDSL_FAULTS": "image-sweep"}
    tracer = start_run(
        MEMLEAK,
        "--backend",
        "bcc",
        "--format",
        "json",
        "--max-live",
        "400",
        "--",
        "sh",
        "-c",
        "while read line; do env /bin/true; done",
        stdin=subprocess.PIPE,
        env=env,
    )
    try:
        for _ in range(8):
            tracer.stdin.write("go\n")
            tracer.stdin.flush()
            line = ""
            while not line.startswith("probedsl: fault image-sweep reached"):
                # bounded: only a run that never frees waits this long
                assert select.select([tracer.stderr], [], [], 120)[0], "no entries of ended images were freed"
                line = stderr_line(tracer)
                assert line, "probedsl ended before freeing anything"
        out, err = tracer.communicate(input="", timeout=120)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.communicate()
    assert tracer.returncode == 0 and "Traceback" not in err, err
    h = heap(report_json(out))
    assert h["untracked"] == 0 and h["unaccounted"] == 0 and h["image_lost"] == 0, h
    assert h["ended_by_exec"] >= 8 * 100 and h["images_ended"] >= 8, h
