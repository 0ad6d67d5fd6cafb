"""The .eh_frame decoder, row by row against binutils' readelf on real files."""

from __future__ import annotations

import os
import re
import struct
import subprocess

import pytest

from probedsl.binaries import cfi

FDE = re.compile(r"^\S+ \S+ \S+ FDE cie=\S+ pc=([0-9a-f]+)\.\.([0-9a-f]+)")


def readelf_rows(path: str):
    """[(fde start, end, [(loc, cfa, rbp, ra, (rbx, r12, ..., r15))])] from readelf
    --debug-dump=frames-interp."""
    # (it exits 1 on libc after printing every frame: it looks for a .debug_frame too)
    out = subprocess.run(["readelf", "--debug-dump=frames-interp", path], capture_output=True, text=True).stdout
    fdes, columns, in_fde = [], [], False
    for line in out.splitlines():
        m = FDE.match(line)
        if m:
            fdes.append((int(m.group(1), 16), int(m.group(2), 16), []))
            columns, in_fde = [], True
        elif " CIE " in line:
            in_fde = False
        elif line.strip().startswith("LOC") and in_fde:
            columns = line.split()
        elif columns and re.match(r"^[0-9a-f]{16} ", line) and fdes:
            values = dict(zip(columns, re.sub(r"(r\d+) \(\w+\)", r"\1", line).split()))
            saved = tuple(values.get(cfi.REGISTER_NAMES[n], "u") for n in cfi.CALLEE_SAVED)
            fdes[-1][2].append(
                (int(values["LOC"], 16), values["CFA"], values.get("rbp", "u"), values.get("ra", "u"), saved)
            )
        elif not line.strip():
            columns = []
    return fdes


def shown(rule) -> str:
    """A rule as readelf prints it."""
    if rule is None or rule == ("undefined",):
        return "u"
    if rule[0] == "offset":
        return f"c{rule[1]:+d}"
    return "other"


def other(text: str) -> str:
    return "other" if text.startswith(("r", "exp", "vexp", "v")) and text != "u" else text


def cfa_shown(row) -> str:
    if row.cfa_register < 0:
        return "exp"
    return f"{cfi.REGISTER_NAMES[row.cfa_register]}{row.cfa_offset:+d}"


@pytest.mark.parametrize(
    "path",
    [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/bin/git",
        "/usr/bin/python3.11",
    ],
    ids=os.path.basename,
)
def test_rows_equal_readelfs(path):
    assert rows_equal_readelfs(path) > 1000


def test_debug_frame_rows_equal_readelfs(build):
    """Built without asynchronous unwind tables, a program's own rows are only in .debug_frame
    (its .eh_frame holds the C runtime's)."""
    exe = build("deep-nounwind")
    sections = subprocess.run(["readelf", "-SW", exe], capture_output=True, text=True, check=True).stdout
    assert ".debug_frame" in sections
    assert rows_equal_readelfs(exe) > 10
    nm = subprocess.run(["nm", exe], capture_output=True, text=True, check=True).stdout
    level4 = next(int(line.split()[0], 16) for line in nm.splitlines() if line.endswith(" level4"))
    assert cfi.table(exe).row_at(level4) is not None


def rows_equal_readelfs(path: str) -> int:
    """Every row readelf shows, ours the same; the number of rows compared."""
    table = cfi.table(path)
    expected = readelf_rows(path)
    assert table is not None and len(table.fdes) == len(expected)
    checked = 0
    for start, _end, rows in expected:
        for loc, cfa, rbp, ra, saved in rows:
            row = table.row_at(loc)
            assert row is not None and row.address == loc, (path, hex(loc))
            rules = dict(row.saved)
            got = (cfa_shown(row), shown(row.rbp), shown(row.ra), tuple(shown(rules.get(n)) for n in cfi.CALLEE_SAVED))
            want = (cfa, other(rbp), other(ra), tuple(other(s) for s in saved))
            assert got == want, (path, hex(start), hex(loc), got, want)
            checked += 1
    return checked


