"""ELF symbol tables, read once per file (pyelftools) and cached: lookups both ways."""
from __future__ import annotations

import bisect
import functools
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from elftools.elf.elffile import ELFFile
from elftools.common.exceptions import ELFError


_SYM = struct.Struct("<IBBHQQ")          # Elf64_Sym
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


class ElfSymbols:
    """Function symbols of one ELF file: .symtab (when not stripped) and .dynsym by name for
    attaching; for naming addresses, also the separate debug file's .symtab, read on first use."""

    def __init__(self, path: str):
        self.path = path
        self.by_name: Dict[str, int] = {}
        self.segments: List[Segment] = []
        self.debug_file = ""
        self._spans: Dict[int, Tuple[int, str]] = {}
        self._addrs: Optional[List[int]] = None
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    self.segments.append(Segment(seg["p_offset"], seg["p_vaddr"], seg["p_filesz"]))
            self._add(elf, (".symtab", ".dynsym"))
            self.debug_file = _debug_file(elf)

    def _add(self, elf: ELFFile, sections) -> None:
        for name in sections:
            table = elf.get_section_by_name(name)
            if table is None or table["sh_entsize"] != _SYM.size:
                continue
            strings = elf.get_section(table["sh_link"]).data()
            # struct over the raw table: pyelftools' per-symbol parsing is ~10x slower
            for st_name, st_info, _other, shndx, addr, size in _SYM.iter_unpack(table.data()):
                if st_info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC) or shndx == 0:
                    continue
                end = strings.find(b"\0", st_name)
                base = strings[st_name:end].decode(errors="replace").split("@", 1)[0]
                self.by_name.setdefault(base, addr)
                # prefer the public (no leading underscore, shortest) name for an address
                old = self._spans.get(addr)
                if old is None or _nicer(base, old[1]):
                    self._spans[addr] = (max(size, old[0] if old else 0), base)

    def _index(self) -> List[int]:
        if self._addrs is None:
            if self.debug_file:
                try:
                    with open(self.debug_file, "rb") as f:
                        self._add(ELFFile(f), (".symtab",))
                except (OSError, ELFError):
                    pass
            self._addrs = sorted(self._spans)
            self._entries = [self._spans[a] for a in self._addrs]
        return self._addrs

    def address_of(self, name: str) -> Optional[int]:
        return self.by_name.get(name)

    def function_at(self, vaddr: int) -> Optional[Tuple[str, int]]:
        """(name, offset) of the function containing vaddr, or None."""
        i = bisect.bisect_right(self._index(), vaddr) - 1
        if i < 0:
            return None
        start = self._addrs[i]
        size, name = self._entries[i]
        if size and vaddr >= start + size:
            return None
        if not size and vaddr - start > 0x10000:
            return None
        return name, vaddr - start

    def file_offset_to_vaddr(self, offset: int) -> int:
        for seg in self.segments:
            if seg.offset <= offset < seg.offset + max(seg.filesz, 1):
                return offset - seg.offset + seg.vaddr
        return offset


DEBUG_ROOT = "/usr/lib/debug"


def _debug_file(elf: ELFFile) -> str:
    """The separate debug file for a stripped ELF, found by build-id (Debian's *-dbg packages)."""
    note_section = elf.get_section_by_name(".note.gnu.build-id")
    if note_section is None:
        return ""
    for note in note_section.iter_notes():
        if note["n_type"] == "NT_GNU_BUILD_ID":
            build_id = note["n_desc"]
            path = os.path.join(DEBUG_ROOT, ".build-id", build_id[:2], build_id[2:] + ".debug")
            return path if os.path.isfile(path) else ""
    return ""


def _nicer(new: str, old: str) -> bool:
    return (new.startswith("_"), len(new)) < (old.startswith("_"), len(old))


@functools.lru_cache(maxsize=256)
def _load(path: str, mtime_ns: int, size: int) -> Optional[ElfSymbols]:
    try:
        return ElfSymbols(path)
    except (OSError, ELFError, ValueError):
        return None


def symbols(path: str) -> Optional[ElfSymbols]:
    """Cached symbols for path (keyed on its mtime and size), or None if it is not a readable ELF."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _load(path, st.st_mtime_ns, st.st_size)
