"""x86-64 code at a function's entry: which instruction the kernel emulates under a uprobe
(one trap) or single-steps (two), and where on the entry path a probe can sit instead.

A uprobe replaces one instruction by a breakpoint. After the BPF programs ran, the kernel
either emulates the instruction it replaced (a few kinds: branches, calls, push, nop) or
copies it out of line and single-steps it, a second trap: ~5-10 us against ~0.5 us here
(bench.calibrate measures it on the running kernel). glibc's free() starts with a single-stepped
`test %rdi,%rdi` followed by an emulated `je`; code built with -fcf-protection starts every
function with a single-stepped `endbr64`.

The probe moves only over instructions that every call executes (straight-line from the
entry, up to the first branch, which may itself be the place) and that leave what the probe
reads as it was at the entry: rsp (the nesting guard, and a uretprobe's return address at
[rsp]), the argument registers the recipe reads, and memory (an argument may point into
it). The decoder is iced-x86 (its Python wheel: a complete, tested x86-64 decoder that also
says which registers and memory each instruction reads and writes, which a hand-written
decoder of a few opcodes could not say).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from probedsl.binaries import elf
from probedsl.process import procfs

# per-hit costs on this kind of machine (kernel 6.18, empty BCC programs): bench.calibrate
# measured 0.5 us emulated and 9.7 single-stepped in a one-thread loop; bench.run's floors
# (two threads, malloc/free) put free's single step at ~5 us and a uretprobe's return at ~0.5
EMULATED_US, STEPPED_US, RETURN_US = 0.5, 5.0, 0.5

# the System V argument registers, in order (ir.Arg's index)
_ARGUMENTS = ("RDI", "RSI", "RDX", "RCX", "R8", "R9")
LOOKAHEAD = 8  # instructions looked at from the entry


@dataclass(frozen=True)
class Place:
    offset: int  # from the function's entry
    instruction: str  # as decoded (AT&T syntax), for compile's comment and check
    emulated: bool  # whether the kernel emulates the instruction there


def emulated(code: bytes, release: Tuple[int, int]) -> bool:
    """Whether the kernel `release` emulates the instruction starting code (its uprobe costs
    one trap) rather than single-stepping it (two). arch/x86/kernel/uprobes.c decides it from
    the opcode: branch_setup_xol_ops (jmp, call, jcc: every kernel with uprobes; nop) and
    push_setup_xol_ops (push of a register; measured emulated on 6.18 by bench.calibrate,
    assumed from 6.1 and not measured below 6.18: a wrong guess costs time, never
    correctness). Prefixed forms are single-stepped, as the kernel rejects most prefixes."""
    if not code:
        return False
    first = code[0]
    if first in (0xE8, 0xE9, 0xEB, 0x90) or 0x70 <= first <= 0x7F:
        return True
    if first == 0x0F and len(code) > 1 and 0x80 <= code[1] <= 0x8F:  # jcc rel32
        return True
    push = code[1] if first == 0x41 and len(code) > 1 else first  # REX.B (r8-r15), then 50+r
    return release >= (6, 1) and 0x50 <= push <= 0x57


def hit_us(path: str, function: str, offset: int) -> float:
    """What one hit of a uprobe at function+offset costs: emulated or single-stepped."""
    code_there = _bytes(path, function, offset + 15)[offset:]
    return EMULATED_US if emulated(code_there, procfs.kernel_release()) else STEPPED_US


def code_before(path: str, function: str, offset: int) -> str:
    """The bytes (hex) from the function's entry to offset."""
    return _bytes(path, function, offset).hex()


def still_there(path: str, function: str, offset: int, expected_hex: str) -> bool:
    """Whether the file still holds the code the placement was chosen on (a loader may run on
    another machine, or after an upgrade: an offset into other code could split an instruction)."""
    return bool(expected_hex) and _bytes(path, function, offset).hex() == expected_hex


def still_at(path: str, address: int, expected_hex: str) -> bool:
    """Whether the file still holds these bytes at this address (a branch probedsl.passes.reentry found)."""
    syms = elf.symbols(path)
    return bool(syms and expected_hex) and syms.read(address, len(expected_hex) // 2).hex() == expected_hex


def _bytes(path: str, function: str, offset: int) -> bytes:
    syms = elf.symbols(path)
    address = syms.address_of(function) if syms else None
    return syms.read(address, offset + 1) if address else b""


def place(path: str, function: str, args_read: Tuple[int, ...]) -> Optional[Place]:
    """Where to put the probe on `function` of the ELF file at path; None when the entry is
    the place (or the function cannot be read). args_read: the argument indexes the probe
    reads at its entry."""
    syms = elf.symbols(path)
    address = syms.address_of(function) if syms else None
    if not address:
        return None
    return _place(path, address, tuple(sorted(set(args_read))), procfs.kernel_release(), os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _place(
    path: str, address: int, args_read: Tuple[int, ...], release: Tuple[int, int], _mtime_ns: int
) -> Optional[Place]:
    from iced_x86 import (
        Decoder,
        FlowControl,
        Formatter,
        FormatterSyntax,
        InstructionInfoFactory,
        OpAccess,
        Register,
        RegisterExt,
    )

    syms = elf.symbols(path)
    code = syms.read(address, 15 * LOOKAHEAD) if syms else b""
    if not code or emulated(code, release):
        return None
    kept = {Register.RSP} | {getattr(Register, _ARGUMENTS[i]) for i in args_read if i < len(_ARGUMENTS)}
    reads_only = (OpAccess.READ, OpAccess.NONE, OpAccess.NO_MEM_ACCESS)
    info, text = InstructionInfoFactory(), Formatter(FormatterSyntax.GAS)
    for count, ins in enumerate(Decoder(64, code, ip=address)):
        start = ins.ip - address
        if count and emulated(code[start : start + ins.len], release):
            return Place(start, text.format(ins), True)
        if ins.flow_control != FlowControl.NEXT or count + 1 >= LOOKAHEAD or ins.is_invalid:
            return None  # a branch not emulated ends the entry path
        used = info.info(ins)
        if any(m.access not in reads_only for m in used.used_memory()):
            return None  # it writes memory an argument may point into
        if any(
            RegisterExt.full_register(r.register) in kept and r.access not in reads_only for r in used.used_registers()
        ):
            return None  # it changes rsp or an argument the probe reads
    return None


def disassemble(code: bytes) -> str:
    """The first instruction of code, AT&T syntax."""
    from iced_x86 import Decoder, Formatter, FormatterSyntax

    return Formatter(FormatterSyntax.GAS).format(next(iter(Decoder(64, code, ip=0))))
