"""BCC's compiled programs kept between runs. Most of a BCC start is clang and LLVM building the
probes' code; the tables are a small part. So a run whose C text (and flags, BCC, kernel) was
compiled before compiles only the tables (the text with PROBEDSL_TABLES_ONLY, which leaves out
every program) and loads the programs' instructions kept from that compile, each reference to a
table moved to the new table of the same name. Kept files are loaded only when the trust checks
pass them (probedsl.trust.cachedir.Kept): they become kernel programs."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import os
import struct
from typing import Callable, Dict, List

from probedsl.drivers import bcc_tracepoints

FORMAT = 1
MOST = 64  # kept compiles (50-200 KB each; one per recipe, options and --comm name)
LD_IMM64 = 0x18
PSEUDO_MAP_FD, PSEUDO_MAP_VALUE = 1, 2  # an ld_imm64 whose imm is a table's descriptor
TABLES_ONLY = "-DPROBEDSL_TABLES_ONLY"


class Unusable(Exception):
    """A kept compile that does not fit this one (damaged, or its tables differ)."""


def name(bcc, text: str, flags: List[str]) -> str:
    """The kept file's name: what the compile's output depends on (the text and its flags,
    BCC, the clang and LLVM it runs, the kernel and the headers BCC compiles against)."""
    uname = os.uname()
    headers = os.environ.get("BCC_KERNEL_SOURCE") or f"/lib/modules/{uname.release}/build"
    parts = [str(FORMAT), getattr(bcc, "__version__", ""), uname.release, uname.version, text, *flags]
    parts += [_identity(headers), _identity(os.path.join(headers, "include/generated/autoconf.h"))]
    parts += [_identity(path) for path in _compilers()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest() + ".json"


def _compilers() -> List[str]:
    """The files of libbcc, clang and LLVM this process has mapped (BCC loaded)."""
    found = set()
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if os.path.basename(path).startswith(("libbcc", "libclang", "libLLVM")):
                found.add(path)
    return sorted(found)


def _identity(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}:-"
    return f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"


def _declare(lib) -> None:
    lib.bpf_num_tables.restype = ctypes.c_ulonglong
    lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
    lib.bpf_table_name.restype = ctypes.c_char_p
    lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    lib.bpf_table_fd_id.restype = ctypes.c_int
    lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]
    for size in (lib.bpf_table_key_size_id, lib.bpf_table_leaf_size_id):
        size.restype = ctypes.c_size_t
        size.argtypes = [ctypes.c_void_p, ctypes.c_ulonglong]


def _tables(lib, module) -> Dict[str, dict]:
    """Each table of a compiled module: its descriptor, and what must match in another compile."""
    _declare(lib)
    tables = {}
    for i in range(lib.bpf_num_tables(module)):
        tables[lib.bpf_table_name(module, i).decode()] = {
            "fd": lib.bpf_table_fd_id(module, i),
            "shape": [
                lib.bpf_table_type_id(module, i),
                lib.bpf_table_key_size_id(module, i),
                lib.bpf_table_leaf_size_id(module, i),
                lib.bpf_table_max_entries_id(module, i),
                lib.bpf_table_flags_id(module, i),
            ],
        }
    return tables


def dump(bcc, bpf) -> bytes:
    """What a full compile leaves to keep: its programs' instructions and its tables."""
    programs = {fn.decode(): base64.b64encode(bpf.dump_func(fn)).decode() for fn in bpf.program_names()}
    body = {"tables": _tables(bcc.libbcc.lib, bpf.module), "programs": programs}
    return json.dumps({"format": FORMAT, "sha256": _digest(body), **body}, sort_keys=True).encode()


