"""CPython frames in user stacks: where an interpreter keeps them, and what a frame names.

At each acquisition the BCC program (backends/templates/bcc_python.c.j2) finds the thread's
PyThreadState in its interpreter's thread list (matched by native thread id: the thread-local
"current" tstate is NULL while a thread has released the GIL, as ctypes calls do), then walks
its frame chain, recording (code object address, instruction pointer - code object, flags) per
frame. This module finds the interpreter in a process and gives the program its structure
offsets, then names each recorded frame from the process's memory: the code object's
qualified name, file name and line (the location table decoded for that version).

A recorded frame travels in the stack's address tuple as a pseudo-address (PSEUDO_BASE + an
index into a table of named frames) placed before the stack's end marker, so that two Python
callers of one C function are two stacks."""

from __future__ import annotations

import functools
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from elftools.elf.elffile import ELFFile

from probedsl.process import procfs
from probedsl.stacks.pyoffsets import TABLES, Offsets, debug_offsets, read, read_many
from probedsl.stacks.pylines import line_of

RUN_END = 1 << 32  # flag: the last frame run by one _PyEval_EvalFrameDefault call
PSEUDO_BASE = 0xFFFF_FE00_0000_0000
PSEUDO_END = 0xFFFF_FF00_0000_0000
EVAL_FUNCTION = "_PyEval_EvalFrameDefault"
FINALIZE_FUNCTION = "Py_FinalizeEx"


@dataclass(frozen=True)
class Interpreter:
    """A CPython found in a process."""

    path: str  # the file holding _PyRuntime (the executable or libpython)
    runtime: int  # _PyRuntime's address in the process
    offsets: Optional[Offsets]  # None: a version without a table
    version: Tuple[int, int]
    eval_ranges: Tuple[Tuple[int, int], ...]  # process addresses of the evaluation function
    image: int = 0  # which exec of the process (a new exec of the same file differs)
    file: str = ""  # where probedsl opens that file (inside the process's root)
    finalize: Tuple[int, ...] = ()  # ELF addresses where finalization begins (probed: bcc_python)

    @property
    def name(self) -> str:
        return f"CPython {self.version[0]}.{self.version[1]} ({os.path.basename(self.path)})"


