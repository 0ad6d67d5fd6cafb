"""USDT probes in the language (usdt:PROVIDER:NAME(args)) and the sampledheap recipe: a process
that samples its own allocations and fires otel_memory/ddheap probes behind their semaphores is
traced on both backends, launched or running, with exact totals."""

import pytest

from probedsl.backends.bcc import usdt_read

from conftest import BACKENDS, ROOT, Held, probedsl, report_json, start_run
from probedsl.binaries import usdt
from probedsl.errors import ProbedslError, RecipeError
from probedsl.language import checker, parser

RECIPE = str(ROOT / "recipes" / "sampledheap.probe")
# sampled.c: 12 sampled blocks stay live, weighing 4 x (64 + i) for i = 4, 12, ..., 92
LIVE = (5376, 12)


def heap_of(stdout: str) -> tuple:
    heap = report_json(stdout)["resources"]["heap"]
    return heap["live_bytes"], heap["live_blocks"], heap["acquired"], heap["released"], heap["unknown_releases"]


@pytest.mark.usefixtures("root_required")
@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("provider", ["otel_memory", "ddheap"])
def test_a_launched_process_that_fires_sampled_allocation_probes_is_traced_exactly(backend, provider, sampled):
    result = probedsl("run", RECIPE, "--backend", backend, "--format", "json", "--", sampled[provider])
    assert result.returncode == 0, result.stderr
    assert "alloc semaphore 1" in result.stdout, "the semaphore was raised before the program ran"
    assert heap_of(result.stdout) == (*LIVE, 25, 13, 0)
    other = "ddheap" if provider == "otel_memory" else "otel_memory"
    assert f"not probed, no file of the program has them: usdt:{other}:alloc, usdt:{other}:free" in result.stderr
    entry = report_json(result.stdout)["reports"][0]["entries"][0]
    assert entry["stack"][0]["function"] == "sampled_malloc"


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_running_process_gets_its_semaphore_raised(backend, sampled):
    """--pid: the kernel raises the semaphore in a process that mapped the file before."""
    held = Held([sampled["otel_memory"], "wait"])
    try:
        tracer = start_run(RECIPE, "--backend", backend, "--format", "json", "--pid", str(held.pid))
        held.go()
        out, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        assert heap_of(out) == (*LIVE, 25, 13, 0)
    finally:
        held.end()


def test_a_program_without_the_probes_is_a_one_line_error(build):
    result = probedsl("run", RECIPE, "--", build("leak"), input="\n")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "no file of the program has usdt:otel_memory:alloc or usdt:ddheap:alloc" in result.stderr


def test_compile_with_the_program_shows_each_backends_probes(sampled):
    bt = probedsl("compile", RECIPE, "--target", "bpftrace", "--program", sampled["ddheap"])
    assert f"usdt:{sampled['ddheap']}:ddheap:alloc" in bt.stdout and "usdt:otel_memory" not in bt.stdout
    bcc = probedsl("compile", RECIPE, "--target", "bcc", "--program", sampled["ddheap"])
    assert "probedsl_read_user(" in bcc.stdout or "ctx->" in bcc.stdout
    assert "'usdt': True" in bcc.stdout and "'ref_ctr': " in bcc.stdout


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8@%rdi", usdt.Location(size=8, signed=False, register="di")),
        ("-4@%esi", usdt.Location(size=4, signed=True, register="si")),
        ("8@-24(%rbp)", usdt.Location(size=8, signed=False, register="bp", offset=-24, memory=True)),
        ("2@(%r12)", usdt.Location(size=2, signed=False, register="r12", offset=0, memory=True)),
        ("-4@$5", usdt.Location(size=4, signed=True, constant=5)),
    ],
)
def test_argument_locations(text, expected):
    assert usdt.location(text) == expected


@pytest.mark.parametrize("text", ["8@(%rax,%rbx,8)", "8@sym(%rip)x", "3@%rax", "8@%xmm0"])
def test_unreadable_argument_locations_are_refused(text):
    with pytest.raises(ProbedslError):
        usdt.location(text)


def test_bcc_reads_a_signed_memory_argument_with_its_width():
    code = usdt_read(usdt.location("-4@-20(%rbp)"), "ctx")
    assert "s32 v_" in code and "ctx->bp + (-20)" in code


@pytest.mark.parametrize(
    "body, message",
    [
        ("acquire usdt:p:alloc(ptr) -> ret", "unknown name 'ret'"),
        ("acquire usdt:p:alloc(ptr) -> *ptr", "a usdt probe has no return"),
    ],
)
def test_usdt_events_cannot_use_a_return(body, message):
    source = f"recipe r\nresource x keyed by k {{\n  {body}\n  release usdt:p:free(q) -> q\n  record time\n}}\n"
    with pytest.raises(RecipeError) as err:
        checker.check(parser.parse(source, "r.probe"))
    assert message in err.value.render()
