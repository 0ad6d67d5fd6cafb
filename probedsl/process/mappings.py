"""Which file each process had mapped where, kept even after the process exits.

Stacks are captured as raw addresses; to name them after the process is gone we need its
memory map from while it lived. The kernel reports every executable mmap, exec and fork as
perf side-band records (what `perf record` uses); we read those from a dummy software event
on each CPU, and fall back to /proc/PID/maps for processes that were mapped before we began.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

from probedsl.process import procfs
from probedsl.process.procfs import process_alive
from probedsl.process import roots
from probedsl import threads
from probedsl.process.roots import RootedFiles

_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(os.uname().machine, 298)
_libc = ctypes.CDLL(None, use_errno=True)

# perf_event_attr flag bits (include/uapi/linux/perf_event.h)
_MMAP, _COMM, _TASK, _WATERMARK, _MMAP2, _COMM_EXEC = 1 << 8, 1 << 9, 1 << 13, 1 << 14, 1 << 23, 1 << 24
_SAMPLE_ID_ALL, _USE_CLOCKID, _SAMPLE_TIME, _CLOCK_MONOTONIC = 1 << 18, 1 << 25, 1 << 2, 1
_RECORD_MMAP, _RECORD_LOST, _RECORD_COMM, _RECORD_FORK, _RECORD_MMAP2 = 1, 2, 3, 7, 10
_MISC_COMM_EXEC = 1 << 13
_PAGES = 64  # data pages per CPU ring: 256 KiB holds thousands of mmap records between reads


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    offset: int
    path: str  # as the process names it (inside its root)
    time: int = 0  # CLOCK_MONOTONIC ns of the mmap (0: read from /proc)
    file: Optional[str] = None  # where probedsl opens it ("": nowhere); None: the same as path


def _perf_attr() -> bytes:
    # type, size, config, sample_period, sample_type, read_format, flags, wakeup_events, bp_type,
    # config1, config2, branch_sample_type, sample_regs_user, sample_stack_user, clockid, then
    # zeros up to PERF_ATTR_SIZE_VER5 (112 bytes). Every record ends with its CLOCK_MONOTONIC
    # time (sample_id_all + TIME), the clock of bpf_ktime_get_ns, so records and live
    # resources can be ordered.
    flags = _MMAP | _COMM | _TASK | _WATERMARK | _MMAP2 | _COMM_EXEC | _SAMPLE_ID_ALL | _USE_CLOCKID
    head = struct.pack("<IIQQQQQIIQQQQIi", 1, 112, 9, 0, _SAMPLE_TIME, 0, flags, 1, 0, 0, 0, 0, 0, 0, _CLOCK_MONOTONIC)
    return head + b"\0" * (112 - len(head))


def _time(body: bytes) -> int:
    """The record's CLOCK_MONOTONIC time: its trailing sample_id (sample_id_all + TIME)."""
    return struct.unpack_from("<Q", body, len(body) - 8)[0] if len(body) >= 8 else 0


def read_proc_maps(pid: int) -> List[Mapping]:
    result: List[Mapping] = []
    try:
        lines, _ = procfs.read_maps(pid)  # bounded: the process sets its length
    except OSError:
        return result
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or "x" not in parts[1] or not parts[5].startswith("/"):
            continue
        try:
            lo, hi = parts[0].split("-")
            result.append(Mapping(int(lo, 16), int(hi, 16), int(parts[2], 16), parts[5]))
        except ValueError:
            continue
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
        data = self.buf[base + pos : base + pos + first]
        if first < n:
            data += self.buf[base : base + n - first]
        return data

    def close(self):
        self.buf.close()
        os.close(self.fd)


