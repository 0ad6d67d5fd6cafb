"""Call-frame information (x86-64 .eh_frame) decoded into rows: at each code address, how to
find the caller's frame (the CFA rule), where rbp was saved, and whether there is a caller.

Only the columns an unwinder needs are kept (CFA, rbp, return address, the other callee-saved
registers). The decoder is ours: pyelftools builds a dict per row (seconds for libc); this one
reads the section once with struct: 63 ms for libc's 25,212 rows, 0.2 s for git's 60,001.
tests/test_cfi.py checks it row by row against `readelf --debug-dump=frames-interp`.
"""
from __future__ import annotations

import bisect
import functools
import os
import struct
import threading
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probedsl.binaries.dwarf_bytes import Reader
from probedsl.trust import bounds
from probedsl.notices import note

RBP, RSP, RA = 6, 7, 16          # DWARF register numbers (x86-64 psABI)
_READING = threading.Lock()      # table(): each file decoded once
EXPRESSION, PLT = -1, -2         # CFA "registers": an expression we do not evaluate; a PLT stub's
# the expression every PLT's FDE has (binutils): CFA = rsp + 8, + 8 more once the stub's push
# ran, i.e. when (rip & 15) >= 11 (the operand of DW_OP_lit11, kept as the row's offset)
_PLT_EXPRESSION = (bytes.fromhex("770880003f1a"), bytes.fromhex("2a332422"))
CALLEE_SAVED = (3, 12, 13, 14, 15)  # rbx, r12-r15: with rbp, what a callee keeps for its caller
REGISTER_NAMES = {0: "rax", 1: "rdx", 2: "rcx", 3: "rbx", 4: "rsi", 5: "rdi", 6: "rbp", 7: "rsp",
                  **{n: f"r{n}" for n in range(8, 16)}, 16: "rip"}

# a register rule: None (unchanged), ("offset", n): saved at CFA+n, ("undefined",), or
# ("other",): in another register or computed by an expression
Rule = Optional[Tuple]


class Row(NamedTuple):  # (a tuple: python3's 65,000 are made in a quarter of a frozen dataclass's time)
    address: int                 # first address (ELF view) the row holds for
    cfa_register: int            # EXPRESSION, or PLT (cfa_offset: the rip & 15 from which +16)
    cfa_offset: int
    rbp: Rule
    ra: Rule
    signal: bool = False         # the FDE is a signal trampoline's ('S' augmentation)
    saved: Tuple = ()            # ((CALLEE_SAVED register, rule), ...) of those not unchanged

    @property
    def frame_pointer_based(self) -> bool:
        """rbp is this function's frame pointer here: the caller's frame pointer is saved at
        [rbp] and the return address at [rbp+8], which is what a frame-pointer walk reads."""
        return self.cfa_register == RBP and self.cfa_offset == 16 and self.rbp == ("offset", -16)

    @property
    def outermost(self) -> bool:
        """No caller: the return address is undefined (_start, a thread's start)."""
        return self.ra == ("undefined",)


class Table:
    """The rows of one file, ordered; row_at(address) is the rule in force there."""

    def __init__(self, fdes: List[Tuple[int, int, List[Row]]]):
        fdes.sort(key=lambda f: f[0])
        self.fdes = fdes
        self.starts = [f[0] for f in fdes]

    def starts_function(self, address: int) -> bool:
        """address is the first of an FDE's: a function's entry."""
        i = bisect.bisect_left(self.starts, address)
        return i < len(self.starts) and self.starts[i] == address

    def row_at(self, address: int) -> Optional[Row]:
        i = bisect.bisect_right(self.starts, address) - 1
        if i < 0:
            return None
        start, end, rows = self.fdes[i]
        if address >= end or not rows:
            return None
        j = bisect.bisect_right([r.address for r in rows], address) - 1
        return rows[max(j, 0)]

    @property
    def row_count(self) -> int:
        return sum(len(rows) for _, _, rows in self.fdes)


@dataclass
class _Cie:
    code_align: int
    data_align: int
    ra_register: int
    fde_encoding: int
    augmented: bool
    signal: bool
    initial: bytes
    start: "_State"  # the state its initial instructions leave
    # FDE programs' rows as offsets from their start, by their bytes (python3: 10,221 FDEs, 5,202
    # programs); not one that sets an absolute address (set_loc)
    programs: Dict[bytes, List[Tuple]] = field(default_factory=dict)


class _State:
    __slots__ = ("cfa_register", "cfa_offset", "rbp", "ra", "saved")

    def __init__(self, cfa_register=RSP, cfa_offset=8, rbp=None, ra=None, saved=()):
        self.cfa_register, self.cfa_offset, self.rbp, self.ra = cfa_register, cfa_offset, rbp, ra
        self.saved: Tuple = saved

    def copy(self) -> "_State":
        return _State(self.cfa_register, self.cfa_offset, self.rbp, self.ra, self.saved)


