"""Which file each process had mapped where, kept even after the process exits.

Stacks are captured as raw addresses; to name them after the process is gone we need its
memory map from while it lived. The kernel reports every executable mmap, exec and fork as
perf side-band records (what `perf record` uses); we read those from a dummy software event
on each CPU, and fall back to /proc/PID/maps for processes that were mapped before we began.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
_libc = ctypes.CDLL(None, use_errno=True)

# perf_event_attr flag bits (include/uapi/linux/perf_event.h)
_MMAP, _COMM, _TASK, _WATERMARK, _MMAP2, _COMM_EXEC = 1 << 8, 1 << 9, 1 << 13, 1 << 14, 1 << 23, 1 << 24
_RECORD_MMAP, _RECORD_LOST, _RECORD_COMM, _RECORD_FORK, _RECORD_MMAP2 = 1, 2, 3, 7, 10
_MISC_COMM_EXEC = 1 << 13
_PAGES = 64  # data pages per CPU ring: 256 KiB holds thousands of mmap records between reads


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str


def _perf_attr() -> bytes:
    # type, size, config, sample_period, sample_type, read_format, flags, wakeup_events, bp_type,
    # then zeros up to PERF_ATTR_SIZE_VER5 (112 bytes)
    head = struct.pack("<IIQQQQQII", 1, 112, 9, 0, 0, 0,
                       _MMAP | _COMM | _TASK | _WATERMARK | _MMAP2 | _COMM_EXEC, 1, 0)
    return head + b"\0" * (112 - len(head))


def read_proc_maps(pid: int) -> List[Mapping]:
    result = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
                    continue
                lo, hi = parts[0].split("-")
                result.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), parts[5].rstrip("\n")))
    except OSError:
        pass
    return result


class _Ring:
    def __init__(self, cpu: int):
        attr = ctypes.create_string_buffer(_perf_attr())
        fd = _libc.syscall(_PERF_EVENT_OPEN, attr, -1, cpu, -1, 8)  # PERF_FLAG_FD_CLOEXEC
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"perf_event_open for mmap records: {os.strerror(err)}")
        self.fd = fd
        self.size = _PAGES * mmap.PAGESIZE
        self.buf = mmap.mmap(fd, (1 + _PAGES) * mmap.PAGESIZE)

    def records(self):
        head = struct.unpack_from("<Q", self.buf, 1024)[0]
        tail = struct.unpack_from("<Q", self.buf, 1032)[0]
        base = mmap.PAGESIZE
        while tail < head:
            pos = tail % self.size
            header = self._read(base, pos, 8)
            rtype, misc, size = struct.unpack("<IHH", header)
            if size < 8:
                break
            yield rtype, misc, self._read(base, pos + 8, size - 8)
            tail += size
        struct.pack_into("<Q", self.buf, 1032, tail)

    def _read(self, base: int, pos: int, n: int) -> bytes:
        pos %= self.size
        first = min(n, self.size - pos)
        data = self.buf[base + pos: base + pos + first]
        if first < n:
            data += self.buf[base: base + n - first]
        return data

    def close(self):
        self.buf.close()
        os.close(self.fd)


class MappingTracker:
    """Keeps every process's executable mappings, fed by the kernel as they change."""

    def __init__(self):
        self._maps: Dict[int, List[Mapping]] = {}
        self._lock = threading.Lock()
        self._rings: List[_Ring] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost = 0

    def start(self) -> "MappingTracker":
        for cpu in range(os.cpu_count() or 1):
            try:
                self._rings.append(_Ring(cpu))
            except OSError:
                if cpu == 0:
                    raise
        self._thread = threading.Thread(target=self._run, name="probedsl-mappings", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.drain()
        for ring in self._rings:
            ring.close()
        self._rings = []

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.drain()

    def drain(self) -> None:
        with self._lock:
            for ring in self._rings:
                for rtype, misc, body in ring.records():
                    self._apply(rtype, misc, body)

    def _apply(self, rtype: int, misc: int, body: bytes) -> None:
        if rtype in (_RECORD_MMAP, _RECORD_MMAP2):
            pid, _tid, addr, length, pgoff = struct.unpack_from("<IIQQQ", body)
            name_at = 32 if rtype == _RECORD_MMAP else 32 + 24 + 8
            path = body[name_at:].split(b"\0", 1)[0].decode(errors="replace")
            if path.startswith("/"):
                self._maps.setdefault(pid, []).append(Mapping(addr, addr + length, pgoff, path))
        elif rtype == _RECORD_COMM and misc & _MISC_COMM_EXEC:
            pid, tid = struct.unpack_from("<II", body)
            if pid == tid:
                self._maps[pid] = []           # exec: a fresh address space
        elif rtype == _RECORD_FORK:
            pid, ppid, _tid, _ptid = struct.unpack_from("<IIII", body)
            if pid != ppid and ppid in self._maps:
                self._maps[pid] = list(self._maps[ppid])
        elif rtype == _RECORD_LOST:
            self.lost += struct.unpack_from("<QQ", body)[1]

    def mappings(self, pid: int) -> List[Mapping]:
        """The process's mappings, newest last; read from /proc when we never saw them."""
        self.drain()
        with self._lock:
            known = self._maps.get(pid)
            if not known:
                known = read_proc_maps(pid)
                if known:
                    self._maps[pid] = known
            return list(known or [])

    def snapshot(self, pid: int) -> None:
        """Record a live process's current mappings (for processes older than the tracker)."""
        current = read_proc_maps(pid)
        with self._lock:
            if current:
                self._maps[pid] = self._maps.get(pid, []) + current


def find(mappings: List[Mapping], address: int) -> Optional[Mapping]:
    for m in reversed(mappings):     # newest first: a later mmap over the same range wins
        if m.start <= address < m.end:
            return m
    return None
