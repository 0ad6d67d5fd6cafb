"""What BCC 0.26-0.37 need around them: its Python module imported quietly, its symbol resolution and ref_ctr_offset passing patched, rlimits for many uprobes, tracefs uprobes left by a killed run removed."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import sys
import tempfile
from typing import Dict, List

from probedsl.errors import ProbedslError
from probedsl.process import tracefs


def _import_bcc():
    try:
        import bcc  # Debian's python3-bpfcc, linked into the venv by scripts/setup.sh
    except ImportError:
        raise ProbedslError(
            "the bcc Python module is missing (apt-get install python3-bpfcc, or run scripts/setup.sh)"
        ) from None
    _pass_the_ref_ctr_offset(bcc.libbcc.lib)
    _resolve_each_symbol_once(bcc.BPF)
    return bcc


class _Semaphore:
    """The ref_ctr_offset the next attach passes: a usdt site's semaphore, else 0."""

    offset = 0


_semaphore = _Semaphore()


def _pass_the_ref_ctr_offset(lib) -> None:
    """bcc 0.26's Python declares bpf_attach_uprobe with 6 arguments; libbcc takes a 7th,
    ref_ctr_offset, which then gets whatever is on the stack (iovisor/bcc#5236). The kernel
    keeps one ref_ctr_offset per probed address: a garbage one (6, measured) makes the attach
    fail with EINVAL ("ref_ctr_offset mismatch" in dmesg) whenever a plain uprobe already sits
    there, and otherwise makes the kernel bump a 16-bit "semaphore" in every process mapping
    the file. Every attach goes through a wrapper that passes 0, as bpftrace does, or the
    semaphore of the usdt site being attached."""
    if getattr(lib.bpf_attach_uprobe, "probedsl_wrapped", False):
        return
    real = lib.bpf_attach_uprobe
    real.restype = ctypes.c_int
    real.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulonglong,
        ctypes.c_int,
        ctypes.c_uint32,
    ]

    def attach(progfd, attach_type, ev_name, path, offset, pid):
        return real(progfd, attach_type, ev_name, path, offset, pid, _semaphore.offset)

    attach.probedsl_wrapped = True
    lib.bpf_attach_uprobe = attach


def _resolve_each_symbol_once(bpf_class) -> None:
    """BCC resolves the symbol again (an ELF symbol-table walk, ~0.3 ms) for every attach;
    --per-process attaches every uprobe (17 for memleak) to each new process, and what the
    process does until they are on is missed. The answer (file, offset) is kept per file
    version, and used for a process that sees the same file at that path; one in another
    mount namespace (a container) sees another file there and is resolved by BCC as before."""
    real = bpf_class._check_path_symbol
    if getattr(real, "probedsl_wrapped", False):
        return
    known: Dict[tuple, tuple] = {}

    def resolve(module, symname, addr, pid, sym_off=0):
        module = os.fsencode(module)
        try:
            ours = os.stat(module)
        except (OSError, ValueError):  # a short name ("c"): BCC's own search
            return real(module, symname, addr, pid, sym_off)
        if pid > 0:
            try:
                theirs = os.stat(b"/proc/%d/root%s" % (pid, module))
            except OSError:  # a path seen from here only (a chroot's file, or the process is gone)
                theirs = ours
            if not os.path.samestat(ours, theirs):
                return real(module, symname, addr, pid, sym_off)
        key = (module, symname, addr, sym_off, ours.st_dev, ours.st_ino, ours.st_mtime_ns)
        if key not in known:
            known[key] = real(module, symname, addr, -1, sym_off)
        return known[key]

    resolve.probedsl_wrapped = True
    bpf_class._check_path_symbol = staticmethod(resolve)


def _allow_many_uprobes() -> None:
    """--per-process holds every uprobe (17 for memleak) per traced process, each an open
    file: BCC refuses more than 1,000 in all (58 processes) unless BCC_PROBE_LIMIT says so. Raise the
    open-file limit to its hard maximum and let BCC use most of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    os.environ.setdefault("BCC_PROBE_LIMIT", str(max(1000, soft - 256)))  # 256 for everything else


TRACEFS_UPROBES = tracefs.files("uprobe_events")


def remove_tracefs_uprobes(bcc_pid: int) -> int:
    """Remove the tracefs uprobe events libbcc made for process bcc_pid and left behind; returns
    how many. When attaching through perf fails (a --per-process target ending meanwhile),
    libbcc falls back to a tracefs event named ..._bcc_<its pid>, and keeps it when that fails
    too. Disabled, they cost nothing, but they outlive the run."""
    path = next((p for p in TRACEFS_UPROBES if os.path.exists(p)), None)
    if path is None:
        return 0
    try:
        with open(path) as f:
            names = [line.split()[0].split(":", 1)[1] for line in f if line.strip()]
    except (OSError, IndexError):
        return 0
    removed = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # not open(path, "a"): its seek fails on tracefs
    except OSError:
        return 0
    try:
        for name in (n for n in names if n.endswith(f"_bcc_{bcc_pid}")):
            try:
                os.write(fd, f"-:{name}\n".encode())
                removed += 1
            except OSError:  # in use, or gone meanwhile
                pass
    finally:
        os.close(fd)
    return removed


@contextlib.contextmanager
def _stderr_captured():
    """What C code (libbcc) writes to fd 2 meanwhile is kept, in the list yielded, not shown."""
    said: List[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.append(sink.read())
