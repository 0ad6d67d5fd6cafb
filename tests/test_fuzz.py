"""Fuzzing the front end: any text gives a compiled program or a located error, nothing else;
and what checks clean is accepted by bpftrace and BCC themselves."""

from __future__ import annotations

import glob
import subprocess

import pytest

from hypothesis import HealthCheck, given, settings, strategies as st

from probedsl import backends, compiler, targets
from probedsl.language import checker, parser
from probedsl.errors import ProbedslError, RecipeError

from conftest import ROOT, probedsl

pytestmark = pytest.mark.parallel  # CPU alone: compiles and loads, attaches nothing

RECIPES = {p: open(p).read() for p in sorted(glob.glob(str(ROOT / "recipes" / "*.probe")))}
TOKENS = [
    "acquire",
    "release",
    "releases",
    "acquires",
    "record",
    "report",
    "resource",
    "when",
    "keyed",
    "by",
    "->",
    "(",
    ")",
    "{",
    "}",
    ",",
    ":",
    "=",
    "*",
    "[",
    "]",
    "!",
    "&&",
    "||",
    "==",
    "int",
    "ret",
    "pid",
    "tid",
    "size",
    "ustack",
    "libc",
    "malloc",
    "free",
    "tracepoint",
    "usdt",
    "kmem",
    "0",
    "-1",
    "0x10",
    "x",
    '"',
    "#",
    "\n",
    "hist",
    "count",
    "sum",
    "top",
    "outstanding",
    "lifetime",
    "ß",
    "\x00",
]


def pipeline(text: str):
    """Everything `probedsl compile` does, for both backends; returns the programs."""
    recipe = parser.parse(text, "fuzz.probe")
    checker.check(recipe)
    program = compiler.build(recipe)
    return program, [backends.for_target(cls()).generate(program) for cls in targets.TARGETS]


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(sorted(RECIPES.values())))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "swap_lines"]))
        if kind == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 12)) :]
        elif kind == "insert":
            text = text[:pos] + " " + draw(st.sampled_from(TOKENS)) + " " + text[pos:]
        elif kind == "replace":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos + draw(st.integers(1, 6)) :]
        else:
            lines = text.splitlines()
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@st.composite
def well_formed(draw):
    """Mutations that keep the syntax: operators, constants, guards, recorded fields."""
    import re

    text = draw(st.sampled_from(sorted(RECIPES.values())))
    swaps = [
        (r"!=|==|>=|<=", ["!=", "==", ">=", "<=", "<", ">"]),
        (r"\b0\b", ["0", "1", "-1", "0x10", "4096"]),
        (r"int\(ret\)", ["int(ret)", "ret", "int(ret) + 1", "(ret * 2)"]),
        (
            r"record [a-z, ]+",
            ["record size, ustack, time, pid", "record ustack, time, pid, tid, comm", "record size, kstack, time, pid"],
        ),
    ]
    for pattern, choices in swaps:
        matches = list(re.finditer(pattern, text))
        for m in reversed(matches):
            if draw(st.booleans()):
                text = text[: m.start()] + draw(st.sampled_from(choices)) + text[m.end() :]
    return text


# the unit layer's budgets; the `slow` variants (the full suite's) try QUICK's tenfold and more
QUICK = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEEP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def compiles_or_fails_with_a_located_error(text):
    try:
        pipeline(text)
    except RecipeError as exc:
        for d in exc.diagnostics:
            assert d.span.line >= 1 and d.span.column >= 1, exc.render()
        assert exc.render().startswith("fuzz.probe:")
    except ProbedslError as exc:
        assert str(exc) and "\n" not in str(exc)


test_mutated_recipes_compile_or_fail_with_a_located_error = QUICK(
    given(mutated())(compiles_or_fails_with_a_located_error)
)
test_many_mutated_recipes_compile_or_fail_with_a_located_error = pytest.mark.slow(
    DEEP(given(mutated())(compiles_or_fails_with_a_located_error))
)


def never_crashes_the_parser(text):
    try:
        pipeline(text)
    except (RecipeError, ProbedslError):
        pass


test_random_text_never_crashes_the_parser = QUICK(given(st.text(max_size=300))(never_crashes_the_parser))
test_much_random_text_never_crashes_the_parser = pytest.mark.slow(
    DEEP(given(st.text(max_size=300))(never_crashes_the_parser))
)


@pytest.mark.usefixtures("root_required")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(well_formed(), mutated()))
def test_recipes_that_check_clean_are_accepted_by_both_backends(tmp_path_factory, text):
    try:
        program, generated = pipeline(text)
    except (RecipeError, ProbedslError):
        return
    # the installed versions' dialects
    bt = backends.for_target(targets.detect("bpftrace")).generate(program)
    bcc_gen = backends.for_target(targets.detect("bcc")).generate(program)
    work = tmp_path_factory.mktemp("fuzz")
    script = work / "f.bt"
    script.write_text(bt.text)
    checking = targets.detect("bpftrace").check_options(str(work / "f.o"))
    result = subprocess.run(["bpftrace", *checking, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (text, result.stderr)
    from bcc import BPF

    bpf = BPF(text=bcc_gen.text, cflags=["-DPROBEDSL_PID=1", "-DPROBEDSL_SELF=1"])
    try:
        for p in bcc_gen.manifest["probes"]:
            bpf.load_func(p["entry"], BPF.KPROBE)
            if p["return"]:
                bpf.load_func(p["return"], BPF.KPROBE)
    finally:
        bpf.cleanup()


def test_check_cli_on_binary_garbage_is_one_located_error(tmp_path):
    bad = tmp_path / "garbage.probe"
    bad.write_bytes(bytes(range(256)) * 4)
    result = probedsl("check", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
