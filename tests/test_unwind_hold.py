"""BCC's DWARF unwinder on code mapped while the run traces (probedsl/process/mapping_hold.py): a
library dlopen'd by ctypes (libffi's call trampoline, hand-written assembly with CFI), the
libraries of each image a wrapper execs (bash, env, the interpreter), the children a shell
forks. Every stack reaches the program's start, none ends early for lack of rows."""

from __future__ import annotations

import os

import pytest

from conftest import FIXTURES, MEMLEAK, probedsl, report_json

pytestmark = pytest.mark.usefixtures("root_required")

SCRIPT = str(FIXTURES / "ctypes_leak.py")
PYTHON = "/usr/bin/python3"
COMMANDS = {
    "direct": [PYTHON, SCRIPT],
    # a shim's shape: bash forks (a subshell, which forks a pipeline), then execs env, which
    # execs the interpreter; the listener is slowed so that every new image and child is
    # early for its rows, as on a busy machine; --reachability's ptrace hold (the tether)
    # takes the first exec, the mapping hold the others
    "wrapped": ["bash", "-c", f'x=$(echo a | cat); exec env {PYTHON} "$0"', SCRIPT],
}
OPTIONS = {"direct": [], "wrapped": ["--reachability"]}


@pytest.mark.parametrize("how", COMMANDS)
def test_ctypes_leak_unwinds_to_the_interpreter_and_main(how):
    assert os.path.exists(PYTHON), f"{PYTHON} (Debian's python3, which scripts/setup.sh uses) is missing"
    env = dict(os.environ, PROBEDSL_FAULTS="slow-listener") if how == "wrapped" else None
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        "bcc",
        "--format",
        "json",
        "--top",
        "1000",
        "--python-native",  # the interpreter's own frames kept beside its Python frames
        *OPTIONS[how],
        "--",
        *COMMANDS[how],
        env=env,
        timeout=300,
    )
    assert "Traceback" not in result.stderr, result.stderr
    report = report_json(result.stdout)
    assert result.returncode == 0, (result.stderr, report.get("incomplete"))
    outstanding = next(r for r in report["reports"] if r["kind"] == "outstanding")
    # no stack of the run ends early for lack of rows (a stack past 64 frames is cut, and said)
    cut = outstanding.get("cut_stacks") or {}
    assert not {"no frame pointer", "no unwind information"} & set(cut), (cut, report["notes"])
    site = [e for e in outstanding["entries"] if e["bytes"] == 5 * 12345 and e["blocks"] == 5]
    assert len(site) == 1, [(e["bytes"], e["blocks"]) for e in outstanding["entries"]]
    stack = site[0]["stack"]
    names = [f["function"] or "" for f in stack]
    modules = [os.path.basename(f["module"] or "") for f in stack]
    assert not site[0].get("truncated"), [f["text"] for f in stack]
    assert any(m.startswith("libffi.so") for m in modules), [f["text"] for f in stack]
    # through libffi into ctypes, the interpreter's loop, its main, and the C runtime's start
    expected = ["_ctypes", "_PyEval_EvalFrameDefault", "Py_RunMain", "__libc_start_main"]
    positions = [
        next((i for i, (n, m) in enumerate(zip(names, modules)) if want in n or want in m), -1) for want in expected
    ]
    assert -1 not in positions and positions == sorted(positions), (positions, [f["text"] for f in stack])
