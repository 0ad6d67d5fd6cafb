"""BCC's loader: the C text compiled by libbcc's clang, the unwinder programs loaded, each probe attached where the manifest says (per process with --per-process and forks followed, in new roots as they appear)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from probedsl.binaries import elf, x86
from probedsl.drivers import bcc_tracepoints, bcc_unwinders, teardown
from probedsl.process import roots
from probedsl.drivers.bcc_compile import Compilation
from probedsl.errors import ProbedslError
from probedsl.ir.layout import ResourceLayout
from probedsl.drivers.bcc_images import EndedImages
from probedsl.process.libraries import LibraryResolver
from probedsl.process import procfs
from probedsl.process.procfs import has_memory, is_process, live_task, process_alive, processes_named
from probedsl.process.mapping_hold import MappingHold
from probedsl.stacks.unwind_tables import UnwindTables
from probedsl.drivers import bcc_python
from probedsl.drivers.bcc_compat import (
    _import_bcc,
    _allow_many_uprobes,
    remove_tracefs_uprobes,
    _stderr_captured,
)
from probedsl.drivers.bcc_read import BccReading, _items
from probedsl.drivers.bcc_moves import Moves
from probedsl.drivers.bcc_uprobes import uprobes_for


ATTACH_TRIES = 3  # --per-process: attempts, RETRY_S apart, before a process is given up
ROOT_WAIT_S = 2.0  # --comm: how long an arrival in another root may take to map its libraries
RETRY_S = 0.05


class BccLoader(BccReading):
    """Runs one compiled program; pid scopes uprobes to one process (0: all processes).
    held_forks: the caller holds each child the process forks until attach_child() has put
    the uprobes on it (probedsl.process.tether), so following forks needs no machine-wide uprobe."""

    def __init__(
        self,
        c_text: str,
        manifest: dict,
        pid: int = 0,
        held_forks: bool = False,
        compiled: Optional[Compilation] = None,
    ):
        """compiled: the program's compile, begun earlier (BccDriver)."""
        bcc = _import_bcc()
        compiled = compiled or Compilation(bcc, c_text, pid)
        # placed probes checked once against the files (not again at each attach), while it compiles
        self.manifest = manifest = dict(manifest, probes=[_placed(p) for p in manifest["probes"]])
        self.layouts = [ResourceLayout.from_json(r) for r in manifest["resources"]]
        self.fronts, self.fronts_lock = {}, threading.Lock()  # (bcc_read.front)
        self.bpf = compiled.result()
        self.uprobes = uprobes_for(bcc, self.bpf)  # links where the kernel has them
        bcc_unwinders.load(bcc, self.bpf, self.uprobes, manifest.get("unwinders", ()))
        bcc_tracepoints.attach(bcc, self.bpf)  # (now that the arrays they tail-call are filled)
        # entries of ended process images, freed between reports (not when every report reads them)
        self.ended_images = (
            EndedImages(self.bpf, self.layouts, _items, self.front)
            if any(lay.ends_with_image for lay in self.layouts) and not manifest.get("read_live")
            else None
        )
        # --stacks dwarf: the unwinder's rows, loaded as processes map files
        self.unwind = UnwindTables(self.bpf) if manifest.get("dwarf") else None
        self.lock = threading.Lock()  # attach_child comes from the tether's thread
        # a launched command: held at each mmap of code until its rows are in; the Python frames
        # of its CPython processes, held as they begin finalization until named
        hold = bool(manifest.get("hold_mappings"))
        self.python = bcc_python.Processes(self.bpf, self.uprobes, self.lock, hold) if manifest.get("dwarf") else None
        self.hold = MappingHold(self.bpf) if hold else None
        scope = pid or -1
        self.moves = Moves()  # --per-process: uprobes off a thread that ended alone
        self.bearer = self._bearer(pid) if pid else 0
        self.held_forks = held_forks and bool(manifest.get("follow_forks"))
        self.closed = False
        if manifest.get("follow_forks"):
            # children inherit no pid-scoped uprobe: each is attached as it is forked (held
            # meanwhile), or else every process is, and the BPF filter keeps the traced ones
            # a launched command held before its exec: traced from its exec (trace_from_exec),
            # not while it is still a copy of probedsl
            if not (self.held_forks and manifest.get("target") == "cmd"):
                self.trace_from_exec(pid)
            scope = pid if self.held_forks else -1
        # --comm --per-process: uprobes on each process with the name, now and as they exec or
        # fork (admit); otherwise on every process, and the BPF filter compares names
        self.attached: Dict[int, list] = {}  # pid -> its uprobes (BCC's event names, or link handles)
        self.refusals: Dict[int, Tuple[int, float]] = {}  # pid -> (failed attempts, when to retry)
        self.last_arrival = 0.0
        self.per_process = bool(manifest.get("per_process"))
        if self.per_process or self.held_forks:
            _allow_many_uprobes()
        if self.per_process:
            for p in manifest["probes"]:  # resolved and loaded now, not while a process waits
                if not p.get("usdt"):
                    bcc.BPF._check_path_symbol(p["path"], p["function"], None, -1)
                for fn in filter(None, (p["entry"], p["return"])):
                    self.uprobes.load(fn)
            self.bpf["probedsl_doorbell"].open_ring_buffer(lambda ctx, data, size: 0)
            for found in processes_named(manifest["comm"]):
                self._attach_process(found)
        else:
            failure = self._attach(self.bearer if scope > 0 else scope)
            if failure:
                raise ProbedslError(failure)
        self.scope = scope
        # --comm: a process with the name in a root not seen yet (a container started later)
        # maps other library files: the probes go on those too, as it arrives
        self.watch_roots = bool(manifest.get("watch_roots"))
        self.unresolved: Dict[int, float] = {}  # arrivals whose libraries are not mapped yet
        self.probed = {(roots.stat_key(p["path"]), p["function"], p["entry"]) for p in manifest["probes"]}
        if self.watch_roots:
            self.bpf["probedsl_doorbell"].open_ring_buffer(lambda ctx, data, size: 0)

    def _attach_one(self, p: dict, path: str, placed: bool, pid: int) -> None:
        """The probe's uprobe (and uretprobe) on path: at the entry, or (placed) both at its
        offset (probedsl.passes.placement: the return address is still at [rsp] there). A usdt site by
        its address, the kernel raising its semaphore while the uprobe is on."""
        attach = self.uprobes.attach
        if p.get("reentry") or p.get("usdt"):  # a branch of that file (probedsl.passes.reentry), by its address
            attach(p["entry"], path, pid, addr=p["address"], ref_ctr=p.get("ref_ctr", 0))
            return
        if not (placed and p.get("offset")):
            attach(p["entry"], path, pid, sym=p["function"])
            if p["return"]:
                attach(p["return"], path, pid, sym=p["function"], ret=True)
            return
        attach(p["entry"], path, pid, sym=p["function"], sym_off=p["offset"])
        if p["return"]:  # BCC has no sym_off for uretprobes: by address
            attach(p["return"], path, pid, addr=p["address"], ret=True)

    def _attach(self, scope: int) -> Optional[str]:
        """Uprobes on every probe for scope (a pid, or -1: all processes); the failure, or None."""
        for p in self.manifest["probes"]:
            if p.get("gone"):  # the branch is not in the file any more: nothing enters again there
                continue
            try:
                self._attach_one(p, p["path"], True, scope)
            except Exception as exc:  # BCC raises bare Exception
                if not p.get("also"):
                    return f"cannot attach to {p['function']} in {p['path']}: {exc}"
                print(f"probedsl: warning: not probing {p['path']} (its process ended?): {exc}", file=sys.stderr)
        return None

    def trace_from_exec(self, pid: int) -> None:
        """The process and the children it forks from now on pass the BPF filter."""
        self.bpf["probedsl_traced"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def attach_child(self, pid: int) -> None:
        """A child forked by a traced process, held until this returns: its own uprobes (they
        follow its execs). A refusal is said; the child then runs untraced."""
        with self.lock:
            if self.closed:
                return
            if pid in self.attached:  # an ended process's pid, taken again
                self._detach(pid)
            self._attach_process(pid, last_try=True, quiet=False)
            self.refusals.pop(pid, None)
            self.last_arrival = time.monotonic()

    def _bearer(self, pid: int) -> int:
        """What a process's uprobes are opened on. Perf events: one of its threads, its main
        thread unless that ended alone (procfs.live_task). Links: the process; when its main
        thread has ended, with the breakpoints kept in every process (_keep_everywhere)."""
        tid = live_task(pid)
        if not self.uprobes.links:
            return tid
        if tid != pid:
            self._keep_everywhere(pid)
        return pid

    def _keep_everywhere(self, pid: int) -> None:
        """pid's main thread has ended alone, or is ending (bcc_uprobes.Links says why)."""
        if self.uprobes.keep_everywhere():
            self.moves.everywhere(pid)

    def rebind(self, pid: int, tid: int) -> None:
        """The thread the process's uprobes are on ended alone (pthread_exit, probedsl.process.rebind):
        the same uprobes opened on another of its threads, tid (machine-wide ones match every
        thread, and links every thread of their process)."""
        with self.lock:
            if self.closed or not (pid == self.scope or pid in self.attached):
                return
            if self.uprobes.links:  # (at its exit stop: its memory is still there)
                self._keep_everywhere(pid)
                return
            before = self.uprobes.handles()
            failure = self._attach(tid)
            if pid in self.attached:  # closed with the process's own
                self.attached[pid] += [e for e in self.uprobes.handles() if e not in before]
        if failure:
            raise ProbedslError(failure)

    def reap(self, wait_s: float, wake: Optional[int] = None) -> None:
        """Following held forks: the uprobes of children that ended are closed (perf events one
        a turn, once none has arrived for a while: bcc_uprobes.PerfEvents)."""
        with self.lock:
            for pid in [p for p in self.attached if not process_alive(p)]:
                self._detach(pid)
            closing = self.uprobes.closing_due(self.last_arrival)
            if closing:
                self.uprobes.close_one()
        if not closing:
            procfs.pause(wait_s, wake)

    def _attach_process(self, pid: int, last_try: bool = False, quiet: bool = True) -> None:
        """--per-process: uprobes on one process. A process between releasing its memory and
        becoming a zombie (or a kernel thread) refuses them with EINVAL: it is skipped. A live
        one that refuses is tried again RETRY_S later, twice, then said and left untraced.
        quiet: libbcc's own messages are kept (fd 2 taken meanwhile: not from a second thread)."""
        before = self.uprobes.handles()
        bearer = self._bearer(pid)  # (its main thread may have ended alone before it was found)
        with _stderr_captured() if quiet else contextlib.nullcontext([""]) as chatter:
            failure = self._attach(bearer)
        # by name: BCC's detach_uprobe resolves the path through /proc/PID again, which
        # fails once the process has ended (its uprobes then stayed open until the end)
        self.attached[pid] = [e for e in self.uprobes.handles() if e not in before]
        if failure:
            self._detach(pid)
        else:
            self.refusals.pop(pid, None)
            self.moves.bear(self, pid, bearer)
            return
        tries = ATTACH_TRIES if last_try else self.refusals.pop(pid, (0, 0))[0] + 1
        if not has_memory(pid):
            return
        if tries < ATTACH_TRIES:
            self.refusals[pid] = (tries, time.monotonic() + RETRY_S)
            return
        said = " ".join(chatter[0].split())
        print(
            f"probedsl: warning: pid {pid} is not traced: {failure}" + (f" ({said})" if said else ""), file=sys.stderr
        )

    def _detach(self, pid: int) -> None:
        """The process's uprobes closed soon (bcc_uprobes: perf events one per turn, once quiet)."""
        self.uprobes.close_soon(self.attached.pop(pid, []))

    def admit(self, wait_s: float = 0) -> List[int]:
        """--comm: attach to processes that took the name since the last call (waiting up to
        wait_s for one: the doorbell rings at its exec or fork), detach from those that ended.
        Returns the pids newly attached."""
        if not (self.per_process or self.watch_roots):
            return []
        if self.watch_roots:
            self.bpf.ring_buffer_poll(max(1, int(wait_s * 1000)))
            now = time.monotonic()
            for pid in self._arrivals():
                self.unresolved.setdefault(pid, now + ROOT_WAIT_S)
            for pid, until in list(self.unresolved.items()):
                if self._probe_other_root(pid) or now > until or not process_alive(pid):
                    del self.unresolved[pid]
            return []
        closing = self.uprobes.closing_due(self.last_arrival)
        if wait_s > 0:  # closing a uprobe (~90 ms) is then the pause
            self.bpf.ring_buffer_poll(0 if closing else max(1, int(wait_s * 1000)))
        pids = self._arrivals()
        added, now = [], time.monotonic()
        for pid in set(pids) | {p for p, (_, retry_at) in self.refusals.items() if retry_at <= now}:
            if pid not in self.attached and is_process(pid):
                self._attach_process(pid)
                if pid in self.attached:
                    added.append(pid)
            elif pid in self.refusals and not is_process(pid):
                del self.refusals[pid]
        self.moves.check(self)  # (before the reap: a process that ended with it is still known)
        for pid in [p for p in self.attached if not process_alive(p)]:
            self._detach(pid)
        if added:
            self.last_arrival = time.monotonic()
        elif closing:
            self.uprobes.close_one()
        return added

    def _arrivals(self) -> List[int]:
        """Pids that exec'd the name or were forked by such a process since the last call."""
        arrivals = self.bpf["probedsl_arrivals"]
        pids = [k.value for k in arrivals.keys()]
        for pid in pids:
            try:
                del arrivals[ctypes.c_uint32(pid)]
            except KeyError:
                pass
        return pids

    def _probe_other_root(self, pid: int) -> bool:
        """Attach every probe to the process's copy of its library when that is a file not
        probed yet; False (nothing attached) while a library cannot be found yet. At exec the
        process has not mapped its libraries: the copy is the one at the probed path inside
        its root, or the one its maps name once the loader has mapped it (admit() asks again
        meanwhile). Said once all of a file's probes are on."""
        if roots.root_prefix(pid) == "":
            return True
        copies: Dict[str, List[str]] = {}
        # usdt: the program's own files; a reentry branch: an address in the file it was found in
        uprobes = [p for p in self.manifest["probes"] if not p.get("usdt") and not p.get("reentry")]
        for p in uprobes:
            if p["library"] not in copies:
                mapped = LibraryResolver(pid=pid).resolve(p["library"])
                found = [roots.attach_path(pid, p["path"])] + ([mapped] if mapped else [])
                copies[p["library"]] = [path for path in found if roots.stat_key(path)]
                if not copies[p["library"]]:
                    return False
        new_files = []
        for p in uprobes:
            for path in copies[p["library"]]:
                key = (roots.stat_key(path), p["function"], p["entry"])
                if key in self.probed:
                    continue
                try:
                    self._attach_one(p, path, False, -1)  # another root's copy: at the entry
                except Exception as exc:  # BCC raises bare Exception
                    print(
                        f"probedsl: warning: pid {pid}: cannot attach to {p['function']} in {path}: {exc}",
                        file=sys.stderr,
                    )
                    continue
                if not any(k[0] == key[0] for k in self.probed):
                    new_files.append((path, p["library"]))
                self.probed.add(key)
                break
        for path, library in new_files:
            print(
                f"probedsl: probing {path}, another root's copy of {library} (pid {pid})", file=sys.stderr, flush=True
            )
        return True

    def close(self, background: bool = False) -> None:
        """Detach everything. background: a process of its own closes the last copies of the
        descriptors (the kernel's ~0.15 s per uprobe, probedsl.drivers.teardown), and this returns at once."""
        with self.lock:
            self.closed = True
        if self.hold is not None:
            self.hold.close()
        if self.unwind is not None:
            self.unwind.close()
        if self.python is not None:
            self.python.close()
        links = self.uprobes.take_all() if self.uprobes.links else []
        holder = teardown.hand_over(remove_tracefs_uprobes) if background else None
        if holder is None:
            teardown.close_on_threads(links)
        else:  # not the last copies: the holder's are
            for fd in links:
                os.close(fd)
            # BCC's detach disables each event first (a call on each CPU, ~15 ms here) and
            # looks for a tracefs event: the holder's close does both's work
            for probes in (self.bpf.uprobe_fds, self.bpf.tracepoint_fds):
                for fd in probes.values():
                    os.close(fd)
                probes.clear()
        self.close_fronts()
        self.bpf.cleanup()
        if holder is not None:
            holder.release()
        else:
            remove_tracefs_uprobes(os.getpid())


def _placed(p: dict) -> dict:
    """A manifest probe with its offset kept only while the file still holds the code it was
    placed in (a loader may run on another machine, or after an upgrade), and the address of
    its placed instruction."""
    if p.get("usdt"):
        return p
    if p.get("reentry"):
        return p if x86.still_at(p["path"], p["address"], p["code"]) else dict(p, gone=True)
    offset = p.get("offset", 0)
    if offset and not x86.still_there(p["path"], p["function"], offset, p.get("code", "")):
        print(
            f"probedsl: warning: {p['function']} in {p['path']} is not the code probedsl placed its probe "
            "in; probing its entry",
            file=sys.stderr,
        )
        offset = 0
    address = elf.symbols(p["path"]).address_of(p["function"]) + offset if offset else 0
    return dict(p, offset=offset, address=address)
