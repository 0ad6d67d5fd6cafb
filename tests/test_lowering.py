"""AST -> IR: correlation planning, release ordering, parameters, library resolution."""

from __future__ import annotations

import pytest

from probedsl.language import checker, parser
from probedsl import compiler, ir, targets
from probedsl.process import libraries
from probedsl.ir import lower
from probedsl.errors import ProbedslError, RecipeError

from conftest import MEMLEAK, probedsl


def program_of(text: str, overrides=None) -> ir.Program:
    recipe = parser.parse(text, "t.probe")
    checker.check(recipe)
    return lower.lower(recipe, lower.parameter_values(recipe, overrides or {}))


def test_entry_arguments_used_at_return_are_saved_per_thread():
    p = program_of(
        "recipe r resource h keyed by a { acquire libc:calloc(n, each) -> ret when ret != 0 size = n * each record size }"
    )
    (probe,) = p.resources[0].probes
    assert probe.at_return and probe.saved_args == (0, 1)
    (action,) = probe.actions
    assert action.size == ir.BinOp("*", ir.Saved(0, 0), ir.Saved(1, 1))


def test_entry_only_release_reads_arguments_directly():
    p = program_of("recipe r resource h keyed by a { acquire l:m(s) -> ret release l:free(p) -> p when p != 0 }")
    free = p.resources[0].probes[1]
    assert not free.at_return and free.saved_args == ()
    assert free.actions[0].key == (ir.Arg(0),)


def test_realloc_releases_the_old_block_before_acquiring_the_new_one():
    p = program_of(
        "recipe r resource h keyed by a { acquire l:realloc(old, size) -> ret when ret != 0 size = size releases old when old != 0 }"
    )
    kinds = [a.kind for a in p.resources[0].probes[0].actions]
    assert kinds == ["release", "acquire"]


def test_out_parameter_is_read_at_return():
    p = program_of(
        "recipe r resource h keyed by a { acquire l:posix_memalign(out, al, size) -> *out when ret == 0 size = size }"
    )
    probe = p.resources[0].probes[0]
    assert probe.at_return
    assert probe.actions[0].key == (ir.Deref(ir.Saved(1, 0)),)


def test_parameters_take_defaults_and_overrides():
    text = "recipe r param min = 5 resource h keyed by a { acquire l:m(s) -> ret when s >= min }"
    assert program_of(text).resources[0].probes[0].actions[0].guard.right == ir.Const(5)
    assert program_of(text, {"min": "0x10"}).resources[0].probes[0].actions[0].guard.right == ir.Const(16)
    with pytest.raises(ProbedslError, match="no parameter 'mn'"):
        program_of(text, {"mn": "1"})
    with pytest.raises(ProbedslError, match="integers"):
        program_of(text, {"min": "five"})


def test_glibc_aliases_are_attached_once():
    # aligned_alloc and memalign are one function in glibc 2.36: two probes would count twice
    program = compiler.build(compiler.load(MEMLEAK))
    functions = [p.function for p in program.resources[0].probes]
    libc = libraries.LibraryResolver().resolve("libc")
    from probedsl.binaries import elf

    syms = elf.symbols(libc)
    if syms.address_of("aligned_alloc") == syms.address_of("memalign"):
        assert ("aligned_alloc" in functions) != ("memalign" in functions)
    addresses = [(p.path, syms.address_of(p.function), p.at_return) for p in program.resources[0].probes]
    assert len(addresses) == len(set(addresses))


def test_short_library_names_resolve_through_ldconfig():
    path = libraries.LibraryResolver().resolve("c")
    assert path and path.endswith("libc.so.6")


def test_unknown_library_is_a_located_error(tmp_path):
    recipe = tmp_path / "x.probe"
    recipe.write_text("recipe x\nresource h keyed by a {\n  acquire nosuchlib:f(a) -> ret\n}\n")
    with pytest.raises(RecipeError) as exc:
        compiler.build(compiler.load(str(recipe)))
    assert "x.probe:3:11: error: library 'nosuchlib' not found" in exc.value.render()


def test_bundled_recipe_is_found_by_name():
    assert compiler.find_recipe("memleak").endswith("memleak.probe")


def test_sampling_is_decided_in_the_kernel_on_both_backends():
    bt = probedsl("compile", "memleak", "--sample", "4")
    bcc = probedsl("compile", "memleak", "--target", "bcc", "--sample", "4")
    assert bt.returncode == 0 and bcc.returncode == 0, bt.stderr + bcc.stderr
    assert "if (rand % 4 == 0) {" in bt.stdout
    assert "if (bpf_get_prandom_u32() % 4 == 0) {" in bcc.stdout
    assert "rand %" not in probedsl("compile", "memleak").stdout  # 1: every acquisition


def test_bpftrace_refuses_live_tables_its_packed_tallies_cannot_count():
    program = compiler.build(compiler.load(MEMLEAK), max_live=1 << 24)
    with pytest.raises(ProbedslError, match="--max-live must be below 16777216"):
        compiler.generate(program, targets.for_version("bpftrace", None))
    compiler.generate(program, targets.for_version("bcc", None))  # BCC keeps bytes and count apart
