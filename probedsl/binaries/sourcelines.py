"""file:line (with inlined calls expanded) and C++ demangling, through GNU binutils.

Why binutils: addr2line reads every DWARF version, compressed sections, inlined subroutines,
all in C. One process per module per batch of addresses keeps thousands of frames fast;
results are cached per address. The first batch of a file the run probes may go to an
addr2line started while the backend started (warm), which has read the DWARF by then.

addr2line reads only what probedsl accepted: it is given a file that holds its own DWARF (the
module, or the debug file probedsl.binaries.debuginfo checked against its build id), never a stripped
one, because BFD would then follow the file's .gnu_debuglink or build-id path itself, with no
build id check, to a file probedsl refused. It runs in an empty private directory on a link to
the file, so nothing beside the file (a debuglink's NAME or .debug/NAME) can be found; a dwz
.gnu_debugaltlink (an absolute path) is followed only when that file carries the build id the
link names.
"""

from __future__ import annotations

import os
import re
import resource
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Dict, Iterable, List, Optional, Sequence, Tuple

from elftools.elf.elffile import ELFFile

from probedsl.process import procfs
from probedsl.trust import bounds
from probedsl.binaries.debuginfo import build_id_of
from probedsl.notices import note

# one addr2line run's bounds: a hostile debug file costs at most this, then has no lines
ADDR2LINE_SECONDS = 60
ADDR2LINE_OUTPUT = 64 << 20  # bytes of output
ADDR2LINE_MEMORY = 4 << 30  # bytes of address space
ADDR2LINE_OPTIONS = ("-a", "-i", "-f", "-C")
_LOCATION = re.compile(r"(.*):(\d+|\?)(?: \(discriminator \d+\))?")
_MANGLED = re.compile(r"_Z[\x21-\x7e]+")


@dataclass(frozen=True)
class SourceFrame:
    function: str  # "" when DWARF has no name
    file: str  # "" when unknown
    line: int  # 0 when unknown


class SourceLines:
    def __init__(self):
        self._addr2line = shutil.which("addr2line")
        self._cxxfilt = shutil.which("c++filt")
        self._cache: Dict[Tuple[str, int], Tuple[SourceFrame, ...]] = {}
        self._names: Dict[str, str] = {}
        self._readable: Dict[str, bool] = {}

    def lookup(self, module: str, vaddrs: Iterable[int]) -> Dict[int, Tuple[SourceFrame, ...]]:
        """vaddr -> frames innermost first (inlined callees, then the real function)."""
        wanted = sorted({a for a in vaddrs if (module, a) not in self._cache})
        if module not in self._readable and wanted:  # (a warm one was checked before it started)
            self._readable[module] = _is_warm(module) or _own_dwarf(module)
        if wanted and self._addr2line and self._readable[module]:
            for chunk in range(0, len(wanted), 4096):
                self._run(module, wanted[chunk : chunk + 4096])
        for a in wanted:
            self._cache.setdefault((module, a), ())
        return {a: self._cache[(module, a)] for a in vaddrs}

    def _run(self, module: str, addrs: List[int]) -> None:
        warm = _take_warm(module)
        if warm is not None and warm.proc.poll() is not None:  # ended before it was asked
            warm.close()
            warm = None
        # addr2line prints one name a line, and a name (from the file's DWARF) may hold a
        # newline: after every address a sentinel address nobody can guess (random, outside
        # any code) whose three output lines close that address's record
        sentinel = warm.sentinel if warm else _sentinel()
        closing = [f"{sentinel:#018x}", "??", "??:0"]
        asked = [text for a in addrs for text in (f"{a:#x}", closing[0])]
        if warm:
            out = warm.finish(asked)
        else:
            with tempfile.TemporaryDirectory(prefix="probedsl-lines-") as alone:
                os.symlink(os.path.abspath(module), os.path.join(alone, "m"))
                out = _bounded_run([self._addr2line, "-e", "m", *ADDR2LINE_OPTIONS, *asked], alone)
        if out is None:
            note(
                f"{module}: addr2line exceeded its bounds ({ADDR2LINE_SECONDS} s, "
                f"{ADDR2LINE_OUTPUT >> 20} MB): no file:line for its frames"
            )
            return
        lines = out.decode("utf-8", "surrogateescape").split("\n")
        pos = 0
        if warm:  # after the record of the address it was warmed with
            pos = next((i + 3 for i in range(len(lines)) if lines[i : i + 3] == closing), len(lines))
        for a in addrs:
            if pos >= len(lines) or lines[pos] != f"{a:#018x}":
                return  # not addr2line's framing: nothing from here on
            end = pos + 1
            while end < len(lines) and lines[end : end + 3] != closing:
                end += 1
            if end >= len(lines):
                return
            self._cache[(module, a)] = _frames(lines[pos + 1 : end])
            pos = end + 3

    def demangle(self, names: Sequence[str]) -> Dict[str, str]:
        # c++filt reads a name a line: only names that are one printable line go to it
        todo = sorted({n for n in names if _MANGLED.fullmatch(n) and n not in self._names})
        if todo and self._cxxfilt:
            try:
                out = subprocess.run(
                    [self._cxxfilt], input="\n".join(todo) + "\n", capture_output=True, text=True, timeout=30
                ).stdout.splitlines()
            except (OSError, subprocess.TimeoutExpired):
                out = []
            if len(out) == len(todo):
                self._names.update(zip(todo, out))
        return {n: self._names.get(n, n) for n in names}


