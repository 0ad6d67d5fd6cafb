"""IR -> backend text: golden files, snippets, and the backends' own acceptance of our output."""
from __future__ import annotations

import dataclasses
import glob
import os
import subprocess

import pytest

from probedsl import ast, backends, checker, compiler, ir, libraries, parser, targets
from probedsl.errors import ProbedslError, RecipeError

from conftest import MEMLEAK, ROOT

GOLDEN = ROOT / "tests" / "golden"
RECIPES = sorted(glob.glob(str(ROOT / "recipes" / "*.probe")) + glob.glob(str(ROOT / "tests" / "recipes" / "*.probe")))


def fixed_paths(program: ir.Program) -> ir.Program:
    """Goldens must not depend on where this machine keeps libc."""
    return dataclasses.replace(program, resources=tuple(
        dataclasses.replace(r, probes=tuple(dataclasses.replace(p, path=f"/lib/{p.library}.so") for p in r.probes))
        for r in program.resources))


def memleak_program(target=ir.Scope("pid", pid=4242)) -> ir.Program:
    return recipe_program(MEMLEAK, target)


def recipe_program(path, target=ir.Scope("pid", pid=4242)) -> ir.Program:
    """usdt probes are found in a program's files only: without one they are left out here
    (tests/test_usdt.py generates them for a real program)."""
    return fixed_paths(compiler.build(compiler.load(path), complete=False)).with_scope(target)


BUNDLED = sorted(glob.glob(str(ROOT / "recipes" / "*.probe")))


def backend(name: str):
    """The generator of a backend's newest dialect."""
    return backends.for_target(targets.for_version(name, None))


def assert_golden(text: str, golden, update: bool) -> None:
    if update:
        golden.write_text(text)
    assert golden.exists(), f"{golden} is missing: write it with pytest --update-golden and review it"
    assert text == golden.read_text(), f"regenerate with pytest --update-golden and review the diff of {golden}"


@pytest.mark.parametrize("recipe", BUNDLED, ids=os.path.basename)
def test_recipe_ir_and_layout_match_golden(recipe, update_golden):
    name = os.path.basename(recipe)[:-len(".probe")]
    program = recipe_program(recipe)
    assert_golden(compiler.dump(program), GOLDEN / "ir" / f"{name}.ir", update_golden)


@pytest.mark.parametrize("cls", targets.TARGETS, ids=lambda c: f"{c.backend}-{c.range_text()}")
def test_memleak_program_per_dialect_matches_golden(cls, update_golden):
    suffix = "bt" if cls.backend == "bpftrace" else "c"
    # each target's default stacks: BCC's unwinder is in its program
    program = memleak_program().walking_stacks("dwarf" if cls.dwarf_stacks else "fp")
    text = backends.for_target(cls()).generate(program).text
    assert_golden(text, GOLDEN / f"memleak.{cls.backend}-{cls.range_text()}.{suffix}", update_golden)


def test_generation_is_deterministic():
    a = backend("bcc").generate(memleak_program())
    b = backend("bcc").generate(memleak_program())
    assert a.text == b.text and a.loader == b.loader


def test_bpftrace_filters_by_pid_and_takes_comm_as_an_argument():
    bt = backend("bpftrace")
    following = bt.generate(memleak_program()).text
    assert "@probedsl_traced[(uint64)4242] = 1;" in following and ":malloc /@probedsl_traced[(uint64)pid]/" in following
    assert "/pid == 4242/" in bt.generate(memleak_program(ir.Scope("pid", pid=4242, follow_forks=False))).text
    text = bt.generate(memleak_program(ir.Scope("comm", comm='le"ak'))).text
    assert "/comm == str($1)/" in text and 'le"ak' not in text


def test_bcc_compares_comm_byte_by_byte():
    text = backend("bcc").generate(memleak_program(ir.Scope("comm", comm='a"*/b'))).text
    assert "comm[0] != 97 || comm[1] != 34 || comm[2] != 42 || comm[3] != 47" in text
    assert '"*/' not in text


def test_recipe_text_in_comments_cannot_close_them(tmp_path):
    recipe = tmp_path / "c.probe"
    recipe.write_text('recipe c "ends */ here\'\'\'"\nresource h keyed by a { acquire libc:malloc(n) -> ret }\n')
    program = compiler.build(compiler.load(str(recipe)))
    gen = backend("bcc").generate(program)
    assert "*/ here" not in gen.text
    compile(gen.loader, "loader.py", "exec")        # the loader is valid Python whatever the text


def test_line_map_points_back_to_the_recipe():
    gen = backend("bpftrace").generate(memleak_program())
    line = next(n for n, t in enumerate(gen.text.splitlines(), 1) if ":free /" in t)
    span = gen.recipe_span(line)
    assert span.line == next(n for n, t in enumerate(open(MEMLEAK).read().splitlines(), 1) if "libc:free" in t)


def test_bcc_manifest_lists_each_uprobe_with_its_functions():
    gen = backend("bcc").generate(memleak_program())
    entries = {p["function"]: p for p in gen.manifest["probes"]}
    assert entries["free"]["return"] == "" and entries["malloc"]["return"].endswith("_return")


