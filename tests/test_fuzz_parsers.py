"""A hostile file cannot stop the parsers: a built program's .eh_frame, symbol tables, DWARF
lines and info, and .gnu_debuglink mutated at random (seeded), each copy through the symbol
reader, addr2line's parser and the unwind-row loader. No exception escapes, no file takes
longer than the per-file bound. The unit layer fuzzes for QUICK_SECONDS; the `slow` variant (the
full suite's) for PROBEDSL_FUZZ_SECONDS (default 40): longer in a bench."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time

import pytest

from probedsl.trust import bounds
from probedsl.binaries import cfi, elf
from probedsl import notices
from probedsl.stacks import unwind_tables
from probedsl.binaries.sourcelines import SourceLines

pytestmark = [pytest.mark.security, pytest.mark.parallel]

SEED = 30
QUICK_SECONDS = 4
SECTIONS = (".eh_frame", ".symtab", ".dynsym", ".strtab", ".debug_line", ".debug_info", ".debug_str", ".gnu_debuglink")


def section_spans(path: str) -> dict:
    """{name: (file offset, size, its header's offset)} of the sections the fuzzer mutates,
    and the build id's."""
    spans = {}
    with open(path, "rb") as f:
        e = elf.ELFFile(f)
        for i, s in enumerate(e.iter_sections()):
            if s.name in SECTIONS + (".note.gnu.build-id",) and s["sh_type"] != "SHT_NOBITS":
                spans[s.name] = (s["sh_offset"], s["sh_size"], e["e_shoff"] + i * e["e_shentsize"])
    return spans


# Elf64_Shdr fields a hostile file might set: (offset in the header, bytes)
_HEADER_FIELDS = {"offset": (0x18, 8), "size": (0x20, 8), "link": (0x28, 4), "entsize": (0x38, 8)}


def mutate_header(data: bytearray, header: int, size: int, rng: random.Random) -> str:
    field = rng.choice(sorted(_HEADER_FIELDS))
    at, width = _HEADER_FIELDS[field]
    value = rng.choice((0, 1, size * 2, len(data), 1 << 40, rng.randrange(1 << (8 * width))))
    data[header + at : header + at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return f"header {field}"


def mutate(data: bytearray, start: int, size: int, rng: random.Random) -> str:
    """One of: random bytes, a byte set to an edge value, a run of LEB128 continuation bytes,
    a span zeroed, a span copied elsewhere in the section. Returns what was done."""
    kind = rng.choice(("flip", "edge", "leb", "zero", "copy"))
    for _ in range(rng.randint(1, 8)):
        at = start + rng.randrange(size)
        if kind == "flip":
            data[at] = rng.randrange(256)
        elif kind == "edge":
            data[at] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
        elif kind == "leb":
            n = min(rng.randint(2, 64), start + size - at)
            data[at : at + n] = b"\x80" * n
        elif kind == "zero":
            n = min(rng.randint(1, 32), start + size - at)
            data[at : at + n] = bytes(n)
        else:
            n = min(rng.randint(1, 64), start + size - at)
            src = start + rng.randrange(size - n + 1)
            data[at : at + n] = data[src : src + n]
    return kind


@pytest.fixture(scope="module")
def program(build, tmp_path_factory):
    """leak.c built -O2 -g (inlined calls, .debug_line and .debug_info), with a .gnu_debuglink."""
    out = tmp_path_factory.mktemp("fuzz")
    exe = str(out / "leak")
    subprocess.run(["objcopy", f"--add-gnu-debuglink={build('leak-O2')}", build("leak-O2"), exe], check=True)
    return exe


@pytest.mark.parametrize(
    "deep", [pytest.param(False, id="quick"), pytest.param(True, id="deep", marks=pytest.mark.slow)]
)
def test_mutated_sections_through_every_parser(deep, program, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DEBUGINFOD_URLS", raising=False)
    budget = float(os.environ.get("PROBEDSL_FUZZ_SECONDS", "40")) if deep else QUICK_SECONDS
    original = bytearray(open(program, "rb").read())
    spans = section_spans(program)
    assert {".eh_frame", ".symtab", ".dynsym", ".debug_line", ".debug_info", ".gnu_debuglink"} <= set(spans), spans
    id_at, id_size, _ = spans.pop(".note.gnu.build-id")
    syms = elf.symbols(program)
    vaddrs = sorted(syms._spans)[:64]  # every function's address, and one past each
    vaddrs += [a + 1 for a in vaddrs]
    rng = random.Random(SEED)
    tried, slowest, kinds, noted = 0, 0.0, {}, 0  # kinds: mutations done
    end = time.monotonic() + budget
    while time.monotonic() < end:
        data = bytearray(original)
        name = rng.choice(sorted(spans))
        start, size, header = spans[name]
        kind = mutate_header(data, header, size, rng) if rng.random() < 0.2 else mutate(data, start, size, rng)
        # a build id of its own: the row cache must not answer for the mutated file
        data[id_at + id_size - 20 : id_at + id_size] = hashlib.sha1(data).digest()
        path = tmp_path / f"m{tried}"
        path.write_bytes(data)
        began = time.monotonic()
        notices.clear()
        loaded = elf.symbols(str(path))
        if loaded is not None:
            for a in vaddrs:
                loaded.function_at(a)
            SourceLines().lookup(loaded.dwarf_file, vaddrs)
        unwind_tables.rows_of(str(path))
        cfi.table(str(path))
        took = time.monotonic() - began
        assert took < bounds.FILE_SECONDS, (name, kind, took, notices.all_notes())
        slowest = max(slowest, took)
        noted += bool(notices.all_notes())
        kinds[kind] = kinds.get(kind, 0) + 1
        tried += 1
        path.unlink()
    print(
        f"\nfuzzed {tried} files (seed {SEED}, {budget:g} s): {kinds}; slowest {slowest:.3f} s; "
        f"{noted} with a note (a table skipped or a debug file refused)"
    )
    assert tried >= (50 if deep else 5), tried  # the loop ran (fewer on a busy machine)
