"""--reachability against valgrind's leak check on the same binary (tests/fixtures/reach.c):
a severed tree, a cycle, an interior pointer, blocks kept by a global, a thread-local, only
another thread's stack, only a register; at the exit of a command and on a live --pid whose
references change between reports. Also: the classification itself on hand-made graphs, a
refusal (another tracer), and the target always let go."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from conftest import BACKENDS, ROOT, probedsl, report_json, start_run

pytestmark = pytest.mark.usefixtures("root_required")
MEMLEAK = str(ROOT / "recipes" / "memleak.probe")
KINDS = ("definitely_lost", "indirectly_lost", "possibly_lost", "still_reachable")
VALGRIND_KINDS = {
    "Leak_DefinitelyLost": "definitely_lost",
    "Leak_IndirectlyLost": "indirectly_lost",
    "Leak_PossiblyLost": "possibly_lost",
    "Leak_StillReachable": "still_reachable",
}


def valgrind_kinds(argv, tmp_path, stdin: bytes = b"", check: bool = True):
    """[(functions past malloc up to main or start_thread, kind, direct bytes, blocks)] of every
    loss record; valgrind without its heuristics (probedsl applies none) or libc's freeres
    (which no real process runs). check=False: the program may fail (die of a signal)."""
    xml = tmp_path / "vg.xml"
    subprocess.run(
        [
            "valgrind",
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--num-callers=64",
            "--read-inline-info=no",
            "--leak-check-heuristics=none",
            "--run-libc-freeres=no",
            "--xml=yes",
            f"--xml-file={xml}",
            *argv,
        ],
        input=stdin,
        capture_output=True,
        check=check,
    )
    records = []
    for error in ET.parse(xml).getroot().iter("error"):
        kind = VALGRIND_KINDS.get(error.findtext("kind", ""))
        if kind is None:
            continue
        names = [(f.findtext("fn") or "?").split("@")[0] for f in error.find("stack")][1:]
        text = error.findtext("xwhat/text", "")
        direct = re.search(r"\((\d[\d,]*) direct", text)
        nbytes = int(direct.group(1).replace(",", "")) if direct else int(error.findtext("xwhat/leakedbytes"))
        records.append((_to_main(names), kind, nbytes, int(error.findtext("xwhat/leakedblocks"))))
    return records


def _to_main(names):
    for end in ("main", "start_thread"):
        if end in names:
            return tuple(names[: names.index(end) + 1])
    return tuple(names)


def totals(records) -> dict:
    out = {k: {"bytes": 0, "blocks": 0} for k in KINDS}
    for _, kind, nbytes, blocks in records:
        out[kind]["bytes"] += nbytes
        out[kind]["blocks"] += blocks
    return out


def our_entries(report):
    """[(functions up to main or start_thread, inlined frames and markers left out, kinds)]."""
    section = next(r for r in report["reports"] if r["kind"] == "outstanding")
    return [
        (
            _to_main([f["function"] or "?" for f in e["stack"] if not f["inlined"] and not f.get("truncated")]),
            e["reachability"],
        )
        for e in section["entries"]
    ]


def assert_equal_to_valgrind(report, records):
    """The four totals equal valgrind's; each of our stacks holds the kinds of valgrind's
    records whose stacks it begins (a frame-pointer walk cut early begins several)."""
    ours = report["resources"]["heap"]["reachability"]
    assert {k: ours[k] for k in KINDS} == totals(records), (ours, records)
    assert "not_scanned" not in ours
    ours_by_stack = {}  # several call sites can show the same frames
    for names, kinds in our_entries(report):
        summed = ours_by_stack.setdefault(names, totals([]))
        for k in KINDS:
            summed[k]["bytes"] += kinds[k]["bytes"]
            summed[k]["blocks"] += kinds[k]["blocks"]
    expected = {names: totals([]) for names in ours_by_stack}
    for names, kind, nbytes, blocks in records:
        longest = max((ours for ours in ours_by_stack if names[: len(ours)] == ours), key=len, default=None)
        assert longest is not None, f"valgrind's stack {names} begins none of ours: {list(ours_by_stack)}"
        expected[longest][kind]["bytes"] += nbytes
        expected[longest][kind]["blocks"] += blocks
    assert ours_by_stack == expected


@pytest.fixture(scope="module")
def reach(build):
    return build("reach-O2")


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_kinds_at_a_commands_exit_equal_valgrinds(backend, reach, tmp_path):
    records = valgrind_kinds([reach, "exit"], tmp_path)
    want = totals(records)
    assert want["definitely_lost"]["blocks"] >= 2 and want["indirectly_lost"]["blocks"] >= 3, want
    assert want["possibly_lost"]["blocks"] >= 1 and want["still_reachable"]["blocks"] >= 7, want
    result = probedsl(
        "run", MEMLEAK, "--backend", backend, "--reachability", "--format", "json", "--top", "100", "--", reach, "exit"
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert report["reachability_scan"]["at"] == "exit"
    assert report["reachability_scan"]["pause_ms"] > 0
    assert_equal_to_valgrind(report, records)


def test_leaks_only_and_the_text_summary(reach, tmp_path):
    records = valgrind_kinds([reach, "exit"], tmp_path)
    want = totals(records)
    result = probedsl(
        "run", MEMLEAK, "--backend", "bcc", "--reachability", "--leaks-only", "--top", "100", "--", reach, "exit"
    )
    assert result.returncode == 0, result.stderr
    labels = {
        "definitely_lost": "definitely lost",
        "indirectly_lost": "indirectly lost",
        "possibly_lost": "possibly lost",
        "still_reachable": "still reachable",
    }
    for kind, label in labels.items():  # valgrind's LEAK SUMMARY lines, the same numbers
        line = f"{label:>17}: {want[kind]['bytes']} bytes in {want[kind]['blocks']} blocks"
        assert line in result.stdout, (line, result.stdout)
    shown = re.findall(r"^ +(\d+) +(\d+) +[\d.]+s +(.*)$", result.stdout, re.M)
    assert shown and not any("still reachable" in extra for _, _, extra in shown), shown
    lost = sum(want[k]["bytes"] for k in ("definitely_lost", "indirectly_lost", "possibly_lost"))
    assert sum(int(b) for b, _, _ in shown) == lost


def _reports(path):
    try:
        text = open(path).read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _report_after(path, sequence: int, tracer) -> dict:
    """The first report written with a sequence >= `sequence` (probedsl writes one a second)."""
    while True:
        doc = _reports(path)
        if doc is not None and doc["sequence"] >= sequence:
            return doc
        assert tracer.poll() is None, tracer.communicate()
        time.sleep(0.05)


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_kinds_of_a_running_process_follow_its_references(backend, reach, tmp_path):
    """Threads keep one block only on a stack and one only in a register; then the program
    forgets its global tree and thread-local block, and the next report says they are lost."""
    before = valgrind_kinds([reach], tmp_path, b"go\nexit\n")
    after = valgrind_kinds([reach], tmp_path, b"go\ndrop\nexit\n")
    kept = [kind for names, kind, _, _ in before if {"stack_holder", "register_holder"} & set(names)]
    assert kept == ["still_reachable"] * 2, before
    assert totals(after)["definitely_lost"]["bytes"] > totals(before)["definitely_lost"]["bytes"]
    target = subprocess.Popen([reach], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = tmp_path / "report.json"
    try:
        tracer = start_run(
            MEMLEAK,
            "--backend",
            backend,
            "--pid",
            str(target.pid),
            "--reachability",
            "--interval",
            "1",
            "--format",
            "json",
            "-o",
            str(out),
            "--top",
            "100",
        )
        target.stdin.write(b"go\n")
        target.stdin.flush()
        assert target.stdout.readline() == b"ready\n"
        seen = (_reports(out) or {"sequence": 0})["sequence"]
        # a report whose pause began before "ready" could be written after it: take the next
        first = _report_after(out, seen + 2, tracer)
        assert first["reachability_scan"]["at"] == "report"
        assert_equal_to_valgrind(first, before)
        target.stdin.write(b"drop\n")
        target.stdin.flush()
        assert target.stdout.readline() == b"dropped\n"
        second = _report_after(out, _reports(out)["sequence"] + 2, tracer)
        assert_equal_to_valgrind(second, after)
        target.stdin.write(b"exit\n")
        target.stdin.flush()
        assert target.wait(60) == 0
        _, err = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, err
        final = _reports(out)
        assert final["final"] and final["reachability_scan"]["at"] == "exit"
        # every thread held at its exit, registers and stacks read: what valgrind sees at exit
        assert_equal_to_valgrind(final, after)
    finally:
        target.kill()
        target.wait()


def _tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("TracerPid:"))


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_the_target_is_let_go_however_probedsl_ends(how, reach, tmp_path):
    target = subprocess.Popen([reach], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        tracer = start_run(MEMLEAK, "--backend", "bcc", "--pid", str(target.pid), "--reachability", "--format", "json")
        assert _tracer_of(target.pid) == tracer.pid or _tracer_of(target.pid) != 0
        tracer.send_signal(getattr(signal, how))
        out, err = tracer.communicate(timeout=120)
        if how == "SIGINT":
            assert tracer.returncode == 0, err
            report = report_json(out)
            assert report["reachability_scan"]["at"] == "report"  # scanned as it ran on
        assert _tracer_of(target.pid) == 0
        assert _state(target.pid) in "SR"  # not left stopped
        target.stdin.write(b"go\n")
        target.stdin.flush()
        assert target.stdout.readline() == b"ready\n"  # it runs on
    finally:
        target.kill()
        target.wait()


def test_a_target_killed_outright_is_still_reported(reach):
    """Linux 6.18 stops even a SIGKILLed process at its exit (measured here), so it is scanned
    there; a kernel that would not gets a note instead (Scanner.final)."""
    target = subprocess.Popen([reach], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        tracer = start_run(MEMLEAK, "--backend", "bcc", "--pid", str(target.pid), "--reachability", "--format", "json")
        target.stdin.write(b"go\n")
        target.stdin.flush()
        assert target.stdout.readline() == b"ready\n"
        target.kill()  # SIGKILL: the kernel allows no stop at its exit
        out, err = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, err
        report = report_json(out)
        assert report["resources"]["heap"]["live_blocks"] > 0
        assert report["reachability_scan"]["at"] == "exit", report["notes"]
        assert report["resources"]["heap"]["reachability"]["definitely_lost"]["blocks"] > 0
    finally:
        target.kill()
        target.wait()


def test_a_process_traced_by_another_is_refused_in_one_line_and_reported(reach):
    target = subprocess.Popen([reach], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from probedsl.process import ptrace
ptrace.request(ptrace.SEIZE, {target.pid})
print("attached", flush=True)
time.sleep(600)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "attached\n"
        tracer = start_run(MEMLEAK, "--backend", "bcc", "--pid", str(target.pid), "--reachability")
        tracer.send_signal(signal.SIGINT)
        out, err = tracer.communicate(timeout=120)
        assert tracer.returncode == 0, err
        assert "probedsl memleak report (final)" in out and "LEAK SUMMARY" not in out
        assert re.search(
            rf"\n  note: --reachability: cannot attach: process {target.pid} is already traced "
            rf"by pid {holder.pid} \(python[^\n]*\n",
            out,
        ), out
    finally:
        holder.kill()
        holder.wait()
        target.kill()
        target.wait()


def test_reachability_refuses_what_it_cannot_scan():
    for args, message in (
        (["--comm", "x"], "--reachability goes with --pid PID or -- CMD"),
        (["--sample", "2", "--", "true"], "needs every block"),
        ([], "--leaks-only goes with --reachability"),
    ):
        extra = (
            ["--reachability"] if message != "--leaks-only goes with --reachability" else ["--leaks-only", "--", "true"]
        )
        result = probedsl("run", MEMLEAK, *extra, *args)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    result = probedsl("run", str(ROOT / "recipes" / "fdleak.probe"), "--reachability", "--", "true")
    assert result.returncode == 1 and "has no resource of memory blocks" in result.stderr, result.stderr


# --- the classification alone, on hand-made graphs --------------------------------------------
def _kinds(blocks, roots=(), edges=()):
    """blocks: [(start, size)]; roots: pointer values; edges: (from block, pointer value)."""
    from probedsl.reachability import heapscan

    starts = np.array([s for s, _ in blocks], dtype=np.uint64)
    graph = heapscan._Graph(starts, starts + np.array([n for _, n in blocks], dtype=np.uint64))
    graph.add_root_words(np.array(roots, dtype=np.uint64))
    for source, value in edges:
        graph.add_block_words(np.array([value], dtype=np.uint64), blocks[source][0])
    return [KINDS[k] for k in graph.kinds()]


def test_classification_follows_valgrinds_rules():
    blocks = [(0x1000, 32), (0x2000, 32), (0x3000, 32), (0x4000, 32), (0x5000, 32), (0x6000, 0)]
    # root -> 0 -> 1; an interior pointer to 4; a pointer to 5's start (size 0); 2, 3 unreached
    kinds = _kinds(blocks, roots=[0x1000, 0x5008, 0x6000], edges=[(0, 0x2000)])
    assert kinds == [
        "still_reachable",
        "still_reachable",
        "definitely_lost",
        "definitely_lost",
        "possibly_lost",
        "still_reachable",
    ]
    # 2 -> 3 -> 2, a cycle nothing points to: the first in address order leads it
    kinds = _kinds(blocks[:4], roots=[0x1000], edges=[(0, 0x2000), (2, 0x4000), (3, 0x3000)])
    assert kinds == ["still_reachable", "still_reachable", "definitely_lost", "indirectly_lost"]
    # reached only through an interior pointer: possibly lost, and so is what it points to
    kinds = _kinds(blocks[:3], roots=[0x1010], edges=[(0, 0x2000), (1, 0x3000)])
    assert kinds == ["possibly_lost", "possibly_lost", "possibly_lost"]
    # a word past a block's end, or a block's last partial word, points at nothing
    kinds = _kinds([(0x1000, 12), (0x2000, 8)], roots=[0x100C])
    assert kinds == ["definitely_lost", "definitely_lost"]


def _memcheck(n, roots, edges):
    """memcheck's leak check (mc_leakcheck.c) step by step: a mark stack from the roots, where
    a block is (re)scanned whenever its state rises, then cliques in address order."""
    state = ["unreached"] * n
    out = {}
    for src, dst, at_start in edges:
        out.setdefault(src, []).append((dst, at_start))

    def push(dst, at_start, prior_definite, stack):
        if state[dst] == "reachable":
            return
        if at_start and prior_definite:
            state[dst] = "reachable"
            stack.append(dst)
        elif state[dst] == "unreached":
            state[dst] = "possible"
            stack.append(dst)

    stack = []
    for dst, at_start in roots:
        push(dst, at_start, True, stack)
    while stack:
        node = stack.pop()
        for dst, at_start in out.get(node, []):
            push(dst, at_start, state[node] == "reachable", stack)
    for leader in range(n):
        if state[leader] != "unreached":
            continue
        stack = [leader]
        while stack:
            node = stack.pop()
            for dst, _ in out.get(node, []):
                if dst != leader and state[dst] == "unreached":
                    state[dst] = "indirect"
                    stack.append(dst)
    names = {
        "unreached": "definitely_lost",
        "indirect": "indirectly_lost",
        "possible": "possibly_lost",
        "reachable": "still_reachable",
    }
    return [names[s] for s in state]


def test_classification_equals_memchecks_algorithm_on_random_graphs():
    """Our closure-based classification against memcheck's own order of work, 300 random heaps."""
    from hypothesis import given, settings, strategies as st

    size = 64

    @settings(max_examples=300, deadline=None)
    @given(
        st.integers(1, 12).flatmap(
            lambda n: st.tuples(
                st.just(n),
                st.lists(st.tuples(st.integers(0, n - 1), st.booleans()), max_size=4),
                st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), st.booleans()), max_size=3 * n),
            )
        )
    )
    def check(case):
        n, roots, edges = case
        blocks = [(0x10000 + i * 0x100, size) for i in range(n)]
        pointer = lambda dst, at_start: blocks[dst][0] + (0 if at_start else 16)
        # each edge sits in its own word of the source block
        graph_edges, used = [], {}
        for src, dst, at_start in edges:
            slot = used.get(src, 0)
            if slot < size // 8:
                used[src] = slot + 1
                graph_edges.append((src, dst, at_start, slot))
        from probedsl.reachability import heapscan

        starts = np.array([b for b, _ in blocks], dtype=np.uint64)
        graph = heapscan._Graph(starts, starts + np.uint64(size))
        graph.add_root_words(np.array([pointer(d, s) for d, s in roots], dtype=np.uint64))
        for src, dst, at_start, slot in graph_edges:
            graph.add_block_words(np.array([pointer(dst, at_start)], dtype=np.uint64), blocks[src][0] + 8 * slot)
        ours = [KINDS[k] for k in graph.kinds()]
        assert ours == _memcheck(n, roots, [(s, d, a) for s, d, a, _ in graph_edges])

    check()
