"""A BCC run's uprobes: BPF links where the kernel has them (uprobe_multi, Linux 6.12+), else BCC's perf events.

A perf event's close waits for the tracing grace periods under a lock that every uprobe
attach on the machine takes too: ~105 ms each, one at a time (docs/design.md), so a run that
followed 200 children left ~6 minutes of teardown. A link closes in ~47 ms without that
lock, and closes on several threads overlap (~6 ms each on 16). A link's pid is a process
(all its threads, and its execs); a perf event's is one thread.
The kernel runs no tail call between the two kinds of program, so a run loads every uprobe
program, and the unwinder they call, as one kind (uprobes_for).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections import deque
from typing import Dict, Iterable, List, Optional, Set, Tuple

from probedsl import threads
from probedsl.process import btf, procfs
from probedsl.drivers.teardown import close_on_threads
from probedsl.drivers.bcc_compat import _semaphore

BPF_PROG_LOAD, BPF_LINK_CREATE = 5, 28
BPF_PROG_TYPE_KPROBE = 2
BPF_TRACE_UPROBE_MULTI = 48  # enum bpf_attach_type
BPF_F_UPROBE_MULTI_RETURN = 1
SYS_BPF = 321  # x86_64
# perf events of ended processes are closed once no process has arrived for QUIET_S (each
# close delays a new process's attach), or when more than MAX_UNCLOSED wait (~20 processes'
# worth; fewer if BCC_PROBE_LIMIT is low)
QUIET_S = 3.0
MAX_UNCLOSED = 340


class _LinkCreate(ctypes.Structure):
    """union bpf_attr, as BPF_LINK_CREATE reads it for uprobe_multi."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("target_fd", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("path", ctypes.c_uint64),
        ("offsets", ctypes.c_uint64),
        ("ref_ctr_offsets", ctypes.c_uint64),
        ("cookies", ctypes.c_uint64),
        ("cnt", ctypes.c_uint32),
        ("multi_flags", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


def links_available() -> bool:
    """The kernel makes uprobe_multi links (its BTF names the function that does) whose pid
    is a whole process (6.12+: before, a thread, or its main thread's memory), on x86-64, and
    PROBEDSL_UPROBE_LINKS is not 0 (perf events then, as on older kernels)."""
    if os.environ.get("PROBEDSL_UPROBE_LINKS", "1") == "0" or os.uname().machine != "x86_64":
        return False
    return procfs.kernel_release() >= (6, 12) and btf.has_function("bpf_uprobe_multi_link_attach")


def uprobes_for(bcc, bpf):
    return Links(bcc, bpf) if links_available() else PerfEvents(bcc, bpf)


class PerfEvents:
    """BCC's own uprobes: a perf event each, on one thread (pid) or every process (-1)."""

    links = False

    def __init__(self, bcc, bpf):
        self.bcc, self.bpf = bcc, bpf
        self.unclosed: deque = deque()  # events of ended processes

    def load(self, fn_name: str):
        return self.bpf.load_func(fn_name, self.bcc.BPF.KPROBE)

    def attach(self, fn_name: str, path: str, pid: int, sym=None, sym_off=0, addr=None, ret=False, ref_ctr=0) -> None:
        """pid: a thread, or -1. ref_ctr: a usdt site's semaphore (its file offset)."""
        call = self.bpf.attach_uretprobe if ret else self.bpf.attach_uprobe
        place = dict(sym=sym, sym_off=sym_off) if sym_off else dict(sym=sym, addr=addr)
        _semaphore.offset = ref_ctr
        try:
            call(name=path, fn_name=fn_name, pid=pid, **place)
        finally:
            _semaphore.offset = 0

    def handles(self) -> set:
        return set(self.bpf.uprobe_fds)

    def close_soon(self, handles: Iterable) -> None:
        """Queued: the kernel takes ~90 ms to unregister each, one at a time, and attaches
        wait meanwhile (docs/design.md), so closing a process's 17 as it ended held up the next
        arrivals by up to 0.1 s. The loader closes one a turn (close_one) when closing_due."""
        self.unclosed.extend(handles)

    def closing_due(self, last_arrival: float) -> bool:
        """No process has arrived for QUIET_S, or too many wait (a quarter of BCC's limit)."""
        if not self.unclosed:
            return False
        too_many = min(MAX_UNCLOSED, self.bcc.BPF.get_probe_limit() // 4)
        return time.monotonic() - last_arrival > QUIET_S or len(self.unclosed) > too_many

    def close_one(self) -> None:
        event = self.unclosed.popleft()
        try:
            self.bpf.detach_uprobe_event(event)
        except Exception as exc:  # BCC raises bare Exception
            print(f"probedsl: warning: {exc}", file=sys.stderr)


class Links:
    """uprobe_multi links, one per program and place; those of ended processes closed on
    threads of their own as they are given (close_soon).
    The kernel puts a link's breakpoints in a memory only where its filter matches, through
    the process's main thread (its task's memory), at the attach and as files are mapped: a
    process whose main thread has ended (a zombie leader, no memory) matches none. Found so, it
    got no breakpoint (measured: tests/test_main_thread_end.py, leaderless); one whose main
    thread ends alone gets none in files it maps later. keep_everywhere() then adds, once, a
    link of a program that does nothing on every place, for every process: the breakpoints
    are then in every process mapping the file, and the process's own links (matched by
    thread group when they fire, 6.12+) fire."""

    links = True

    def __init__(self, bcc, bpf):
        self.bcc, self.bpf = bcc, bpf
        self.fds: Dict[int, int] = {}  # handle -> the link's descriptor
        self._made = 0
        self._lock = threading.Lock()
        self._syscall = ctypes.CDLL(None, use_errno=True).syscall
        self._syscall.restype = ctypes.c_long
        self.places: Set[Tuple[bytes, int]] = set()  # (file, offset) of every link made
        self.keeping: Optional[int] = None  # the no-op program, once keep_everywhere() ran
        self.kept: Set[Tuple[bytes, int]] = set()
        self.keepers: List[int] = []  # their links, closed at the end only

    def load(self, fn_name: str):
        return self.bpf.load_func(fn_name, self.bcc.BPF.KPROBE, attach_type=BPF_TRACE_UPROBE_MULTI)

    def attach(self, fn_name: str, path: str, pid: int, sym=None, sym_off=0, addr=None, ret=False, ref_ctr=0) -> None:
        """pid: a process, or -1 (every process). The place is resolved as BCC resolves it
        (a symbol, or an ELF address, to the file offset the kernel wants)."""
        # (the process's pid: a file in its root resolved through /proc/PID/root, as BCC does)
        module, offset = self.bcc.BPF._check_path_symbol(
            path.encode(), sym.encode() if sym else None, addr, pid if pid > 0 else -1, sym_off
        )
        module = module if isinstance(module, bytes) else module.encode()
        where = sym or f"{addr or 0:#x}"
        fd = self._link(self.load(fn_name).fd, module, [offset], ref_ctr, ret, max(pid, 0), where)
        with self._lock:
            self._made += 1
            self.fds[self._made] = fd
            self.places.add((module, offset))
        if self.keeping is not None:
            self._keep()

    def _link(
        self, prog_fd: int, module: bytes, offsets: List[int], ref_ctr: int, ret: bool, pid: int, where: str
    ) -> int:
        name = ctypes.create_string_buffer(module)
        places = (ctypes.c_uint64 * len(offsets))(*offsets)
        ref_ctrs = (ctypes.c_uint64 * len(offsets))(*[ref_ctr] * len(offsets))
        attr = _LinkCreate(
            prog_fd=prog_fd,
            attach_type=BPF_TRACE_UPROBE_MULTI,
            path=ctypes.addressof(name),
            offsets=ctypes.addressof(places),
            ref_ctr_offsets=ctypes.addressof(ref_ctrs) if ref_ctr else 0,
            cnt=len(offsets),
            multi_flags=BPF_F_UPROBE_MULTI_RETURN if ret else 0,
            pid=pid,
        )
        fd = self._syscall(SYS_BPF, BPF_LINK_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
        if fd < 0:
            err = ctypes.get_errno()
            kind = "uretprobe" if ret else "uprobe"
            raise OSError(err, f"cannot attach a {kind} link to {where}: {os.strerror(err)}")
        return fd

    def keep_everywhere(self) -> bool:
        """The no-op link on every place, for every process, from now on (see the class);
        False if it was on already. Every other process mapping a probed file then pays the
        uprobe's trap (~1-2 us a call) until the run ends."""
        if self.keeping is not None:
            return False
        self.keeping = _load_no_op(self._syscall)
        self._keep()
        return True

    def _keep(self) -> None:
        with self._lock:
            new = sorted(self.places - self.kept)
            self.kept |= set(new)
        for module in {m for m, _ in new}:
            offsets = [o for m, o in new if m == module]
            self.keepers.append(self._link(self.keeping, module, offsets, 0, False, 0, module.decode()))

    def handles(self) -> set:
        with self._lock:
            return set(self.fds)

    def closing_due(self, last_arrival: float) -> bool:
        return False  # (closed at once, on the closing threads)

    def close_one(self) -> None:
        pass

    def close_soon(self, handles: Iterable[int]) -> None:
        """Closed on threads of their own (teardown.close_on_threads), the run going on."""
        with self._lock:
            fds = [self.fds.pop(h) for h in handles if h in self.fds]
        if fds:
            threads.start("probedsl-unlink", lambda: close_on_threads(fds))

    def take_all(self) -> List[int]:
        """The descriptors of every link still open, now the caller's to close."""
        with self._lock:
            fds, self.fds, self.keepers = list(self.fds.values()) + self.keepers, {}, []
        return fds


def _load_no_op(syscall) -> int:
    """A uprobe_multi program that does nothing (`r0 = 0; exit`), loaded by a raw bpf() call:
    the keeper needs no compile."""
    insns = bytes.fromhex("b7000000000000009500000000000000")
    code = ctypes.create_string_buffer(insns, len(insns))
    license = ctypes.create_string_buffer(b"GPL")
    attr = (ctypes.c_uint32 * 18)()  # union bpf_attr, as BPF_PROG_LOAD reads it
    attr[0], attr[1] = BPF_PROG_TYPE_KPROBE, 2
    ctypes.c_uint64.from_buffer(attr, 8).value = ctypes.addressof(code)
    ctypes.c_uint64.from_buffer(attr, 16).value = ctypes.addressof(license)
    attr[17] = BPF_TRACE_UPROBE_MULTI  # expected_attach_type, at byte 68
    fd = syscall(SYS_BPF, BPF_PROG_LOAD, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot load the no-op uprobe program: {os.strerror(err)}")
    return fd
