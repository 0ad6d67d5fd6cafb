"""Where a stripped file's names and lines are.

In this order: the separate debug file by build id under /usr/lib/debug (the process's own
root's first, then ours), the file .gnu_debuglink names (its CRC checked), debuginfod when
DEBUGINFOD_URLS is set (downloads cached where elfutils caches them, so gdb shares them), and
MiniDebugInfo: .gnu_debugdata, an xz-compressed ELF holding a .symtab (Fedora ships it).
"""
from __future__ import annotations

import functools
import lzma
import os
import re
import sys
import urllib.error
import urllib.request
import zlib
from typing import Optional, Tuple

from elftools.elf.elffile import ELFFile

DEBUG_DIR = "/usr/lib/debug"
FETCH_TIMEOUT_S = 30
_HEX = re.compile(r"[0-9a-f]{8,128}")


def build_id(elf: ELFFile) -> str:
    section = elf.get_section_by_name(".note.gnu.build-id")
    if section is None:
        return ""
    for note in section.iter_notes():
        if note["n_type"] == "NT_GNU_BUILD_ID":
            value = str(note["n_desc"]).lower()
            return value if _HEX.fullmatch(value) else ""
    return ""


def debuglink(elf: ELFFile) -> Optional[Tuple[str, int]]:
    """(file name, CRC-32 of the debug file) from .gnu_debuglink."""
    section = elf.get_section_by_name(".gnu_debuglink")
    if section is None:
        return None
    data = section.data()
    end = data.find(b"\0")
    if end <= 0:
        return None
    crc_at = (end + 4) & ~3
    name = data[:end].decode(errors="replace")
    if "/" in name or len(data) < crc_at + 4:
        return None
    return name, int.from_bytes(data[crc_at:crc_at + 4], "little")


def find(path: str, elf: ELFFile, root: str = "") -> str:
    """The separate debug file of path (an ELF opened from here), or "". root: the directory
    that is the file's process's root, seen from here ("" for ours)."""
    ident = build_id(elf)
    roots = [root, ""] if root else [""]
    if ident:
        for r in roots:
            candidate = f"{r}{DEBUG_DIR}/.build-id/{ident[:2]}/{ident[2:]}.debug"
            if os.path.isfile(candidate):
                return candidate
    link = debuglink(elf)
    if link:
        name, crc = link
        # the file's directory as its process names it, then as we reach it
        here = os.path.dirname(os.path.realpath(path))
        inside = here[len(root):] if root and here.startswith(root + "/") else here
        places = [os.path.join(here, name), os.path.join(here, ".debug", name)]
        places += [f"{r}{DEBUG_DIR}{inside}/{name}" for r in roots]
        for candidate in places:
            if os.path.realpath(candidate) != os.path.realpath(path) and _crc_matches(candidate, crc):
                return candidate
    if ident and os.environ.get("DEBUGINFOD_URLS"):
        return fetch(ident)
    return ""


def _crc_matches(path: str, crc: int) -> bool:
    try:
        with open(path, "rb") as f:
            value = 0
            for chunk in iter(lambda: f.read(1 << 20), b""):
                value = zlib.crc32(chunk, value)
    except OSError:
        return False
    return value == crc


def cache_dir() -> str:
    """elfutils' debuginfod client cache: $DEBUGINFOD_CACHE_PATH, else XDG's."""
    given = os.environ.get("DEBUGINFOD_CACHE_PATH")
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "debuginfod_client")


@functools.lru_cache(maxsize=1024)
def fetch(ident: str) -> str:
    """The debug file with this build id from the first DEBUGINFOD_URLS server that has it,
    cached; "" when none has it (asked once per run)."""
    if not _HEX.fullmatch(ident):
        return ""
    cached = os.path.join(cache_dir(), ident, "debuginfo")
    if os.path.isfile(cached):
        return cached
    for url in os.environ.get("DEBUGINFOD_URLS", "").split():
        if not url.startswith(("http://", "https://")):
            continue
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/buildid/{ident}/debuginfo",
                                        timeout=FETCH_TIMEOUT_S) as response:
                data = response.read()
        except (urllib.error.URLError, OSError, ValueError):
            continue
        if not data.startswith(b"\x7fELF"):
            continue
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        partial = f"{cached}.{os.getpid()}.part"
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, cached)
        print(f"probedsl: debug info for build id {ident} fetched from {url}", file=sys.stderr)
        return cached
    return ""


def minidebuginfo(elf: ELFFile) -> Optional[bytes]:
    """The ELF inside .gnu_debugdata (xz), or None."""
    section = elf.get_section_by_name(".gnu_debugdata")
    if section is None:
        return None
    try:
        data = lzma.decompress(section.data())
    except lzma.LZMAError:
        return None
    return data if data.startswith(b"\x7fELF") else None
