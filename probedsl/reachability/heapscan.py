"""Which live heap blocks a paused process can still reach: valgrind's four leak kinds.

Roots are every writable mapping that holds no heap block (modules' .data and .bss, the
program's own mmaps, thread-local storage), each paused thread's live stack (stackroots: from
exit()'s caller for the thread ending the process; on a heap block when it runs there), its
general and vector registers, and the callee-saved registers exit()'s caller had when it
called (the exit path saved them in its own frames). A pointer to a block's start makes it
reachable, one into its interior only possibly reachable; blocks reached from nothing are
lost, split as memcheck does (mc_leakcheck.c): in address order, each unreached block claims
as *indirectly* lost the unreached blocks it leads to, and stays *definitely* lost itself.

Memory is read through /proc/PID/mem in large chunks and scanned with numpy: every aligned
word is looked up among the block starts at once (searchsorted), which is what makes a
gigabyte take about a second; a Python loop over words would take minutes.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from probedsl.binaries import elf
from probedsl.process import ptrace
from probedsl.process.tether import PAUSE_TIMEOUT_S, Paused
from probedsl.reachability.regions import Region, read_maps
from probedsl.reachability.stackroots import _heap_stacks, live_stacks

DEFINITE, INDIRECT, POSSIBLE, REACHABLE = range(4)
CHUNK = 16 << 20  # bytes read and scanned at a time (numpy's temporaries: ~5x)


@dataclass
class Scan:
    """Each block's kind (index into KINDS), in the order the blocks were given."""

    kinds: np.ndarray
    scanned_bytes: int = 0
    seconds: float = 0.0
    unreadable_bytes: int = 0
    notes: List[str] = field(default_factory=list)


