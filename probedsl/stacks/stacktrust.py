"""How much of a frame-pointer stack is certain.

A frame-pointer walk (the kernel's, or BCC's program's own) reads the caller's return address at
[rbp+8]. That holds only while each function on the way keeps rbp as its frame pointer.
Code built without one (gcc -O2, most distribution libraries) leaves rbp to anything, and
the walk goes on through garbage or skips callers. The call-frame information (.eh_frame)
says, at each address, whether rbp is the frame pointer there: the stack is kept up to the
first frame where it is not, then ends with a marker saying why.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

from probedsl.binaries import cfi, elf, sourcelines
from probedsl import ir, threads
from probedsl.process import procfs
from probedsl.ir.stackformat import DEPTH_LIMIT, FP_WALK, MARKERS, NO_FRAME_POINTER, NO_UNWIND_INFO


# how a cut stack ended, by its marker: what reports count
CUT_KINDS = {NO_FRAME_POINTER: "no frame pointer", NO_UNWIND_INFO: "no unwind information", DEPTH_LIMIT: "depth limit"}


def cut_kind(addresses: Tuple[int, ...]) -> Optional[str]:
    """Why a trusted() stack ends early, or None when it is whole."""
    return CUT_KINDS.get(addresses[-1]) if addresses else None


def reason(marker: int, module: str) -> str:
    """What a marker says, for a stack whose last kept frame is in module."""
    if marker == NO_FRAME_POINTER:
        return f"no frame pointer in {module}"
    if marker == NO_UNWIND_INFO:
        return f"no unwind information for {module or 'this address'}"
    return f"only the innermost {ir.STACK_DEPTH} frames are kept"


def read_ahead(paths: Sequence[str]) -> None:
    """The files' call-frame tables and symbols read on a thread of their own while the backend
    compiles (the main thread only waits then), and addr2line started on those with DWARF: a
    report of python3 -c pass spent 0.5 s reading libc's and python3's .eh_frame after the
    command ended, 0.06 s their symbols and 0.09 s libc's debug file."""

    def read():
        files = list(dict.fromkeys(paths))
        for path in files:  # first: each addr2line reads in a process of its own meanwhile
            dwarf = elf.read_ahead(path)
            if dwarf:
                sourcelines.warm(dwarf)
        for path in files:
            cfi.table(path)

    threads.start("probedsl-read-ahead", read)


# resolve(address to look up) -> (file opened from here, address in its ELF view), or None
Resolver = Callable[[int], Optional[Tuple[str, int]]]


def trusted(addresses: Tuple[int, ...], resolve: Resolver) -> Tuple[int, ...]:
    """The frames of a frame-pointer walk that are certain, then a marker when it was cut.
    A stack the unwinder ended with a marker is kept as it is (but FP_WALK's).

    Frame 0 is where the probe stopped the thread (its exact address); every other frame is
    a return address, whose call is the byte before it."""
    if addresses and addresses[-1] in MARKERS:
        if addresses[-1] != FP_WALK:
            return tuple(addresses)
        addresses = tuple(addresses[:-1])
    for depth, address in enumerate(addresses):
        where = resolve(address if depth == 0 else address - 1)
        table = cfi.table(where[0]) if where else None
        row = table.row_at(where[1]) if table else None
        if row is None:
            return addresses[: depth + 1] + (NO_UNWIND_INFO,)
        if row.outermost:  # the thread's first function: complete
            return addresses[: depth + 1]
        if depth == 0 and table.starts_function(where[1]) and _kernel_adds_caller(*where):
            continue  # frame 1 was read at [rsp]: the immediate caller
        if not row.frame_pointer_based:
            return addresses[: depth + 1] + (NO_FRAME_POINTER,)
    if len(addresses) >= ir.STACK_DEPTH:
        return tuple(addresses) + (DEPTH_LIMIT,)
    return tuple(addresses)


_PUSH_RBP, _ENDBR64 = b"\x55", b"\xf3\x0f\x1e\xfa"


@functools.lru_cache(maxsize=4096)
def _kernel_adds_caller(path: str, vaddr: int) -> bool:
    """At a probe on a function's first instruction the frame-pointer walk from rbp skips the
    immediate caller (rbp is still the caller's). Linux 6.12 reads it at [rsp] and puts it
    second when that instruction is `push %rbp` or `endbr64` (perf_callchain_user, commit
    cfa7f3d2c526): then it is certain. Older kernels (some stable ones have it too, unknown
    here) leave it out: the stack is cut after frame 0."""
    syms = elf.symbols(path)
    first = syms.read(vaddr, 4) if syms else b""
    return procfs.kernel_release() >= (6, 12) and (first[:1] == _PUSH_RBP or first == _ENDBR64)
