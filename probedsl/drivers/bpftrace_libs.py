"""Private copies of the probed libraries for a bpftrace started while another one traces.
bpftrace itself runs on the host's libc: when libc is probed, each of the many allocations of
its compile traps into the running bpftrace's uprobes, which slows its start past a minute.
Loading copies of those libraries (LD_LIBRARY_PATH), files no probe sits on, keeps it fast."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, Iterable, Optional

from probedsl.process.libraries import loader_map


class LibraryCopies:
    """probed: the paths the running bpftrace probes. The copies are made once, at the first
    env(), and removed by remove()."""

    def __init__(self, probed: Iterable[str]):
        self.probed = {os.path.realpath(p) for p in probed}
        self.dir: Optional[str] = None  # set once every copy is in it

    def env(self) -> Dict[str, str]:
        """The environment to add to a later bpftrace's."""
        if self.dir is None:
            made = tempfile.mkdtemp(prefix="probedsl-bpftrace-libs-")
            try:
                exe = shutil.which("bpftrace")
                for name, path in loader_map(exe) if exe else []:
                    if os.path.realpath(path) in self.probed and "/" not in name:
                        shutil.copy2(path, os.path.join(made, name))
            except BaseException:  # a half-made directory is not reused
                shutil.rmtree(made, ignore_errors=True)
                raise
            self.dir = made
        paths = [self.dir] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        return {"LD_LIBRARY_PATH": ":".join(paths)}

    def remove(self) -> None:
        """A bpftrace still ending keeps the files it maps: removing them is safe."""
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
