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
import time
import zlib
from typing import Optional, Tuple

from elftools.elf.elffile import ELFFile

from probedsl.trust import cachedir
from probedsl.notices import note

DEBUG_DIR = "/usr/lib/debug"
FETCH_TIMEOUT_S = 30  # a whole download, not only each read
MAX_DOWNLOAD = 1 << 30  # bytes of one debug file
MAX_MINI = 64 << 20  # bytes of MiniDebugInfo, decompressed
_HEX = re.compile(r"[0-9a-f]{8,128}")


def build_id(elf: ELFFile) -> str:
    section = elf.get_section_by_name(".note.gnu.build-id")
    if section is None:
        return ""
    for entry in section.iter_notes():
        if entry["n_type"] == "NT_GNU_BUILD_ID":
            value = str(entry["n_desc"]).lower()
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
    return name, int.from_bytes(data[crc_at : crc_at + 4], "little")


def find(path: str, elf: ELFFile, root: str = "", remote: bool = True) -> Optional[str]:
    """The separate debug file of path (an ELF opened from here), or "". root: the directory
    that is the file's process's root, seen from here ("" for ours). Every candidate must
    carry the file's build id (when it has one): another file would name its frames wrongly.
    Without remote, None where only debuginfod could answer."""
    ident = build_id(elf)
    roots = [root, ""] if root else [""]
    if ident:
        for r in roots:
            candidate = f"{r}{DEBUG_DIR}/.build-id/{ident[:2]}/{ident[2:]}.debug"
            if os.path.isfile(candidate) and matches(candidate, ident, path):
                return candidate
    link = debuglink(elf)
    if link:
        name, crc = link
        # the file's directory as its process names it, then as we reach it
        here = os.path.dirname(os.path.realpath(path))
        inside = here[len(root) :] if root and here.startswith(root + "/") else here
        places = [os.path.join(here, name), os.path.join(here, ".debug", name)]
        places += [f"{r}{DEBUG_DIR}{inside}/{name}" for r in roots]
        for candidate in places:
            if (
                os.path.realpath(candidate) != os.path.realpath(path)
                and _crc_matches(candidate, crc)
                and (not ident or matches(candidate, ident, path))
            ):
                return candidate
    if ident and os.environ.get("DEBUGINFOD_URLS"):
        return fetch(ident) if remote else None
    return ""


def build_id_of(path: str) -> str:
    """The build id of an ELF file ("" when it has none or is not one)."""
    try:
        with open(path, "rb") as f:
            return build_id(ELFFile(f))
    except Exception:  # pyelftools on a damaged file raises many kinds
        return ""


def matches(candidate: str, ident: str, binary: str, source: str = "") -> bool:
    """Whether a debug file is the one asked for (its build id is ident); a note if not."""
    found = build_id_of(candidate)
    if found == ident:
        return True
    note(
        f"debug file for {binary} from {source or candidate} not used: its build id is "
        f"{found or 'missing'}, not {ident}; frames there are module+offset"
    )
    return False


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
    """elfutils' debuginfod client cache ($DEBUGINFOD_CACHE_PATH, else XDG's) when it may be
    trusted (probedsl.trust.cachedir), else a private one; "" for none (fetched each run)."""
    given = os.environ.get("DEBUGINFOD_CACHE_PATH")
    if given:
        return cachedir.directory("debuginfod_client", root=given, sub="")
    return cachedir.directory("debuginfod_client", sub="debuginfod_client")


@functools.lru_cache(maxsize=1024)
def fetch(ident: str) -> str:
    """The debug file with this build id from the first DEBUGINFOD_URLS server that has it,
    cached; "" when none has it (asked once per run). A download is bounded in size and time,
    kept only whole and only if it carries the build id asked for."""
    if not _HEX.fullmatch(ident):
        return ""
    where = cache_dir()
    if not where:
        return ""
    cached = os.path.join(where, ident, "debuginfo")
    if os.path.lexists(cached) and cachedir.file_ok(where, cached) and matches(cached, ident, f"build id {ident}"):
        return cached
    for url in os.environ.get("DEBUGINFOD_URLS", "").split():
        if not url.startswith(("http://", "https://")):
            continue
        try:
            os.makedirs(os.path.dirname(cached), mode=0o700, exist_ok=True)
        except OSError:
            return ""
        partial = f"{cached}.{os.getpid()}.part"
        try:
            complete = _download(f"{url.rstrip('/')}/buildid/{ident}/debuginfo", partial)
            if complete and matches(partial, ident, f"build id {ident}", source=url):
                os.replace(partial, cached)
                print(f"probedsl: debug info for build id {ident} fetched from {url}", file=sys.stderr)
                return cached
            if not complete:
                note(
                    f"debug info for build id {ident} from {url}: the download was cut short or "
                    f"too large (over {MAX_DOWNLOAD >> 20} MB or {FETCH_TIMEOUT_S} s); not used"
                )
        finally:
            if os.path.lexists(partial):
                os.unlink(partial)
            try:
                os.rmdir(os.path.dirname(cached))  # only if nothing was kept in it
            except OSError:
                pass
    return ""


def _download(url: str, partial: str) -> bool:
    """url's body into partial, whole; False when it failed, ended short of its length, or
    went past MAX_DOWNLOAD bytes or FETCH_TIMEOUT_S seconds."""
    import http.client  # (here: 13 ms of every start otherwise, for a fetch most runs never make)
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + FETCH_TIMEOUT_S
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response, open(partial, "wb") as f:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if expected is not None and expected > MAX_DOWNLOAD:
                return False
            got = 0
            head = b""
            while True:
                chunk = response.read(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
                head = head or chunk[:4]
                if got > MAX_DOWNLOAD or time.monotonic() > deadline:
                    return False
                f.write(chunk)
            return head == b"\x7fELF" and (expected is None or got == expected)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError):
        return False


def minidebuginfo(elf: ELFFile) -> Optional[bytes]:
    """The ELF inside .gnu_debugdata (xz), or None."""
    section = elf.get_section_by_name(".gnu_debugdata")
    if section is None:
        return None
    try:
        # bounded: a small section can decompress to gigabytes
        decompressor = lzma.LZMADecompressor()
        data = decompressor.decompress(section.data(), MAX_MINI)
        if not decompressor.eof:
            note(f"MiniDebugInfo over {MAX_MINI >> 20} MB decompressed: not used")
            return None
    except lzma.LZMAError:
        return None
    return data if data.startswith(b"\x7fELF") else None
