"""Every way a frame can be laid out in -O2 code, against valgrind's stacks for the same
binaries: recursion, a variable-length array, a frame of 3,000 bytes, a realigned (-mavx2)
frame, a signal handler, a thread, a shared library and dlopen'ed code built without frame pointers, C++ containers and a
thrown exception. BCC's unwinder must show valgrind's frames; the frame-pointer walk (both
backends) only frames valgrind shows, in their place, and a marker where it stops."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import BACKENDS, CXXLEAK, FIXTURES, MEMLEAK, probedsl, report_json
from test_stacks import our_stacks, valgrind_stacks
from test_tracing import assert_accounted

pytestmark = pytest.mark.usefixtures("root_required")

# leaf_alloc's block sizes in shapes.c, one per shape; lib_leaf's for the two libraries
SHAPES = {
    101: "recursion",
    102: "variable-length array",
    103: "realigned frame",
    104: "signal handler",
    105: "thread",
    106: "shared library",
    107: "dlopen'ed library",
    108: "frame larger than the unwinder's copy of the stack",
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    lib = str(out / "libshapelib.so")
    subprocess.run(["gcc", "-O2", "-g", "-fPIC", "-shared", "-o", lib, str(FIXTURES / "shapelib.c")], check=True)
    shutil.copy(lib, out / "libshapedl.so")
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-g",
            "-mavx2",
            "-pthread",
            "-o",
            str(out / "shapes"),
            str(FIXTURES / "shapes.c"),
            f"-L{out}",
            "-lshapelib",
            "-Wl,-rpath,$ORIGIN",
            "-ldl",
        ],
        check=True,
    )
    subprocess.run(["g++", "-O2", "-g", "-o", str(out / "shapes_cxx"), str(FIXTURES / "shapes_cxx.cpp")], check=True)
    return out


def to_the_start(names) -> tuple:
    """Frames up to main, or to a thread's start_thread: below them valgrind differs (it shows
    "(below main)", and threads made by clone, since it turns clone3 down)."""
    names = tuple(names)
    for last in ("main", "start_thread"):
        if last in names:
            return names[: names.index(last) + 1]
    return names


def by_size(stacks: dict) -> dict:
    """{bytes: valgrind's stack} of the blocks one shape allocates (each has its own size)."""
    return {
        nbytes: to_the_start(stack)
        for stack, (nbytes, _) in stacks.items()
        if stack[:1] in (("leaf_alloc",), ("lib_leaf",))
    }


@pytest.mark.debian13
def test_dwarf_stacks_of_every_frame_shape_equal_valgrinds(shapes, tmp_path):
    expected = by_size(valgrind_stacks(str(shapes / "shapes"), tmp_path))
    assert sorted(expected) == sorted(SHAPES), expected
    result = probedsl(
        "run", MEMLEAK, "--backend", "bcc", "--format", "json", "--top", "100", "--", str(shapes / "shapes")
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    ours = {nbytes: (names, truncated) for names, truncated, nbytes, _ in our_stacks(report) if nbytes in SHAPES}
    for nbytes, shape in SHAPES.items():
        names, truncated = ours[nbytes]
        if shape == "dlopen'ed library" and truncated:
            # its code runs microseconds after the mmap, before the loader has written its
            # rows: the walk stops there, with a marker, never past it
            assert expected[nbytes][: len(names)] == names and names[-1] == "dl_chain", (shape, names)
            continue
        assert to_the_start(names) == expected[nbytes], (shape, names, expected[nbytes])
        assert not truncated, (shape, names)
    for e in report["reports"][0]["entries"]:
        assert all(f["module"] for f in e["stack"]), [f["text"] for f in e["stack"]]  # none in no mapping


@pytest.mark.debian13
def test_dwarf_stacks_of_cxx_containers_and_exceptions_equal_valgrinds(shapes, tmp_path):
    expected = valgrind_stacks(str(shapes / "shapes_cxx"), tmp_path)
    assert any(".cold" in name for stack in expected for name in stack)  # the catch block's own part
    result = probedsl(
        "run", CXXLEAK, "--backend", "bcc", "--format", "json", "--top", "100", "--", str(shapes / "shapes_cxx")
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    ours = {}
    for names, truncated, nbytes, blocks in our_stacks(report, "objects"):
        assert not truncated, names
        b, n = ours.get(to_the_start(names), (0, 0))
        ours[to_the_start(names)] = (b + nbytes, n + blocks)
    assert ours == {to_the_start(k): v for k, v in expected.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_pointer_walks_of_every_frame_shape_show_only_valgrinds_frames(backend, shapes, tmp_path):
    expected = by_size(valgrind_stacks(str(shapes / "shapes"), tmp_path))
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--stacks",
        "fp",
        "--format",
        "json",
        "--top",
        "100",
        "--",
        str(shapes / "shapes"),
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_accounted(report)
    shown = 0  # the walk is cut early, so shapes share entries: count bytes
    for names, truncated, nbytes, _ in our_stacks(report):
        if names[:1] not in (("leaf_alloc",), ("lib_leaf",)):
            continue
        assert any(stack[: len(names)] == to_the_start(names) for stack in expected.values()), names
        assert truncated, names  # -O2 code keeps no frame pointer
        shown += nbytes
    assert shown == sum(SHAPES)


STREAMS_AND_HEAP = """recipe streams_and_heap "FILE streams, and the heap blocks allocated under them"
resource stream keyed by (pid, file) {
  acquire libc:fopen(path, mode) -> (pid, ret) when ret != 0
  release libc:fclose(f)         -> (pid, f)   when f != 0
  record ustack, time, pid
}
resource heap keyed by (pid, address) {
  acquire libc:malloc(size) -> (pid, ret) when ret != 0  size = size
  release libc:free(ptr)    -> (pid, ptr) when ptr != 0
  record size, ustack, time, pid
}
report outstanding heap by ustack: sum(size) as bytes, count() as blocks, top 20
"""


@pytest.mark.debian13
def test_dwarf_stacks_pass_a_pending_uretprobe(build, tmp_path):
    """malloc inside fopen, both probed: the unwinder takes the caller's address that fopen's
    entry probe kept, not the trampoline the kernel put in its place."""
    exe = build("nested_calls-O2")
    expected = valgrind_stacks(exe, tmp_path)
    recipe = tmp_path / "streams_and_heap.probe"
    recipe.write_text(STREAMS_AND_HEAP)
    result = probedsl("run", str(recipe), "--backend", "bcc", "--format", "json", "--", exe)
    assert result.returncode == 0, result.stderr
    heap = {"reports": [r for r in report_json(result.stdout)["reports"] if r["resource"] == "heap"]}
    ours = [(to_the_start(names), truncated) for names, truncated, _, _ in our_stacks(heap) if "open_stream" in names]
    assert ours == [(to_the_start(next(k for k in expected if "open_stream" in k)), False)], (ours, expected)
