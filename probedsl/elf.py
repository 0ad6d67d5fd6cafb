"""ELF symbol tables, read once per file (pyelftools) and cached: lookups both ways."""
from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from elftools.elf.elffile import ELFFile
from elftools.common.exceptions import ELFError


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


class ElfSymbols:
    """Function symbols of one ELF file, from .symtab (when not stripped) and .dynsym."""

    def __init__(self, path: str):
        self.path = path
        self.by_name: Dict[str, int] = {}
        spans: Dict[int, Tuple[int, str]] = {}
        self.segments: List[Segment] = []
        self.is_shared = False
        self.debug_file = ""
        with open(path, "rb") as f:
            elf = ELFFile(f)
            self.is_shared = elf.header["e_type"] == "ET_DYN"
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    self.segments.append(Segment(seg["p_offset"], seg["p_vaddr"], seg["p_filesz"]))
            tables = [elf.get_section_by_name(".symtab"), elf.get_section_by_name(".dynsym")]
            debug = _debug_file(elf)
            debug_elf = ELFFile(open(debug, "rb")) if debug else None
            if debug_elf is not None:
                self.debug_file = debug
                tables.append(debug_elf.get_section_by_name(".symtab"))
            for table in tables:
                if table is None:
                    continue
                for sym in table.iter_symbols():
                    if sym["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC") or sym["st_shndx"] == "SHN_UNDEF":
                        continue
                    addr, size = sym["st_value"], sym["st_size"]
                    base = sym.name.split("@", 1)[0]
                    self.by_name.setdefault(base, addr)
                    # prefer the public (shortest, no leading underscore) name for an address
                    old = spans.get(addr)
                    if old is None or _nicer(base, old[1]):
                        spans[addr] = (max(size, old[0] if old else 0), base)
            if debug_elf is not None:
                debug_elf.stream.close()
        self._addrs = sorted(spans)
        self._entries = [spans[a] for a in self._addrs]

    def address_of(self, name: str) -> Optional[int]:
        return self.by_name.get(name)

    def function_at(self, vaddr: int) -> Optional[Tuple[str, int]]:
        """(name, offset) of the function containing vaddr, or None."""
        i = bisect.bisect_right(self._addrs, vaddr) - 1
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
