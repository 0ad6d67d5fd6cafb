"""addr2line started ahead (probedsl.binaries.sourcelines.warm): the report's lookups answered by
the process that already read the DWARF, the same as a fresh run's, and nothing left behind."""

from __future__ import annotations

import os
import subprocess

import pytest

from probedsl.binaries import elf, sourcelines
from probedsl.binaries.sourcelines import SourceLines

SOURCE = """#include <stdlib.h>
__attribute__((noinline)) void *first(void) { return malloc(8); }
__attribute__((noinline)) void *second(void) { return malloc(16); }
int main(void) { free(first()); free(second()); return 0; }
"""


@pytest.fixture
def program(tmp_path):
    (tmp_path / "p.c").write_text(SOURCE)
    exe = tmp_path / "p"
    subprocess.run(["gcc", "-g", "-O2", "-o", str(exe), str(tmp_path / "p.c")], check=True)
    stripped = tmp_path / "p-stripped"
    subprocess.run(["strip", "-g", "-o", str(stripped), str(exe)], check=True)
    yield str(exe), str(stripped)
    sourcelines.stop_warm()


def _gone(warm) -> bool:
    return warm.proc.poll() is not None and not os.path.exists(warm.alone)


def test_a_warm_addr2line_answers_as_a_fresh_one(program):
    exe, _ = program
    syms = elf.symbols(exe)
    addrs = [syms.address_of("first") + 1, syms.address_of("second") + 1]
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
