"""What a late root's bpftrace probes (probedsl.run.late_roots), without tracing: only files no
bpftrace of the run probes yet, never the tracepoints and system calls the first one has."""

from __future__ import annotations

import dataclasses
import os
import shutil
from types import SimpleNamespace

from probedsl import compiler
from probedsl.run.late_roots import LateRoots

from conftest import MEMLEAK, ROOT


def on_file(program, path):
    return dataclasses.replace(
        program,
        resources=tuple(
            dataclasses.replace(r, probes=tuple(dataclasses.replace(p, path=path) for p in r.probes))
            for r in program.resources
        ),
    )


def test_a_late_root_gets_probes_only_on_files_not_probed_yet(tmp_path):
    program = compiler.build(compiler.load(MEMLEAK))
    late = LateRoots(SimpleNamespace(program=program), None, print)
    same = late._new_files_only(program)  # the root's libc is our file (a bind mount)
    assert same.resources == () and same.reports == ()
    copy = str(tmp_path / "libc.so.6")  # the root's own copy: every probe moves there
    shutil.copy2(program.resources[0].probes[0].path, copy)
    kept = late._new_files_only(on_file(program, copy))
    assert [p.id for p in kept.resources[0].probes] == [p.id for p in program.resources[0].probes]
    assert {p.path for p in kept.resources[0].probes} == {copy} and len(kept.reports) == len(program.reports)


def test_a_recipe_of_system_calls_traces_a_late_root_as_it_is():
    program = compiler.build(compiler.load(str(ROOT / "recipes" / "fdleak.probe")))
    late = LateRoots(SimpleNamespace(program=program), None, print)
    assert late._new_files_only(program).resources == ()
    assert late.adopt(os.getpid(), (0, 0), "x", "/") is True  # traced by the first bpftrace: no hold