# --- the real backends accept what we generate (needs root, as CI has) --------------------
def built(recipe: str, sampled: dict) -> ir.Program:
    """The recipe resolved for this machine; one with usdt probes for a program that has them."""
    parsed = compiler.load(recipe)
    uses_usdt = any(isinstance(e.probe, ast.Usdt) for r in parsed.resources for e in r.events)
    program = sampled["otel_memory"] if uses_usdt else None
    return compiler.build(parsed, resolver=libraries.LibraryResolver(command=program) if program else None)


@pytest.mark.debian13
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
@pytest.mark.parametrize("scope", [ir.Scope(), ir.Scope("pid", pid=1), ir.Scope("comm", comm="x")],
                         ids=["all", "pid", "comm"])
def test_bpftrace_accepts_generated_script(recipe, scope, tmp_path, root_required, sampled):
    program = built(recipe, sampled).with_scope(scope)
    script = tmp_path / "p.bt"
    target = targets.detect("bpftrace")
    script.write_text(backends.for_target(target).generate(program, ready_pid=1).text)
    argv = ["bpftrace", *target.check_options(str(tmp_path / "p.o")), str(script)] + target.positional(scope)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.debian13
@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
@pytest.mark.parametrize("scope", [ir.Scope(), ir.Scope("comm", comm="x")], ids=["all", "comm"])
def test_bcc_compiles_and_loads_generated_program(recipe, scope, root_required, sampled):
    """--comm with dwarf stacks (BCC's default), --all with fp: each program is verified; with
    dwarf, the unwinder is verified once, in its own program, which no acquire program inlines."""
    from bcc import BPF
    program = built(recipe, sampled).with_scope(scope).walking_stacks("dwarf" if scope.mode == "comm" else "fp")
    gen = backends.for_target(targets.detect("bcc")).generate(program)
    bpf = BPF(text=gen.text, cflags=["-DPROBEDSL_PID=1", "-DPROBEDSL_SELF=1"])
    try:
        # loading checks the verifier, without attaching; uprobes load as kprobe-type programs
        programs = [bpf.load_func(f, BPF.KPROBE) for p in gen.manifest["probes"] for f in (p["entry"], p["return"]) if f]
        unwinders = [bpf.load_func(u["program"], BPF.TRACEPOINT if u["type"] == "tracepoint" else BPF.KPROBE)
                     for u in gen.manifest.get("unwinders", [])]
        assert bool(unwinders) == gen.manifest["dwarf"]
        # BCC loaded and attached the system calls' tracepoint programs already
        programs += [f for name, f in bpf.funcs.items() if name.startswith(b"tracepoint__syscalls__")]
        if unwinders:          # (memleak: 297,000 instructions verified in the unwinder, 700 in an acquire program)
            least = min(verified_instructions(u.fd) for u in unwinders)
            assert all(verified_instructions(p.fd) < least / 20 for p in programs)
    finally:
        bpf.cleanup()


def verified_instructions(fd: int) -> int:
    """What the kernel's verifier walked to accept a loaded program (its fdinfo, kernel 5.16+)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("verified_insns:"))


def test_control_characters_in_a_description_stay_out_of_generated_text():
    """bpftrace's lexer stops at a NUL even inside a comment (found by tests/test_fuzz.py)."""
    from probedsl import parser
    source = open(MEMLEAK).read().replace('"Heap blocks', '"\\x00 \x1b[31m Heap blocks', 1)
    source = source.replace("\\x00", "\x00")
    recipe = parser.parse(source, "m.probe")
    program = compiler.build(recipe).with_scope(ir.Scope("pid", pid=1))
    for cls in targets.TARGETS:
        text = backends.for_target(cls()).generate(program).text
        assert "\x00" not in text and "\x1b" not in text and "Heap blocks" in text


class _NewKind(str):
    """A probe kind no generator lowers yet (what adding one to ir.ProbeKind starts as)."""
    value = "newkind"


@pytest.mark.parametrize("name", ["bpftrace", "bcc"])
def test_a_probe_kind_a_generator_does_not_lower_is_refused_by_name(name):
    program = compiler.build(compiler.load(MEMLEAK))
    res = program.resources[0]
    probe = res.probes[0]
    object.__setattr__(probe, "kind", _NewKind("newkind"))
    with pytest.raises(ProbedslError, match=f"{name if name == 'bpftrace' else 'BCC'} has no lowering for a newkind probe"):
        backends.for_target(targets.for_version(name, None)).generate(program)


def test_two_columns_of_one_name_are_refused_where_the_second_is():
    source = ('recipe t "two columns"\nresource heap keyed by (pid, address) {\n'
              "  acquire libc:malloc(size) -> (pid, ret) when ret != 0 size = size\n"
              "  release libc:free(ptr) -> (pid, ptr)\n  record size, ustack, pid\n}\n"
              "report outstanding heap by ustack: sum(size) as x, count() as x\n")
    with pytest.raises(RecipeError) as exc:
        checker.check(parser.parse(source, "t.probe"))
    assert "t.probe:7:" in exc.value.render() and "column 'x' is already in this report" in exc.value.render()
