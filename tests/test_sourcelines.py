"""addr2line started ahead (probedsl.binaries.sourcelines.warm): the report's lookups answered by
the process that already read the DWARF, the same as a fresh run's, and nothing left behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from probedsl.binaries import debuginfo, elf, sourcelines
from probedsl.binaries.sourcelines import SourceLines

SOURCE = """#include <stdlib.h>
__attribute__((noinline)) void *first(void) { return malloc(8); }
__attribute__((noinline)) void *second(void) { return malloc(16); }
int main(void) { free(first()); free(second()); return 0; }
"""


@pytest.fixture
def program(tmp_path, monkeypatch):
    monkeypatch.setattr(sourcelines, "_stopped", False)  # (a run's end stops them for good)
    (tmp_path / "p.c").write_text(SOURCE)
    exe = tmp_path / "p"
    subprocess.run(["gcc", "-g", "-O2", "-o", str(exe), str(tmp_path / "p.c")], check=True)
    stripped = tmp_path / "p-stripped"
    subprocess.run(["strip", "-g", "-o", str(stripped), str(exe)], check=True)
    yield str(exe), str(stripped)
    sourcelines.stop_warm()


def _gone(warm) -> bool:
    return warm.proc.returncode is not None and not os.path.exists(warm.alone)


def _addresses(exe):
    syms = elf.symbols(exe)
    return [syms.address_of("first") + 1, syms.address_of("second") + 1]


def test_a_warm_addr2line_answers_as_a_fresh_one(program):
    exe, _ = program
    addrs = _addresses(exe)
    fresh = SourceLines().lookup(exe, addrs)
    assert [f[0].function for f in fresh.values()] == ["first", "second"], fresh
    sourcelines.warm(exe)
    warm = sourcelines._warm[exe]
    assert warm.proc.poll() is None  # waiting for the report's addresses
    assert SourceLines().lookup(exe, addrs) == fresh
    assert exe not in sourcelines._warm and _gone(warm)  # used once, then ended
    assert SourceLines().lookup(exe, addrs) == fresh  # later lookups run addr2line as before


def test_a_file_without_dwarf_is_not_warmed_and_stop_ends_the_others(program):
    exe, stripped = program
    sourcelines.warm(stripped)
    assert stripped not in sourcelines._warm
    sourcelines.warm(exe)
    warm = sourcelines._warm[exe]
    sourcelines.stop_warm()
    assert not sourcelines._warm and _gone(warm)


def test_a_warm_addr2line_that_ended_early_is_replaced_by_a_fresh_one(program):
    """Killed meanwhile (a signal to it alone; a Ctrl-C to the run's process group misses it):
    the report's lookup runs addr2line as without one, and says nothing of bounds."""
    exe, _ = program
    addrs = _addresses(exe)
    fresh = SourceLines().lookup(exe, addrs)
    sourcelines.warm(exe)
    warm = sourcelines._warm[exe]
    assert os.getpgid(warm.proc.pid) != os.getpgid(0)
    warm.proc.kill()
    warm.proc.wait()
    assert SourceLines().lookup(exe, addrs) == fresh
    assert _gone(warm)


def test_none_is_started_once_the_run_has_ended(program):
    exe, _ = program
    sourcelines.stop_warm()
    sourcelines.warm(exe)
    assert exe not in sourcelines._warm


def test_the_read_ahead_asks_nothing_of_debuginfod(program, monkeypatch):
    """It reads every file a pid maps: only the report's frames may cause a download."""
    _, stripped = program
    monkeypatch.setenv("DEBUGINFOD_URLS", "http://127.0.0.1:9")
    asked = []
    monkeypatch.setattr(debuginfo, "fetch", lambda ident: asked.append(ident) or "")
    elf._load.cache_clear()
    assert elf.read_ahead(stripped) is None and not asked
    assert elf.symbols(stripped).debug_file == "" and asked
