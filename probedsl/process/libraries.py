"""Where probes attach: library short names -> files, symbol checks, and alias folding."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from typing import Dict, Iterable, List, Optional, Tuple

from probedsl.process import roots
from probedsl.process.mappings import read_proc_maps

# Paths end up inside generated probe specs; keep them to characters that need no quoting.
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+/-]+$")


def _short_matches(short: str, filename: str) -> bool:
    stem = short if short.startswith("lib") else "lib" + short
    return filename.startswith(stem + ".so") or filename.startswith(stem + "-")


@functools.lru_cache(maxsize=1)
def _ldconfig() -> Tuple[Tuple[str, str], ...]:
    exe = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ()
    entries = []
    for line in out.splitlines()[1:]:
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and ("x86-64" in m.group(2) or "64" in m.group(2)):
            entries.append((m.group(1), m.group(3)))
    return tuple(entries)


def mapped_files(pid: int) -> List[str]:
    """Files mapped executable by a live process, in map order, named inside its root."""
    return list(dict.fromkeys(roots.inside(pid, m.path) for m in read_proc_maps(pid)))


def dynamic_loader(root: str = "") -> str:
    """The dynamic loader's path (inside root), "" if it has none."""
    return next(
        (p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1") if os.path.exists(root + p)), ""
    )


def loader_map(command: str, env: Optional[dict] = None, root: str = "") -> List[Tuple[str, str]]:
    """(name asked for, file) for each library the dynamic loader would map for `command`,
    from `ld.so --list` (which loads but does not run it), under `env` added to ours; with
    `root`, as the command will see it chrooted there (paths inside the root)."""
    loader = dynamic_loader(root)
    if not loader:
        return []
    argv = (["chroot", root] if root else []) + [loader, "--list", command]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, env={**os.environ, **(env or {})}).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, re.M)]


def linked_libraries(command: str, env: Optional[dict] = None) -> List[str]:
    return [path for _, path in loader_map(command, env)]


class LibraryResolver:
    """Resolves a recipe's library names the way the traced program would, to files probedsl
    can attach to: pid, a live process (its maps, in its own root); command, a program about
    to run (with root: chrooted there); others, processes in other roots (containers) whose
    copies of each library are probed too."""

    def __init__(
        self, pid: Optional[int] = None, command: Optional[str] = None, root: str = "", others: Iterable[int] = ()
    ):
        self.pid, self.command, self.root, self.others = pid, command, root.rstrip("/"), tuple(others)
        self._prefix = roots.root_prefix(pid) if pid else self.root
        self._elsewhere: Dict[str, List[str]] = {}

    @functools.cached_property
    def _command_libraries(self) -> List[str]:
        """What the loader maps for the command: asked once (`ld.so --list` per probe added up
        to 26 runs for memleak with --allocator), as a program not yet started cannot change it."""
        return [path for _, path in loader_map(self.command, root=self.root)]

    def candidates(self) -> Iterable[str]:
        """Library paths as the traced program names them (inside its root)."""
        if self.pid:
            yield from mapped_files(self.pid)
        if self.command:
            yield from self._command_libraries
        if self._prefix == "":  # our root: what ldconfig knows is what it can load
            for _, path in _ldconfig():
                yield path

    def here(self, path: str) -> str:
        """A path in the program's root -> the file here."""
        if self.pid and self._prefix is None:
            return roots.attach_path(self.pid, path)
        return os.path.realpath((self._prefix or "") + path)

    def program_files(self) -> Iterable[str]:
        """The program itself, then its libraries, as files here: where usdt probes are looked for."""
        if self.command:
            yield self.here(self.command)
        for path in self.candidates():
            yield self.here(path)

    def resolve(self, library: str) -> Optional[str]:
        if "/" in library:
            path = self.here(library)
            return path if os.path.isfile(path) else None
        for path in self.candidates():
            if _short_matches(library, os.path.basename(path)):
                return self.here(path)
        return None

    def elsewhere(self, library: str) -> List[str]:
        """The library as each process of `others` maps it: files other than ours (asked once
        per library: every probe of a recipe names the same few)."""
        if library not in self._elsewhere:
            paths = (LibraryResolver(pid=pid).resolve(library) for pid in self.others)
            self._elsewhere[library] = [p for p in paths if p and os.path.isfile(p)]
        return self._elsewhere[library]
