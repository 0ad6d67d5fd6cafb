"""--reachability's root set at its edges, against valgrind's leak check on the same binary
(tests/fixtures/reach_roots.c): the dead frames of the exit path, a pointer only in a vector
register, a thread running on a heap-allocated stack with a guard page, a suspended coroutine's
dropped stack (a large block split by its guard page), a self-pointing block,
a pointer stored only unaligned, a pointer only in the red zone of a leaf function computing,
a death by SIGSEGV, a pointer only in a callee-saved register of the frame that called exit()
(and coreutils' seq, which keeps its output buffer so).
Also: the exit-path unwinder and the XSAVE reader alone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import BACKENDS, ROOT, probedsl, report_json
from test_reachability import assert_equal_to_valgrind, valgrind_kinds
from probedsl.reachability import stackroots

pytestmark = pytest.mark.usefixtures("root_required")
MEMLEAK = str(ROOT / "recipes" / "memleak.probe")

# mode: {block size: the kind both must give it}
EXPECTED = {
    # the atexit handler's local and the local of a function main called before exit(): dead
    "exitpath": {100: "definitely_lost", 150: "definitely_lost", 40: "still_reachable"},
    # only in xmm15 (valgrind: lost, see VALGRIND_DIFFERS)
    "xmm": {200: "still_reachable"},
    # the heap stack's live frame, the stack left, the heap stack itself; a dead frame there
    "swapctx": {300: "still_reachable", 400: "still_reachable", 73728: "still_reachable", 120: "definitely_lost"},
    # the same, the heap stack kept only by pointers into it: its live frames are roots still
    "swapctx-interior": {
        300: "still_reachable",
        400: "still_reachable",
        73728: "possibly_lost",
        120: "definitely_lost",
    },
    # a suspended coroutine's stack (a large block split by its guard page), dropped: a lost
    # block like any, and what only its frames hold lost with it
    "suspended": {262144: "definitely_lost", 500: "indirectly_lost"},
    "small": {32: "definitely_lost", 64: "definitely_lost"},
    # dies of SIGSEGV: the faulting thread's registers are roots (its stack from rsp - 128)
    "crash": {40: "still_reachable", 150: "definitely_lost", 260: "still_reachable"},
    # a thread stopped computing in a leaf function: its red zone is live
    "redzone": {250: "still_reachable"},
    # only in r13 of the frame that called exit(), saved in the exit path's frame: live
    "calleesaved": {180: "still_reachable"},
}
# valgrind reads only the general registers (memcheck's leak check: VG_(apply_to_GP_regs));
# LeakSanitizer reads the XSAVE area too, and the program can still use the pointer.
# valgrind's roots are the memory outside heap blocks: a thread's frames on a heap stack count
# only through that block (here reached by interior pointers: possibly lost). LeakSanitizer
# counts interior pointers as references, and the thread is running on those frames.
VALGRIND_DIFFERS = {
    "xmm": {200: ("definitely_lost", "still_reachable")},
    "swapctx-interior": {300: ("possibly_lost", "still_reachable")},
    # at a death by a signal valgrind reads no thread's registers (they have ended)
    "crash": {260: ("definitely_lost", "still_reachable")},
}
DIES = {"crash": 128 + 11}  # the exit status a mode ends with (probedsl gives the command's)


# LeakSanitizer (gcc's -fsanitize=leak) on the same source reports as leaks the blocks lost
# here (it counts a pointer into a block as a reference: possibly lost is no leak to it), but:
# it scans a thread's stack from its stack pointer, without the red zone valgrind keeps
LSAN_DIFFERS = {"redzone": {250: "definitely_lost"}}
# where it gives no answer: its scan of a heap block faults on a guard page inside it (gcc 12's
# liblsan); it checks nothing at a death by a signal
GUARD_FAULT = "LeakSanitizer has encountered a fatal error"
LSAN_FAILS = {"swapctx": GUARD_FAULT, "swapctx-interior": GUARD_FAULT, "suspended": GUARD_FAULT, "crash": "SEGV"}
LOST = ("definitely_lost", "indirectly_lost")


@pytest.fixture(scope="module")
def reach_roots(build):
    return build("reach_roots-O2")


@pytest.fixture(scope="module")
def valgrinds(reach_roots, tmp_path_factory):
    """valgrind's loss records of a mode, run once for both backends' tests."""
    runs = {}

    def _records(mode):
        if mode not in runs:
            runs[mode] = valgrind_kinds([reach_roots, mode], tmp_path_factory.mktemp("vg"), check=mode not in DIES)
        return runs[mode]

    return _records


def _by_size(records):
    return {nbytes: kind for _, kind, nbytes, blocks in records if blocks == 1}


def _ours_by_size(report):
    section = next(r for r in report["reports"] if r["kind"] == "outstanding")
    out = {}
    for entry in section["entries"]:
        kinds = [k for k, v in entry["reachability"].items() if v["blocks"]]
        if entry["blocks"] == 1 and len(kinds) == 1:
            out[entry["bytes"]] = kinds[0]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_root_set_edges_equal_valgrinds(mode, backend, reach_roots, valgrinds):
    records = valgrinds(mode)
    seen = _by_size(records)
    differs = VALGRIND_DIFFERS.get(mode, {})
    for size, kind in EXPECTED[mode].items():
        assert seen.get(size) == differs.get(size, (kind,))[0], (size, records)
    # what valgrind's own design makes it say differently: our answer instead
    records = [
        (names, differs[n][1] if n in differs and blocks == 1 else kind, n, blocks)
        for names, kind, n, blocks in records
    ]
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--reachability",
        "--format",
        "json",
        "--top",
        "100",
        "--",
        reach_roots,
        mode,
    )
    assert result.returncode == DIES.get(mode, 0), result.stderr
    report = report_json(result.stdout)
    assert report["reachability_scan"]["at"] == "exit"
    if backend == "bcc":  # its stacks (unwound by CFI) set each block apart; bpftrace's
        ours = _ours_by_size(report)  # frame-pointer walk stops at -O2: the totals
        assert {size: ours.get(size) for size in EXPECTED[mode]} == EXPECTED[mode], ours
    assert_equal_to_valgrind(report, records)


def _held_at_exit(argv, env=None):
    """A process (reading commands from stdin: tests/fixtures/reach.c) held at its exit by a
    Tether, and the Paused of it (call .close() after)."""
    from probedsl.process.tether import Tether

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    tether = Tether(proc.pid)
    tether.start()
    proc.stdin.close()  # the fixture exits at the end of its input
    assert tether.at_exit.wait(60)
    return proc, tether, tether.pause()


def test_the_exit_path_unwinds_to_the_frame_that_called_exit(build):
    """The exiting thread's stack begins at exit()'s caller: above the stack pointer (the exit
    path's frames lie between) and inside the caller's frame, whose return address (into
    __libc_start_call_main) lies just above it."""
    from probedsl.binaries import elf
    from probedsl.reachability import heapscan

    reach = build("reach-O2")
    proc, tether, paused = _held_at_exit([reach])
    try:
        regs = paused.registers[proc.pid]
        assert regs["orig_rax"] == 231  # exit_group
        regions, _ = heapscan.read_maps(proc.pid)
        top = stackroots._exit_caller_sp(proc.pid, regs, regions)
        assert top is not None and regs["rsp"] < top
        assert stackroots._stack_tops(proc.pid, paused, regions)[list(paused.registers).index(proc.pid)] == top
        # main's frame is small: a return address out of main is within a few words above
        with open(f"/proc/{proc.pid}/mem", "rb") as mem:
            mem.seek(top)
            words = [int.from_bytes(mem.read(8), "little") for _ in range(32)]
        names = []
        for w in words:
            region = next((r for r in regions if r.start <= w < r.end and "x" in r.perms and r.path), None)
            if region:
                symbols = elf.symbols(region.path)
                found = symbols.function_at(w - 1 - region.start + symbols.file_offset_to_vaddr(region.offset))
                names.append(found and found[0])
        assert "__libc_start_call_main" in names, names
        assert not stackroots.EXIT_PATH & set(names), names
    finally:
        tether.release_exit()
        tether.close()
        proc.wait(30)


def test_vector_registers_are_read(build):
    """The XSAVE area of a thread holds what was put in xmm15, the upper half of ymm14 and,
    with AVX-512, the upper half of zmm13 and zmm16 (reach_roots' xmm-wait): each of the
    XSAVE components read is where ptrace.VECTOR_COMPONENTS says."""
    from probedsl.process.tether import Tether

    exe = build("reach_roots-O2")
    proc = subprocess.Popen([exe, "xmm-wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        fields = proc.stdout.readline().split()
        held = {name.decode(): int(value, 16) for name, value in zip(fields[::2], fields[1::2])}
        assert {"xmm15", "ymm14"} <= set(held), fields
        with open("/proc/cpuinfo") as f:
            assert ("zmm16" in held) == (" avx512f" in f.read())
        tether = Tether(proc.pid)
        tether.start()
        try:
            paused = tether.pause()
            words = {
                int.from_bytes(v[i : i + 8], "little") for v in paused.vectors.values() for i in range(0, len(v), 8)
            }
            assert {name: value in words for name, value in held.items()} == {name: True for name in held}
            assert all(len(v) % 8 == 0 and len(v) >= 256 for v in paused.vectors.values())
        finally:
            tether.resume()
            tether.close()
    finally:
        proc.kill()
        proc.wait()


def _libc_without_debug_symbols(directory):
    """A copy of this machine's libc in `directory` whose debug file cannot be found: its
    build id changed, its .gnu_debuglink renamed (its code, and so its frames, unchanged)."""
    from elftools.elf.elffile import ELFFile

    with open("/proc/self/maps") as maps:
        libc = next(line.split()[-1] for line in maps if os.path.basename(line.split()[-1]).startswith("libc.so"))
    data = bytearray(open(libc, "rb").read())
    with open(libc, "rb") as f:
        elffile = ELFFile(f)
        note = elffile.get_section_by_name(".note.gnu.build-id")
        link = elffile.get_section_by_name(".gnu_debuglink")
        for at in range(note["sh_offset"] + 16, note["sh_offset"] + note["sh_size"]):
            data[at] ^= 0xFF
        if link is not None:
            data[link["sh_offset"]] = ord("x")
    copy = directory / os.path.basename(libc)
    copy.write_bytes(bytes(data))
    return copy


def test_the_exit_path_unwinds_alike_without_libcs_debug_symbols(build, tmp_path):
    """Without libc's debug symbols __run_exit_handlers has no name: the exiting thread's
    stack still begins above exit(), where it begins with them (the frames have the same sizes)."""
    from probedsl.binaries import elf
    from probedsl.reachability import heapscan

    reach = build("reach-O2")
    bare = _libc_without_debug_symbols(tmp_path)
    symbols = elf.symbols(str(bare))
    assert symbols is not None and not symbols.debug_file
    tops = {}
    for env in (None, dict(os.environ, LD_LIBRARY_PATH=str(tmp_path))):
        proc, tether, paused = _held_at_exit([reach], env)
        try:
            regions, _ = heapscan.read_maps(proc.pid)
            libc = next(r.path for r in regions if os.path.basename(r.path).startswith("libc.so"))
            regs = paused.registers[proc.pid]
            top = stackroots._exit_caller_sp(proc.pid, regs, regions)
            assert top is not None
            tops[libc == str(bare)] = top - regs["rsp"]
        finally:
            tether.release_exit()
            tether.close()
            proc.wait(30)
    assert tops[True] == tops[False], tops


def test_leaksanitizer_on_the_same_source(build):
    """The blocks each mode loses are those LeakSanitizer reports leaked, but for the cases
    named in LSAN_DIFFERS and LSAN_FAILS."""
    exe = build("reach_roots-lsan")
    env = dict(os.environ, LSAN_OPTIONS="report_objects=1:exitcode=23")
    for mode, expected in sorted(EXPECTED.items()):
        done = subprocess.run([exe, mode], env=env, capture_output=True, text=True, timeout=120)
        if mode in LSAN_FAILS:
            assert LSAN_FAILS[mode] in done.stderr and "leak of" not in done.stderr, (mode, done.stderr)
            continue
        leaked = {int(size) for size in re.findall(r"^0x[0-9a-f]+ \((\d+) bytes\)$", done.stderr, re.M)}
        kinds = {**expected, **LSAN_DIFFERS.get(mode, {})}
        want = {size for size, kind in kinds.items() if kind in LOST}
        assert leaked & set(expected) == want, (mode, done.stderr)
        assert done.returncode == (23 if want else 0), (mode, done.stderr)


def test_coreutils_seq_equals_valgrind(tmp_path):
    """Debian's coreutils seq (-O2, stripped) calls exit() from the function that keeps its 8 KB
    output buffer in r13 (mode `calleesaved` above): libc's exit path saves r13 in its own frame
    and reuses the register. Each block's kind equals valgrind's, the buffer's included."""
    seq = tmp_path / "coreutils-seq"  # a copy: a name no other test's process has
    shutil.copy("/usr/bin/seq", seq)
    argv = [str(seq), "1", "20000"]
    records = valgrind_kinds(argv, tmp_path)
    assert ("still_reachable", 8192) in {(kind, n) for _, kind, n, blocks in records if blocks == 1}, records
    result = probedsl(
        "run", MEMLEAK, "--backend", "bcc", "--reachability", "--format", "json", "--top", "100", "--", *argv
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    # seq's main has no symbol, so valgrind's names stop at the frame it calls "(below main)"
    for entry in next(r for r in report["reports"] if r["kind"] == "outstanding")["entries"]:
        names = [f["function"] for f in entry["stack"]]
        if "__libc_start_call_main" in names:
            del entry["stack"][names.index("__libc_start_call_main") :]
            entry["stack"].append({"function": "(below main)", "inlined": False})
    assert_equal_to_valgrind(report, records)
