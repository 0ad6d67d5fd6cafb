"""Shared helpers: the CLI, C fixtures built in the test run, and JSON report readers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MEMLEAK = str(ROOT / "recipes" / "memleak.probe")
CXXLEAK = str(ROOT / "recipes" / "cxxleak.probe")
BACKENDS = ("bpftrace", "bcc")


def pytest_collection_modifyitems(config, items):
    """`tracing`: every test that needs root's rights or a real backend (it asks for
    root_required), so `pytest -m "not tracing"` is the unit layer, runnable unprivileged.
    That layer is also quick: it leaves out `slow` tests (the deeper fuzzing) unless the
    expression names `slow`; the full suite runs them."""
    for item in items:
        if "root_required" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.tracing)
    expression = config.getoption("markexpr") or ""
    if "not tracing" in expression and "slow" not in expression:
        slow = [item for item in items if item.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden from current output")


@pytest.fixture
def update_golden(request):
    return request.config.getoption("--update-golden")


def probedsl(*args, input=None, timeout=120, **kw):
    """Run the CLI as a user would; returns CompletedProcess with text output."""
    return subprocess.run(
        [sys.executable, "-m", "probedsl", *args], input=input, capture_output=True, text=True, timeout=timeout, **kw
    )


def start_run(*args, env=None, stdin=None):
    """`probedsl run ARGS` in the background, returned once it says that tracing has begun
    (every probe attached); its output is read later with communicate(). stdin=PIPE keeps a
    launched command that reads its input (the seed's leak) running until it is closed."""
    tracer = subprocess.Popen(
        [sys.executable, "-m", "probedsl", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=stdin,
        text=True,
        env=env,
    )
    said = []
    while not said or not said[-1].startswith("probedsl: tracing "):
        said.append(stderr_line(tracer))
        if not said[-1]:
            out, err = tracer.communicate()
            pytest.fail(f"probedsl ended before tracing: {''.join(said) + err}")
    return tracer


def stderr_line(proc) -> str:
    """A line of proc's stderr, read a byte at a time: a buffered readline could take lines
    after it, which communicate() (reading the descriptor itself) would then never see."""
    line = b""
    while not line.endswith(b"\n"):
        byte = os.read(proc.stderr.fileno(), 1)
        if not byte:
            break
        line += byte
    return line.decode(errors="replace")


MEMLEAK_UPROBES = 17  # the uprobes (and uretprobes) --per-process opens on each process for memleak


def uprobes_open(pid: int) -> int:
    """The uprobe perf events and links the process holds open (an fd closed meanwhile is not one)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") in ("anon_inode:[perf_event]", "anon_inode:bpf_link")
        except OSError:
            pass
    return count


def wait_uprobes(tracer, at_least: int, limit_s: float = 120) -> None:
    """Until the tracer holds at least that many uprobes open (a process attached)."""
    deadline = time.monotonic() + limit_s
    while uprobes_open(tracer.pid) < at_least:
        assert time.monotonic() < deadline, f"the tracer did not hold {at_least} uprobes within {limit_s} s"
        assert tracer.poll() is None, "the tracer ended"
        time.sleep(0.01)


class Held:
    """A program started with argv ending in `leak_delayed wait ...`: it allocates once go()
    writes its line (after the tracer says it is tracing)."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        self.pid = self.proc.pid

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()

    def end(self) -> None:
        if self.proc.poll() is None and not self.proc.stdin.closed:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session", autouse=True)
def empty_cache(tmp_path_factory):
    """The suite runs as a user's first run does: probedsl's caches (XDG_CACHE_HOME) start
    empty in a directory of this test run; a test about the cache sets its own."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture(autouse=True)
def nothing_shipped_in_process(tmp_path_factory, monkeypatch):
    """probedsl's code in this process sees no install build (an absent shipped root): a test of
    a cache means the user's. The probedsl processes tests start read the install's, as a
    user's first run does (tests/test_bcc_kept.py tests that)."""
    from probedsl.trust import cachedir

    monkeypatch.setattr(cachedir, "shipped_root", lambda: str(tmp_path_factory.getbasetemp() / "nothing-shipped"))


@pytest.fixture(scope="session")
def root_required():
    if os.geteuid() != 0:
        pytest.fail("tracing tests need root with eBPF rights (CI runs as root); run: sudo scripts/test.sh")


@pytest.fixture(scope="session")
def mallocfree(tmp_path_factory):
    """bench's workload: mallocfree THREADS CALLS DELAY_S (malloc/free pairs, nothing kept)."""
    exe = tmp_path_factory.mktemp("bench") / "mallocfree"
    subprocess.run(
        ["gcc", "-O1", "-pthread", "-o", str(exe), str(ROOT / "bench" / "workloads" / "mallocfree.c")], check=True
    )
    return str(exe)


@pytest.fixture(scope="session")
def sampled(tmp_path_factory):
    """tests/fixtures/sampled.c for each USDT provider: {provider: executable}, built -O2 (no frame
    pointers) as distributions build."""
    out = tmp_path_factory.mktemp("usdt")
    built = {}
    for provider, define in (("otel_memory", "-DOTEL"), ("ddheap", "-DDD")):
        built[provider] = str(out / f"sampled_{provider}")
        subprocess.run(["gcc", "-O2", "-g", define, "-o", built[provider], str(FIXTURES / "sampled.c")], check=True)
    return built


# build("NAME-FLAVOUR"): gcc's flags for each optimized flavour of a fixture
OPTIMIZED = {
    "O2": ["-O2", "-g"],
    "nounwind": ["-O2", "-g", "-fno-asynchronous-unwind-tables"],
    "cet": ["-O2", "-fcf-protection=full"],
    "lsan": ["-O2", "-g", "-fsanitize=leak"],
}


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    """build(name) compiles tests/fixtures/NAME.c (or .cpp) at -O0 -g (gcc drops unused mallocs at
    -O2); build("libNAME.so") builds a shared library from NAME.c; build("NAME-stripped") a
    stripped copy; build("NAME-O2") NAME.c at -O2 -g, as distributions build (no frame pointers);
    "NAME-nounwind" the same without asynchronous unwind tables (rows in .debug_frame only);
    "NAME-cet" at -O2 -fcf-protection=full (every function starts with endbr64); "NAME-lsan" at
    -O2 -g with LeakSanitizer (-fsanitize=leak)."""
    out = tmp_path_factory.mktemp("fixtures")
    built = {}

    def _build(name: str) -> str:
        if name in built:
            return built[name]
        exe = out / name
        if name.endswith("-stripped"):
            subprocess.run(["strip", "-o", str(exe), _build(name[: -len("-stripped")])], check=True)
        elif name.rsplit("-", 1)[-1] in OPTIMIZED:
            base, flavour = name.rsplit("-", 1)
            subprocess.run(
                ["gcc", *OPTIMIZED[flavour], "-pthread", "-o", str(exe), str(FIXTURES / f"{base}.c")], check=True
            )
        elif name.startswith("lib") and name.endswith(".so"):
            src = FIXTURES / f"{name[3:-3]}.c"
            subprocess.run(["gcc", "-O0", "-g", "-shared", "-fPIC", "-o", str(exe), str(src)], check=True)
        elif (FIXTURES / f"{name}.cpp").exists():
            subprocess.run(["g++", "-O0", "-g", "-o", str(exe), str(FIXTURES / f"{name}.cpp")], check=True)
        else:
            subprocess.run(
                ["gcc", "-O0", "-g", "-pthread", "-o", str(exe), str(FIXTURES / f"{name}.c"), "-ldl", "-lz"], check=True
            )
        built[name] = str(exe)
        return built[name]

    return _build


def report_json(stdout: str) -> dict:
    """The last JSON report in the output (interval runs print several)."""
    dec, docs, i = json.JSONDecoder(), [], 0
    while (i := stdout.find("{", i)) >= 0:
        try:
            doc, i = dec.raw_decode(stdout, i)
            docs.append(doc)
        except ValueError:
            i += 1
    assert docs, f"no JSON report in output: {stdout[:500]!r}"
    return docs[-1]


ALLOCATOR_MODULES = ("libc.so", "ld-linux")


def first_user_function(entry: dict) -> str:
    """The innermost frame outside libc/ld.so: where the program called the allocator."""
    for frame in entry["stack"]:
        if not any(m in (frame["module"] or "") for m in ALLOCATOR_MODULES):
            return frame["function"] or frame["text"]
    return entry["stack"][0]["text"] if entry["stack"] else ""


def by_site(report: dict) -> dict:
    """{function: (bytes, blocks)} summed over the outstanding-heap entries."""
    sites = {}
    for rep in report["reports"]:
        if rep["kind"] != "outstanding":
            continue
        for e in rep["entries"]:
            name = first_user_function(e)
            b, n = sites.get(name, (0, 0))
            sites[name] = (b + e["bytes"], n + e["blocks"])
    return sites


@pytest.fixture
def kept_between_runs(tmp_path, monkeypatch):
    """As probedsl.cli does, under tmp_path/cache (and with nothing the install built: an empty
    tmp_path/shipped); the parser and templates are then built or loaded again, and after the
    test forget that place."""
    from backends import base
    from probedsl import compiler
    from probedsl.trust import cachedir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cachedir, "shipped_root", lambda: str(tmp_path / "shipped"))
    compiler.keep_between_runs(cachedir.Kept)
    yield tmp_path / "cache" / "probedsl"
    from probedsl.language import parser

    parser.keep_tables_in(None)
    base.keep_no_templates()