def _run(program: bytes, cie: _Cie, state: _State, initial: Optional[_State], start: int,
         rows: Optional[List[Row]], base: int, offset: int) -> Tuple[int, bool]:
    """Execute CFA instructions from start; appends a row at each new address. Returns the
    address reached, and whether an instruction set an absolute one (set_loc)."""
    r = Reader(program, base + offset)
    loc, stack, absolute = start, [], False

    def emit(new_loc: int) -> None:
        nonlocal loc
        if rows is not None and new_loc != loc:
            _push(rows, loc, state, cie.signal)
        loc = new_loc

    def set_rule(reg: int, rule: Rule) -> None:
        if reg == RBP:
            state.rbp = rule
        elif reg == cie.ra_register:
            state.ra = rule
        elif reg in CALLEE_SAVED:
            kept = tuple(p for p in state.saved if p[0] != reg)
            state.saved = kept + ((reg, rule),) if rule is not None else kept

    def restore(reg: int) -> None:
        if initial is not None:
            rule = initial.rbp if reg == RBP else initial.ra if reg == cie.ra_register else dict(initial.saved).get(reg)
            set_rule(reg, rule)

    end = len(program)
    while r.pos < end:                                     # (the commonest kinds first)
        op = program[r.pos]
        r.pos += 1
        high, low = op & 0xC0, op & 0x3F
        if high == 0x40:                                   # advance_loc
            emit(loc + low * cie.code_align)
        elif op == 0x0E:                                   # def_cfa_offset
            state.cfa_offset = r.uleb()
        elif high == 0x80:                                 # offset
            set_rule(low, ("offset", r.uleb() * cie.data_align))
        elif op == 0x00:                                   # nop
            pass
        elif high == 0xC0:                                 # restore
            restore(low)
        elif op == 0x01:                                   # set_loc
            emit(r.pointer(cie.fde_encoding))
            absolute = True
        elif op in (0x02, 0x03, 0x04):                     # advance_loc1/2/4
            emit(loc + r.fixed({2: "<B", 3: "<H", 4: "<I"}[op]) * cie.code_align)
        elif op == 0x05:                                   # offset_extended
            reg = r.uleb()
            set_rule(reg, ("offset", r.uleb() * cie.data_align))
        elif op == 0x06:                                   # restore_extended
            restore(r.uleb())
        elif op == 0x07:                                   # undefined
            set_rule(r.uleb(), ("undefined",))
        elif op == 0x08:                                   # same_value
            set_rule(r.uleb(), None)
        elif op == 0x09:                                   # register
            reg = r.uleb()
            r.uleb()
            set_rule(reg, ("other",))
        elif op == 0x0A:                                   # remember_state
            stack.append(state.copy())
        elif op == 0x0B:                                   # restore_state
            if stack:
                saved = stack.pop()
                state.cfa_register, state.cfa_offset, state.rbp, state.ra, state.saved = \
                    saved.cfa_register, saved.cfa_offset, saved.rbp, saved.ra, saved.saved
        elif op == 0x0C:                                   # def_cfa
            state.cfa_register = r.uleb()
            state.cfa_offset = r.uleb()
        elif op == 0x0D:                                   # def_cfa_register
            state.cfa_register = r.uleb()
        elif op == 0x0F:                                   # def_cfa_expression
            length = r.uleb()
            expr = r.data[r.pos:r.pos + length]
            r.pos += length
            head, tail = _PLT_EXPRESSION
            if len(expr) == 11 and expr.startswith(head) and expr.endswith(tail) and 0x30 <= expr[6] <= 0x4f:
                state.cfa_register, state.cfa_offset = PLT, expr[6] - 0x30      # DW_OP_litN
            else:
                state.cfa_register, state.cfa_offset = EXPRESSION, 0
        elif op in (0x10, 0x16):                           # expression, val_expression
            reg = r.uleb()
            r.skip_block()
            set_rule(reg, ("other",))
        elif op == 0x11:                                   # offset_extended_sf
            reg = r.uleb()
            set_rule(reg, ("offset", r.sleb() * cie.data_align))
        elif op == 0x12:                                   # def_cfa_sf
            state.cfa_register = r.uleb()
            state.cfa_offset = r.sleb() * cie.data_align
        elif op == 0x13:                                   # def_cfa_offset_sf
            state.cfa_offset = r.sleb() * cie.data_align
        elif op in (0x14, 0x15):                           # val_offset(_sf): a value, not a slot
            reg = r.uleb()
            r.uleb() if op == 0x14 else r.sleb()
            set_rule(reg, ("other",))
        elif op == 0x2E:                                   # GNU_args_size
            r.uleb()
        elif op == 0x2F:                                   # GNU_negative_offset_extended
            reg = r.uleb()
            set_rule(reg, ("offset", -r.uleb() * cie.data_align))
        else:
            raise ValueError(f"unknown CFA instruction {op:#x}")
    return loc, absolute


def _push(rows: List[Row], loc: int, state: _State, signal: bool) -> None:
    row = Row(loc, state.cfa_register, state.cfa_offset, state.rbp, state.ra, signal, state.saved)
    if rows and rows[-1].address == loc:
        rows[-1] = row
    else:
        rows.append(row)


