"""Choose the target for a backend from the version installed (or asked for)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from typing import Dict, Optional, Tuple, Type

from probedsl.errors import ProbedslError

from .base import Target, Version, version_text
from .bcc import Bcc
from .bpftrace import DIALECTS

TARGETS: Tuple[Type[Target], ...] = (*DIALECTS, Bcc)
BACKENDS = tuple(dict.fromkeys(t.backend for t in TARGETS))
DEFAULT_BACKEND = "bpftrace"


def supported() -> str:
    """Every supported range, per backend: "bpftrace 0.17-0.19, 0.20-0.23, ...; bcc 0.26-0.37"."""
    return "; ".join(f"{b} " + ", ".join(t.range_text() for t in TARGETS if t.backend == b) for b in BACKENDS)


def parse_version(text: str) -> Optional[Version]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


@functools.lru_cache(maxsize=None)
def installed_version(backend: str) -> Optional[Version]:
    """The installed version of a backend, or None when it is not installed."""
    if backend == "bpftrace":
        exe = shutil.which("bpftrace")
        if exe is None:
            return None
        # --info names the version too (0.17-0.27), and a run asks it anyway: one start, not two
        version = info_version(_info(exe))
        if version:
            return version
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        return parse_version(out)
    try:
        import bcc
    except ImportError:
        return None
    return parse_version(getattr(bcc, "__version__", ""))


# `bpftrace --info`'s Build lines -> what a build can do; a distribution's build may lack one
BUILD_FEATURES = {
    "bfd": "bfd",
    "libdw (DWARF support)": "dwarf",
    "dwunwind (DWARF stack unwinding)": "dwunwind",
    "blazesym (advanced symbolization)": "blazesym",
}


def parse_info(text: str) -> Dict[str, bool]:
    """The build features `bpftrace --info` names ("  bfd: yes"); those it does not name are absent."""
    found = {}
    for line in text.splitlines():
        name, sep, value = line.strip().rpartition(": ")
        if sep and name in BUILD_FEATURES:
            found[BUILD_FEATURES[name]] = value.strip() == "yes"
    return found


def info_version(text: str) -> Optional[Version]:
    """The version `bpftrace --info` names under Build ("  version: v0.23.2"), None if none."""
    m = re.search(r"^\s*version: (v?[\d.]+)", text, re.M)
    return parse_version(m.group(1)) if m else None


def build_info(exe: str) -> Dict[str, bool]:
    """What this bpftrace binary was built with."""
    return parse_info(_info(exe))


def _info(exe: str) -> str:
    """`bpftrace --info`'s text, asked once per binary (path, size, mtime); "" if it fails."""
    st = os.stat(exe)
    return _info_of(exe, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _info_of(exe: str, size: int, mtime: int) -> str:
    try:
        out = subprocess.run([exe, "--info"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout + out.stderr


def _known(backend: str) -> str:
    if backend not in BACKENDS:
        raise ProbedslError(f"unknown backend '{backend}'; choose {' or '.join(BACKENDS)}")
    return backend


def for_version(backend: str, version: Optional[Version]) -> Target:
    """The target of a backend at a version; None: the newest dialect (compiling offline)."""
    _known(backend)
    classes = [t for t in TARGETS if t.backend == backend]
    if version is None:
        return classes[-1]()
    for cls in classes:
        if cls.covers(version):
            return cls(version)
    other = " or ".join(b for b in BACKENDS if b != backend)
    raise ProbedslError(
        f"{backend} {version_text(version)} is not supported: probedsl supports {supported()}; "
        f"install a supported version or use --backend {other}"
    )


def detect(backend: str) -> Target:
    """The target for the backend installed here; a clear error when it is missing."""
    version = installed_version(_known(backend))
    if version is None:
        hint = {"bpftrace": "apt-get install bpftrace", "bcc": "apt-get install python3-bpfcc"}.get(backend, "")
        raise ProbedslError(f"{backend} is not installed ({hint}, or run scripts/setup.sh)")
    target = for_version(backend, version)
    if backend == "bpftrace":
        target.with_build(build_info(shutil.which("bpftrace")))
    return target


def from_name(name: str) -> Target:
    """compile --target: "bpftrace" (the installed version, else the newest dialect),
    "bpftrace-0.17" (that version's dialect), "bcc"."""
    backend, _, version = name.partition("-")
    if version:
        parsed = parse_version(version)
        if parsed is None:
            raise ProbedslError(f"--target {name}: write BACKEND or BACKEND-VERSION (bpftrace-0.23)")
        return for_version(backend, parsed)
    return for_version(backend, installed_version(_known(backend)))
