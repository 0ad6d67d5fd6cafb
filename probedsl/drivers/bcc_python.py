"""The BCC loader's side of Python frames (probedsl.stacks.pyframes): each CPython process's entry
in the program's probedsl_py_procs, and its stacks' records turned into pseudo-addresses."""

from __future__ import annotations

import ctypes
import os
import threading
import struct
from typing import Dict, List, Set, Tuple

from probedsl import faults, threads
from probedsl.process.mapping_hold import marked, release
from probedsl.ir.stackformat import PY_ENTRY_SHIFT as ENTRY_SHIFT, PY_FRAMES as MAX_FRAMES, PY_TRUNCATED as TRUNCATED
from probedsl.stacks.pyframes import NAMER, PYMALLOC_NOTE, RUN_END, Interpreter, Namer, find, uses_pymalloc


def config_bytes(interp: Interpreter) -> bytes:
    """The BPF program's per-process entry (struct probedsl_py_proc_t)."""
    o = interp.offsets
    fields = [
        interp.runtime + o.runtime_interp_head,
        o.interp_threads_head,
        o.tstate_next,
        o.tstate_native_tid,
        o.tstate_frame,
        o.cframe_frame & 0xFFFF,
        o.frame_code,
        o.frame_previous,
        o.frame_instr,
        o.frame_entry,
        int(o.entry_is_owner),
        o.code_tag_bits,
    ]
    return struct.pack("<Q11H", *fields) + b"\0" * 2


class PyRecord(ctypes.Structure):
    """The BPF program's record of a stack's Python frames (struct probedsl_pystack_t)."""

    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("n", ctypes.c_uint32),
        ("code", ctypes.c_uint64 * MAX_FRAMES),
        ("meta", ctypes.c_uint64 * MAX_FRAMES),
    ]


def pseudo_frames(namer: Namer, record) -> Tuple[int, ...]:
    """A record's frames as pseudo-addresses, innermost first. The entry byte says where the
    run of one evaluation call ends: 3.11's is_entry is set on its last frame; 3.12+'s owner
    is 3 or more on the C stack's shim frame after it (skipped)."""
    interp = namer.interpreter(record.pid)
    by_owner = bool(interp and interp.offsets and interp.offsets.entry_is_owner)
    frames: List[list] = []
    for i in range(min(record.n, MAX_FRAMES)):
        meta = record.meta[i]
        entry = (meta >> ENTRY_SHIFT) & 0xFF
        if by_owner and entry >= 3:
            if frames:
                frames[-1][2] |= RUN_END
            continue
        lasti = meta & 0xFFFFFFFF
        lasti = lasti - (1 << 32) if lasti & (1 << 31) else lasti
        frames.append([record.code[i], lasti, (meta & TRUNCATED) | (RUN_END if entry and not by_owner else 0)])
    return namer.pseudos(record.pid, [tuple(f) for f in frames])


POLL_MS = 100  # the doorbell thread's wait for a new stack (then it checks for the end)


