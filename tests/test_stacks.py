"""Stacks on code built without frame pointers (-O2), against valgrind's for the same binary:
every frame shown is one valgrind shows, in its place; where the frame-pointer walk stops being
certain the stack ends with a marker instead of garbage."""
from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET

import pytest

from conftest import BACKENDS, MEMLEAK, probedsl, report_json
from test_tracing import assert_accounted

pytestmark = pytest.mark.usefixtures("root_required")


def valgrind_stacks(exe: str, tmp_path) -> dict:
    """{functions past the allocator, caller first at index 0: (bytes, blocks)} of every block
    live at exit, from valgrind --xml."""
    xml = tmp_path / "vg.xml"
    subprocess.run(["valgrind", "--leak-check=full", "--show-leak-kinds=all", "--num-callers=64", "--xml=yes",
                    f"--xml-file={xml}", exe], capture_output=True, check=True)
    out = {}
    for error in ET.parse(xml).getroot().iter("error"):
        if not error.findtext("kind", "").startswith("Leak_"):
            continue
        names = [f.findtext("fn") or "?" for f in error.find("stack")]
        stack = tuple(names[1:])            # past valgrind's malloc
        b, n = out.get(stack, (0, 0))
        out[stack] = (b + int(error.findtext("xwhat/leakedbytes")), n + int(error.findtext("xwhat/leakedblocks")))
    return out


def our_stacks(report) -> list:
    """[(functions, truncated, bytes, blocks)] of the report's entries, inlined frames left out."""
    rows = []
    for e in report["reports"][0]["entries"]:
        names = tuple(f["function"] or f["text"] for f in e["stack"] if not f["inlined"] and not f.get("truncated"))
        rows.append((names, e["truncated"], e["bytes"], e["blocks"]))
    return rows


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_o2_stacks_show_only_frames_valgrind_shows_and_mark_the_cut(backend, build, tmp_path):
    exe = build("deep-O2")
    expected = valgrind_stacks(exe, tmp_path)
    assert sum(n for _, n in expected.values()) == 16, expected
    result = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--top", "50", "--", exe)
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    matched = [0, 0]
    for names, truncated, nbytes, blocks in our_stacks(report):
        full = [vg for vg in expected if vg[:len(names)] == names]
        if names[:1] != ("level4",):
            continue                    # the C library's own blocks (stdio): not in this program
        assert full, (names, list(expected))
        assert truncated, names         # -O2: level4 keeps no frame pointer
        matched[0] += nbytes
        matched[1] += blocks
    assert matched == [sum(b for b, _ in expected.values()), 16], (matched, expected)
    assert any("no frame pointer" in n for n in report["notes"]), report["notes"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_pointer_code_keeps_its_whole_stack(backend, build, tmp_path):
    """-O0 code keeps frame pointers: the stack reaches main, as valgrind's does, and stops at
    the C library's start-up code, which has none."""
    exe = build("leak")
    result = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--top", "50", "--", exe,
                      input="\n")
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    entry = next(e for e in report["reports"][0]["entries"] if e["bytes"] == 40)
    names = [f["function"] for f in entry["stack"] if not f.get("truncated")]
    assert names[:4] == ["wrapper1", "wrapper2", "main", "__libc_start_call_main"], names
    assert entry["stack"][-1]["text"] == "[truncated: no frame pointer in libc.so.6]"