def _frames(lines: List[str]) -> Tuple[SourceFrame, ...]:
    """One address's (function, file:line) pairs; none when they are not pairs (a name held
    a newline): its frame is then named from the symbol table alone."""
    if len(lines) % 2:
        return ()
    frames = []
    for fn, where in zip(lines[0::2], lines[1::2]):
        m = _LOCATION.fullmatch(where)
        if m is None:
            return ()
        file, line = m.group(1), m.group(2)
        frames.append(
            SourceFrame(
                "" if fn == "??" else fn,
                "" if file in ("??", "") else os.path.normpath(file),
                int(line) if line.isdigit() else 0,
            )
        )
    return tuple(f for f in frames if f.function or f.file)


def _own_dwarf(path: str) -> bool:
    """Whether addr2line may read path: it holds DWARF of its own (so BFD follows no debuglink
    or build-id path), and a .gnu_debugaltlink it has names a file that carries the build id
    the link gives (or one that does not exist: BFD then reads nothing)."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            own = any(
                s["sh_type"] != "SHT_NOBITS" and s["sh_size"] > 0
                for s in elf.iter_sections()
                if s.name in (".debug_info", ".zdebug_info") or s.name.startswith(".gnu.linkonce.wi.")
            )
            alt = elf.get_section_by_name(".gnu_debugaltlink")
            link = bounds.section_data(alt, f"{path} .gnu_debugaltlink") if own and alt is not None else b""
    except Exception:  # unreadable or damaged (pyelftools raises many kinds)
        return False
    if not link:
        return own
    name, _, ident = link.partition(b"\0")
    target = name.decode("utf-8", "surrogateescape")
    if not target.startswith("/") or not os.path.exists(target) or build_id_of(target) == ident.hex():
        return True  # relative: BFD looks in its empty directory
    note(f"{path}: its .gnu_debugaltlink {target} does not carry build id {ident.hex()}: no file:line for its frames")
    return False


def _sentinel() -> int:
    return secrets.randbits(62) | 1 << 62


def _bounded_run(argv: List[str], cwd: str) -> Optional[bytes]:
    """argv's output (b"" when it failed), or None when it went past the time, output or
    memory bound (the output goes to a file whose size the kernel limits)."""
    try:
        with tempfile.TemporaryFile() as out:
            proc = _bounded_start(argv, cwd, out, subprocess.DEVNULL)
            started = time.monotonic()
            procfs.await_end(proc.pid, ADDR2LINE_SECONDS)
            try:
                status = proc.wait(timeout=max(0.0, ADDR2LINE_SECONDS - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return None
            return _bounded_output(status, out)
    except OSError:
        return None


def _bounded_start(argv: List[str], cwd: str, out: IO[bytes], stdin) -> subprocess.Popen:
    # a session of its own: a Ctrl-C that ends the run is probedsl's alone (its report needs this)
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, stdin=stdin, cwd=cwd, start_new_session=True)
    limits = ((resource.RLIMIT_FSIZE, ADDR2LINE_OUTPUT), (resource.RLIMIT_AS, ADDR2LINE_MEMORY))
    try:  # CPU too: a warm one (below) waits the whole run before its time bound begins
        for limit, value in (*limits, (resource.RLIMIT_CPU, ADDR2LINE_SECONDS)):
            resource.prlimit(proc.pid, limit, (value, value))
    except (OSError, ValueError):
        pass  # it ended already
    return proc


def _bounded_output(status: int, out: IO[bytes]) -> Optional[bytes]:
    if status < 0:  # killed: past the output, memory or CPU bound
        return None
    if status > 0:  # not a file it reads: nothing to say
        return b""
    out.seek(0)
    return out.read()


class _Warm:
    """An addr2line that has read a module's DWARF for a first address and waits on its input
    for the report's: libc's debug file took 0.09 s to read, after the traced command ended."""

    def __init__(self, addr2line: str, module: str):
        self.sentinel = _sentinel()
        self.proc: Optional[subprocess.Popen] = None
        self.out = tempfile.TemporaryFile()
        self.alone = ""
        try:
            self.alone = tempfile.mkdtemp(prefix="probedsl-lines-")
            os.symlink(os.path.abspath(module), os.path.join(self.alone, "m"))
            self.proc = _bounded_start(
                [addr2line, "-e", "m", *ADDR2LINE_OPTIONS], self.alone, self.out, subprocess.PIPE
            )
            # an address in its code: addr2line reads the DWARF at the first that falls in a section
            self.proc.stdin.write(f"{_code_address(module):#x}\n{self.sentinel:#x}\n".encode())
            self.proc.stdin.flush()
        except BaseException:
            self.close()
            raise

    def finish(self, asked: List[str]) -> Optional[bytes]:
        """Its output once it has named `asked` too (None past a bound, as _bounded_run)."""
        try:
            self.proc.communicate("".join(f"{a}\n" for a in asked).encode(), timeout=ADDR2LINE_SECONDS)
            return _bounded_output(self.proc.returncode, self.out)
        except subprocess.TimeoutExpired:
            return None
        except OSError:
            return None
        finally:
            self.close()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.out.close()
        if self.alone:
            shutil.rmtree(self.alone, ignore_errors=True)


def _code_address(path: str) -> int:
    """Where path's .text starts (0 if it has none)."""
    with open(path, "rb") as f:
        text = ELFFile(f).get_section_by_name(".text")
        return text["sh_addr"] if text is not None else 0


