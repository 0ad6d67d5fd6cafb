"""Raw stack addresses -> frames (function+offset, module, file:line), user and kernel."""

from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from probedsl.binaries import elf
from probedsl.ir import stackformat
from probedsl.stacks import pyframes, stacktrust
from probedsl.process.mappings import MappingTracker, find
from probedsl.process.procfs import read_maps
from probedsl.binaries.sourcelines import SourceLines

# the kernel's uprobe page in a process: a pending uretprobe puts its start, the return
# trampoline, in place of its function's return address until the call returns
UPROBES = "[uprobes]"
TRAMPOLINE = "uretprobe trampoline: caller hidden by another tracer"
PYTHON = "[python]"  # the module of a Python frame (probedsl.stacks.pyframes)


@dataclass(frozen=True)
class Frame:
    address: int
    function: str  # "" when unknown
    offset: int
    module: str  # file path, "[kernel]", or "" when the address is in no known mapping
    file: str = ""  # source file, when DWARF says
    line: int = 0
    inlined: bool = False  # a call inlined into the frame below it (same address)
    vaddr: int = -1  # the address in the module's ELF view (objdump's, addr2line's); -1: unknown
    truncated: str = ""  # a marker ending a cut stack: why the frames past it are not shown
    build_id: str = ""  # the module's GNU build id (hex), as read when the frame was named

    @property
    def name(self) -> str:
        """Its name in stack formats (folded, speedscope, pprof, flame graphs): the function,
        else MODULE+0xVADDR (the same in every run, unlike an address), or the cut marker."""
        if self.function:
            return self.function
        if self.module and self.vaddr >= 0 and not self.truncated:
            return f"{os.path.basename(self.module)}+{self.vaddr:#x}"
        return str(self)

    def __str__(self) -> str:
        if self.truncated:
            return f"[truncated: {self.truncated}]"
        if self.module == PYTHON:
            return f"{self.function} ({self.file}:{self.line})" if self.function else f"[Python frame: {self.file}]"
        if self.module == UPROBES:
            return f"[{TRAMPOLINE}]"
        module = self.module if self.module.startswith("[") else f"[{os.path.basename(self.module)}]"
        where = f" {self.file}:{self.line}" if self.file and self.line else (f" {self.file}" if self.file else "")
        if self.inlined:
            return f"{self.function} (inlined) {module}{where}"
        if self.function:
            return f"{self.function}+{self.offset} {module}{where}"
        if self.module and self.vaddr >= 0:
            # no symbol's extent holds it: the module and the ELF address, never a guess
            return f"{os.path.basename(self.module)}+{self.vaddr:#x}{where}"
        if self.module:
            return f"{self.address:#x} [{module.strip('[]')}: unreadable]"
        return f"{self.address:#x} [no mapping]"

    def as_dict(self) -> dict:
        if self.truncated:
            return {
                "address": None,
                "function": None,
                "offset": 0,
                "module": self.module or None,
                "vaddr": None,
                "file": None,
                "line": None,
                "inlined": False,
                "truncated": self.truncated,
                "text": str(self),
            }
        return {
            "address": f"{self.address:#x}",
            "function": self.function or None,
            "offset": self.offset,
            "module": self.module or None,
            "vaddr": f"{self.vaddr:#x}" if self.vaddr >= 0 else None,
            "file": self.file or None,
            "line": self.line or None,
            "inlined": self.inlined,
            "text": str(self),
            **({"build_id": self.build_id} if self.build_id else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Frame":
        if d.get("truncated"):
            return cls(0, "", 0, d.get("module") or "", truncated=d["truncated"])
        return cls(
            int(d["address"], 16),
            d.get("function") or "",
            int(d.get("offset") or 0),
            d.get("module") or "",
            d.get("file") or "",
            int(d.get("line") or 0),
            bool(d.get("inlined")),
            int(d["vaddr"], 16) if d.get("vaddr") else -1,
            build_id=str(d.get("build_id") or ""),
        )


@functools.lru_cache(maxsize=1)
def _kallsyms() -> Tuple[List[int], List[str]]:
    addrs, names = [], []
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                a, kind, name = line.split()[:3]
                if kind in "tTwW" and int(a, 16):
                    addrs.append(int(a, 16))
                    names.append(name)
    except OSError:
        pass
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


def uprobe_trampoline(pid: int) -> Optional[int]:
    """The address of the kernel's uretprobe trampoline in a live process (where its [uprobes]
    page starts), or None: not mapped (no uprobe ever hit it) or the process is gone. BCC's
    unwinder recovers the return addresses its own uretprobes replaced (probedsl_unw_returns);
    another tracer's are known only to the kernel, so a stack ends there."""
    try:
        lines, _ = read_maps(pid)
        return next((int(line.split("-", 1)[0], 16) for line in lines if line.endswith(UPROBES)), None)
    except (OSError, ValueError):
        return None


def _module(mappings, address: int):
    """(mapping, file opened from here, its symbols) of a process address; Nones where unknown."""
    m = find(mappings, address)
    if m is None:
        return None, "", None
    file = m.path if m.file is None else m.file  # another root's file, opened from here
    # a chroot's file is ROOT/PATH here: its debug files may be under ROOT/usr/lib/debug
    root = file[: -len(m.path)] if file != m.path and file.endswith(m.path) else ""
    return m, file, elf.symbols(file, root) if file else None


class Symbolizer:
    """Names addresses: ELF symbols for function+offset, DWARF (via addr2line) for file:line
    and inlined calls. Everything is cached per (process, address) and per module."""

    def __init__(self, tracker: Optional[MappingTracker], source_lines: Optional[SourceLines] = None):
        self.tracker = tracker
        self.lines = source_lines or SourceLines()
        self._cache: Dict[Tuple[int, int, int], List[Frame]] = {}
        self._trust: Dict[Tuple[int, int, Tuple[int, ...]], Tuple[int, ...]] = {}
        self._trampolines: Dict[Tuple[int, int], Optional[int]] = {}  # (pid, generation)

    def user_stacks(self, stacks: Sequence[Tuple], leaf_returns: bool = True) -> List[List[Frame]]:
        """Symbolize many (pid, addresses) stacks at once: one addr2line run per module.

        Every frame but the leaf is a return address; so is the leaf when the stack was taken
        at a function's return (leaf_returns), but not when taken at a function's entry."""
        # stacks are (pid, addresses) or (pid, addresses, time_ns); an address means something
        # only in the address space (generation) the process had at that time
        keyed = []
        self.refresh()  # once per batch, not per stack
        located: Dict[Tuple[int, int, int], Tuple[Frame, int]] = {}  # (pid, generation, address)
        per_module: Dict[str, set] = {}
        for pid, addresses, *when in stacks:
            start, mappings = (
                self.tracker.generation(pid, when[0] if when else None, drain=False) if self.tracker else (0, [])
            )
            addresses = self._trusted(pid, start, mappings, tuple(addresses))
            keyed.append(((pid, start), addresses))
            for depth, address in enumerate(addresses):
                if address in stackformat.MARKERS or pyframes.is_pseudo(address):
                    continue
                key = (pid, start, address)
                if key in self._cache or key in located:
                    continue
                # a return address points after its call: look up the call itself
                is_return = depth > 0 or leaf_returns
                frame, vaddr, file = self._elf_frame(mappings, address, address - 1 if is_return else address)
                if not frame.module and address == self._trampoline(pid, start):
                    frame = Frame(address, "", 0, UPROBES)
                located[key] = (frame, vaddr, file)
                if vaddr is not None:
                    per_module.setdefault(file, set()).add(vaddr)
        sources = {m: self.lines.lookup(m, vaddrs) for m, vaddrs in per_module.items()}
        names = self.lines.demangle([f.function for f, _, _ in located.values() if f.function])
        for key, (frame, vaddr, file) in located.items():
            frame = replace(frame, function=names.get(frame.function, frame.function))
            expanded = [frame]
            src = sources.get(file, {}).get(vaddr, ()) if vaddr is not None else ()
            if src:
                # addr2line -i: innermost inlined callee first, the real function last
                *inlined, outer = src
                expanded = [
                    Frame(frame.address, s.function, 0, frame.module, s.file, s.line, True, build_id=frame.build_id)
                    for s in inlined
                ]
                # addr2line names an address without DWARF after the nearest symbol before
                # it: its name is taken only with a source location (from DWARF)
                expanded.append(
                    replace(
                        frame,
                        file=outer.file,
                        line=outer.line,
                        function=frame.function or (outer.function if outer.file else ""),
                    )
                )
            self._cache[key] = expanded
        return [self._frames(pid, start, addresses) for (pid, start), addresses in keyed]

    def _frames(self, pid: int, start: int, addresses: Tuple[int, ...]) -> List[Frame]:
        frames: List[Frame] = []
        python = [a for a in addresses if pyframes.is_pseudo(a)]
        for a in addresses:
            if a == stackformat.COMPLETE or pyframes.is_pseudo(a):
                continue
            if a in stackformat.MARKERS:
                module = os.path.basename(frames[-1].module) if frames else ""
                frames.append(
                    Frame(a, "", 0, frames[-1].module if frames else "", truncated=stacktrust.reason(a, module))
                )
            else:
                frames.extend(self._cache[(pid, start, a)])
        return self._with_python(pid, frames, python) if python else frames

    keep_interpreter = False  # keep the interpreter's native frames that Python frames explain

    def _with_python(self, pid: int, native: List[Frame], python: List[int]) -> List[Frame]:
        """Python frames where the interpreter's evaluation function sits in the native stack,
        one run of them (the frames one call of it ran) per such frame, innermost first; the
        interpreter's frames among them folded away. Runs left over (the native walk stopped
        before reaching the interpreter) follow the native frames."""
        runs: List[List[Frame]] = [[]]
        for a in python:
            named = pyframes.named(a, pyframes.NAMER)
            frame, flags = named if named else (pyframes.PyFrame("", "", 0, "not recorded"), 0)
            runs[-1].append(
                Frame(a, frame.function, 0, PYTHON, frame.file if frame.function else frame.why, frame.line)
            )
            if flags & pyframes.RUN_END:
                runs.append([])
        runs = [r for r in runs if r]
        interp = pyframes.NAMER.interpreter(pid)
        out: List[Frame] = []
        anchored = False
        for f in native:
            if f.truncated:
                break
            if f.function.startswith(pyframes.EVAL_FUNCTION) and runs:
                out.extend(runs.pop(0))
                anchored = True
                if not self.keep_interpreter:
                    continue
            elif anchored and not self.keep_interpreter and interp and f.module == interp.path:
                continue
            out.append(f)
        for run in runs:
            out.extend(run)
        return out + [f for f in native if f.truncated]

    def _trampoline(self, pid: int, start: int) -> Optional[int]:
        if (pid, start) not in self._trampolines:
            self._trampolines[pid, start] = uprobe_trampoline(pid)
        return self._trampolines[pid, start]

    def refresh(self) -> None:
        """Take in the mappings told since the last call: once before a report's stacks."""
        if self.tracker:
            self.tracker.drain()

    def trusted(self, pid: int, addresses: Sequence[int], when: Optional[int] = None) -> Tuple[int, ...]:
        """The certain part of a frame-pointer stack, ending in a marker when cut (stacktrust):
        the stack that reports group by. Mappings as of the last refresh()."""
        start, mappings = self.tracker.generation(pid, when, drain=False) if self.tracker else (0, [])
        return self._trusted(pid, start, mappings, tuple(addresses))

    def _trusted(self, pid: int, start: int, mappings, addresses: Tuple[int, ...]) -> Tuple[int, ...]:
        if not addresses:
            return addresses
        python = tuple(a for a in addresses if pyframes.is_pseudo(a))
        if python:  # the native part's, with the Python frames before its end marker
            cut = self._trusted(pid, start, mappings, tuple(a for a in addresses if not pyframes.is_pseudo(a)))
            return cut[:-1] + python + cut[-1:] if cut and cut[-1] in stackformat.MARKERS else cut + python
        key = (pid, start, addresses)
        if key in self._trust:
            return self._trust[key]
        cut = stacktrust.trusted(addresses, lambda a: self._elf_address(mappings, a))
        if cut[-1] != stackformat.NO_UNWIND_INFO:  # (a mapping may be told later)
            self._trust[key] = cut
        return cut

    def _elf_address(self, mappings, address: int) -> Optional[Tuple[str, int]]:
        """(file opened from here, address in its ELF view) of a process address."""
        m, file, syms = _module(mappings, address)
        if syms is None:
            return None
        return file, syms.file_offset_to_vaddr(address - m.start + m.offset)

    def user_stack(self, pid: int, addresses: Sequence[int], leaf_returns: bool = True) -> List[Frame]:
        return self.user_stacks([(pid, addresses)], leaf_returns)[0]

    def _elf_frame(self, mappings, address: int, lookup: int) -> Tuple[Frame, Optional[int], str]:
        """(frame, address in the file's ELF view or None, the file opened for it)."""
        m, file, syms = _module(mappings, lookup)
        if m is None:
            return Frame(address, "", 0, ""), None, ""
        if syms is None:
            return Frame(address, "", 0, m.path), None, file
        vaddr = syms.file_offset_to_vaddr(lookup - m.start + m.offset)
        shown = vaddr + (address - lookup)
        hit = syms.function_at(vaddr)
        if hit is None:
            return Frame(address, "", 0, m.path, vaddr=shown, build_id=syms.build_id), vaddr, syms.dwarf_file
        name, offset = hit
        return (
            Frame(address, name, offset + (address - lookup), m.path, vaddr=shown, build_id=syms.build_id),
            vaddr,
            syms.dwarf_file,
        )

    def kernel_stack(self, addresses: Sequence[int]) -> List[Frame]:
        addrs, names = _kallsyms()
        frames = []
        for address in addresses:
            i = bisect.bisect_right(addrs, address) - 1
            if i >= 0:
                frames.append(Frame(address, names[i], address - addrs[i], "[kernel]"))
            else:
                frames.append(Frame(address, "", 0, "[kernel]"))
        return frames
