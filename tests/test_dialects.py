"""What each tracer version needs of generated code: snippets per dialect, and the installed
tracer's acceptance of what is generated for it (the roots run these on their own versions)."""
from __future__ import annotations

import pytest

from probedsl import backends, compiler, ir, targets

from conftest import ROOT


# --- BCC: the unwinder passes the verifier whatever clang the installed BCC brings ---------
@pytest.mark.debian13
@pytest.mark.parametrize("recipe", ["memleak", "fdleak"])
def test_bcc_unwinder_loads_with_the_installed_clang(recipe, root_required):
    """clang 21 (BCC 0.37) turned the stack-hash loop into a count-down the verifier could not
    bound; each root loads the walk with its own BCC (0.26, 0.31, 0.37)."""
    from bcc import BPF
    program = compiler.build(compiler.load(str(ROOT / "recipes" / f"{recipe}.probe")))
    program = program.with_scope(ir.Scope("pid", pid=1)).walking_stacks("dwarf")
    gen = backends.for_target(targets.detect("bcc")).generate(program)
    assert "probedsl_unw_rows" in gen.text        # the unwinder is in the program
    bpf = BPF(text=gen.text, cflags=["-DPROBEDSL_PID=1", "-DPROBEDSL_SELF=1"])
    try:
        for p in gen.manifest["probes"]:
            for name in (p["entry"], p["return"]):
                if name:
                    bpf.load_func(name, BPF.KPROBE)      # the verifier runs here
    finally:
        bpf.cleanup()


# --- bpftrace: each dialect flag, with the text it changes --------------------------------
def memleak_text(version, scope=ir.Scope("pid", pid=4242)) -> str:
    from test_backends import memleak_program
    return backends.for_target(targets.for_version("bpftrace", version)).generate(memleak_program(scope)).text


def test_bpftrace_027_is_a_dialect_of_its_own():
    for version in ((0, 27, 0), (0, 27, 1)):
        target = targets.for_version("bpftrace", version)
        assert target.range_text() == "0.27" and target.warns_same_type_cast
    assert targets.from_name("bpftrace-0.27").range_text() == "0.27"
    assert "bpftrace 0.17-0.19, 0.20-0.23, 0.24, 0.25-0.26, 0.27;" in targets.supported()


def test_casts_to_the_type_a_value_has_are_left_out_from_027():
    """0.27 warns for each `(uint64)arg0`; older dialects keep every cast (map keys and
    record fields agree on uint64)."""
    new, old = memleak_text((0, 27, 1)), memleak_text((0, 26, 1))
    assert "@heap_live[(uint64)(pid), retval] = (nsecs, $s.2," in new
    assert 'reg("sp"), arg0' in new and "(uint64)(arg0)" not in new and "(uint64)(retval)" not in new
    assert "@heap_live[(uint64)(pid), (uint64)(retval)] = (nsecs, (uint64)($s.2)," in old
    assert "(uint64)(pid)" in new        # pid is uint32: its cast stays


def test_delete_results_are_used_from_025():
    """0.25 warns on a discarded result; delete returns one from 0.24; 0.17 has delete(@m[k])."""
    assert "$deleted = delete(@heap_scratch, tid);" in memleak_text((0, 25, 1))
    assert "$deleted" not in memleak_text((0, 24, 2)) and "  delete(@heap_scratch, tid);" in memleak_text((0, 24, 2))
    assert "delete(@heap_scratch[tid]);" in memleak_text((0, 17, 0))


def test_lifetimes_subtract_as_signed_from_026():
    """0.26 makes subtraction int64 and warns for each uint64 operand cast implicitly."""
    assert "hist((int64)nsecs - (int64)$v.0)" in memleak_text((0, 26, 1))
    assert "hist(nsecs - $v.0)" in memleak_text((0, 23, 2))


def test_pid_option_is_not_used_where_it_filters_every_probe():
    """0.24+ applies -p to every probe (measured on 0.27.0 and 0.27.1): probedsl's own ready
    and snapshot tracepoints would never fire. The run is unscoped and says so."""
    from test_backends import memleak_program
    scope = ir.Scope("pid", pid=4242, follow_forks=False)
    assert targets.for_version("bpftrace", (0, 23, 2)).options(scope) == ["-p", "4242"]
    for version in ((0, 24, 2), (0, 26, 1), (0, 27, 1)):
        target = targets.for_version("bpftrace", version)
        assert "-p" not in target.options(scope) and not target.scopes_uprobes(scope)
        assert any("-p filters every probe" in n for n in target.notes(memleak_program(scope)))


def test_a_probe_that_cannot_attach_is_a_warning_as_before_024():
    """0.24 made it an error: a --comm process ending before attach ended the run (0.27.1)."""
    assert targets.for_version("bpftrace", (0, 27, 1)).environment(10)["BPFTRACE_MISSING_PROBES"] == "warn"
    assert "BPFTRACE_MISSING_PROBES" not in targets.for_version("bpftrace", (0, 23, 2)).environment(10)


# --- capabilities read from `bpftrace --info`, not guessed from the version -----------------
INFO_017 = """Build
  version: v0.17.0
  LLVM: 14.0.6
  unsafe uprobe: no
  bfd: no
  libdw (DWARF support): yes
"""
INFO_0271 = """Build
  version: v0.27.1
  LLVM: 21.1.8
  bfd: yes
  libdw (DWARF support): yes
  libsystemd (systemd notify support): no
  blazesym (advanced symbolization): no
  dwunwind (DWARF stack unwinding): yes
"""


def test_build_features_are_read_from_bpftrace_info():
    """Debian 12's 0.17 and Debian sid's 0.27.1, as they print them."""
    assert targets.parse_info(INFO_017) == {"bfd": False, "dwarf": True}
    assert targets.parse_info(INFO_0271) == {"bfd": True, "dwarf": True, "blazesym": False, "dwunwind": True}


def test_a_build_without_bfd_probes_at_entries_whatever_its_version():
    target = targets.for_version("bpftrace", (0, 23, 2))
    assert target.probe_offsets
    assert not target.with_build(targets.parse_info(INFO_017)).probe_offsets
    assert targets.for_version("bpftrace", (0, 23, 2)).probe_offsets     # the class is untouched
    assert targets.for_version("bpftrace", (0, 27, 1)).with_build(targets.parse_info(INFO_0271)).probe_offsets


@pytest.mark.debian13
def test_doctor_names_the_installed_builds_features():
    import shutil
    import subprocess
    from conftest import probedsl
    exe = shutil.which("bpftrace")
    printed = subprocess.run([exe, "--info"], capture_output=True, text=True)
    info = targets.parse_info(printed.stdout + printed.stderr)      # 0.17 prints it on stderr
    assert "bfd" in info
    line = next(l for l in probedsl("doctor").stdout.splitlines() if " bpftrace " in l)
    assert f"bfd {'yes' if info['bfd'] else 'no'}" in line
    assert ("places probes past" in line) == (info["bfd"] and targets.detect("bpftrace").probe_offsets)


def test_stacks_print_as_raw_addresses_from_024():
    """0.27.1 names a live process's frames in perf mode whatever BPFTRACE_NO_USER_SYMBOLS says
    (measured: "557d4a8201b4wrapper2+27(/tmp/ld)"); raw mode prints the addresses alone."""
    assert "ustack(raw, 64)" in memleak_text((0, 27, 1)) and "ustack(perf" not in memleak_text((0, 24, 2))
    assert "ustack(perf, 64)" in memleak_text((0, 23, 2)) and "ustack(perf, 64)" in memleak_text((0, 17, 0))
