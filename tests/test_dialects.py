"""What each tracer version needs of generated code: snippets per dialect, and the installed
tracer's acceptance of what is generated for it (the roots run these on their own versions)."""
from __future__ import annotations

import pytest

from probedsl import compiler, ir, targets

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
    gen = targets.detect("bcc").generator().generate(program)
    assert "probedsl_unw_rows" in gen.text        # the unwinder is in the program
    bpf = BPF(text=gen.text, cflags=["-DPROBEDSL_PID=1", "-DPROBEDSL_SELF=1"])
    try:
        for p in gen.manifest["probes"]:
            for name in (p["entry"], p["return"]):
                if name:
                    bpf.load_func(name, BPF.KPROBE)      # the verifier runs here
    finally:
        bpf.cleanup()