# module (its real path) -> its warm addr2line, None while one starts; none after stop_warm()
_warm: Dict[str, Optional[_Warm]] = {}
_warm_lock = threading.Lock()
_stopped = False


def warm(module: str) -> None:
    """Start addr2line on module now (if it may read it), so that the report's lookups wait for
    none of its DWARF reading: a read-ahead thread's, while the backend starts."""
    addr2line, module = shutil.which("addr2line"), os.path.realpath(module)
    with _warm_lock:
        if _stopped or not addr2line or module in _warm:
            return
        _warm[module] = None
    started = None
    try:
        if _own_dwarf(module):
            started = _Warm(addr2line, module)
    except Exception:  # (pyelftools raises many kinds): looked up the usual way
        pass
    with _warm_lock:  # the report may have looked it up meanwhile, or the run ended
        kept = started is not None and not _stopped and module in _warm
        if kept:
            _warm[module] = started
        else:
            _warm.pop(module, None)
    if started is not None and not kept:
        started.close()


def _is_warm(module: str) -> bool:
    with _warm_lock:
        return _warm.get(os.path.realpath(module)) is not None


def _take_warm(module: str) -> Optional[_Warm]:
    with _warm_lock:
        return _warm.pop(os.path.realpath(module), None)


def stop_warm() -> None:
    """End the addr2lines no report asked, and start no more (the run's end)."""
    global _stopped
    with _warm_lock:
        _stopped = True
        left = [w for w in _warm.values() if w is not None]
        _warm.clear()
    for w in left:
        w.close()
