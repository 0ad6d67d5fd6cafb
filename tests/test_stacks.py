"""Stacks on code built without frame pointers (-O2), against valgrind's for the same binary:
every frame shown is one valgrind shows, in its place; where the frame-pointer walk stops being
certain the stack ends with a marker instead of garbage."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

import pytest

from conftest import BACKENDS, MEMLEAK, Held, probedsl, report_json, start_run
from test_tracing import assert_accounted

pytestmark = pytest.mark.usefixtures("root_required")


def valgrind_stacks(exe: str, tmp_path) -> dict:
    """{functions past the allocator, caller first at index 0: (bytes, blocks)} of every block
    live at exit, from valgrind --xml; real frames only (ours leave inlined calls out too), "?"
    for a frame it cannot name."""
    xml = tmp_path / "vg.xml"
    subprocess.run(
        [
            "valgrind",
            "--leak-check=full",
            "--show-leak-kinds=all",
            "--num-callers=64",
            "--read-inline-info=no",
            "--xml=yes",
            f"--xml-file={xml}",
            exe,
        ],
        capture_output=True,
        check=True,
    )
    out = {}
    for error in ET.parse(xml).getroot().iter("error"):
        if not error.findtext("kind", "").startswith("Leak_"):
            continue
        names = [f.findtext("fn") or "?" for f in error.find("stack")]
        stack = tuple(names[1:])  # past valgrind's malloc
        b, n = out.get(stack, (0, 0))
        out[stack] = (b + int(error.findtext("xwhat/leakedbytes")), n + int(error.findtext("xwhat/leakedblocks")))
    return out


def our_stacks(report, count: str = "blocks") -> list:
    """[(functions, truncated, bytes, count)] of the report's entries, inlined frames left out,
    "?" for a frame without a name (shown as module+0xaddress)."""
    rows = []
    for e in report["reports"][0]["entries"]:
        names = tuple(f["function"] or "?" for f in e["stack"] if not f["inlined"] and not f.get("truncated"))
        rows.append((names, e["truncated"], e["bytes"], e[count]))
    return rows


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_o2_frame_pointer_stacks_show_only_frames_valgrind_shows_and_mark_the_cut(backend, build, tmp_path):
    exe = build("deep-O2")
    expected = valgrind_stacks(exe, tmp_path)
    assert sum(n for _, n in expected.values()) == 16, expected
    result = probedsl(
        "run", MEMLEAK, "--backend", backend, "--stacks", "fp", "--format", "json", "--top", "50", "--", exe
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    matched = [0, 0]
    for names, truncated, nbytes, blocks in our_stacks(report):
        full = [vg for vg in expected if vg[: len(names)] == names]
        if names[:1] != ("level4",):
            continue  # the C library's own blocks (stdio): not in this program
        assert full, (names, list(expected))
        assert truncated, names  # -O2: level4 keeps no frame pointer
        matched[0] += nbytes
        matched[1] += blocks
    assert matched == [sum(b for b, _ in expected.values()), 16], (matched, expected)
    assert any("no frame pointer" in n for n in report["notes"]), report["notes"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_pointer_code_keeps_its_whole_stack(backend, build, tmp_path):
    """-O0 code keeps frame pointers: the stack reaches main, as valgrind's does, and stops at
    the C library's start-up code, which has none."""
    exe = build("leak")
    result = probedsl(
        "run", MEMLEAK, "--backend", backend, "--stacks", "fp", "--format", "json", "--top", "50", "--", exe, input="\n"
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    entry = next(e for e in report["reports"][0]["entries"] if e["bytes"] == 40)
    names = [f["function"] for f in entry["stack"] if not f.get("truncated")]
    assert names[:4] == ["wrapper1", "wrapper2", "main", "__libc_start_call_main"], names
    assert entry["stack"][-1]["text"] == "[truncated: no frame pointer in libc.so.6]"


def up_to_main(names) -> tuple:
    """The frames from the allocating function to main (valgrind says "(below main)" past it)."""
    names = tuple(names)
    return names[: names.index("main") + 1] if "main" in names else names


def assert_same_as_valgrind(report, expected):
    """Every entry of the program's own blocks has valgrind's stack, frame by frame to main,
    and the (bytes, blocks) of each stack are valgrind's."""
    ours = {}
    for names, _truncated, nbytes, blocks in our_stacks(report):
        if names[:1] != ("level4",):
            continue
        b, n = ours.get(up_to_main(names), (0, 0))
        ours[up_to_main(names)] = (b + nbytes, n + blocks)
    assert ours == {up_to_main(k): v for k, v in expected.items()}, (ours, expected)


@pytest.mark.debian13
def test_dwarf_stacks_of_an_o2_program_equal_valgrinds(build, tmp_path):
    """BCC unwinds from call-frame information: the two callers of the shared -O2 chain are
    told apart, every frame to main, and the stack goes on to _start (complete)."""
    exe = build("deep-O2")
    expected = valgrind_stacks(exe, tmp_path)
    held = Held([exe, "wait"])
    try:
        tracer = start_run(MEMLEAK, "--backend", "bcc", "--format", "json", "--top", "50", "--pid", str(held.pid))
        held.go()
        out, err = tracer.communicate(timeout=120)
    finally:
        held.end()
    assert tracer.returncode == 0, err
    report = report_json(out)
    assert_accounted(report)
    assert_same_as_valgrind(report, expected)
    for names, truncated, _, _ in our_stacks(report):
        if names[:1] == ("level4",):
            assert not truncated and names[-1] == "_start", names


@pytest.mark.debian13
def test_dwarf_stacks_of_a_launched_o2_command(build, tmp_path):
    """-- CMD: the command is stopped at its exec while its program's rows are loaded."""
    exe = build("deep-O2")
    expected = valgrind_stacks(exe, tmp_path)
    result = probedsl("run", MEMLEAK, "--backend", "bcc", "--format", "json", "--top", "50", "--", exe)
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    assert_same_as_valgrind(report, expected)


@pytest.mark.debian13
def test_dwarf_stacks_from_debug_frame(build, tmp_path):
    """Code built without asynchronous unwind tables has its rows in .debug_frame only."""
    exe = build("deep-nounwind")
    expected = valgrind_stacks(exe, tmp_path)
    result = probedsl("run", MEMLEAK, "--backend", "bcc", "--format", "json", "--top", "50", "--", exe)
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_same_as_valgrind(report, expected)


@pytest.mark.debian13
@pytest.mark.parametrize(
    "command",
    [
        ["git", "--version"],
        ["/usr/bin/python3", "-c", "import json"],
        ["sqlite3", ":memory:", "create table t(x); insert into t values(1);"],
    ],
    ids=["git", "python3", "sqlite3"],
)
def test_dwarf_stacks_of_debians_programs_are_deep_and_never_garbage(command):
    """Distribution programs are stripped and built without frame pointers."""
    result = probedsl("run", MEMLEAK, "--backend", "bcc", "--format", "json", "--top", "5", "--", *command)
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    entries = report["reports"][0]["entries"][:5]  # the largest (JSON holds them all)
    assert entries
    for e in entries:
        frames = [f for f in e["stack"] if not f["inlined"] and not f.get("truncated")]
        assert len(frames) >= 4, [f["text"] for f in e["stack"]]
        assert all(f["module"] for f in frames), [f["text"] for f in e["stack"]]  # none in no mapping


def test_bpftrace_refuses_dwarf_stacks_in_one_line():
    result = probedsl("run", MEMLEAK, "--backend", "bpftrace", "--stacks", "dwarf", "--", "true")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--stacks dwarf" in result.stderr, result.stderr


ENTRY_RECIPE = """recipe calls "target's calls, by the stack at its entry"
resource call keyed by (pid, id) {
  acquire "%s":target(id) -> (pid, id)
  record ustack, time, pid
}
report outstanding call by ustack: count() as calls, top 10
"""


@pytest.mark.parametrize("backend,stacks", [("bpftrace", "fp"), ("bcc", "fp"), ("bcc", "dwarf")])
def test_entry_probe_stacks_keep_the_immediate_caller(backend, stacks, build, tmp_path):
    """At a function's first instruction rbp is still its caller's: a frame-pointer walk from
    there skips the caller. Kept on frame-pointer code where the kernel reads it at [rsp]
    (6.12+, a first instruction `push %rbp`), and by the unwinder everywhere."""
    exe = build("entry_chain")
    recipe = tmp_path / "calls.probe"
    recipe.write_text(ENTRY_RECIPE % exe)
    result = probedsl("run", str(recipe), "--backend", backend, "--stacks", stacks, "--format", "json", "--", exe)
    assert result.returncode == 0, result.stderr
    (entry,) = report_json(result.stdout)["reports"][0]["entries"]
    names = [f["function"] for f in entry["stack"] if not f.get("truncated")]
    assert names[:4] == ["target", "middle", "outer", "main"], names
    assert entry["calls"] == 3


def test_entry_probe_stacks_of_o2_code(build, tmp_path):
    """-O2: no frame pointer, so the walk is cut after the probed function, where the
    unwinder goes on to _start."""
    exe = build("entry_chain-O2")
    recipe = tmp_path / "calls.probe"
    recipe.write_text(ENTRY_RECIPE % exe)
    walked, unwound = (
        probedsl("run", str(recipe), "--backend", "bcc", "--stacks", stacks, "--format", "json", "--", exe)
        for stacks in ("fp", "dwarf")
    )
    (cut,) = report_json(walked.stdout)["reports"][0]["entries"]
    assert [f["function"] for f in cut["stack"] if not f.get("truncated")] == ["target"] and cut["truncated"]
    for whole in report_json(unwound.stdout)["reports"][0]["entries"]:  # (main's loop may be unrolled)
        names = [f["function"] for f in whole["stack"]]
        assert names[:4] == ["target", "middle", "outer", "main"] and names[-1] == "_start", names