def _digest(body: dict) -> str:
    """Damage (a disk's, a bug's) is found before anything reaches the kernel."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def retarget(insns: bytes, moved: Dict[int, int]) -> bytes:
    """The instructions with each table descriptor (an ld_imm64's imm) moved; Unusable if one
    is not a kept table's."""
    if len(insns) % 8:
        raise Unusable("a program's length is not whole instructions")
    out = bytearray(insns)
    i = 0
    while i < len(out):
        if out[i] == LD_IMM64:
            if out[i + 1] >> 4 in (PSEUDO_MAP_FD, PSEUDO_MAP_VALUE):
                (fd,) = struct.unpack_from("<i", out, i + 4)
                if fd not in moved:
                    raise Unusable(f"a program refers to descriptor {fd}, no kept table's")
                struct.pack_into("<i", out, i + 4, moved[fd])
            i += 16  # ld_imm64 takes two slots
        else:
            i += 8
    return bytes(out)


def loaded(bcc, text: str, flags: List[str], kept: bytes, forget: Callable[[], None]):
    """A bcc.BPF whose module holds the tables alone and whose programs are the kept ones (the
    tracepoints' loaded, for bcc_tracepoints.attach). forget: called when a kept program fails
    to load (the next run compiles afresh)."""
    try:
        saved = json.loads(kept)
        if saved.get("format") != FORMAT:
            raise Unusable("another format")
        if saved.get("sha256") != _digest({"tables": saved["tables"], "programs": saved["programs"]}):
            raise Unusable("damaged: its digest differs")
        programs = {k.encode(): base64.b64decode(v, validate=True) for k, v in saved["programs"].items()}
        old = saved["tables"]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unusable(f"damaged: {exc}") from None
    others = [n for n in programs if n.startswith(bcc_tracepoints.NEVER_GENERATED)]
    if others:
        raise Unusable(f"a program BPF() would attach by its name: {others[0].decode()}")
    bpf = _with_kept_programs(bcc)(bcc, text, flags, forget)
    try:
        new = _tables(bcc.libbcc.lib, bpf.module)
        if {k: v["shape"] for k, v in new.items()} != {k: v.get("shape") for k, v in old.items()}:
            raise Unusable("the tables differ")
        moved = {old[k]["fd"]: new[k]["fd"] for k in new}
        bpf.kept = {fn: retarget(insns, moved) for fn, insns in programs.items()}
        bcc_tracepoints.load(bcc, bpf)  # (a refusal here: compiled afresh)
    except BaseException:
        bpf.cleanup()
        raise
    return bpf


def _with_kept_programs(bcc):
    class WithKeptPrograms(bcc_tracepoints.unattached(bcc)):
        """BPF() of the tables alone; load_func loads a kept program."""

        def __init__(self, bcc, text: str, flags: List[str], forget: Callable[[], None]):
            self.kept: Dict[bytes, bytes] = {}
            self.forget = forget
            super().__init__(text=text, cflags=flags + [TABLES_ONLY])

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            func_name = func_name if isinstance(func_name, bytes) else func_name.encode()
            if func_name in self.funcs:
                return self.funcs[func_name]
            insns = self.kept.get(func_name)
            if insns is None:
                raise Exception(f"Unknown program {func_name.decode()}")
            lib = bcc.libbcc.lib
            code = ctypes.create_string_buffer(insns, len(insns))
            fd = lib.bcc_func_load(
                self.module,
                prog_type,
                func_name,
                code,
                len(insns),
                lib.bpf_module_license(self.module),
                lib.bpf_module_kern_version(self.module),
                0,
                None,
                0,
                device,
                attach_type,
            )
            if fd < 0:
                why = os.strerror(ctypes.get_errno())
                self.forget()
                raise Exception(
                    f"Failed to load BPF program {func_name.decode()}: {why} (a compile kept from an "
                    "earlier run or the install: set aside, the next run compiles the program afresh)"
                )
            self.funcs[func_name] = fn = bcc.BPF.Function(self, func_name, fd)
            return fn

        def dump_func(self, func_name):
            return self.kept[func_name if isinstance(func_name, bytes) else func_name.encode()]

        def program_names(self) -> List[bytes]:
            return list(self.kept)

    return WithKeptPrograms
