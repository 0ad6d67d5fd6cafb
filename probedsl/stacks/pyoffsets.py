"""CPython's structure offsets, x86-64: where the Python frame walk (probedsl.stacks.pyframes,
backends/templates/bcc_python.c.j2) and the naming find each field, per version: a table for
3.11, the interpreter's own _Py_DebugOffsets for 3.13."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from probedsl.ir.stackformat import PY_FRAME_READ


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.POINTER(_Iovec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def read(pid: int, address: int, size: int) -> Optional[bytes]:
    """size bytes of the process's memory, or None: one system call (the naming thread reads a
    new code object in ~7 of these, each giving up the GIL once, not five times as open, seek,
    read and close did)."""
    if size <= 0 or not 0 < address < 1 << 64:
        return None
    buffer = ctypes.create_string_buffer(size)
    local, remote = _Iovec(ctypes.addressof(buffer), size), _Iovec(address, size)
    got = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return buffer.raw if got == size else None


def read_many(pid: int, addresses: Sequence[int], size: int) -> List[Optional[bytes]]:
    """size bytes at each address (None where unreadable), in one system call: a stack's code
    object headers (the naming thread read 6,250 of them one by one for python3 -c pass). The
    kernel stops where it cannot read (within an address's bytes too): from that address on,
    each is read alone."""
    if size <= 0 or not addresses or len(addresses) > 1024 or not all(0 < a < 1 << 64 for a in addresses):
        return [read(pid, a, size) for a in addresses]
    buffer = ctypes.create_string_buffer(size * len(addresses))
    local = _Iovec(ctypes.addressof(buffer), size * len(addresses))
    remote = (_Iovec * len(addresses))(*[_Iovec(a, size) for a in addresses])
    got = max(_libc.process_vm_readv(pid, ctypes.byref(local), 1, remote, len(addresses), 0), 0)
    data = buffer.raw
    whole = got // size
    return [data[i * size : (i + 1) * size] for i in range(whole)] + [read(pid, a, size) for a in addresses[whole:]]


@dataclass(frozen=True)
class Offsets:
    """Byte offsets of the fields the walk and the naming read (x86-64)."""

    version: Tuple[int, int]
    runtime_interp_head: int  # _PyRuntime.interpreters.head
    interp_threads_head: int  # PyInterpreterState.threads.head
    tstate_next: int
    tstate_native_tid: int
    tstate_frame: int  # 3.11: tstate->cframe; 3.13+: tstate->current_frame
    cframe_frame: int  # 3.11: cframe->current_frame; -1: none
    frame_code: int
    frame_previous: int
    frame_instr: int
    frame_entry: int  # 3.11: is_entry (bool); 3.13+: owner (char)
    entry_is_owner: bool  # an owner >= 3 frame is the C stack's shim (skipped, ends a run)
    code_tag_bits: int  # low bits of the code pointer that are tags (3.14 stack refs)
    code_firstlineno: int
    code_adaptive: int
    code_filename: int
    code_qualname: int
    code_linetable: int
    str_length: int
    str_state: int
    str_ascii_size: int
    str_compact_size: int
    bytes_size: int
    bytes_data: int
    source: str


# CPython 3.11: Include/internal/pycore_frame.h (_PyInterpreterFrame), pycore_runtime.h,
# pycore_interp.h, Include/cpython/pystate.h (PyThreadState, _PyCFrame), cpython/code.h,
# cpython/unicodeobject.h, cpython/bytesobject.h; checked with offsetof() compiled against
# Debian 12's python3.11-dev 3.11.2 headers (docs/python.md says how to redo it).
PY311 = Offsets(
    version=(3, 11),
    runtime_interp_head=40,
    interp_threads_head=16,
    tstate_next=8,
    tstate_native_tid=160,
    tstate_frame=56,
    cframe_frame=8,
    frame_code=32,
    frame_previous=48,
    frame_instr=56,
    frame_entry=68,
    entry_is_owner=False,
    code_tag_bits=0,
    code_firstlineno=72,
    code_adaptive=184,
    code_filename=112,
    code_qualname=128,
    code_linetable=136,
    str_length=16,
    str_state=32,
    str_ascii_size=48,
    str_compact_size=72,
    bytes_size=16,
    bytes_data=32,
    source="CPython 3.11 Include/internal/pycore_frame.h and neighbours (checked against python3.11-dev's headers)",
)

TABLES = {(3, 11): PY311}

# 3.13+: _PyRuntime starts with _Py_DebugOffsets (cookie "xdebugpy", PY_VERSION_HEX, free_threaded,
# then groups of uint64 offsets, each group led by its struct's size). Where each field we read
# sits in it, by version, from the field order of CPython 3.13's Include/internal/pycore_runtime.h
# and 3.14's Include/internal/pycore_debug_offsets.h; checked against the initial data of Debian
# 13's python3.13 (3.13.5) and Debian sid's python3.14 (3.14.10).
DEBUG_FIELDS = {
    (3, 13): dict(
        runtime_interp_head=40,
        interp_threads_head=72,
        tstate_next=168,
        tstate_frame=184,
        tstate_native_tid=200,
        frame_previous=232,
        frame_code=240,
        frame_instr=248,
        frame_entry=264,
        code_filename=280,
        code_qualname=296,
        code_linetable=304,
        code_firstlineno=312,
        code_adaptive=344,
        bytes_size=520,
        bytes_data=528,
        str_state=544,
        str_length=552,
        str_ascii_size=560,
    ),
    (3, 14): dict(
        runtime_interp_head=40,
        interp_threads_head=72,
        tstate_next=192,
        tstate_frame=208,
        tstate_native_tid=224,
        frame_previous=256,
        frame_code=264,
        frame_instr=272,
        frame_entry=288,
        code_filename=320,
        code_qualname=336,
        code_linetable=344,
        code_firstlineno=352,
        code_adaptive=384,
        bytes_size=600,
        bytes_data=608,
        str_state=624,
        str_length=632,
        str_ascii_size=640,
    ),
}
DEBUG_COOKIE = b"xdebugpy"


def debug_offsets(pid: int, runtime: int, version: Tuple[int, int]) -> Optional[Offsets]:
    """A 3.13+ interpreter's offsets, read from its _Py_DebugOffsets; None when the cookie or
    the version does not match, or for a free-threaded build (its objects differ)."""
    fields = DEBUG_FIELDS.get(version)
    raw = read(pid, runtime, 8 + 8 * (max(fields.values()) // 8)) if fields else None
    if raw is None or raw[:8] != DEBUG_COOKIE:
        return None
    hexversion, free_threaded = struct.unpack_from("<QQ", raw, 8)
    if (hexversion >> 24, (hexversion >> 16) & 0xFF) != version or free_threaded:
        return None
    got = {name: struct.unpack_from("<Q", raw, at)[0] for name, at in fields.items()}
    # (the walk reads a frame's fields from its header's PY_FRAME_READ bytes: past them is another frame)
    words = max(got["frame_code"], got["frame_previous"], got["frame_instr"]) + 8
    if max(got.values()) > 0xFFFF or max(words, got["frame_entry"] + 1) > PY_FRAME_READ:
        return None
    return Offsets(
        version=version,
        cframe_frame=-1,
        entry_is_owner=True,
        code_tag_bits=7 if version >= (3, 14) else 0,
        str_compact_size=got["str_ascii_size"] + 16,
        source=f"_Py_DebugOffsets of the process's CPython {version[0]}.{version[1]}",
        **got,
    )