class Processes:
    """The BCC loader's side: finds the CPython in each process as it maps files, and gives
    the BPF program its offsets (probedsl_py_procs). hold (a launched command): a process
    that begins its finalization is stopped (bcc.c.j2, probedsl_py_finalizing) and continued
    here once the stacks it rang for before are named. uprobes, lock: the loader's (bcc_uprobes),
    the lock held to attach."""

    def __init__(self, bpf, uprobes, lock: threading.Lock, hold: bool = False):
        self.bpf, self.uprobes, self.lock, self.closed = bpf, uprobes, lock, False
        self.table = bpf["probedsl_py_procs"]
        self.stacks = bpf["probedsl_pystacks"]
        self.seen: Dict[int, Interpreter] = {}  # pid -> its interpreter, as last written
        self.said: List[str] = []
        self.named: Dict[int, Tuple[int, ...]] = {}  # stack id -> its Python frames
        # the doorbell has a ring buffer reader and a thread of its own: a code object is freed
        # as soon as its module or function goes (the program's end frees them all, before an
        # exit hold stops it), and the run loop can be busy for seconds naming a report's frames
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib  # (imported with bcc: the loader has it)

        self._lib = lib
        self._callback = _RINGBUF_CB_TYPE(self._rung)  # kept: the C side holds it
        self._reader = lib.bpf_new_ringbuf(bpf["probedsl_py_doorbell"].map_fd, self._callback, None)
        self._closing = threading.Event()
        # (without the thread nothing would continue a stopped process: no hold; should the
        # thread die, MappingHold.turn lets a held process go after FINALIZING_BOUND_S)
        self.finalizing = bpf["probedsl_py_held"] if hold and self._reader else None
        self.mapping = bpf["probedsl_unw_held"] if self.finalizing is not None else None
        self.probed: Set[Tuple[int, int]] = set()  # interpreter files with the finalization probe
        self.waited: List[int] = []  # ns each finalization waited
        self._thread = threads.start("probedsl-python-frames", self._listen) if self._reader else None

    def _rung(self, ctx, data, size) -> int:
        if size == 8:  # a new stack (else a process stopped at its finalization: _let_go)
            self.frames_of(ctypes.cast(data, ctypes.POINTER(ctypes.c_uint64)).contents.value)
        return 0

    def _listen(self) -> None:
        while not self._closing.is_set():
            self._lib.bpf_poll_ringbuf(self._reader, POLL_MS)
            if self.finalizing is not None:
                try:
                    self._let_go()
                except Exception as exc:  # said; the next turn tries again
                    threads.failed("probedsl-python-frames", exc)

    def _let_go(self) -> None:
        """Continues the processes stopped at their finalization, once the stacks they rang
        for before their marks are named (the ring is read after the marks)."""
        pids = marked(self.finalizing)
        if pids:
            faults.wait("python-finalizing")
            self._lib.bpf_consume_ringbuf(self._reader)
            self.waited += release(self.finalizing, pids, unless=self.mapping)

    def _probe_finalization(self, interp: Interpreter) -> None:
        """The finalization probe on the interpreter's file, once per file: it fires in every
        process that runs the file, and stops only those in probedsl_py_procs."""
        path = interp.file or interp.path
        try:
            st = os.stat(path)
        except OSError:
            return
        with self.lock:
            if self.closed or (st.st_dev, st.st_ino) in self.probed:
                return
            self.probed.add((st.st_dev, st.st_ino))
            try:
                for address in interp.finalize:
                    self.uprobes.attach("probedsl_py_finalizing", path, -1, addr=address)
            except Exception as exc:  # BCC raises bare Exception: named at exit, if still mapped
                self._say(
                    f"the finalization of {interp.name} is not held ({exc}): frames first seen as it ends may be unnamed"
                )

    def close(self) -> None:
        with self.lock:
            self.closed = True
        if self._thread is not None:
            self._closing.set()
            threads.join(self._thread, 2 * POLL_MS / 1000)
            if not self._thread.is_alive():
                self._lib.bpf_free_ringbuf(self._reader)
            self._thread = None

    def process(self, pid: int, mappings, walk: bool = True) -> None:
        """walk: whether its Python frames are walked (--no-python-frames: the pymalloc note only)."""
        interp = find(pid, mappings)
        if interp is None or self.seen.get(pid) == interp:
            return
        self.seen[pid] = interp
        if uses_pymalloc(pid):
            self._say(PYMALLOC_NOTE)
        if not walk:
            return
        if interp.offsets is None:
            self._say(
                f"pid {pid} runs {interp.name}, a version (or build) probedsl has no frame layout for: "
                "its stacks are native only (Python frames: CPython 3.11, 3.13 and 3.14; not free-threaded)"
            )
            return
        NAMER.know(pid, interp)
        if self.finalizing is not None and interp.finalize:
            self._probe_finalization(interp)
        key = self.table.Key(pid)
        self.table[key] = self.table.Leaf.from_buffer_copy(config_bytes(interp))
        self._say(f"Python frames of pid {pid} ({interp.name}) are in its stacks")

    def _say(self, text: str) -> None:
        if text not in self.said:
            self.said.append(text)

    def frames_of(self, stack_id: int) -> Tuple[int, ...]:
        """The stack's Python frames as pseudo-addresses, innermost first: named at its first
        sight (its doorbell, or a read) while its code objects live, and kept (read again later,
        a code object freed since would be unreadable, or another's)."""
        known = self.named.get(stack_id)
        if known is not None:
            return known
        try:
            record = self.stacks[self.stacks.Key(stack_id)]
        except KeyError:
            return ()
        self.named[stack_id] = pseudo_frames(NAMER, record)
        return self.named[stack_id]

    def notes(self) -> List[str]:
        if not self.waited:
            return list(self.said)
        n = len(self.waited)
        return self.said + [
            f"{n} Python process{'es' if n != 1 else ''} waited at the start of finalization until "
            f"{'their' if n != 1 else 'its'} frames were named (longest {max(self.waited) / 1e6:.1f} ms)"
        ]
