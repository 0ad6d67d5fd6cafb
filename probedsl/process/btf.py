"""The running kernel's type layout, from its BTF (/sys/kernel/btf/vmlinux): the byte offsets of
struct members. BCC compiles against whatever kernel headers are installed, which need not be
this kernel's; a program that reads kernel structs by hand takes their offsets from here.
libbpf (BCC's own dependency) parses it in ~12 ms; where it cannot be loaded, the parse below
(~0.1 s, on every BCC start) does."""

import ctypes
import struct
from functools import lru_cache
from typing import Dict, Optional, Tuple

VMLINUX = "/sys/kernel/btf/vmlinux"
STRUCT, UNION, FUNC = 4, 5, 12
# bytes that follow each kind's 12-byte header: fixed, and per member (vlen)
EXTRA = {
    1: (4, 0),
    3: (12, 0),
    4: (0, 12),
    5: (0, 12),
    6: (0, 8),
    13: (0, 8),
    14: (4, 0),
    15: (0, 12),
    17: (4, 0),
    19: (0, 12),
}


@lru_cache(maxsize=1)
def _structs(path: str = VMLINUX) -> Dict[str, Tuple[int, Dict[str, int]]]:
    """{struct name: (size, {member name: byte offset})} for every named struct and union."""
    with open(path, "rb") as f:
        data = f.read()
    magic, _version, _flags, hdr_len, type_off, type_len, str_off, _str_len = struct.unpack_from("<HBBIIIII", data)
    if magic != 0xEB9F:
        raise ValueError(f"{path}: not BTF")
    types, strings = hdr_len + type_off, hdr_len + str_off

    def name(off: int) -> str:
        return data[strings + off : data.index(b"\0", strings + off)].decode()

    found: Dict[str, Tuple[int, Dict[str, int]]] = {}
    at, end = types, types + type_len
    while at < end:
        name_off, info, size = struct.unpack_from("<III", data, at)
        kind, vlen, bitfields = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        at += 12
        fixed, each = EXTRA.get(kind, (0, 0))
        if kind in (STRUCT, UNION) and name_off:
            members = {}
            for i in range(vlen):
                m_name, _m_type, m_off = struct.unpack_from("<III", data, at + 12 * i)
                bits = m_off & 0xFFFFFF if bitfields else m_off
                members[name(m_name)] = bits // 8
            found.setdefault(name(name_off), (size, members))
        at += fixed + each * vlen
    return found


class _Libbpf:
    """The kernel's BTF as libbpf parsed it: one struct looked up at a time."""

    def __init__(self, path: str):
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        lib.btf__parse.restype = ctypes.c_void_p
        lib.btf__parse.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        lib.btf__find_by_name_kind.restype = ctypes.c_int
        lib.btf__find_by_name_kind.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.btf__type_by_id.restype = ctypes.c_void_p
        lib.btf__type_by_id.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.btf__name_by_offset.restype = ctypes.c_char_p
        lib.btf__name_by_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        self.lib, self.btf = lib, lib.btf__parse(path.encode(), None)
        if not self.btf:  # libbpf 1.x: NULL and errno
            raise OSError(ctypes.get_errno(), f"libbpf cannot parse {path}")

    def has_function(self, name: str) -> bool:
        return self.lib.btf__find_by_name_kind(self.btf, name.encode(), FUNC) > 0

    def struct(self, name: str) -> Tuple[int, Dict[str, int]]:
        for kind in (STRUCT, UNION):
            type_id = self.lib.btf__find_by_name_kind(self.btf, name.encode(), kind)
            if type_id > 0:
                break
        else:
            raise KeyError(name)
        at = self.lib.btf__type_by_id(self.btf, type_id)
        _name, info, size = (ctypes.c_uint32 * 3).from_address(at)
        vlen, bitfields = info & 0xFFFF, info >> 31
        raw = (ctypes.c_uint32 * (3 * vlen)).from_address(at + 12)
        members = {}
        for i in range(vlen):
            bits = raw[3 * i + 2] & 0xFFFFFF if bitfields else raw[3 * i + 2]
            members[self.lib.btf__name_by_offset(self.btf, raw[3 * i]).decode()] = bits // 8
        return size, members


@lru_cache(maxsize=1)
def _libbpf() -> Optional[_Libbpf]:
    try:
        return _Libbpf(VMLINUX)
    except (OSError, AttributeError):  # no libbpf 1.x here: the parse in Python
        return None


@lru_cache(maxsize=None)
def _struct(name: str) -> Tuple[int, Dict[str, int]]:
    parsed = _libbpf()
    return parsed.struct(name) if parsed else _structs()[name]


def offset(struct_name: str, member: str) -> int:
    """The byte offset of struct_name.member in the running kernel; KeyError if it has none."""
    return _struct(struct_name)[1][member]


def size(struct_name: str) -> int:
    return _struct(struct_name)[0]


@lru_cache(maxsize=None)
def has_function(name: str) -> bool:
    """Whether the running kernel has a function of that name (False without BTF)."""
    parsed = _libbpf()
    if parsed:
        return parsed.has_function(name)
    try:
        with open(VMLINUX, "rb") as f:
            return b"\0" + name.encode() + b"\0" in f.read()
    except OSError:
        return False