def test_frame_pointer_rows_of_a_frame_pointer_build(build):
    """-fno-omit-frame-pointer code keeps rbp as its frame pointer past the prologue."""
    exe = build("leak")
    nm = subprocess.run(["nm", exe], capture_output=True, text=True, check=True).stdout
    wrapper1 = next(int(l.split()[0], 16) for l in nm.splitlines() if l.endswith(" wrapper1"))
    table = cfi.table(exe)
    assert not table.row_at(wrapper1).frame_pointer_based  # push %rbp not done yet
    assert table.row_at(wrapper1 + 8).frame_pointer_based


def test_plt_stubs_have_their_own_rule():
    """A PLT's FDE computes the CFA by an expression (rsp + 8, + 8 after the stub's push): it
    is recognized, with the stub offset from which it adds 8."""
    sections = subprocess.run(["readelf", "-SW", "/usr/bin/git"], capture_output=True, text=True, check=True).stdout
    plt = next(int(line.split()[3], 16) for line in sections.splitlines() if " .plt " in line)
    row = cfi.table("/usr/bin/git").row_at(plt + 0x20)
    assert (row.cfa_register, row.cfa_offset) == (cfi.PLT, 11)


def _section(address: int, fdes) -> bytes:
    """An .eh_frame at address: one CIE (CFA = rsp+8, the return address at CFA-8, pointers
    pc-relative 4-byte), then an FDE per (start, size, program(position of the program))."""

    def entry(body: bytes) -> bytes:
        body += b"\0" * (-len(body) % 4)  # (DW_CFA_nop)
        return struct.pack("<I", len(body)) + body

    data = entry(struct.pack("<I", 0) + b"\x01zR\0" + bytes([1, 0x78, 16, 1, 0x1B, 0x0C, 7, 8, 0x90, 1]))
    for start, size, program in fdes:
        body_at = len(data) + 4
        pc_begin = start - (address + body_at + 4)
        program_at = body_at + 4 + 4 + 4 + 1
        data += entry(struct.pack("<Iii", body_at, pc_begin, size) + b"\0" + program(address + program_at))
    return data + b"\0" * 4


def test_fdes_with_one_program_share_its_rows_unless_it_sets_an_address(monkeypatch):
    """A program seen before is not run again: its rows are moved to the new FDE's start; one
    that sets an absolute address (DW_CFA_set_loc, here pc-relative) is run each time."""
    address = 0x10000
    plain = lambda at: bytes([0x41, 0x0E, 16, 0x44, 0x0E, 8])  # noqa: E731 (advance 1: CFA+16; 4 more: CFA+8)

    placed = []

    def set_loc(at: int) -> bytes:  # advance 1; set_loc to 0x100 past its operand (at + 2): CFA+24 there
        placed.append(at + 2 + 0x100)
        return bytes([0x41, 0x01]) + struct.pack("<i", 0x100) + bytes([0x0E, 24])

    runs = []
    real_run = cfi._run
    monkeypatch.setattr(cfi, "_run", lambda *a: runs.append(a[4]) or real_run(*a))
    starts = [0x1000, 0x2000, 0x3000, 0x4000]
    data = _section(address, [(0x1000, 16, plain), (0x2000, 16, plain), (0x3000, 16, set_loc), (0x4000, 16, set_loc)])
    fdes = cfi._fdes(data, address, debug_frame=False)
    assert [f[0] for f in fdes] == starts
    relative = [[(r.address - f[0], r.cfa_register, r.cfa_offset) for r in f[2]] for f in fdes]
    assert relative[0] == relative[1] == [(0, cfi.RSP, 8), (1, cfi.RSP, 16), (5, cfi.RSP, 8)]
    assert runs == [0, 0x1000, 0x3000, 0x4000]  # the CIE's instructions, then each program not seen
    for fde, target in zip(fdes[2:], placed):
        assert [(r.address, r.cfa_offset) for r in fde[2]] == [(fde[0], 8), (fde[0] + 1, 8), (target, 24)]
