"""--reachability on a process tree: every process the run follows is held at its own exit,
scanned, and let go; its kinds (per process, in reachability_scans) equal valgrind
--trace-children=yes's LEAK SUMMARY of the same process, on the same binaries
(tests/fixtures/tree_leaks.c): three forked children leaking differently, an exec chain
(sh -c, env) with a thread pool whose workers leak, a shell traced by --pid and its descendants
(these on both backends), 200 leaky children of a shell loop, and a process whose main thread
ends first (pthread_exit) and whose last thread leaks and exits."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections import Counter

import pytest

from conftest import BACKENDS, ROOT, probedsl, report_json, start_run
from probedsl.process import procfs

pytestmark = pytest.mark.usefixtures("root_required")
MEMLEAK = str(ROOT / "recipes" / "memleak.probe")
KINDS = ("definitely_lost", "indirectly_lost", "possibly_lost", "still_reachable")
_SUMMARY = re.compile(
    r"==(\d+)==\s+(definitely lost|indirectly lost|possibly lost|still reachable): ([\d,]+) bytes in ([\d,]+) blocks"
)


def valgrind_per_process(argv, cwd, tmp_path, children: bool = True) -> Counter:
    """The multiset of valgrind's per-process kinds ((kind, bytes, blocks) x 4) of every process
    of the tree (each at its last image's exit; a process with no block left says so)."""
    logs = tmp_path / "vg"
    logs.mkdir(parents=True)
    subprocess.run(
        [
            "valgrind",
            f"--trace-children={'yes' if children else 'no'}",
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--leak-check-heuristics=none",
            "--run-libc-freeres=no",
            f"--log-file={logs}/%p",
            *argv,
        ],
        cwd=cwd,
        capture_output=True,
        check=True,
    )
    out = Counter()
    for log in logs.iterdir():
        text = log.read_text()
        if not children and "HEAP SUMMARY" not in text:
            continue  # a fork of the shell that exec'd: run natively from there, not a process of its own
        found = {k: (0, 0) for k in KINDS}
        for _, kind, nbytes, blocks in _SUMMARY.findall(text):
            found[kind.replace(" ", "_")] = (int(nbytes.replace(",", "")), int(blocks.replace(",", "")))
        command = re.search(r"Command: (\S+)", text)
        out[_kinds(command.group(1) if command else "", found)] += 1
    return out


def _kinds(command: str, found) -> tuple:
    """A process's kinds; the shell's still reachable blocks left out: under valgrind its
    environment holds valgrind's own variables (LD_PRELOAD...), which dash copies (3 blocks more)."""
    shell = command.rsplit("/", 1)[-1] == "sh"
    return (shell, tuple((k, *found[k]) for k in KINDS if not (shell and k == "still_reachable")))


def ours_per_process(report: dict) -> Counter:
    out = Counter()
    for scan in report["reachability_scans"]:
        heap = scan["resources"]["heap"]
        out[_kinds(scan["command"].split(" ")[0], {k: (heap[k]["bytes"], heap[k]["blocks"]) for k in KINDS})] += 1
    return out


def run_tree(backend, argv, cwd) -> dict:
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--reachability",
        "--format",
        "json",
        "--top",
        "1000",
        "--",
        *argv,
        cwd=cwd,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "not_scanned" not in report["resources"]["heap"]["reachability"], report["notes"]
    assert not [n for n in report["notes"] if "not_scanned" in n], report["notes"]
    return report


@pytest.fixture(scope="module")
def tree_leaks(build):
    return build("tree_leaks")


@pytest.fixture(scope="module")
def valgrinds(tmp_path_factory):
    """valgrind_per_process of a tree (argv of absolute paths), run once for both backends."""
    runs = {}

    def _of(argv):
        if tuple(argv) not in runs:
            where = tmp_path_factory.mktemp("vgtree")
            runs[tuple(argv)] = valgrind_per_process(argv, where, where)
        return runs[tuple(argv)]

    return _of


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_forked_children_each_classified_as_valgrind_does(backend, tree_leaks, valgrinds, tmp_path):
    want = valgrinds([tree_leaks, "fork3"])
    assert sum(want.values()) == 4 and len(want) == 4, want  # four processes, each leaking its own way
    report = run_tree(backend, [tree_leaks, "fork3"], tmp_path)
    assert ours_per_process(report) == want
    pids = [s["pid"] for s in report["reachability_scans"]]
    assert len(set(pids)) == 4 and all(s["at"] == "exit" for s in report["reachability_scans"])
    # the stacks of the children and the parent, grouped by kind across processes
    entries = report["reports"][0]["entries"]
    lost = [e for e in entries if e["reachability"]["definitely_lost"]["blocks"]]
    assert len({p for e in lost for p in e["pids"]}) == 3, lost  # the parent, child 1 and child 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_exec_chain_and_thread_pool_classified_as_valgrind_does(backend, tree_leaks, valgrinds, tmp_path):
    """sh forks `env ... tree_leaks pool` (two execs: scanned at the last image's exit; a pool of
    four workers that leak, held in read() at the exit), then runs `tree_leaks leaky`."""
    argv = ["sh", "-c", f"env TREE=1 {tree_leaks} pool; {tree_leaks} leaky; true"]
    want = valgrinds(argv)
    report = run_tree(backend, argv, tmp_path)
    assert ours_per_process(report) == want
    commands = [s["command"] for s in report["reachability_scans"]]
    assert any(c.endswith("tree_leaks pool") for c in commands), commands  # its last image
    text = probedsl("run", MEMLEAK, "--backend", backend, "--reachability", "--", *argv, cwd=tmp_path).stdout
    assert "by process" in text and "3 processes" in text, text


def test_200_leaky_children_classified_in_full(tree_leaks, tmp_path):
    (tmp_path / "leaky_child").symlink_to(tree_leaks)
    # coreutils' seq (-O2) is one of the tree: its output buffer only in a callee-saved register
    # of the frame that calls exit() (test_reachability_roots' coreutils seq)
    loop = "for i in $(seq 200); do ./leaky_child leaky; done"
    # valgrind runs the shell alone, seq once and one child once: the 200 children are one
    # program run 200 times the same way (3 valgrind start-ups, not 202)
    want = valgrind_per_process(["sh", "-c", loop], tmp_path, tmp_path / "sh", children=False)
    want += valgrind_per_process(["seq", "200"], tmp_path, tmp_path / "seq")
    child = valgrind_per_process(["./leaky_child", "leaky"], tmp_path, tmp_path / "child")
    want += Counter({kinds: 200 * n for kinds, n in child.items()})
    report = run_tree("bcc", ["sh", "-c", loop], tmp_path)
    assert sum(want.values()) == 202  # sh, seq and the 200 children
    assert ours_per_process(report) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_pid_and_its_descendants_classified_as_valgrind_does(backend, tree_leaks, valgrinds):
    """--pid on a shell that, once probedsl traces it, runs `tree_leaks fork3` (a child that
    execs, and forks three): each of the four is held at its exit and classified."""
    want = valgrinds([tree_leaks, "fork3"])
    shell = subprocess.Popen(["sh", "-c", f"read x; {tree_leaks} fork3; true"], stdin=subprocess.PIPE)
    try:
        tracer = start_run(MEMLEAK, "--backend", backend, "--reachability", "--format", "json", "--pid", str(shell.pid))
        shell.communicate(b"go\n", timeout=120)
        out, err = tracer.communicate(timeout=120)
    finally:
        if shell.poll() is None:
            shell.kill()
    report = report_json(out)
    scans = [s for s in report["reachability_scans"] if s["command"].endswith("tree_leaks fork3")]
    assert ours_per_process({"reachability_scans": scans}) == want, err
    assert not [n for n in report["notes"] if "not_scanned" in n], report["notes"]


def test_a_process_whose_main_thread_ended_runs_while_its_other_threads_do(tree_leaks):
    """Its leader is a zombie (its /proc/PID/stat says Z) until the last thread ends."""
    proc = subprocess.Popen([tree_leaks, "mainexit", "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"main ended\n"
        assert procfs.process_alive(proc.pid) and procfs.is_process(proc.pid)
        proc.stdin.close()
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped: a zombie
        assert not procfs.process_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("how", ["command", "child"])
def test_main_thread_ending_first_then_exit_is_held_scanned_and_let_go(how, tree_leaks, tmp_path):
    """The main thread ends alone (pthread_exit), then the last thread calls exit(): the process
    is held at that exit and scanned, as the command and as a shell's child, and then let go
    (the run ends with it; it waited for the ended main thread neither there nor in a pause).
    The 2 x 72 B the last thread lost after the main thread ended are definitely lost, as
    valgrind says (measured: a 2,304 B block of ld.so, which valgrind calls possibly lost, is
    still reachable here)."""
    argv = [tree_leaks, "mainexit"] if how == "command" else ["sh", "-c", f"{tree_leaks} mainexit; true"]
    report = run_tree("bcc", argv, tmp_path)
    scans = [s for s in report["reachability_scans"] if s["command"].endswith("mainexit")]
    assert [s["at"] for s in scans] == ["exit"] and scans[0]["blocks"] > 0, report["reachability_scans"]
    lost = scans[0]["resources"]["heap"]["definitely_lost"]
    assert (lost["bytes"], lost["blocks"]) == (144, 2), scans[0]
    assert not [n for n in report["notes"] if "did not stop" in n], report["notes"]
