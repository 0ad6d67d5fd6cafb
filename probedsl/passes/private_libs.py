"""Private copies of probed libraries for a launched command, so untraced processes pay nothing.

A uprobe belongs to a file (its inode): every process mapping that file traps, whatever the
filter says. A launched command pointed at a byte-for-byte copy (LD_LIBRARY_PATH) maps the
copy instead, and probes on the copy trap only the command and the children it starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from typing import Dict

from probedsl import ir
from probedsl.process.libraries import linked_libraries, loader_map


class PrivateLibraries:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="probedsl-libs-")
        self.env: Dict[str, str] = {}

    def apply(self, program: ir.Program, command: str) -> ir.Program:
        """Copy the shared libraries `program` probes; return the program retargeted to the
        copies the command's loader will really pick (checked with ld.so --list), others kept."""
        originals = {p.path for r in program.resources for p in r.probes if p.kind == ir.ProbeKind.UPROBE and p.path}
        # the file name the loader asks for (the soname link, e.g. libc.so.6), per real file
        asked = {os.path.realpath(where): name for name, where in loader_map(command)}
        copies = {}
        for path in sorted(originals):
            if path == os.path.realpath(command) or ".so" not in os.path.basename(path):
                continue  # the program itself cannot be swapped
            target = os.path.join(self.dir, asked.get(os.path.realpath(path), os.path.basename(path)))
            if not os.path.exists(target):
                shutil.copy2(path, target)
            copies[path] = target
        if not copies:
            return program
        paths = [self.dir] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        self.env = {"LD_LIBRARY_PATH": ":".join(paths)}
        loaded = {os.path.realpath(p) for p in linked_libraries(command, env=self.env)}
        used = {orig: copy for orig, copy in copies.items() if os.path.realpath(copy) in loaded}
        if not used:
            self.env = {}
        return replace(
            program,
            resources=tuple(
                replace(r, probes=tuple(replace(p, path=used.get(p.path, p.path)) for p in r.probes))
                for r in program.resources
            ),
        )

    def owns(self, path: str) -> bool:
        return os.path.dirname(path) == self.dir

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