def classify(
    pid: int, paused: Paused, addresses: Sequence[int], sizes: Sequence[int], all_blocks_known: bool = True
) -> Scan:
    """Classify the blocks (address, size) of the paused process `pid`. When some of its
    blocks are unknown (allocated before probedsl attached, or not tracked), the heap outside
    the known blocks is scanned as roots too: a block kept only by an unknown one is then
    called reachable, never lost (a freed chunk's stale word may keep one reachable)."""
    t0 = time.monotonic()
    starts = np.asarray(addresses, dtype=np.uint64)
    order = np.argsort(starts, kind="stable")
    starts = starts[order]
    ends = starts + np.asarray(sizes, dtype=np.uint64)[order]
    graph = _Graph(starts, ends)
    pid = memory_of(pid, paused)
    regions, cut = read_maps(pid)
    live, exit_caller_registers = live_stacks(pid, paused, regions)
    heap, roots, notes = _split(regions, paused, starts, ends, live)
    if cut:
        notes.append(
            "/proc maps read in part (over its bound): mappings past the cut were not "
            "scanned, so a block kept only from there may show as lost"
        )
    running = _heap_stacks(heap, starts, ends, live)
    dead = [(start, top) for start, top, _ in running]
    roots += [(top, end) for _, top, end in running]  # also scanned as the block they are
    excluded = _allocator_state(regions)
    if excluded is None:
        notes.append(
            "glibc's arena (main_arena) was not found in libc's symbols: its pointers to free "
            "chunks count as roots, so a lost block beside a free chunk may show as possibly lost"
        )
    scanned = unreadable = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for lo, hi in roots:
            for a, b in _without(lo, hi, excluded):
                got = _scan(mem, a, b, graph, root=True)
                scanned, unreadable = scanned + got, unreadable + (b - a - got)
        for lo, hi in heap:
            got = _scan(mem, lo, hi, graph, root=False, outside_is_root=not all_blocks_known, dead=dead)
            scanned, unreadable = scanned + got, unreadable + (hi - lo - got)
    for regs in paused.registers.values():
        graph.add_root_words(np.array([regs[r] for r in (*ptrace.POINTER_REGISTERS, "fs_base")], dtype=np.uint64))
    graph.add_root_words(np.array(exit_caller_registers, dtype=np.uint64))
    for words in paused.vectors.values():
        graph.add_root_words(np.frombuffer(words, dtype=np.uint64, count=len(words) // 8))
    kinds_sorted = graph.kinds()
    kinds = np.empty_like(kinds_sorted)
    kinds[order] = kinds_sorted
    if unreadable:
        notes.append(
            f"{unreadable} bytes of the process could not be read (pages not present or "
            "device memory); pointers there were not seen"
        )
    return Scan(kinds, scanned, time.monotonic() - t0, unreadable, notes)


def memory_of(pid: int, paused: Paused) -> int:
    """The task whose /proc entry shows the process's memory: its leader's, unless the leader
    ended alone (pthread_exit: a zombie, its maps empty while the others run on); then a
    paused thread's."""
    return pid if pid in paused.registers or not paused.registers else min(paused.registers)


def _split(regions: List[Region], paused: Paused, starts: np.ndarray, ends: np.ndarray, live: List[int]):
    """(heap mappings, root ranges, notes): a writable mapping holding part of a block, or the
    brk heap, is the allocator's (scanned only inside blocks: the tail of a large block whose
    mapping a guard page split is the block's, not a root); the others are roots, a paused
    thread's stack only from the top of its live frames up (live_stacks; the stack of a
    thread that ended, which glibc keeps for reuse, or one a thread switched away from, whole,
    as valgrind does)."""
    heap, roots, notes = [], [], []
    sps = live
    for r in regions:
        if "r" not in r.perms or "w" not in r.perms or r.path in ("[vvar]", "[vsyscall]", "[vdso]"):
            continue
        if r.path.startswith("/dev/") and not r.path.startswith(("/dev/zero", "/dev/shm/")):
            continue  # device memory: reading it can have effects
        # live blocks do not overlap: sorted by start, their ends are sorted too
        last = int(np.searchsorted(starts, np.uint64(r.end))) - 1
        if r.path == "[heap]" or (last >= 0 and int(ends[last]) > r.start):
            heap.append((r.start, r.end))
            continue
        inside = [sp for sp in sps if r.start <= sp < r.end]
        if inside:
            roots.append((max(r.start, min(inside)) & ~7, r.end))
        else:
            roots.append((r.start, r.end))
    if paused.missing:
        notes.append(
            f"{len(paused.missing)} thread(s) did not stop in {PAUSE_TIMEOUT_S:.0f} s (uninterruptible): "
            "their registers were not read, their stacks were scanned whole"
        )
    return heap, roots, notes


def _allocator_state(regions: List[Region]) -> Optional[Tuple[int, int]]:
    """[start, end) of glibc's main_arena in the process: its bins and top pointers point at
    free chunks, whose headers can lie inside the last bytes of a live block."""
    libc = next((r for r in regions if os.path.basename(r.path).startswith("libc.so")), None)
    found = _arena_in_file(libc.path) if libc is not None else None
    if found is None:
        return None
    first = min((r for r in regions if r.path == libc.path), key=lambda r: r.start)
    bias = first.start - found[2](first.offset)
    return bias + found[0], bias + found[0] + found[1]


def prepare(pid: int) -> None:
    """What a scan looks up once (libc's symbols, its arena, its call-frame rows for the exit
    path), done before any pause."""
    from probedsl.binaries import cfi

    try:
        regions, _ = read_maps(pid)
        _allocator_state(regions)
    except OSError:
        return
    libc = next((r.path for r in regions if os.path.basename(r.path).startswith("libc.so")), None)
    if libc:
        symbols = elf.symbols(libc)
        if symbols is not None:
            symbols.function_at(0)
        cfi.table(libc)


@functools.lru_cache(maxsize=16)
def _arena_in_file(path: str):
    """(address, size, file offset -> address) of main_arena in a libc file, None if unknown."""
    symbols = elf.symbols(path)
    if symbols is None or not symbols.debug_file:
        return None
    found = _object_symbol(symbols.debug_file, "main_arena")
    return (found[0], found[1], symbols.file_offset_to_vaddr) if found else None


def _object_symbol(path: str, name: str) -> Optional[Tuple[int, int]]:
    """(value, size) of a symbol in a file's .symtab, found by its name's string offset
    (pyelftools' by-name lookup parses every symbol: a second for libc's debug file)."""
    try:
        with open(path, "rb") as f:
            elffile = ELFFile(f)
            table = elffile.get_section_by_name(".symtab")
            if table is None:
                return None
            strings = elffile.get_section(table["sh_link"]).data()
            at = strings.find(b"\0" + name.encode() + b"\0")
            if at < 0:
                return None
            entries = np.frombuffer(
                table.data(),
                dtype=np.dtype(
                    [
                        ("name", "<u4"),
                        ("info", "u1"),
                        ("other", "u1"),
                        ("shndx", "<u2"),
                        ("value", "<u8"),
                        ("size", "<u8"),
                    ]
                ),
            )
            hit = np.flatnonzero(entries["name"] == at + 1)
            return (int(entries["value"][hit[0]]), int(entries["size"][hit[0]])) if len(hit) else None
    except (OSError, ELFError, ValueError):
        return None


def _without(lo: int, hi: int, hole: Optional[Tuple[int, int]]):
    if hole is None or hole[1] <= lo or hole[0] >= hi:
        return [(lo, hi)]
    return [(a, b) for a, b in ((lo, hole[0]), (hole[1], hi)) if a < b]


def _scan(
    mem,
    lo: int,
    hi: int,
    graph: "_Graph",
    root: bool,
    outside_is_root: bool = False,
    dead: Sequence[Tuple[int, int]] = (),
) -> int:
    """Read [lo, hi) in chunks and add the pointers found, none from the `dead` ranges; bytes read."""
    done = 0
    at = lo
    while at < hi:
        n = min(CHUNK, hi - at)
        buf = bytearray(n)
        try:
            mem.seek(at)
            got = mem.readinto(buf)
        except OSError:
            got = 0
        if not got:  # an unreadable page: skip it
            at = (at + 4096) & ~4095
            continue
        for a, b in dead:
            if a < at + got and b > at:
                buf[max(a, at) - at : min(b, at + got) - at] = bytes(min(b, at + got) - max(a, at))
        words = np.frombuffer(buf, dtype=np.uint64, count=got // 8)
        if root:
            graph.add_root_words(words)
        else:
            graph.add_block_words(words, at, outside_is_root)
        done += got
        at += got
    return done


class _Graph:
    """Pointers between blocks (start or interior), and from roots."""

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts, self.ends = starts, ends
        self.lo = starts[0] if len(starts) else np.uint64(0)
        self.hi = ends.max() if len(ends) else np.uint64(0)
        self.root_targets: List[np.ndarray] = []
        self.root_start: List[np.ndarray] = []
        self.src: List[np.ndarray] = []
        self.dst: List[np.ndarray] = []
        self.edge_start: List[np.ndarray] = []

    def _targets(self, words: np.ndarray):
        """(word positions, target block, points at its start) of the words that point into a block."""
        cand = np.flatnonzero((words >= self.lo) & (words <= self.hi))
        if not len(cand):
            return cand, cand, cand.astype(bool)
        values = words[cand]
        block = np.searchsorted(self.starts, values, side="right").astype(np.int64) - 1
        ok = block >= 0
        block = np.where(ok, block, 0)
        at_start = values == self.starts[block]
        ok &= (values < self.ends[block]) | at_start
        return cand[ok], block[ok], at_start[ok]

    def add_root_words(self, words: np.ndarray) -> None:
        if not len(self.starts):
            return
        _, block, at_start = self._targets(words)
        self.root_targets.append(block)
        self.root_start.append(at_start)

    def add_block_words(self, words: np.ndarray, base: int, outside_is_root: bool = False) -> None:
        """Words of a heap mapping at `base`: those inside a block (whole aligned words) point
        from it; the others (allocator headers, free chunks) count as roots or not at all."""
        if not len(self.starts):
            return
        pos, block, at_start = self._targets(words)
        if not len(pos):
            return
        addr = np.uint64(base) + pos.astype(np.uint64) * np.uint64(8)
        owner = np.searchsorted(self.starts, addr, side="right").astype(np.int64) - 1
        ok = owner >= 0
        owner = np.where(ok, owner, 0)
        ok &= addr + np.uint64(8) <= self.ends[owner]
        self.src.append(owner[ok])
        self.dst.append(block[ok])
        self.edge_start.append(at_start[ok])
        if outside_is_root:
            self.root_targets.append(block[~ok])
            self.root_start.append(at_start[~ok])

    def kinds(self) -> np.ndarray:
        n = len(self.starts)
        kinds = np.full(n, DEFINITE, dtype=np.int8)
        if not n:
            return kinds
        cat = lambda parts, t: np.concatenate(parts).astype(t) if parts else np.zeros(0, t)
        src, dst, start = cat(self.src, np.int64), cat(self.dst, np.int64), cat(self.edge_start, bool)
        roots, root_start = cat(self.root_targets, np.int64), cat(self.root_start, bool)
        order = np.argsort(src, kind="stable")
        src, dst, start = src[order], dst[order], start[order]
        indptr = np.searchsorted(src, np.arange(n + 1))
        # reachable: a chain of start pointers from a root
        seeds = np.zeros(n, dtype=bool)
        seeds[roots[root_start]] = True
        reachable = _closure(seeds, indptr, dst, start)
        # possibly: reached at all (any pointer) from a root or a reachable block, not reachable
        seeds[roots] = True
        seen = _closure(seeds | reachable, indptr, dst, None)
        kinds[seen] = POSSIBLE
        kinds[reachable] = REACHABLE
        # the rest is lost: memcheck's cliques, leaders taken in address order (plain lists:
        # a numpy element access costs ten times a list's)
        state, first, targets = kinds.tolist(), indptr.tolist(), dst.tolist()
        for leader in np.flatnonzero(kinds == DEFINITE).tolist():
            if state[leader] != DEFINITE:
                continue
            stack = [leader]
            while stack:
                node = stack.pop()
                for child in targets[first[node] : first[node + 1]]:
                    if child != leader and state[child] == DEFINITE:
                        state[child] = INDIRECT
                        stack.append(child)
        return np.array(state, dtype=np.int8)


def _closure(seeds: np.ndarray, indptr: np.ndarray, dst: np.ndarray, start: Optional[np.ndarray]) -> np.ndarray:
    """Blocks reached from the `seeds` mask (included) along edges (start pointers only, when
    given). A plain depth-first walk: a linked list of a million blocks is a million rounds,
    which per-round numpy calls would make slower, not faster."""
    mark = bytearray(seeds.astype(np.uint8).tobytes())
    first, targets = indptr.tolist(), dst.tolist()
    starts = start.tolist() if start is not None else None
    stack = np.flatnonzero(seeds).tolist()
    while stack:
        node = stack.pop()
        for e in range(first[node], first[node + 1]):
            child = targets[e]
            if not mark[child] and (starts is None or starts[e]):
                mark[child] = 1
                stack.append(child)
    return np.frombuffer(bytes(mark), dtype=bool)
