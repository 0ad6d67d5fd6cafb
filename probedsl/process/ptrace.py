"""The ptrace(2) requests probedsl makes (x86-64 Linux), and why the system refused one."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from typing import Dict, Iterable, Tuple

from probedsl.process import procfs

TRACEME, CONT, GETREGS, DETACH = 0, 7, 12, 17
GETEVENTMSG, GETREGSET, SEIZE, INTERRUPT, LISTEN = 0x4201, 0x4204, 0x4206, 0x4207, 0x4208
NT_X86_XSTATE = 0x202
O_TRACEFORK, O_TRACEVFORK, O_TRACECLONE, O_TRACEEXEC, O_TRACEEXIT = 0x02, 0x04, 0x08, 0x10, 0x40
EVENT_FORK, EVENT_VFORK, EVENT_CLONE, EVENT_EXEC, EVENT_EXIT, EVENT_STOP = 1, 2, 3, 4, 6, 128
WALL = 0x40000000  # waitpid: threads (clone children) too

_REGS = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags rsp ss "
    "fs_base gs_base ds es fs gs"
).split()
# the registers a pointer can live in (not segment selectors, flags, rip)
POINTER_REGISTERS = ("r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi rsp").split()
# the vector registers in the XSAVE area's standard (uncompacted) layout, which ptrace gives:
# (XSTATE_BV bit, offset, bytes): xmm0-15; the upper halves of ymm0-15; the upper halves of
# zmm0-15; zmm16-31 (Intel SDM vol. 1, 13.4-13.5; the same offsets on AMD)
VECTOR_COMPONENTS = ((1, 160, 256), (2, 576, 256), (6, 1152, 512), (7, 1664, 1024))
_XSTATE_BV = 512
_XSAVE_MAX = 16384  # more than any XSAVE area so far (AMX: ~11 KB)


class _UserRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in _REGS]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.ptrace.restype = ctypes.c_long


def request(req: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """One ptrace request (data: a number, or the address of a buffer); OSError on failure."""
    ctypes.set_errno(0)
    result = _libc.ptrace(ctypes.c_long(req), ctypes.c_long(tid), ctypes.c_void_p(addr), ctypes.c_void_p(data))
    err = ctypes.get_errno()
    if result == -1 and err:
        raise OSError(err, os.strerror(err))
    return result


def registers(tid: int) -> Dict[str, int]:
    regs = _UserRegs()
    request(GETREGS, tid, 0, ctypes.addressof(regs))
    return {name: getattr(regs, name) for name in _REGS}


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def vector_words(tid: int) -> bytes:
    """The thread's xmm, ymm and zmm registers (those in use), as bytes to scan as 8-byte
    words; OSError when the kernel gives no XSAVE area."""
    buf = ctypes.create_string_buffer(_XSAVE_MAX)
    iov = _Iovec(ctypes.addressof(buf), _XSAVE_MAX)
    request(GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    area = buf.raw[: iov.len]
    in_use = int.from_bytes(area[_XSTATE_BV : _XSTATE_BV + 8], "little") if len(area) >= _XSTATE_BV + 8 else 0b10
    return b"".join(
        area[at : at + size] for bit, at, size in VECTOR_COMPONENTS if in_use >> bit & 1 and at + size <= len(area)
    )


def stopped_registers(tids: Iterable[int]) -> Tuple[Dict[int, Dict[str, int]], Dict[int, bytes]]:
    """The general and vector registers of stopped threads (one that has gone has none)."""
    general, vectors = {}, {}
    for tid in tids:
        try:
            general[tid] = registers(tid)
        except OSError:
            continue
        try:
            vectors[tid] = vector_words(tid)
        except OSError:
            pass  # no XSAVE area: general registers only
    return general, vectors


def event_message(tid: int) -> int:
    value = ctypes.c_ulong()
    request(GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value


def tracer_of(pid: int) -> int:
    """The pid tracing `pid` (0: none)."""
    value = procfs.status_field(pid, "TracerPid")
    return int(value) if value and value.isdigit() else 0


def why_refused(pid: int, exc: OSError) -> str:
    """One line on why attaching to `pid` failed, naming what the user can change."""
    if exc.errno == errno.ESRCH:
        return f"process {pid} ended"
    tracer = tracer_of(pid)
    if tracer:
        name = procfs.comm(tracer) or "?"
        return f"process {pid} is already traced by pid {tracer} ({name}); a process has one tracer at a time"
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        scope = 0
    if scope == 3:
        return "the kernel forbids ptrace (kernel.yama.ptrace_scope = 3, until reboot)"
    if scope == 2:
        return "ptrace needs CAP_SYS_PTRACE here (kernel.yama.ptrace_scope = 2)"
    return f"ptrace of process {pid} refused: {os.strerror(exc.errno)}"