@functools.lru_cache(maxsize=64)
def _symbols(path: str, mtime_ns: int) -> Dict[str, Tuple[int, int]]:
    """(value, size) of the few dynamic symbols that say "CPython" (an empty dict otherwise)."""
    wanted = ("_PyRuntime", "Py_Version", EVAL_FUNCTION, FINALIZE_FUNCTION, "Py_Exit")
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            table = elf.get_section_by_name(".dynsym")
            # looked for in the names first: pyelftools reads every symbol to find one (libc's
            # ~3,000 took 0.1-0.2 s of each start)
            if table is None or b"_PyRuntime\0" not in table.stringtable.data():
                return {}
            out = _dynamic_symbols(elf, table, wanted)
            out["_load"] = tuple(
                (s["p_vaddr"], s["p_offset"], s["p_filesz"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"
            )
            if FINALIZE_FUNCTION in out:
                out["_finalize"] = (_past_stub(f, out["_load"], *out[FINALIZE_FUNCTION]), 0)
            return out if "_PyRuntime" in out else {}
    except Exception:  # not an ELF file, or a damaged one: not an interpreter
        return {}


_SYMBOL64 = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, section, value, size


def _dynamic_symbols(elf: ELFFile, table, names) -> Dict[str, Tuple[int, int]]:
    """(value, size) of each named symbol, the first of that name. A 64-bit little-endian table
    is read whole with struct: pyelftools parses every symbol to find one (python3.11's ~2,000
    took 0.05 s of a held command's start)."""
    if elf.elfclass != 64 or not elf.little_endian or table["sh_entsize"] != _SYMBOL64.size:
        found = {name: table.get_symbol_by_name(name) for name in names}
        return {name: (s[0]["st_value"], s[0]["st_size"]) for name, s in found.items() if s}
    strings = table.stringtable.data()
    named_at = {}  # string table offset -> name (a name can also be the tail of a longer one)
    for name in names:
        needle = name.encode() + b"\0"
        at = strings.find(needle)
        while at >= 0:
            named_at.setdefault(at, name)
            at = strings.find(needle, at + 1)
    out: Dict[str, Tuple[int, int]] = {}
    data = table.data()
    whole = data[: len(data) - len(data) % _SYMBOL64.size]  # a section cut short: its whole entries
    for st_name, _info, _other, _section, value, size in _SYMBOL64.iter_unpack(whole):
        name = named_at.get(st_name)
        if name is not None and name not in out:
            out[name] = (value, size)
    return out


def _past_stub(f, loads, address: int, size: int = 0) -> int:
    """Where a function really begins: 3.13's and 3.14's Py_FinalizeEx are stubs (endbr64; jmp)
    to a local function that other paths (Py_Exit) call directly; probed there, every path
    stops. A jump within the function itself is no stub."""
    at = next((address - v + o for v, o, n in loads if v <= address < v + n), None)
    try:
        f.seek(at)
        code = f.read(16)
        i = 4 if code.startswith(b"\xf3\x0f\x1e\xfa") else 0  # endbr64
        if code[i : i + 3] == b"\x48\x8d\x3d":  # lea rdi, [rip+d32]: an argument set for the callee
            i += 7
        target = address
        if code[i : i + 1] == b"\xe9":  # jmp rel32
            target = address + i + 5 + struct.unpack_from("<i", code, i + 1)[0]
        elif code[i : i + 1] == b"\xeb":  # jmp rel8
            target = address + i + 2 + struct.unpack_from("<b", code, i + 1)[0]
    except (TypeError, OSError, struct.error):  # outside every segment, or a short file
        return address
    return address if address <= target < address + max(size, 1) else target


def symbols_of(path: str) -> Dict[str, Tuple[int, int]]:
    try:
        return _symbols(path, os.stat(path).st_mtime_ns)
    except OSError:
        return {}


def is_interpreter(path: str) -> bool:
    """Whether an executable (or a library it links statically) is a CPython: `-- CMD` is held
    at its exit until its frames are named."""
    return bool(symbols_of(path))


# a CPython's small objects are not malloc's: said for every traced CPython, whatever the backend
PYMALLOC_NOTE = (
    "CPython's objects under 512 bytes come from pymalloc's arenas, not malloc: run the program with "
    "PYTHONMALLOC=malloc to see them (docs/python.md)"
)


def uses_pymalloc(pid: int) -> bool:
    """Whether a CPython process's small objects come from pymalloc: PYTHONMALLOC=malloc (or
    malloc_debug) in the environment it started with sends them to malloc."""
    try:
        with open(f"{procfs.proc_dir(pid)}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return True
    return not {b"PYTHONMALLOC=malloc", b"PYTHONMALLOC=malloc_debug"} & set(env)


def bpftrace_note(exe: str, name: str = "") -> str:
    """bpftrace's frame-pointer stacks cannot carry Python frames: said once for a CPython."""
    if not exe or not is_interpreter(exe):
        return ""
    return (
        f"the target runs CPython ({os.path.basename(name or exe)}): its stacks show the interpreter's native frames "
        f"only; Python frames (function (file.py:LINE)) need --backend bcc (docs/python.md). {PYMALLOC_NOTE}"
    )


def find(pid: int, mappings) -> Optional[Interpreter]:
    """The CPython in a process's mappings (Mapping objects), or None."""
    for m in mappings:
        file = m.path if m.file is None else m.file
        syms = symbols_of(file) if file else {}
        if not syms:
            continue
        # the load bias: where the mapping starts less the ELF address of its file offset
        vaddrs = [v + m.offset - o for v, o, size in syms["_load"] if o <= m.offset < o + max(size, 1)]
        if not vaddrs:
            continue
        bias = m.start - vaddrs[0]
        runtime = syms["_PyRuntime"][0] + bias
        version = _version(pid, syms, bias)
        if version is None:
            continue
        evals = tuple((s + bias, s + bias + n) for s, n in [syms.get(EVAL_FUNCTION, (0, 0))] if s)
        offsets = debug_offsets(pid, runtime, version) if version >= (3, 13) else TABLES.get(version)
        finalize = tuple(a for a in [syms.get("_finalize", (0, 0))[0]] if a)  # ELF addresses
        if finalize and finalize[0] == syms[FINALIZE_FUNCTION][0] and "Py_Exit" in syms:
            # no stub: Py_Exit may reach finalization by another way (a build's local copy)
            finalize += (syms["Py_Exit"][0],)
        return Interpreter(m.path, runtime, offsets, version, evals, _image(pid), file, finalize)
    return None


def _image(pid: int) -> int:
    """An identity of the process's current exec: its auxiliary vector holds the addresses of
    its new stack's random bytes and strings, different at each exec (the pid, the file and
    _PyRuntime's address may all stay the same: a held command's fork, then its exec)."""
    try:
        with open(f"{procfs.proc_dir(pid)}/auxv", "rb") as f:
            return hash(f.read())
    except OSError:
        return 0


def _version(pid: int, syms, bias: int) -> Optional[Tuple[int, int]]:
    """Py_Version (PY_VERSION_HEX, 3.11+) from the process's memory."""
    if "Py_Version" not in syms:
        return None
    raw = read(pid, syms["Py_Version"][0] + bias, 4)
    if raw is None:
        return None
    hexversion = struct.unpack("<I", raw)[0]
    return (hexversion >> 24, (hexversion >> 16) & 0xFF)


# --- naming frames ------------------------------------------------------------------------


@dataclass(frozen=True)
class PyFrame:
    function: str  # the code object's qualified name; "" when unreadable
    file: str
    line: int  # 0: no line (an unreadable table, or no location)
    why: str = ""  # why it is unnamed


VAR_SIZE = 16  # ob_size in a PyVarObject (after the reference count and the type)


@dataclass
class _Code:
    qualname: str
    filename: str
    firstlineno: int
    adaptive: int
    linetable: bytes
    units: int  # its bytecode's length in code units (Py_SIZE)


class Namer:
    """Names recorded frames, reading each code object once per process (a code object can be
    freed after its process exits, or reused: read while the process lives)."""

    def __init__(self):
        self._codes: Dict[Tuple[int, int, object], _Code] = {}
        self._interps: Dict[int, Interpreter] = {}
        self._pseudo: Dict[Tuple[int, int, int, int, int], int] = {}
        self._generation: Dict[int, int] = {}
        self.frames: List[Tuple[PyFrame, int]] = []  # by pseudo index: (frame, flags)
        self._lock = threading.Lock()

    def know(self, pid: int, interp: Interpreter) -> None:
        """The process's interpreter; a new one (an exec) starts its naming afresh."""
        with self._lock:
            if self._interps.get(pid) != interp:
                self._generation[pid] = self._generation.get(pid, 0) + 1
                self._codes = {k: c for k, c in self._codes.items() if k[0] != pid}
            self._interps[pid] = interp

    def interpreter(self, pid: int) -> Optional[Interpreter]:
        return self._interps.get(pid)

    def pseudos(self, pid: int, frames: Sequence[Tuple[int, int, int]]) -> Tuple[int, ...]:
        """The pseudo-addresses of a stack's recorded frames (code, lasti, flags), named now (the
        process may end soon). A freed code object's address is reused by later ones (an
        import's class bodies are freed once run): the object's own fields (its name, file and
        line table pointers, its first line) are part of its key, read afresh for each new stack,
        all of its frames' in one system call (under the lock: an exec meanwhile changes offsets)."""
        with self._lock:
            interp = self._interps.get(pid)
            offsets = interp.offsets if interp else None
            heads = read_many(pid, [code for code, _, _ in frames], offsets.code_adaptive) if offsets else []
            heads += [None] * (len(frames) - len(heads))
            return tuple(self._pseudo_of(pid, *frame, head or b"") for frame, head in zip(frames, heads))

    def pseudo(self, pid: int, code: int, lasti: int, flags: int) -> int:
        return self.pseudos(pid, [(code, lasti, flags)])[0]

    def _pseudo_of(self, pid: int, code: int, lasti: int, flags: int, head: bytes) -> int:
        """One frame's, with the lock held and its code object's header read (b"": unreadable)."""
        interp = self._interps.get(pid)
        offsets = interp.offsets if interp else None
        ident = _identity(head, offsets) if head and offsets else None
        key = (pid, self._generation.get(pid, 0), code, ident, lasti, flags)
        if key not in self._pseudo:
            self._pseudo[key] = PSEUDO_BASE + len(self.frames)
            self.frames.append((self._name(pid, code, head, ident, lasti), flags))
        elif not self.frames[self._pseudo[key] - PSEUDO_BASE][0].function:  # not read yet: again
            self.frames[self._pseudo[key] - PSEUDO_BASE] = (self._name(pid, code, head, ident, lasti), flags)
        return self._pseudo[key]

    def _name(self, pid: int, code: int, head: Optional[bytes], ident, lasti: int) -> PyFrame:
        interp = self._interps.get(pid)
        if interp is None or interp.offsets is None:
            return PyFrame("", "", 0, "no interpreter known for the process")
        c = self._codes.get((pid, code, ident)) or (_read_code(pid, head, interp.offsets) if head else None)
        if c is not None:
            self._codes[pid, code, ident] = c
        if c is None:
            return PyFrame("", "", 0, f"code object {code:#x} unreadable")
        units = (lasti - c.adaptive) // 2 if lasti >= 0 else -1
        if not -1 <= units <= c.units:
            # the instruction lies past this code's end: the frame's code object was freed and
            # its address is another's (read too late), not a frame of this one
            return PyFrame("", "", 0, f"code object {code:#x} freed before it was read (its address reused)")
        return PyFrame(c.qualname, c.filename, line_of(c.linetable, c.firstlineno, units))


def named(address: int, namer: Optional["Namer"]) -> Optional[Tuple[PyFrame, int]]:
    if namer is None or not (PSEUDO_BASE <= address < PSEUDO_END):
        return None
    index = address - PSEUDO_BASE
    return namer.frames[index] if index < len(namer.frames) else None


def is_pseudo(address: int) -> bool:
    return PSEUDO_BASE <= address < PSEUDO_END


def _identity(head: bytes, o: Offsets) -> Tuple[int, ...]:
    """What tells a code object from another at the same address: its name, file and line
    table objects and its first line."""
    return tuple(
        struct.unpack_from("<Q", head, at)[0] for at in (o.code_qualname, o.code_filename, o.code_linetable)
    ) + (struct.unpack_from("<i", head, o.code_firstlineno)[0],)


def _read_code(pid: int, head: bytes, o: Offsets) -> Optional[_Code]:
    """A code object's names and line table, from its header (read from the process)."""
    ptr = lambda off: struct.unpack_from("<Q", head, off)[0]
    qualname, filename = _read_str(pid, ptr(o.code_qualname), o), _read_str(pid, ptr(o.code_filename), o)
    table = _read_bytes(pid, ptr(o.code_linetable), o)
    if qualname is None or filename is None:
        return None
    firstlineno = struct.unpack_from("<i", head, o.code_firstlineno)[0]
    units = struct.unpack_from("<q", head, VAR_SIZE)[0]  # a code object is a PyVarObject
    return _Code(qualname, filename, firstlineno, o.code_adaptive, table or b"", units)


def _read_str(pid: int, address: int, o: Offsets, limit: int = 4096) -> Optional[str]:
    """A compact str object's text (names and paths are compact), or None."""
    head = read(pid, address, o.str_state + 4)
    if head is None:
        return None
    length = struct.unpack_from("<q", head, o.str_length)[0]
    state = struct.unpack_from("<I", head, o.str_state)[0]
    kind, compact, ascii_ = (state >> 2) & 7, (state >> 5) & 1, (state >> 6) & 1
    if not compact or kind not in (1, 2, 4) or not 0 <= length <= limit:
        return None
    data = read(pid, address + (o.str_ascii_size if ascii_ else o.str_compact_size), length * kind)
    if data is None:
        return None
    return data.decode({1: "latin-1", 2: "utf-16-le", 4: "utf-32-le"}[kind], errors="replace")


def _read_bytes(pid: int, address: int, o: Offsets, limit: int = 1 << 16) -> Optional[bytes]:
    head = read(pid, address, o.bytes_data)
    if head is None:
        return None
    size = struct.unpack_from("<q", head, o.bytes_size)[0]
    if not 0 <= size < limit:
        return None
    return read(pid, address + o.bytes_data, size) if size else b""


NAMER = Namer()  # the run's named frames (pseudo-addresses are unique in it)