def _fdes(data: bytes, address: int, debug_frame: bool, deadline: Optional[bounds.Deadline] = None) -> list:
    """[(start, end, rows)] of every FDE of an .eh_frame section loaded at address (ELF view),
    or of a .debug_frame (DWARF's own: absolute addresses, a CIE found by its offset in the
    section, no augmentation data in practice)."""
    cies: Dict[int, _Cie] = {}
    fdes = []
    pos = 0
    while pos + 4 <= len(data):
        if deadline is not None and len(fdes) & 0xFF == 0:
            deadline.check()
        length = struct.unpack_from("<I", data, pos)[0]
        header = 4
        if length == 0:
            if debug_frame:            # padding, not a terminator
                pos += 4
                continue
            break                                          # the terminator
        if length == 0xFFFFFFFF:
            pos = pos + 12 + struct.unpack_from("<Q", data, pos + 4)[0]
            continue                   # 64-bit DWARF: not made for x86-64 user code
        body = pos + header
        end = body + length
        cie_id = struct.unpack_from("<I", data, body)[0]
        if cie_id == (0xFFFFFFFF if debug_frame else 0):
            cies[pos] = _parse_cie(data, body + 4, end, address)
        else:
            # .eh_frame's pointer counts back from this field; .debug_frame's from the start
            cie = cies.get(cie_id if debug_frame else body - cie_id)
            if cie is None:                         # (a CIE always comes first in practice)
                pos = end
                continue
            r = Reader(data, address)
            r.pos = body + 4
            start = r.pointer(cie.fde_encoding)
            size = r.pointer(cie.fde_encoding & 0x0F)
            if cie.augmented:
                r.skip_block()
            fdes.append((start, start + size, _fde_rows(cie, data[r.pos:end], start, address, r.pos)))
        pos = end
    return fdes


def _parse_cie(data: bytes, pos: int, end: int, address: int) -> _Cie:
    r = Reader(data, address)
    r.pos = pos
    version = r.u8()
    augmentation = r.cstring().decode(errors="replace")
    if "eh" in augmentation:
        r.fixed("<Q")
    if version >= 4:                   # address and segment selector sizes
        r.u8()
        r.u8()
    code_align, data_align = r.uleb(), r.sleb()
    ra_register = r.u8() if version == 1 else r.uleb()
    fde_encoding, signal = 0, False
    if augmentation.startswith("z"):
        aug_len = r.uleb()
        aug_end = r.pos + aug_len
        for c in augmentation[1:]:
            if c == "R":
                fde_encoding = r.u8()
            elif c == "P":
                r.pointer(r.u8())
            elif c == "L":
                r.u8()
            elif c == "S":
                signal = True
        r.pos = aug_end
    cie = _Cie(code_align, data_align, ra_register, fde_encoding, augmentation.startswith("z"), signal,
               bytes(data[r.pos:end]), _State())
    _run(cie.initial, cie, cie.start, None, 0, None, address, 0)
    return cie


def _fde_rows(cie: _Cie, program: bytes, start: int, address: int, offset: int) -> List[Row]:
    relative = cie.programs.get(program)
    if relative is not None:
        return [tuple.__new__(Row, (start + row[0], *row[1:])) for row in relative]
    state, rows = cie.start.copy(), []
    last, absolute = _run(program, cie, state, cie.start, start, rows, address, offset)
    _push(rows, last, state, cie.signal)
    if not absolute:
        cie.programs[program] = [(row[0] - start, *row[1:]) for row in rows]
    return rows


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime_ns: int, size: int) -> Optional[Table]:
    """.eh_frame's FDEs, and .debug_frame's for code .eh_frame does not cover (a build with
    -fno-asynchronous-unwind-tables has only the C runtime's in .eh_frame). Bounded per file
    (probedsl.trust.bounds): a file past the bounds has no rows, and a note says so."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            deadline = bounds.Deadline(f"{path} call-frame information")
            fdes = []
            section = elf.get_section_by_name(".eh_frame")
            if section is not None:
                fdes = _fdes(bounds.section_data(section, f"{path} .eh_frame"), section["sh_addr"],
                             debug_frame=False, deadline=deadline)
            section = elf.get_section_by_name(".debug_frame")
            if section is not None and section["sh_type"] != "SHT_NOBITS":
                covered = Table(list(fdes))
                fdes += [f for f in _fdes(bounds.section_data(section, f"{path} .debug_frame"), 0,
                                          debug_frame=True, deadline=deadline) if covered.row_at(f[0]) is None]
            return Table(fdes) if fdes else None
    except bounds.OverBound as exc:
        note(f"{exc}: no unwind rows from it")
        return None
    except (OSError, ValueError, IndexError, KeyError, struct.error, ELFError):   # damaged: no rows
        return None
    except Exception as exc:          # pyelftools on a damaged file raises many kinds
        note(f"{path}: call-frame information unreadable ({type(exc).__name__}): no unwind rows from it")
        return None


def table(path: str) -> Optional[Table]:
    """The file's CFI rows, cached on mtime and size and decoded once, whoever asks; None without .eh_frame."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    with _READING:
        return _load(path, st.st_mtime_ns, st.st_size)
