"""ELF symbol tables, read once per file (pyelftools) and cached: lookups both ways."""

from __future__ import annotations

import bisect
import functools
import io
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from elftools.elf.elffile import ELFFile
from elftools.common.exceptions import ELFError

from probedsl.trust import bounds
from probedsl.binaries import debuginfo
from probedsl.notices import note


_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
_STT_FUNC, _STT_GNU_IFUNC = 2, 10


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int


class ElfSymbols:
    """Function symbols of one ELF file: .symtab (when not stripped) and .dynsym by name for
    attaching; for naming addresses, also those of its debug information (probedsl.binaries.debuginfo),
    found on first use. root: the directory that is the file's process's root, seen from here."""

    def __init__(self, path: str, root: str = ""):
        self.path, self.root = path, root
        self.by_name: Dict[str, int] = {}
        self.segments: List[Segment] = []
        self._debug_file: Optional[str] = None
        self._spans: Dict[int, Tuple[int, str]] = {}
        self._addrs: Optional[List[int]] = None
        self._entries: List[Tuple[int, str]] = []
        self._lock = threading.Lock()  # the report's thread and a read-ahead's find names alike
        with open(path, "rb") as f:
            elf = ELFFile(f)
            try:
                self.build_id = debuginfo.build_id(elf) or ""  # "" when the file has none
            except Exception:  # a damaged note costs the id, never the file's symbols
                self.build_id = ""
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    self.segments.append(Segment(seg["p_offset"], seg["p_vaddr"], seg["p_filesz"]))
            self._add(elf, (".symtab", ".dynsym"))

    @property
    def debug_file(self) -> str:
        """The separate debug file ("" when none is found), looked for once."""
        with self._lock:
            return self._debug(remote=True) or ""

    def _debug(self, remote: bool) -> Optional[str]:
        """(under the lock) Without remote, None where only debuginfod could answer."""
        if self._debug_file is None:
            try:
                with open(self.path, "rb") as f:
                    found = debuginfo.find(self.path, ELFFile(f), self.root, remote)
            except Exception:  # unreadable or damaged: no debug file
                found = ""
            if found is None:
                return None
            self._debug_file = found
        return self._debug_file

    @property
    def dwarf_file(self) -> str:
        """The file addr2line reads for lines: the debug file, else the file itself."""
        return self.debug_file or self.path

    def read_names(self) -> Optional[str]:
        """Read the names for addresses now, those of a debug file found here included (a
        read-ahead: nothing is asked of debuginfod); the dwarf_file, None if not known yet."""
        with self._lock:
            found = self._debug(remote=False)
            if found is None:
                return None
            self._index_locked()
            return found or self.path

    def _add(self, elf: ELFFile, sections, path: str = "") -> None:
        for name in sections:
            try:
                self._add_table(elf, name, path or self.path)
            except bounds.OverBound as exc:
                note(f"{exc}: its symbols are left out")
            except Exception as exc:  # pyelftools on a damaged file raises many kinds
                note(f"{path or self.path}: {name} unreadable ({type(exc).__name__}): its symbols are left out")

    def _add_table(self, elf: ELFFile, name: str, path: str) -> None:
        table = elf.get_section_by_name(name)
        if table is None or table["sh_entsize"] != _SYM.size:
            return
        what = f"{path} {name}"
        data = bounds.section_data(table, what)
        strings = bounds.section_data(elf.get_section(table["sh_link"]), what + " names")
        deadline = bounds.Deadline(what)
        # struct over the raw table: pyelftools' per-symbol parsing is ~10x slower
        for i, (st_name, st_info, _other, shndx, addr, size) in enumerate(
            _SYM.iter_unpack(data[: len(data) - len(data) % _SYM.size])
        ):
            if not i & 0xFFF:
                deadline.check()
            if st_info & 0xF not in (_STT_FUNC, _STT_GNU_IFUNC) or shndx == 0:
                continue
            # a name ends at its NUL, or at the bound (a table without NULs costs no more)
            end = strings.find(b"\0", st_name, st_name + bounds.MAX_NAME_BYTES)
            raw = strings[st_name : end if end >= 0 else st_name + bounds.MAX_NAME_BYTES]
            base = raw.decode(errors="surrogateescape").split("@", 1)[0]
            self.by_name.setdefault(base, addr)
            # prefer the public (no leading underscore, shortest) name for an address
            old = self._spans.get(addr)
            if old is None or _nicer(base, old[1]):
                self._spans[addr] = (max(size, old[0] if old else 0), base)

    def _index(self) -> List[int]:
        with self._lock:
            return self._index_locked()

    def _index_locked(self) -> List[int]:
        if self._addrs is None:
            debug = self._debug(remote=True)
            if debug:
                try:
                    with open(debug, "rb") as f:
                        self._add(ELFFile(f), (".symtab",), debug)
                except Exception:  # unreadable or damaged: its names are left out
                    pass
            try:
                with open(self.path, "rb") as f:
                    mini = debuginfo.minidebuginfo(ELFFile(f))
                if mini:
                    self._add(ELFFile(io.BytesIO(mini)), (".symtab",), self.path + " MiniDebugInfo")
            except Exception:  # unreadable or damaged: its names are left out
                pass
            addrs = sorted(self._spans)
            self._entries = [self._spans[a] for a in addrs]
            self._addrs = addrs  # last: set, it says the entries are there
        return self._addrs

    def address_of(self, name: str) -> Optional[int]:
        return self.by_name.get(name)

    def function_at(self, vaddr: int) -> Optional[Tuple[str, int]]:
        """(name, offset) of the function whose extent holds vaddr, or None: never the name of
        a symbol before it (a symbol without a size names its own address only)."""
        i = bisect.bisect_right(self._index(), vaddr) - 1
        if i < 0:
            return None
        start = self._addrs[i]
        size, name = self._entries[i]
        if vaddr >= start + max(size, 1):
            return None
        return name, vaddr - start

    def read(self, vaddr: int, size: int) -> bytes:
        """Up to size bytes of the file at an address of a loaded segment, not past its end
        (b"" outside the segments)."""
        for seg in self.segments:
            if seg.vaddr <= vaddr < seg.vaddr + seg.filesz:
                try:
                    with open(self.path, "rb") as f:
                        f.seek(vaddr - seg.vaddr + seg.offset)
                        return f.read(min(size, seg.vaddr + seg.filesz - vaddr))
                except OSError:
                    return b""
        return b""

    def file_offset_to_vaddr(self, offset: int) -> int:
        for seg in self.segments:
            if seg.offset <= offset < seg.offset + max(seg.filesz, 1):
                return offset - seg.offset + seg.vaddr
        return offset


def _nicer(new: str, old: str) -> bool:
    return (new.startswith("_"), len(new)) < (old.startswith("_"), len(old))


@functools.lru_cache(maxsize=256)
def _load(path: str, root: str, mtime_ns: int, size: int) -> Optional[ElfSymbols]:
    try:
        return ElfSymbols(path, root)
    except (OSError, ELFError, ValueError):
        return None
    except Exception as exc:  # pyelftools on a damaged file raises many kinds
        note(f"{path}: not a readable ELF file ({type(exc).__name__}): its frames are unnamed")
        return None


def symbols(path: str, root: str = "") -> Optional[ElfSymbols]:
    """Cached symbols for path (keyed on its mtime and size), or None if it is not a readable
    ELF. root: where its process's root is, seen from here (for its debug files)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _load(path, root, st.st_mtime_ns, st.st_size)


def read_ahead(path: str) -> Optional[str]:
    """Read path's symbols and names now (ElfSymbols.read_names): a read-ahead thread's, so
    the report finds them ready. The file addr2line would read, None if not known yet."""
    syms = symbols(path)
    return syms.read_names() if syms is not None else None
