"""USDT probes (sys/sdt.h): where each one is in a file, its semaphore, where its arguments are.

A probe site is a `nop` the compiler left in the code, described by an ELF note in
.note.stapsdt: the site's address, the address of its semaphore (a 16-bit counter the program
tests before preparing the arguments; 0 when the probe has none), the provider and name, and
each argument's location as an assembler operand ("8@%rdi", "-4@-20(%rbp)", "4@$5"). The
kernel raises the semaphore itself while a uprobe is attached with its file offset
(ref_ctr_offset, since 4.20), in every process mapping the file, started before or after.
"""

from __future__ import annotations

import functools
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probedsl.errors import ProbedslError

_NT_STAPSDT = 3


@dataclass(frozen=True)
class Site:
    address: int  # the nop's virtual address in the file
    semaphore: int  # the semaphore's file offset (the kernel's ref_ctr_offset); 0: none
    args: Tuple[str, ...]  # argument locations as the note gives them

    def location(self, index: int) -> "Location":
        """Where the argument `index` is at this site (ProbedslError for a form not read)."""
        return location(self.args[index])


def sites(path: str, provider: str, name: str) -> List[Site]:
    """Every site of provider:name in the file (one per expansion of the macro)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return _notes(path, st.st_mtime_ns, st.st_size).get((provider, name), [])


@functools.lru_cache(maxsize=256)
def _notes(path: str, mtime_ns: int, size: int) -> Dict[Tuple[str, str], List[Site]]:
    found: Dict[Tuple[str, str], List[Site]] = {}
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            notes = elf.get_section_by_name(".note.stapsdt")
            if notes is None or elf.elfclass != 64:
                return found
            base = elf.get_section_by_name(".stapsdt.base")
            loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
            data = notes.data()
    except (OSError, ELFError):
        return found

    def file_offset(vaddr: int) -> int:
        for seg in loads:
            if seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_memsz"]:
                return vaddr - seg["p_vaddr"] + seg["p_offset"]
        return 0

    at = 0
    while at + 12 <= len(data):
        namesz, descsz, kind = struct.unpack_from("<III", data, at)
        at += 12
        owner = data[at : at + namesz].rstrip(b"\0")
        at += (namesz + 3) & ~3
        desc = data[at : at + descsz]
        at += (descsz + 3) & ~3
        if owner != b"stapsdt" or kind != _NT_STAPSDT or len(desc) < 24:
            continue
        pc, note_base, semaphore = struct.unpack_from("<QQQ", desc)
        if base is not None:  # prelink moved the file: the base says by how much
            shift = base["sh_addr"] - note_base
            pc += shift
            semaphore = semaphore + shift if semaphore else 0
        texts = desc[24:].split(b"\0")
        if len(texts) < 3:
            continue
        prov, nm, args = (t.decode(errors="replace") for t in texts[:3])
        site = Site(pc, file_offset(semaphore) if semaphore else 0, tuple(args.split()))
        found.setdefault((prov, nm), []).append(site)
    return found


# --- argument locations -------------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    size: int  # bytes: 1, 2, 4 or 8
    signed: bool
    register: str = ""  # pt_regs field (di, ax, r8...): the value, or the base of memory
    offset: int = 0  # memory at register + offset
    memory: bool = False
    constant: Optional[int] = None


# x86-64 register names, every width, -> the pt_regs field holding the whole register
_REGISTERS: Dict[str, str] = {}
for _field, _names in {
    "ax": "rax eax ax al",
    "bx": "rbx ebx bx bl",
    "cx": "rcx ecx cx cl",
    "dx": "rdx edx dx dl",
    "si": "rsi esi si sil",
    "di": "rdi edi di dil",
    "bp": "rbp ebp bp bpl",
    "sp": "rsp esp sp spl",
    "ip": "rip",
}.items():
    for _n in _names.split():
        _REGISTERS[_n] = _field
for _i in range(8, 16):
    for _suffix in ("", "d", "w", "b"):
        _REGISTERS[f"r{_i}{_suffix}"] = f"r{_i}"

_OPERAND = re.compile(r"^(-?\d+)@(?:\$(-?\d+)|%(\w+)|(-?\d*)\(%(\w+)\))$")


def location(text: str) -> Location:
    """One argument's location; ProbedslError for a form probedsl does not read (an operand
    with an index register or a symbol, which compilers rarely emit for sdt arguments)."""
    m = _OPERAND.match(text)
    if not m:
        raise ProbedslError(
            f"usdt argument location {text!r}: probedsl reads registers, base+offset memory and constants only"
        )
    size = int(m.group(1))
    if abs(size) not in (1, 2, 4, 8):
        raise ProbedslError(f"usdt argument location {text!r}: size {size} is not 1, 2, 4 or 8")
    common = dict(size=abs(size), signed=size < 0)
    if m.group(2) is not None:
        return Location(constant=int(m.group(2)), **common)
    reg = m.group(3) or m.group(5)
    if reg not in _REGISTERS:
        raise ProbedslError(f"usdt argument location {text!r}: unknown register %{reg}")
    if m.group(3):
        return Location(register=_REGISTERS[reg], **common)
    return Location(register=_REGISTERS[reg], offset=int(m.group(4) or 0), memory=True, **common)
