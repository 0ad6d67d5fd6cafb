"""The kernel's copy of the call-frame rows that BCC's stack unwinder walks (--stacks dwarf).

Three maps, written here and read by the BPF program (backends/templates/bcc_unwinder.c.j2):
- probedsl_unw_rows: every loaded file's rows, one file's contiguous and ordered by address;
- probedsl_unw_maps: per process, its executable mappings ordered by start, each with the
  file's rows (first, count) and the bias from a process address to the file's ELF address;
- probedsl_unw_chunks: per process and 256 KB chunk of its address space, the mappings in it.
Files are loaded once (by identity), shared by every process mapping them, as the mapping tracker
(probedsl.process.mappings) reports maps, execs and forks; rows are kept on disk by build id.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import os
import struct
import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probedsl.trust import cachedir
from probedsl.binaries import cfi, debuginfo, elf
from probedsl import faults, notices, threads
from probedsl.errors import ProbedslError
from probedsl.process.mappings import Mapping, read_proc_maps
from probedsl.ir.stackformat import (
    CFA_RBP,
    CFA_RSP,
    CHUNK_SHIFT,
    INVALID,
    MAX_MAPS,
    OUTERMOST,
    PER_CHUNK,
    PLT,
    RBP_AT_CFA,
    RBP_SAME,
    ROW_KINDS,
    ROWS,
    SIGNAL,
)


# a row on disk: pc u32, kind u8, rbp kind u8, rbp offset s16, cfa offset s32; the name of
# the file says which encoding, so a change of it never reads old files
_DISK_ROW = struct.Struct("<IBBhi")
# the kernel table's row (struct probedsl_unw_row_t: pc, kind, rbp_kind, rbp_off, cfa_off, pad)
_KERNEL_ROW = struct.Struct("<IBBhiI")
_KERNEL_ROW_OFFSETS = (0, 4, 5, 6, 8)
_DISK_FORMAT = 3


def cache_dir() -> str:
    """$XDG_CACHE_HOME/probedsl/unwind-rows (~/.cache/... without it) when it may be trusted
    (probedsl.trust.cachedir), else a private one; "" for none (rows computed, not cached)."""
    return cachedir.directory("unwind-rows")


# path -> (its identity then, its rows being found): read_ahead's, until rows_of takes them
_ahead: Dict[str, Tuple[Tuple[int, ...], concurrent.futures.Future]] = {}
_ahead_lock = threading.Lock()


def _identity(path: str) -> Tuple[int, ...]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_ahead(paths: Iterable[str]) -> None:
    """The files' rows found on a thread of their own while the backend compiles (the main
    thread only waits then): decoding python3's and libc's took 0.65 s after a first compile,
    reading them from the disk cache 0.05 s after a later one."""
    found: Dict[str, concurrent.futures.Future] = {}
    with _ahead_lock:
        for path in dict.fromkeys(paths):
            try:
                identity = _identity(path)
            except OSError:
                continue
            if path not in _ahead:
                found[path] = concurrent.futures.Future()
                _ahead[path] = identity, found[path]

    def find():
        try:
            for path, future in found.items():
                try:
                    future.set_result(_rows_of(path))
                except Exception as exc:  # raised again to rows_of's caller
                    future.set_exception(exc)
                elf.symbols(path)  # (cached) its segments place the rows
            for path in found:  # the report's frame names, once no attach waits for rows
                elf.read_ahead(path)
        finally:  # those not found (it ended early, or never began): rows_of finds them itself
            for future in found.values():
                future.cancel()

    if found:
        try:
            threads.start("probedsl-rows-ahead", find)
        except RuntimeError:  # no thread to spare
            for future in found.values():
                future.cancel()


def rows_of(path: str) -> List[Tuple[int, int, int, int, int]]:
    """The file's rows: read ahead (probedsl.stacks.unwind_tables.read_ahead), else from the
    disk cache by build id, else decoded (and then cached)."""
    with _ahead_lock:
        identity, future = _ahead.pop(path, (None, None))
    try:
        if future is not None and identity == _identity(path):  # (not replaced meanwhile)
            return future.result()
    except (OSError, concurrent.futures.CancelledError):
        pass
    return _rows_of(path)


def _rows_of(path: str) -> List[Tuple[int, int, int, int, int]]:
    try:
        with open(path, "rb") as f:
            ident = debuginfo.build_id(ELFFile(f))
    except (OSError, ELFError):
        return []
    except Exception:  # pyelftools on a damaged file: no rows from it
        return []
    name, limit = f"{ident}.v{_DISK_FORMAT}", ROWS * _DISK_ROW.size + 1
    where = cache_dir() if ident else ""
    cached = os.path.join(where, name) if where else ""
    source, data = cached, cachedir.read_trusted(where, cached, limit) if cached and os.path.lexists(cached) else None
    if data is None and ident:  # none of the user's: what the install decoded (probedsl.run.prebuilt)
        source = cachedir.shipped_path("unwind-rows", name)
        data = cachedir.shipped_file("unwind-rows", name, limit)
    rows = _read_rows(source, data) if data is not None else []
    if rows:
        return rows
    table = cfi.table(path)
    rows = encode(table) if table else []
    if not all(0 <= row[0] < 1 << 32 for row in rows):  # (a damaged file's): the kernel rows hold a u32
        return []
    if cached and rows:
        _save(cached, rows)
    return rows


def _read_rows(cached: str, data: bytes) -> List[Tuple[int, int, int, int, int]]:
    """A cache file's rows if they have the shape encode() gives (whole rows, a sane count,
    pcs in order, known kinds, ending where code ends); else [] and a note."""
    why = ""
    if not data or len(data) % _DISK_ROW.size or len(data) > ROWS * _DISK_ROW.size:
        why = f"{len(data)} bytes is not a whole number of rows up to {ROWS}"
    rows = (
        []
        if why
        else [
            (pc, kind, cfa_off, rbp_kind, rbp_off)
            for pc, kind, rbp_kind, rbp_off, cfa_off in _DISK_ROW.iter_unpack(data)
        ]
    )
    last = -1
    for pc, kind, _cfa_off, rbp_kind, _rbp_off in rows:
        if pc <= last or kind not in ROW_KINDS or rbp_kind not in (RBP_SAME, RBP_AT_CFA):
            why = f"row at {pc:#x} out of order or of an unknown kind"
            break
        last = pc
    if not why and rows[-1][1] != INVALID:
        why = "the last row does not end the code"
    if why:
        notices.note(f"unwind-row cache {cached} discarded: {why}")
        return []
    return rows


def _save(cached: str, rows) -> None:
    try:
        data = b"".join(
            _DISK_ROW.pack(pc, kind, rbp_kind, rbp_off, cfa_off) for pc, kind, cfa_off, rbp_kind, rbp_off in rows
        )
    except struct.error:  # a row no cache file can hold: computed again next time
        return
    if not cachedir.write_whole(cached, data):  # it only costs the next run time
        notices.note(f"unwind-row cache {os.path.dirname(cached)} is not writable: rows computed, not cached")


def encode(table: cfi.Table) -> List[Tuple[int, int, int, int, int]]:
    """(pc, kind, cfa offset, rbp kind, rbp offset) rows of a file, ordered, with a row of
    kind INVALID where no FDE covers the code and consecutive equal rules merged."""
    out: List[Tuple[int, int, int, int, int]] = []

    def add(pc, kind, cfa_off=0, rbp_kind=RBP_SAME, rbp_off=0):
        rule = (kind, cfa_off, rbp_kind, rbp_off)
        if out and out[-1][0] == pc:
            out[-1] = (pc, *rule)
        elif not out or out[-1][1:] != rule:
            out.append((pc, *rule))

    for _start, end, rows in table.fdes:
        for row in rows:
            add(row.address, *_rule(row))
        add(end, INVALID)
    return out


def _still_mapped(pid: int, entries) -> bool:
    """Whether the process still has these mappings (it has not exec'd since they were told)."""
    starts = {m.start for m in read_proc_maps(pid)}
    return bool(starts) and all(start in starts for start, *_rest in entries)


def _rule(row: cfi.Row) -> Tuple[int, int, int, int]:
    if row.signal:
        return SIGNAL, 0, RBP_SAME, 0
    if row.outermost:
        return OUTERMOST, 0, RBP_SAME, 0
    if not -(1 << 31) <= row.cfa_offset < 1 << 31:  # an s32 in the kernel row (a damaged file's ULEB)
        return INVALID, 0, RBP_SAME, 0
    if row.cfa_register == cfi.PLT:  # cfa offset: the (rip & 15) from which CFA = rsp+16
        return PLT, row.cfa_offset, RBP_SAME, 0
    if row.ra != ("offset", -8) or row.cfa_register not in (cfi.RSP, cfi.RBP):
        return INVALID, 0, RBP_SAME, 0
    kind = CFA_RSP if row.cfa_register == cfi.RSP else CFA_RBP
    if row.rbp is None:
        return kind, row.cfa_offset, RBP_SAME, 0
    if row.rbp[0] == "offset" and -(1 << 15) <= row.rbp[1] < 1 << 15:  # an s16 in the kernel row
        return kind, row.cfa_offset, RBP_AT_CFA, row.rbp[1]
    return INVALID, 0, RBP_SAME, 0  # rbp kept elsewhere: the frames above cannot use it


class _Closed(Exception):
    """The tables were closed: the write is skipped."""


class UnwindTables:
    def __init__(self, bpf):
        self.bpf = bpf
        self.rows = bpf["probedsl_unw_rows"]
        self.maps = bpf["probedsl_unw_maps"]
        self.chunks = bpf["probedsl_unw_chunks"]
        self.chunks_of: Dict[int, set] = {}  # pid -> its chunk keys written
        self.used = 0  # rows written so far
        self.files: Dict[Tuple[int, int], Optional[Tuple[int, int]]] = {}  # identity -> (first, count)
        self.full = 0  # files left out: the row table was full
        self._lock = threading.Lock()
        self._raised = False
        self.following = False  # told of mappings as they change (the run is tracing)
        # held around every write to the kernel maps; once closed, writes are skipped: the
        # maps may be gone (the run is ending), and a listener may still be running
        self._writing = threading.Lock()
        self.closed = False
        self.errors: List[str] = []  # processes whose entry could not be written

    def close(self) -> None:
        """No write to the maps after this returns (one in progress finishes first)."""
        with self._writing:
            self.closed = True

    @contextlib.contextmanager
    def _maps_open(self):
        with self._writing:
            if self.closed:
                raise _Closed
            yield

    def preload(self, paths: Iterable[str]) -> None:
        """Load files a command is about to map (before it runs)."""
        try:
            for path in paths:
                self._file(path)
        except _Closed:
            pass

    def _file(self, path: str) -> Optional[Tuple[int, int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        identity = (st.st_dev, st.st_ino)
        if identity in self.files:
            return self.files[identity]
        rows = rows_of(path)
        placed = None
        if rows:
            if self.used + len(rows) > ROWS:
                self.full += 1
            else:
                self._write(self.used, rows)
                placed = (self.used, len(rows))
                self.used += len(rows)
        self.files[identity] = placed
        return placed

    def _write(self, first: int, rows) -> None:
        with self._maps_open():
            self._write_rows(first, rows)

    def _write_rows(self, first: int, rows) -> None:
        leaf, key = self.rows.Leaf, self.rows.Key
        keys = (key * len(rows))(*range(first, first + len(rows)))
        # packed whole (3x faster than ctypes field by field), so the layouts must agree
        layout = tuple(getattr(leaf, f).offset for f in ("pc", "kind", "rbp_kind", "rbp_off", "cfa_off"))
        if layout != _KERNEL_ROW_OFFSETS or ctypes.sizeof(leaf) != _KERNEL_ROW.size:
            raise ProbedslError(f"the unwinder's row table has another layout than probedsl packs: {layout}")
        data = b"".join([_KERNEL_ROW.pack(pc, k, rk, ro, co, 0) for pc, k, co, rk, ro in rows])
        values = (leaf * len(rows)).from_buffer_copy(data)
        try:
            self.rows.items_update_batch(keys, values)
        except Exception:  # BCC raises bare Exception; older kernels lack batches
            for k, v in zip(keys, values):
                self.rows[k] = v

    def process(self, pid: int, mappings: List[Mapping]) -> None:
        """(Re)write the pid's entry from its current executable mappings."""
        if faults.on("listener-raises") and self.following and not self._raised:
            self._raised = True
            raise RuntimeError("injected listener fault")
        if faults.on("slow-listener") and threading.current_thread() is not threading.main_thread():
            time.sleep(0.2)
        if self.closed:
            return
        try:
            with self._lock:
                self._process(pid, mappings)
        except _Closed:
            pass
        except Exception as exc:  # BCC raises bare Exception: this process's stacks fall back
            self.errors.append(f"pid {pid}: {exc}")

    def _process(self, pid: int, mappings: List[Mapping]) -> None:
        entries = []
        for m in sorted(mappings, key=lambda m: m.start)[-MAX_MAPS:]:
            file = m.path if m.file is None else m.file
            placed = self._file(file) if file else None
            syms = elf.symbols(file) if placed else None
            if placed is None or syms is None:
                continue
            bias = m.start - syms.file_offset_to_vaddr(m.offset)  # process address - ELF address
            entries.append((m.start, m.end, bias & 0xFFFFFFFFFFFFFFFF, *placed))
        with self._maps_open():
            if not entries or not _still_mapped(pid, entries):
                # nothing to unwind with, or the process has exec'd since (the BPF program
                # dropped its entry then): frame-pointer walks until its new mappings come
                self._forget(pid)
                return
            self._store(pid, entries)

    def _store(self, pid: int, entries) -> None:
        value = self.maps.Leaf()
        value.n = len(entries)
        for slot, (start, end, bias, first, count) in zip(value.m, entries):
            slot.start, slot.end, slot.bias, slot.first, slot.count = start, end, bias, first, count
        chunks: Dict[int, List[int]] = {}
        for slot, (start, end, *_rest) in enumerate(entries, 1):
            for chunk in range(start >> CHUNK_SHIFT, ((end - 1) >> CHUNK_SHIFT) + 1):
                chunks.setdefault(chunk, []).append(slot)
        for chunk, slots in chunks.items():
            leaf = self.chunks.Leaf()
            for i, slot in enumerate(slots[-PER_CHUNK:]):
                leaf.slot[i] = slot
            self.chunks[self.chunks.Key(pid, 0, chunk)] = leaf
        self._drop_chunks(pid, self.chunks_of.get(pid, set()) - set(chunks))
        self.chunks_of[pid] = set(chunks)
        self.maps[self.maps.Key(pid)] = value

    def _forget(self, pid: int) -> None:
        try:
            del self.maps[self.maps.Key(pid)]
        except KeyError:
            pass
        self._drop_chunks(pid, self.chunks_of.pop(pid, set()))

    def _drop_chunks(self, pid: int, chunks) -> None:
        for chunk in chunks:
            try:
                del self.chunks[self.chunks.Key(pid, 0, chunk)]
            except KeyError:
                pass

    def notes(self) -> List[str]:
        if not self.errors:
            return []
        return [
            f"the unwind tables of {len(self.errors)} process entries could not be written (first: "
            f"{self.errors[0]}): their stacks were walked by frame pointers"
        ]

    def memory(self) -> int:
        """The rows, mappings and chunk tables, the kept return addresses, and the table of
        unwound stacks."""
        tables = [self.bpf["probedsl_ustacks"], self.chunks, self.maps]
        try:
            tables.append(self.bpf["probedsl_unw_returns"])
        except KeyError:  # only where a stack can pass a pending uretprobe
            pass
        return ROWS * ctypes.sizeof(self.rows.Leaf) + sum(
            t.max_entries * (ctypes.sizeof(t.Key) + ctypes.sizeof(t.Leaf)) for t in tables
        )
