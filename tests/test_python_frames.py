"""Python frames in BCC stacks (probedsl/pyframes.py): a Python program leaking through ctypes'
malloc from nested calls; each leak site's Python frames must equal the traceback the program
took at the allocation, and its totals the sizes it allocated there."""

from __future__ import annotations

import dis
import json
import os
import subprocess
import sys
import sysconfig
import time

import pytest

from conftest import ROOT, start_run
from probedsl.stacks import pylines

# the system's CPython: 3.11 on Debian 12, 3.13 in a Debian 13 root, 3.14 in sid's
PYTHON = os.path.realpath("/usr/bin/python3")
pytestmark = pytest.mark.debian13
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pyleak.py")


def _sample(n):
    total = 0
    for i in range(n):
        if i % 3:
            total += (lambda x: x * 2)(i)
        else:
            total -= [j for j in range(i) if j > 1].__len__()
    return total


@pytest.mark.skipif(sys.version_info[:2] < (3, 11), reason="the 3.11+ location table")
def test_line_table_decoded_as_cpython_does():
    code = _sample.__code__
    expected = {offset // 2: line for offset, _, line in code.co_lines() for offset in range(offset, _, 2)}
    assert len(expected) > 20
    for unit, line in expected.items():
        assert pylines.line_of(code.co_linetable, code.co_firstlineno, unit) == (line or 0), unit
    assert pylines.line_of(code.co_linetable, code.co_firstlineno, -1) == code.co_firstlineno
    assert any(i.opname == "CALL" for i in dis.get_instructions(code))


def _report_after(tracer, out):
    """Waits for an interval report written after now (the program said ready: its stacks
    are all taken)."""
    ready = time.time()
    while not (out.exists() and out.stat().st_mtime > ready):
        assert tracer.poll() is None, tracer.communicate()
        time.sleep(0.05)


@pytest.fixture(scope="module", params=["cmd", "pid"])
def python_run(request, tmp_path_factory, root_required):
    """The program launched (-- CMD) or running (--pid), traced until an interval report after
    it said ready (every stack read while it lives); (its sites, the final report, stderr)."""
    if not os.path.exists(PYTHON):
        pytest.fail(f"{PYTHON} is needed (the system's python3)")
    tmp = tmp_path_factory.mktemp("py")
    sites, out = tmp / "sites.jsonl", tmp / "report.json"
    common = ["memleak", "--backend", "bcc", "--format", "json", "-o", str(out), "--interval", "1"]
    service = None
    if request.param == "cmd":
        tracer = start_run(*common, "--", PYTHON, FIXTURE, str(sites), "at-end", stdin=subprocess.PIPE)
        said = tracer.stdout
    else:
        service = subprocess.Popen(
            [PYTHON, FIXTURE, str(sites), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert service.stdout.readline().strip() == "started"
        tracer = start_run(*common, "--pid", str(service.pid))
        service.stdin.write("go\n")
        service.stdin.flush()
        said = service.stdout
    assert said.readline().strip() == "ready"
    _report_after(tracer, out)
    if service is not None:
        service.stdin.close()
        assert service.wait(timeout=60) == 0
    _, err = tracer.communicate("" if service is None else None, timeout=120)
    assert tracer.returncode == 0, err
    return [json.loads(line) for line in sites.read_text().splitlines()], json.loads(out.read_text()), err


# the versions whose frames probedsl names
NAMED_VERSIONS = {(3, 11), (3, 13), (3, 14)}


def _unnamed_version(report) -> bool:
    """Whether the system's CPython is one probedsl has no frame layout for: then the report
    says so in a note, and its stacks are native only."""
    found = subprocess.run([PYTHON, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
    if tuple(int(v) for v in found.stdout.split()) in NAMED_VERSIONS:
        return False
    assert any("has no frame layout" in n for n in report["notes"]), report["notes"]
    assert not any(_python_frames(e) for r in report["reports"] for e in r.get("entries", ()))
    return True


def _python_frames(entry):
    return [(f["file"], f["line"], f["function"]) for f in entry["stack"] if f["module"] == "[python]"]


def test_each_leak_site_has_its_own_python_frames(python_run):
    sites, report, err = python_run
    assert len(sites) == 9
    if _unnamed_version(report):
        return
    expected = {}
    for site in sites:
        frames = tuple((file, line) for file, line, _ in site["frames"])
        nbytes, blocks, names = expected.get(frames, (0, 0, [n for _, _, n in site["frames"]]))
        expected[frames] = (nbytes + site["size"], blocks + 1, names)
    # through a method, a comprehension, a generator and a lambda: in the main thread and in
    # another; and a direct call
    assert len(expected) == 3
    # one Python path can be several entries: its native frames (folded away in the report) differ
    # while the interpreter specialises a call (3.13: the first call of a function is generic)
    paths = {}
    for e in report["reports"][0]["entries"]:
        frames = tuple((file, line) for file, line, _ in _python_frames(e))
        if frames in expected:
            nbytes, blocks, entries = paths.get(frames, (0, 0, []))
            paths[frames] = (nbytes + e["bytes"], blocks + e["blocks"], entries + [e])
    big = [
        (e["bytes"], [f["text"] for f in e["stack"]]) for e in report["reports"][0]["entries"] if e["bytes"] >= 100_000
    ]
    assert set(paths) == set(expected), (big, err)
    for frames, (nbytes, blocks, names) in expected.items():
        assert paths[frames][:2] == (nbytes, blocks), big
        # qualified names end with traceback's names (Service.handle, worker.<locals>.<lambda>)
        for e in paths[frames][2]:
            for (_, _, qualname), name in zip(_python_frames(e), names):
                assert qualname.split(".")[-1] == name
    assert any(
        "Thread._bootstrap" in q for _, _, found in paths.values() for e in found for _, _, q in _python_frames(e)
    )


def test_a_stack_first_seen_as_the_command_ends_is_named(python_run, request):
    """-- CMD is held as it begins finalization until its frames are named: the program's last
    statement allocates from a stack never seen before, and the program ends at once (its
    finalization frees every code object); that stack's frames are named from its memory.
    (--pid is not held: the program does not do it.)"""
    if request.node.callspec.params["python_run"] != "cmd":
        return
    _, report, err = python_run
    if _unnamed_version(report):
        return
    with open(FIXTURE) as f:
        source = f.read().splitlines()
    lines = [
        next(n for n, text in enumerate(source, 1) if text.strip().startswith(at))
        for at in ("libc.malloc(500", "last_words()")
    ]
    assert any("waited at the start of finalization" in n for n in report["notes"]), report["notes"]
    last = [e for e in report["reports"][0]["entries"] if e["bytes"] == 500_000]
    assert last, err
    for e in last:
        assert _python_frames(e)[:2] == [(FIXTURE, lines[0], "last_words"), (FIXTURE, lines[1], "main")], (
            [f["text"] for f in e["stack"]],
            err,
        )


def test_python_frames_follow_the_evaluation_loop_and_fold_it(python_run):
    _, report, _ = python_run
    if _unnamed_version(report):
        return
    text = [[f["text"] for f in e["stack"]] for e in report["reports"][0]["entries"] if _python_frames(e)]
    assert text
    assert not any(t.startswith("_PyEval_EvalFrameDefault") for stack in text for t in stack)
    assert any("pymalloc" in n and "PYTHONMALLOC=malloc" in n for n in report["notes"])


def _program_path(frames):
    """A Python path innermost first as (file, line, function), cut after the program's own
    top frame: memray runs the program through runpy and its own launcher, whose frames lie
    outside it. A qualified name compares by its last part (memray gives the code's name)."""
    path = []
    for file, line, function in frames:
        path.append((file, line, function.split(".")[-1]))
        if file == FIXTURE and function == "<module>":
            break
    return tuple(path)


def _memray_leaks(tmp):
    """The program under memray (`memray run --native`, its reader's leaks at the end of
    tracking): {Python path: (bytes, blocks)} of the leaked blocks whose native stack passes
    through libffi's ffi_call (the ctypes calls: native leak sites)."""
    import memray

    out = tmp / "memray.bin"
    # the interpreter probedsl traced, with this environment's memray (its extension is built
    # for the version, not the build)
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    args = [PYTHON, "-m", "memray", "run", "--native", "-q", "-o", str(out), FIXTURE, str(tmp / "m.jsonl"), "at-end"]
    ran = subprocess.run(args, input="", capture_output=True, text=True, env=env, timeout=300)
    assert ran.returncode == 0 and ran.stdout.strip() == "ready", ran.stderr
    leaks = {}
    for record in memray.FileReader(str(out)).get_leaked_allocation_records(merge_threads=True):
        if any(function == "ffi_call" for function, _, _ in record.native_stack_trace()):
            path = _program_path((file, line, function) for function, file, line in record.stack_trace())
            nbytes, blocks = leaks.get(path, (0, 0))
            leaks[path] = (nbytes + record.size, blocks + record.n_allocations)
    return leaks


def test_memray_finds_the_same_native_leaks_with_the_same_python_frames(python_run, request, tmp_path):
    """The same program under memray: the blocks leaked through ctypes, by Python path (function,
    file, line, innermost first), with the same bytes and blocks (docs/python.md, "Compared
    with memray", says where the two differ otherwise)."""
    if request.node.callspec.params["python_run"] != "cmd":
        return
    sites, report, err = python_run
    if _unnamed_version(report):
        return
    found = {}
    for e in report["reports"][0]["entries"]:
        if any(f["function"] == "ffi_call" for f in e["stack"]):
            path = _program_path(_python_frames(e))
            nbytes, blocks = found.get(path, (0, 0))
            found[path] = (nbytes + e["bytes"], blocks + e["blocks"])
    memray_found = _memray_leaks(tmp_path)
    # the program's own record of its leak sites is among them (the comparison is not of nothing)
    assert {_program_path(site["frames"]) for site in sites} < set(found), (found, err)
    assert memray_found == found, err


def test_forked_workers_name_their_own_frames(root_required, tmp_path):
    """A parent and its forked child each compile a function after the fork: one code object
    address, two functions, reached through one native stack. Each allocation is named after
    its own process's function, with its own size."""
    sites, out = tmp_path / "sites.jsonl", tmp_path / "report.json"
    fixture = os.path.join(ROOT, "tests", "fixtures", "pyforked.py")
    common = ["memleak", "--backend", "bcc", "--format", "json", "-o", str(out), "--interval", "1"]
    tracer = start_run(*common, "--", PYTHON, fixture, str(sites), stdin=subprocess.PIPE)
    assert tracer.stdout.readline().strip() == "ready"
    _report_after(tracer, out)
    _, err = tracer.communicate("", timeout=120)
    assert tracer.returncode == 0, err
    roles = [json.loads(line) for line in sites.read_text().splitlines()]
    assert len({r["code"] for r in roles}) == 1, roles  # the case: one address in both
    report = json.loads(out.read_text())
    if _unnamed_version(report):
        return
    innermost = {}
    for e in report["reports"][0]["entries"]:
        for _, _, function in _python_frames(e)[:1]:
            innermost[function] = innermost.get(function, 0) + e["bytes"]
    assert {r["role"]: innermost.get(r["role"]) for r in roles} == {r["role"]: r["size"] for r in roles}, (
        innermost,
        err,
    )


def test_bpftrace_says_python_frames_need_bcc(root_required, tmp_path):
    out = tmp_path / "report.json"
    tracer = start_run(
        "memleak", "--backend", "bpftrace", "--format", "json", "-o", str(out), "--", PYTHON, "-c", "import json"
    )
    _, err = tracer.communicate(timeout=120)
    notes = json.loads(out.read_text())["notes"]
    assert [n for n in notes if "--backend bcc" in n and os.path.basename(PYTHON) in n and "pymalloc" in n], (
        notes,
        err,
    )


def test_the_bpftrace_note_reads_a_pid_through_its_exe_and_a_gone_one_is_no_note():
    """--pid: the interpreter is read through /proc/PID/exe (its own root); a process that
    exits as tracing begins gives no note, never an error that ends the run."""
    from probedsl.run import pyhold

    python = subprocess.Popen([PYTHON, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    gone = subprocess.Popen(["true"])
    os.waitid(os.P_PID, gone.pid, os.WEXITED | os.WNOWAIT)  # a zombie: /proc/PID is there, its exe not
    try:
        note = pyhold.bpftrace_note("bpftrace", "pid", python.pid, "")
        assert os.path.basename(PYTHON) in note and "--backend bcc" in note
        assert pyhold.bpftrace_note("bpftrace", "pid", gone.pid, "") == ""
        assert pyhold.bpftrace_note("bcc", "pid", python.pid, "") == ""
    finally:
        python.communicate(b"")
        gone.wait()


def test_no_python_frames_leaves_stacks_native_and_still_says_pymalloc(root_required, tmp_path):
    out = tmp_path / "report.json"
    common = ["memleak", "--backend", "bcc", "--no-python-frames", "--format", "json", "-o", str(out)]
    tracer = start_run(*common, "--", PYTHON, "-c", "import json")
    _, err = tracer.communicate(timeout=120)
    assert tracer.returncode == 0, err
    report = json.loads(out.read_text())
    entries = report["reports"][0]["entries"]
    assert entries and not any(_python_frames(e) for e in entries)
    assert not any("Python frames of pid" in n for n in report["notes"]), report["notes"]
    assert any("pymalloc" in n and "PYTHONMALLOC=malloc" in n for n in report["notes"]), report["notes"]


def test_pymalloc_is_read_from_the_environment_the_process_started_with():
    from probedsl.stacks import pyframes

    env = dict(os.environ)
    env.pop("PYTHONMALLOC", None)
    started = [
        subprocess.Popen([PYTHON, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, env=dict(env, **extra))
        for extra in ({}, {"PYTHONMALLOC": "malloc"}, {"PYTHONMALLOC": "pymalloc"})
    ]
    try:
        assert [pyframes.uses_pymalloc(p.pid) for p in started] == [True, False, True]
    finally:
        for p in started:
            p.communicate(b"")


def test_an_instruction_past_the_code_objects_end_is_not_named_after_it():
    """A frame whose code object was freed and its address reused before it was read: when the
    recorded instruction lies past the new code's end, the frame is unreadable, not the new
    function (the recorded offset within the code's length is named)."""
    from probedsl.process.mappings import read_proc_maps
    from probedsl.stacks import pyframes

    source = "import sys\ndef f():\n    return 1\nprint(id(f.__code__), len(f.__code__.co_code) // 2, flush=True)\n"
    child = subprocess.Popen(
        [PYTHON, "-c", source + "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        code, units = map(int, child.stdout.readline().split())
        interp = pyframes.find(child.pid, read_proc_maps(child.pid))
        if interp is None or interp.offsets is None:  # a version without frame layout: nothing named
            return
        namer = pyframes.Namer()
        namer.know(child.pid, interp)
        at = lambda unit: pyframes.named(
            namer.pseudo(child.pid, code, interp.offsets.code_adaptive + 2 * unit, 0), namer
        )
        assert [at(unit)[0].function for unit in (-1, 0, units - 1)] == ["f"] * 3
        assert at(units - 1)[0].line == 3
        for unit in (units + 1, 10_000):
            frame = at(unit)[0]
            assert frame.function == "" and "address reused" in frame.why, frame
    finally:
        child.communicate("")


def test_the_finalization_probe_goes_past_a_stub():
    """3.13 and 3.14 build Py_FinalizeEx as a stub (endbr64; jmp) to a local function that
    Py_Exit calls directly: the probe goes where the stub jumps; a real function stays put."""
    import io
    import struct

    from probedsl.stacks.pyframes import _past_stub

    loads = ((0x400000, 0x1000, 0x10000),)  # one segment: ELF address 0x400000 is file offset 0x1000
    at = 0x400100

    def placed(code: bytes) -> int:
        image = bytearray(0x12000)
        image[0x1100 : 0x1100 + len(code)] = code
        return _past_stub(io.BytesIO(bytes(image)), loads, at)

    endbr, lea = b"\xf3\x0f\x1e\xfa", b"\x48\x8d\x3d" + struct.pack("<i", 0x1234)
    assert placed(endbr + b"\xe9" + struct.pack("<i", -0x80)) == at + 9 - 0x80
    assert placed(endbr + lea + b"\xeb\x10") == at + 13 + 0x10
    assert placed(b"\xe9" + struct.pack("<i", 0x40)) == at + 5 + 0x40
    assert placed(endbr + b"\x53\x48\x83\xec\x18") == at  # push rbx; sub rsp: the function itself
    assert _past_stub(io.BytesIO(b""), loads, 0x900000) == 0x900000  # outside every segment
    # a jump within the function (its size known) is no stub
    image = bytearray(0x12000)
    image[0x1100:0x1106] = endbr + b"\xeb\x10"
    assert _past_stub(io.BytesIO(bytes(image)), loads, at, 0x40) == at
    assert _past_stub(io.BytesIO(b"\xf3"), ((0x400000, 0, 0x10),), 0x400000) == 0x400000  # a short read


def test_code_headers_of_a_stack_are_read_in_one_call_as_one_by_one():
    """pyoffsets.read_many gives what read() gives for each address, also past one the kernel
    cannot read (it stops there: the rest are read one by one)."""
    from probedsl.stacks import pyoffsets

    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with open(f"/proc/{child.pid}/maps") as f:
            start = int(f.readline().split("-")[0], 16)
        addresses = [start, start + 24, 0x10, start + 40, start + 1]
        one_by_one = [pyoffsets.read(child.pid, a, 16) for a in addresses]
        assert one_by_one[2] is None and all(one_by_one[i] for i in (0, 1, 3, 4))
        assert pyoffsets.read_many(child.pid, addresses, 16) == one_by_one
        assert pyoffsets.read_many(child.pid, addresses[:2], 16) == one_by_one[:2]
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("by_owner", [False, True], ids=["3.11 is_entry", "3.12+ owner shim"])
def test_a_records_frames_carry_where_each_evaluation_run_ends(by_owner):
    """pseudo_frames: 3.11 marks the last frame of an evaluation call's run (is_entry); 3.12+
    records the C stack's shim frame after it (owner >= 3), which is skipped and marks the frame
    before it. lasti keeps its sign, and a truncated chain keeps its flag."""
    from types import SimpleNamespace

    from probedsl.drivers import bcc_python
    from probedsl.stacks.pyframes import RUN_END

    entry = bcc_python.ENTRY_SHIFT
    record = bcc_python.PyRecord(pid=7, n=4)
    shim_or_entry = (3 if by_owner else 1) << entry
    metas = [10, (20 | shim_or_entry) if not by_owner else 20, shim_or_entry if by_owner else 30, 0xFFFFFFFE]
    codes = [0x100, 0x200, 0x300, 0x400]
    for i, (c, m) in enumerate(zip(codes, metas)):
        record.code[i], record.meta[i] = c, m
    record.meta[3] |= bcc_python.TRUNCATED
    seen = []
    offsets = SimpleNamespace(entry_is_owner=by_owner)
    namer = SimpleNamespace(
        interpreter=lambda pid: SimpleNamespace(offsets=offsets),
        pseudos=lambda pid, frames: seen.append((pid, frames)) or tuple(range(len(frames))),
    )
    bcc_python.pseudo_frames(namer, record)
    ((pid, frames),) = seen
    if by_owner:  # the shim (third) skipped, the frame before it ends a run
        assert frames == [(0x100, 10, 0), (0x200, 20, RUN_END), (0x400, -2, bcc_python.TRUNCATED)]
    else:
        assert frames == [(0x100, 10, 0), (0x200, 20, RUN_END), (0x300, 30, 0), (0x400, -2, bcc_python.TRUNCATED)]
    assert pid == 7
