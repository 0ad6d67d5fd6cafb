"""file:line (with inlined calls expanded) and C++ demangling, through GNU binutils.

Why binutils: addr2line reads every DWARF version, compressed sections, inlined subroutines,
and finds separate debug files by build-id or debuglink, all in C. One process per module
per batch of addresses keeps thousands of frames fast; results are cached per address.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class SourceFrame:
    function: str          # "" when DWARF has no name
    file: str              # "" when unknown
    line: int              # 0 when unknown


class SourceLines:
    def __init__(self):
        self._addr2line = shutil.which("addr2line")
        self._cxxfilt = shutil.which("c++filt")
        self._cache: Dict[Tuple[str, int], Tuple[SourceFrame, ...]] = {}
        self._names: Dict[str, str] = {}

    def lookup(self, module: str, vaddrs: Iterable[int]) -> Dict[int, Tuple[SourceFrame, ...]]:
        """vaddr -> frames innermost first (inlined callees, then the real function)."""
        wanted = sorted({a for a in vaddrs if (module, a) not in self._cache})
        if wanted and self._addr2line:
            for chunk in range(0, len(wanted), 4096):
                self._run(module, wanted[chunk:chunk + 4096])
        for a in wanted:
            self._cache.setdefault((module, a), ())
        return {a: self._cache[(module, a)] for a in vaddrs}

    def _run(self, module: str, addrs: List[int]) -> None:
        argv = [self._addr2line, "-e", module, "-a", "-i", "-f", "-C"] + [f"{a:#x}" for a in addrs]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return
        current: Optional[int] = None
        pending: List[str] = []
        results: Dict[int, List[SourceFrame]] = {}

        def flush():
            if current is None:
                return
            frames = []
            for fn, where in zip(pending[0::2], pending[1::2]):
                file, _, line = where.rpartition(":")
                line = line.split(" ", 1)[0]
                frames.append(SourceFrame("" if fn == "??" else fn, "" if file in ("??", "") else os.path.normpath(file),
                                          int(line) if line.isdigit() else 0))
            results[current] = [f for f in frames if f.function or f.file]

        for text in out.splitlines():
            if text.startswith("0x") and len(pending) % 2 == 0:
                flush()
                current, pending = int(text, 16), []
            else:
                pending.append(text)
        flush()
        for a, frames in results.items():
            self._cache[(module, a)] = tuple(frames)

    def demangle(self, names: Sequence[str]) -> Dict[str, str]:
        todo = sorted({n for n in names if n.startswith("_Z") and n not in self._names})
        if todo and self._cxxfilt:
            try:
                out = subprocess.run([self._cxxfilt], input="\n".join(todo) + "\n", capture_output=True,
                                     text=True, timeout=30).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                out = []
            if len(out) == len(todo):
                self._names.update(zip(todo, out))
        return {n: self._names.get(n, n) for n in names}