class MappingTracker:
    """Keeps every process's executable mappings, fed by the kernel as they change.

    A pid has generations of mappings: a new one at exec (a fresh address space) and at fork
    (a copy of the parent's), each starting at a CLOCK_MONOTONIC time; an address captured at
    time T is read in the generation that was current at T, so a process that exec'd, or a
    pid reused by another process, does not confuse stacks taken before."""

    def __init__(self):
        self._gens: Dict[int, List[Tuple[int, List[Mapping]]]] = {}
        self._lock = threading.Lock()
        self._rings: List[_Ring] = []
        self._stop = threading.Event()
        self._wake: Tuple[int, ...] = ()  # stop_thread's byte ends the thread's poll at once, not 20 ms later
        self._thread: Optional[threading.Thread] = None
        self._joined = True
        self.family: Set[int] = set()  # followed processes and all they forked (follow)
        self.lost = 0
        self.files = RootedFiles()
        # told (pid, its current mappings) whenever a process's mappings change
        self._listeners: List[Callable[[int, List[Mapping]], None]] = []
        # called by the thread after each drain, given drain (probedsl.process.mapping_hold)
        self._turns: List[Callable[[Callable[[], None]], None]] = []

    def listen(self, listener: Callable[[int, List[Mapping]], None]) -> None:
        """Call listener(pid, mappings) for every process known now, then at every change
        (a listener that wants only some processes filters them itself: it is called for
        every process on the machine)."""
        with self._lock:
            self._listeners.append(listener)
            known = [(pid, list(gens[-1][1])) for pid, gens in self._gens.items() if gens and gens[-1][1]]
        for pid, maps in known:
            self._call(listener, pid, maps)

    def unlisten(self, listener: Callable[[int, List[Mapping]], None]) -> None:
        """No call to listener starts after this returns (one already running may finish)."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def on_turn(self, hook: Callable[[Callable[[], None]], None]) -> None:
        """Call hook(drain) from the thread at each turn (a poll of the rings, 20 ms at most)."""
        self._turns.append(hook)

    def off_turn(self, hook) -> None:
        if hook in self._turns:
            self._turns.remove(hook)

    def _tell(self, pids) -> None:
        if not self._listeners:
            return
        with self._lock:
            changed = [(pid, list(self._current(pid))) for pid in pids]
        for pid, maps in changed:
            for listener in list(self._listeners):
                # asked each time: the run may end while a long batch is being told
                if listener in self._listeners:
                    self._call(listener, pid, maps)

    @staticmethod
    def _call(listener, pid: int, maps: List[Mapping]) -> None:
        """A listener's failure is the run's note (probedsl.threads), not the tracker's end."""
        try:
            listener(pid, maps)
        except Exception as exc:  # BCC raises bare Exception
            threads.failed("the mapping listener (unwind tables)", exc)

    def _rooted(self, pid: int, maps: List[Mapping], identity=None) -> List[Mapping]:
        """Mappings with the path the process names each file by (inside its root) and the
        file probedsl opens for it (its root may be another: a chroot, a container)."""
        out = []
        for m in maps:
            file = self.files.path(pid, m.path, identity)
            out.append(m if file == m.path else Mapping(m.start, m.end, m.offset, m.path, m.time, file))
        return out

    def _from_proc(self, pid: int) -> List[Mapping]:
        """A live process's mappings from /proc, named as in its own root."""
        out = []
        for m in read_proc_maps(pid):
            inside = Mapping(m.start, m.end, m.offset, roots.inside(pid, m.path))
            out += self._rooted(pid, [inside], roots.mapped_identity(pid, m.start, m.end))
        return out

    def start(self) -> "MappingTracker":
        for cpu in range(os.cpu_count() or 1):
            try:
                self._rings.append(_Ring(cpu))
            except OSError:
                if cpu == 0:
                    raise
        self._wake = os.pipe()
        self._thread = threads.start("probedsl-mappings", self._run)
        return self

    def stop_thread(self, bound_s: float = 5.0) -> None:
        """End the thread that drains the rings (and tells listeners); the rings stay, so
        drain() from the caller's thread still reads what the kernel says until close().
        Called once the listeners are detached: a thread still inside one (decoding a large
        file's call-frame rows) has nothing left to change, so not ending in time is no failure."""
        self._stop.set()
        if self._wake:
            os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._joined = threads.join(self._thread, bound_s, harmless=not self._listeners)
            self._thread = None

    def close(self) -> None:
        """Stop the thread, read what is left, close the rings; safe to call twice."""
        self.stop_thread()
        if not self._joined:
            return  # it may still read the rings: they go with the process
        self.drain()
        for ring in self._rings:
            ring.close()
        self._rings = []
        self.files.close()
        for fd in self._wake:
            os.close(fd)
        self._wake = ()

    def _run(self) -> None:
        # woken by the first byte of a record (wakeup watermark 1): a process's new mappings
        # reach listeners (BCC's unwinder) within about a millisecond, not the next poll turn
        poller = select.poll()
        for ring in self._rings:
            poller.register(ring.fd, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        while not self._stop.is_set():
            poller.poll(20)
            self.drain()
            for hook in list(self._turns):
                try:
                    hook(self.drain)
                except Exception as exc:  # BCC raises bare Exception
                    threads.failed("the mapping hold", exc)

    def drain(self) -> None:
        with self._lock:
            # each CPU has its own ring: a process that moved CPUs during exec can have its
            # mmaps in one ring and its exec in another, so apply a batch in time order
            batch = [rec for ring in self._rings for rec in ring.records()]
            batch.sort(key=lambda rec: _time(rec[2]))
            touched = {self._apply(rtype, misc, body) for rtype, misc, body in batch}
        touched.discard(None)
        self._tell(touched)

    def _current(self, pid: int) -> List[Mapping]:
        gens = self._gens.setdefault(pid, [(0, [])])
        return gens[-1][1]

    def _at(self, pid: int, time_ns: int) -> List[Mapping]:
        gens = self._gens.setdefault(pid, [(0, [])])
        return max((g for g in gens if g[0] <= time_ns), key=lambda g: g[0], default=gens[0])[1]

    def _new_generation(self, pid: int, time_ns: int, inherited: List[Mapping]) -> None:
        """Start an address space at time_ns; mmaps already filed under the one before it but
        stamped later (they arrived in an earlier batch) move into it."""
        gens = self._gens.setdefault(pid, [])
        before = self._at(pid, time_ns) if gens else []
        moved = [m for m in before if m.time >= time_ns]
        before[:] = [m for m in before if m.time < time_ns]
        gens.append((time_ns, inherited + moved))
        gens.sort(key=lambda g: g[0])

    def _apply(self, rtype: int, misc: int, body: bytes) -> Optional[int]:
        """Apply one record; the pid whose mappings it changed, if any."""
        time_ns = _time(body)
        if rtype in (_RECORD_MMAP, _RECORD_MMAP2):
            pid, _tid, addr, length, pgoff = struct.unpack_from("<IIQQQ", body)
            name_at = 32 if rtype == _RECORD_MMAP else 32 + 24 + 8
            path = body[name_at : len(body) - 8].split(b"\0", 1)[0].decode(errors="replace")
            # MMAP2 says which file (device, inode): ours at that path, or another root's
            identity = struct.unpack_from("<IIQ", body, 32) if rtype == _RECORD_MMAP2 else None
            if path.startswith("/"):
                mapped = self._rooted(pid, [Mapping(addr, addr + length, pgoff, path, time_ns)], identity)[0]
                maps = self._at(pid, time_ns)
                # a mapping a newer one covers is never found again (find() takes the newest):
                # a process that maps code in a loop would otherwise grow its list without end
                maps[:] = [m for m in maps if not (mapped.start <= m.start and m.end <= mapped.end)]
                maps.append(mapped)
                return pid
        elif rtype == _RECORD_COMM and misc & _MISC_COMM_EXEC:
            pid, tid = struct.unpack_from("<II", body)
            if pid == tid:
                self._new_generation(pid, time_ns, [])  # exec: a fresh address space
                return pid
        elif rtype == _RECORD_FORK:
            pid, ppid, _tid, _ptid = struct.unpack_from("<IIII", body)
            if pid != ppid:  # a process, not a thread
                if ppid in self.family:
                    self.family.add(pid)
                parent = self._at(ppid, time_ns) if ppid in self._gens else []
                self._new_generation(pid, time_ns, [m for m in parent if m.time < time_ns])
                return pid
        elif rtype == _RECORD_LOST:
            self.lost += struct.unpack_from("<QQ", body)[1]
        return None

    def prune(self, keep: Set[int]) -> None:
        """Forget processes that have ended and that nothing reported still names: records come
        from every process on the machine, and over a long run they would pile up (an hour
        on a busy machine grew probedsl by ~32 MB before this)."""
        with self._lock:
            for pid in [p for p in self._gens if p not in keep and not process_alive(p)]:
                del self._gens[pid]

    def follow(self, root: int) -> None:
        """Keep root's family: root and every process forked by one of it (descends_from)."""
        self.family.add(root)

    def descends_from(self, pid: int) -> bool:
        """Whether pid is in a followed family. Joined at its fork, so a child whose parent
        has ended stays; if fork records were lost, its parent is read from /proc."""
        if pid in self.family:
            return True
        if self.lost and procfs.parent(pid) in self.family:
            self.family.add(pid)
            return True
        return False

    def generation(self, pid: int, at_ns: Optional[int] = None, drain: bool = True) -> Tuple[int, List[Mapping]]:
        """(start time, mappings) of the pid's address space at `at_ns` (default: the latest);
        read from /proc when the kernel never told us about it. drain=False: the caller just did."""
        if drain:
            self.drain()
        with self._lock:
            gens = self._gens.get(pid)
            if not gens or not any(m for _, m in gens):
                current = self._from_proc(pid)
                if current:
                    gens = self._gens[pid] = [(0, current)]
            if not gens:
                return 0, []
            chosen = gens[-1]
            if at_ns is not None:
                for start, maps in gens:
                    if start <= at_ns:
                        chosen = (start, maps)
            return chosen[0], list(chosen[1])

    def generation_start(self, pid: int, at_ns: int) -> int:
        """Start time of the pid's address space at at_ns (0 if unknown): cheap, no draining,
        for telling apart equal stacks of two processes that had the same pid."""
        gens = self._gens.get(pid, ())
        if len(gens) <= 1:
            return gens[0][0] if gens else 0
        return max((start for start, _ in gens if start <= at_ns), default=0)

    def mappings(self, pid: int, at_ns: Optional[int] = None) -> List[Mapping]:
        return self.generation(pid, at_ns)[1]

    def snapshot(self, pid: int) -> None:
        """Record a live process's current mappings (for processes older than the tracker)."""
        current = self._from_proc(pid)
        with self._lock:
            if current:
                self._current(pid).extend(current)
        if current:
            self._tell([pid])


def find(mappings: List[Mapping], address: int) -> Optional[Mapping]:
    for m in reversed(mappings):  # newest first: a later mmap over the same range wins
        if m.start <= address < m.end:
            return m
    return None
