"""Where a uprobe sits in its function (probedsl.passes.placement): hand-made entries whose answer is
known, the kernel's emulated instructions, and the real C library."""

from __future__ import annotations

import subprocess

import pytest

from conftest import BACKENDS, FIXTURES, MEMLEAK, probedsl, report_json
from probedsl import compiler, targets
from probedsl.passes import placement
from probedsl.binaries import x86

RELEASE = (6, 18)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("placement") / "libplacement.so")
    subprocess.run(["gcc", "-shared", "-nostdlib", "-o", out, str(FIXTURES / "placement.S")], check=True)
    return out


@pytest.mark.parametrize(
    "function,args,expected",
    [
        ("test_then_je", (0,), (3, "je")),  # test %rdi,%rdi only reads rdi
        ("writes_rdi", (0,), None),  # the probe reads rdi, which mov changes
        ("writes_rdi", (1,), (5, "jmp")),  # it reads rsi only
        ("push_first", (0,), None),  # emulated where it is
        ("moves_rsp", (), None),  # sub changes rsp
        ("stores", (0, 1), None),  # a store into memory
        ("endbr_then_push", (), (4, "push")),  # past endbr64
        ("syscall_first", (), None),  # mov, then a syscall: no emulated instruction
    ],
)
def test_place(lib, function, args, expected):
    got = x86.place(lib, function, args)
    if expected is None:
        assert got is None, got
    else:
        assert (got.offset, got.instruction.split()[0]) == expected and got.emulated, got


@pytest.mark.parametrize(
    "code,release,expected",
    [
        ("7403", RELEASE, True),
        ("0f8412345678", RELEASE, True),
        ("e800000000", RELEASE, True),
        ("eb00", RELEASE, True),
        ("e900000000", RELEASE, True),
        ("90", RELEASE, True),
        ("53", RELEASE, True),
        ("4154", RELEASE, True),
        ("4850", RELEASE, False),
        ("53", (5, 15), False),
        ("4885ff", RELEASE, False),
        ("f30f1efa", RELEASE, False),
        ("c3", RELEASE, False),
        ("", RELEASE, False),
    ],
)
def test_emulated(code, release, expected):
    assert x86.emulated(bytes.fromhex(code), release) is expected


def test_memleak_on_this_c_library():
    """Every placed probe of memleak sits on an emulated instruction after instructions that
    keep rsp, the arguments read and memory; free is placed (glibc starts it with a test)."""
    program = placement.apply(compiler.build(compiler.load(MEMLEAK)))
    probes = {p.function: p for r in program.resources for p in r.probes}
    assert probes["free"].place_in(probes["free"].path)[0] > 0
    for probe in probes.values():
        offset, _ = probe.place_in(probe.path)
        if offset:
            code = x86._bytes(probe.path, probe.function, offset + 15)
            assert x86.emulated(code[offset:], RELEASE)
            assert x86.still_there(probe.path, probe.function, offset, probe.code_in(probe.path))


def test_a_changed_file_is_probed_at_its_entry():
    assert not x86.still_there("/lib/x86_64-linux-gnu/libc.so.6", "free", 3, "00" * 4)


def test_probe_at_entry_turns_placement_off():
    placed = probedsl("compile", MEMLEAK, "--target", "bpftrace-0.23")
    entry = probedsl("compile", MEMLEAK, "--target", "bpftrace-0.23", "--probe-at", "entry")
    assert placed.returncode == entry.returncode == 0
    assert ":free+" in placed.stdout and "// at free+" in placed.stdout
    assert ":free+" not in entry.stdout and "// at " not in entry.stdout
    old = probedsl("compile", MEMLEAK, "--target", "bpftrace-0.17").stdout
    assert ":free+" not in old and "attaches at entries only" in old


def test_each_target_attaches_where_it_can_and_pays_for_it():
    """BCC and bpftrace 0.20+ attach free's probe at its placed (emulated) instruction, 0.17 at
    its single-stepped entry; a probe with a uretprobe stays at the entry on bpftrace."""
    program = placement.apply(compiler.build(compiler.load(MEMLEAK)))
    probes = {p.function: p for r in program.resources for p in r.probes}
    free, memalign = probes["free"], probes["posix_memalign"]
    at = {name: targets.from_name(name) for name in ("bcc", "bpftrace-0.23", "bpftrace-0.17")}
    assert at["bcc"].attaches_at(free, free.path) == at["bpftrace-0.23"].attaches_at(free, free.path) > 0
    assert at["bpftrace-0.17"].attaches_at(free, free.path) == 0
    assert (
        at["bpftrace-0.23"].attaches_at(memalign, memalign.path) == 0 < at["bcc"].attaches_at(memalign, memalign.path)
    )
    assert x86.hit_us(free.path, "free", at["bcc"].attaches_at(free, free.path)) == x86.EMULATED_US
    assert x86.hit_us(free.path, "free", 0) == x86.STEPPED_US


@pytest.mark.debian13
@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cf_protection_functions_are_probed_past_endbr64(backend, build, tmp_path):
    """-fcf-protection: the probes move past endbr64 to the tail jumps (BCC: the uretprobe
    too; bpftrace 0.20+: the entry-only one), and every block is still counted."""
    exe = build("cet_pool-cet")
    recipe = tmp_path / "pool.probe"
    recipe.write_text((FIXTURES / "pool.probe").read_text().replace("EXE", exe))
    listed = probedsl("check", str(recipe))
    assert "pool_get+4" in listed.stdout and "pool_put+4" in listed.stdout, listed.stdout
    result = probedsl("run", str(recipe), "--backend", backend, "--format", "json", "--", exe)
    assert result.returncode == 0, result.stderr
    heap = report_json(result.stdout)["resources"]["block"]
    assert (heap["live_bytes"], heap["live_blocks"], heap["acquired"], heap["released"]) == (24, 3, 10, 7), heap
