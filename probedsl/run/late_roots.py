"""bpftrace and the roots that appear after it started. bpftrace places its uprobes on the
files it is given when it starts, so a process of the target in a root that appears later (a
container started after tracing began) runs library files that carry no probe. For each such
root, a bpftrace of its own is started with the same recipe lowered on that root's files (as
the process maps them), and every report merges what all of them saw (probedsl.drivers.merged),
as BCC does in one process by attaching to the new files.

Order: the mapping tracker's listener (process/unprobed.py) finds the process; once its maps
name every library the recipe probes, it is held (ptrace, process/tether.py) and queued. The
run loop's thread (the one that started the first bpftrace: PR_SET_PDEATHSIG ends each child
with it) lowers, starts the root's bpftrace, then lets the held processes go. What a process did
before it was held (its loader, the start of its libc) is not seen: a release of a block from
then counts as a release of an unknown block. A process that cannot be held (another tracer
holds it) runs while its bpftrace starts, which the notes say; one whose libraries never
appear in its maps, or whose bpftrace fails, is named as untraced (notes, JSON `untraced`)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from probedsl import compiler, drivers, ir, targets
from probedsl.drivers.bpftrace_libs import LibraryCopies
from probedsl.drivers.merged import MergedDriver
from probedsl.drivers.rundata import Snapshot
from probedsl.errors import ProbedslError, one_line
from probedsl.passes import allocators
from probedsl.process.libraries import LibraryResolver
from probedsl.process.procfs import process_alive
from probedsl.process.realfile import real_key
from probedsl.process.tether import Tether
from probedsl.process.unprobed import UnprobedRoots

FILE_KINDS = (ir.ProbeKind.UPROBE, ir.ProbeKind.USDT)
# each bpftrace holds its own maps (~250 MB of kernel memory at the default --max-live): the
# roots past this many are named untraced instead
MAX_ROOTS = 8


def applies(target: targets.Target, scope: ir.Scope) -> bool:
    """--comm or --all on a target that probes the files named at its start (bpftrace)."""
    return scope.mode in ("comm", "all") and not scope.per_process and not target.follows_new_roots


def lowering(recipe, target: targets.Target, choices: compiler.Choices, opts, pidns_ino: int):
    """(resolver, keep) -> (program, generated) for one root: the run's passes with the
    allocator found again there (its library is that root's), then keep (what is left to
    probe), generated to watch the same requests (our pid)."""

    def lower(resolver: LibraryResolver, keep: Callable[[ir.Program], ir.Program]):
        found = allocators.choose(opts.allocator, opts.object, opts.symbols_prefix, resolver.resolve)
        program, _ = compiler.plan(recipe, target, dataclasses.replace(choices, allocator=found), resolver)
        program = keep(program)
        return program, compiler.generate(program, target, ready_pid=os.getpid(), pidns_ino=pidns_ino)

    return lower


def files_of(program: ir.Program) -> Set[Tuple[int, int]]:
    """The real files (realfile.real_key) the program's probes sit on: the kernel's uprobes
    are on those, so a second probe there would count each call twice."""
    paths = [path for r in program.resources for p in r.probes if p.kind in FILE_KINDS for path in (p.path, *p.also)]
    return {k for k in map(real_key, paths) if k}


def split(full: ir.Program, kept: ir.Program) -> List[str]:
    """The resources of which kept (a late root's program) has some of full's probes only."""
    counts = {r.name: len(r.probes) for r in full.resources}
    return [r.name for r in kept.resources if len(r.probes) < counts.get(r.name, 0)]


@dataclasses.dataclass
class Arrival:
    pid: int
    comm: str
    root: str
    tether: Optional[Tether]  # holding it; None: it runs on (why_not says why)
    why_not: str = ""
    noticed: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class Child:
    number: int
    root: str
    driver: object
    pids: List[int]
    waited_s: float  # from the first process's hold (or sighting) to its bpftrace's start
    not_held: str  # why the first process could not be held ("": it was)
    ended_said: bool = False


Key = Tuple[int, int]


class LateRoots(MergedDriver):
    """The first bpftrace (main) and one more per root that appears, read as one (MergedDriver).
    stopping: whether the run is ending (a signal, --duration): no bpftrace is started then."""

    def __init__(self, main, lower, say: Callable[[str], None], stopping: Callable[[], bool] = lambda: False):
        super().__init__(main)
        self.lower, self.say, self.stopping = lower, say, stopping
        self.unprobed: Optional[UnprobedRoots] = None
        self._libraries = sorted(
            {p.library for r in main.program.resources for p in r.probes if p.kind == ir.ProbeKind.UPROBE}
        )
        self._probed = files_of(main.program)
        kinds = {p.kind for r in main.program.resources for p in r.probes}
        # tracepoints and system calls alone fire for every process: a late root changes nothing
        self._on_files = bool(kinds & set(FILE_KINDS))
        self._usdt = ir.ProbeKind.USDT in kinds
        self._pending: Dict[Key, List[Arrival]] = {}
        self._done: Set[Key] = set()  # roots with a bpftrace, or nothing new to probe, or failed
        self._failed: Set[Key] = set()  # roots whose bpftrace did not start
        self._waiting: Dict[int, Tuple[str, str, Key]] = {}  # pid -> (comm, root, key): libraries not mapped yet
        self._lock = threading.Lock()
        self._closed = False
        self._numbers = itertools.count(2)
        self._copies = LibraryCopies(p.path for r in main.program.resources for p in r.probes if p.path)

    def watch(self, unprobed: UnprobedRoots) -> None:
        self.unprobed = unprobed
        unprobed.adopt = self.adopt

    def _record(self, pid: int, comm: str, root: str) -> None:
        if self.unprobed:
            self.unprobed.record(pid, comm, root)

    def _verdict(self, key: Key) -> Optional[bool]:
        """Under _lock: True when the root is traced, False when it cannot be, None: not known yet."""
        return None if key not in self._done else key not in self._failed

    # --- the mapping tracker's thread ---------------------------------------------------------
    def adopt(self, pid: int, key: Key, comm: str, root: str) -> Optional[bool]:
        """A process of the target in a root not probed: queued for its root's bpftrace (held
        meanwhile) once its maps name the recipe's libraries; None until then."""
        if not self._on_files:
            return True
        with self._lock:
            verdict = False if self._closed else self._verdict(key)
            if verdict is not None:
                self._waiting.pop(pid, None)
                return verdict
        resolver = LibraryResolver(pid=pid)
        paths = [resolver.resolve(lib) for lib in self._libraries]
        mapped = all(p and os.path.isfile(p) for p in paths)
        # the same real files (one image's containers): neither held nor a bpftrace
        probed = mapped and not self._usdt and all(real_key(p) in self._probed for p in paths if p)
        with self._lock:
            verdict = False if self._closed else self._verdict(key)
            if verdict is None and not mapped:
                self._waiting[pid] = (comm, root, key)
                return None
            if verdict is None and probed:
                self._done.add(key)
                self.notes_.append(f"root {root} (pid {pid}): its libraries are files probed already")
                verdict = True
            if verdict is not None:
                self._waiting.pop(pid, None)
                return verdict
        tether, why = self._hold(pid)
        if tether is False:
            with self._lock:
                self._waiting.pop(pid, None)
            return False
        with self._lock:
            self._waiting.pop(pid, None)
            verdict = False if self._closed else self._verdict(key)
            if verdict is None:
                self._pending.setdefault(key, []).append(Arrival(pid, comm, root, tether or None, why))
        if verdict is not None:
            if tether:
                tether.close()  # let go: its root's fate is known
            return verdict
        held = "held until its probes are on" if tether else f"not held ({why}): it runs untraced meanwhile"
        self.say(
            f"note: pid {pid} ({comm}) runs in a root that appeared after tracing began ({root}): "
            f"starting a bpftrace on its libraries; {held}"
        )
        return True

    @staticmethod
    def _hold(pid: int):
        """(tether holding pid, "") or (None, why not); (False, "") when it ended meanwhile."""
        tether = Tether(pid, hold_exit=False, purpose="a root's bpftrace")
        try:
            tether.start()
            if tether.pause() is None:  # it ended: it ran untraced
                tether.close()
                return False, ""
        except ProbedslError as exc:
            tether.close()
            return None, one_line(exc)
        except BaseException:
            tether.close()
            raise
        return tether, ""

    # --- the run loop's thread ----------------------------------------------------------------
    def idle(self, seconds: float, wake: Optional[int] = None) -> None:
        """Between the run's turns: a bpftrace for each root queued since, then the pause."""
        self.start_pending()
        self.main.idle(seconds, wake)

    def start_pending(self) -> None:
        """A bpftrace for each root queued; its processes let go after. A root met once the
        run is ending stays queued (stop() lets them go and names them)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        left: Dict[Key, List[Arrival]] = {}
        try:
            for key, arrivals in pending.items():
                if key in self._done:
                    if key in self._failed:  # queued while its bpftrace was failing
                        for a in arrivals:
                            self._record(a.pid, a.comm, a.root)
                elif self.stopping() or not self._start(key, arrivals):
                    left[key] = arrivals
        finally:
            for key, arrivals in pending.items():
                if key not in left:
                    for a in arrivals:
                        if a.tether:
                            a.tether.close()  # detached: it runs on
            with self._lock:
                for key, arrivals in left.items():
                    self._pending[key] = arrivals + self._pending.get(key, [])

    def _start(self, key: Key, arrivals: List[Arrival]) -> bool:
        """The root's bpftrace started, or found needless, or failed (a note; its processes
        named): True. False: the run began to end meanwhile."""
        alive = [a for a in arrivals if process_alive(a.pid)]
        if not alive:  # its files are read through a live process: the next one in the root
            for a in arrivals:
                self._record(a.pid, a.comm, a.root)
            return True
        first, began, driver = alive[0], time.monotonic(), None
        full: List[ir.Program] = []

        def keep(program: ir.Program) -> ir.Program:
            full.append(program)
            return self._new_files_only(program)

        try:
            if len(self.children) >= MAX_ROOTS:
                raise ProbedslError(f"{MAX_ROOTS} late roots have a bpftrace already (each holds its own maps)")
            program, generated = self.lower(LibraryResolver(pid=first.pid), keep)
            if not any(r.probes for r in program.resources):
                self.notes_.append(
                    f"root {first.root} (pid {first.pid}): its libraries are files probed already; no bpftrace needed"
                )
                with self._lock:
                    self._done.add(key)
                return True
            driver = drivers.for_target(self.main.target, program, generated)
            driver.env = self._copies.env()
            driver.start(cancelled=self.stopping)
        except Exception as exc:  # any failure: a note; the processes are named untraced
            if driver is not None:
                driver.discard()
            if self.stopping():
                return False
            self._failed_start(key, arrivals, first, one_line(exc))
            return True
        except BaseException:  # Ctrl-C outside the run's handler: no bpftrace left behind
            if driver is not None:
                driver.discard()
            raise
        number = next(self._numbers)
        self._probed |= files_of(program)
        with self._lock:
            self._done.add(key)
            self._waiting = {pid: w for pid, w in self._waiting.items() if w[2] != key}  # traced once mapped
        if self.unprobed:
            self.unprobed.probed.add(key)
        self.children.append(
            Child(
                number, first.root, driver, [a.pid for a in arrivals], time.monotonic() - first.noticed, first.why_not
            )
        )
        for name in split(full[0], program) if full else []:
            self.notes_.append(
                f"bpftrace #{number}: resource {name} has only some of its probes in root {first.root} "
                "(the others sit on files probed already): a block acquired under one bpftrace and released "
                "under another stays live in the first and is an unknown release in the other"
            )
        self.say(
            f"bpftrace #{number} traces root {first.root} (pid {', '.join(str(a.pid) for a in arrivals)}), "
            f"started in {time.monotonic() - began:.1f} s; its maps hold {driver.map_memory() / 2**20:.0f} MB"
        )
        return True

    def _failed_start(self, key: Key, arrivals: List[Arrival], first: Arrival, why: str) -> None:
        number = next(self._numbers)
        self.notes_.append(f"bpftrace #{number} for root {first.root} (pid {first.pid}) did not start: {why}")
        self.say(f"note: bpftrace #{number} for root {first.root} did not start: {why}")
        with self._lock:
            self._done.add(key)  # not tried again: each later process there is named
            self._failed.add(key)
        for a in arrivals:  # those waiting for their libraries there: named by adopt or stop()
            self._record(a.pid, a.comm, a.root)

    def _new_files_only(self, program: ir.Program) -> ir.Program:
        """The root's program without what a bpftrace of the run already counts: probes on
        files probed already (compared as real files), tracepoints and syscalls (they fire for
        every process)."""
        resources = []
        for res in program.resources:
            kept = tuple(p for p in res.probes if p.kind in FILE_KINDS and real_key(p.path) not in self._probed)
            if kept:
                resources.append(dataclasses.replace(res, probes=kept))
        names = {r.name for r in resources}
        return dataclasses.replace(
            program, resources=tuple(resources), reports=tuple(r for r in program.reports if r.resource in names)
        )

    def stop(self, timeout: float = 30) -> Optional[Snapshot]:
        """Each bpftrace's final snapshot, then all ended; merged. Processes still waiting for
        their libraries, or queued, in a root no bpftrace traces are named untraced."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
            waiting, self._waiting = self._waiting, {}
            traced = self._done - self._failed
        for key, arrivals in pending.items():
            for a in arrivals:
                if a.tether:
                    a.tether.close()
                if key not in traced:
                    self._record(a.pid, a.comm, a.root)
        for pid, (comm, root, key) in waiting.items():
            if key not in traced:
                self._record(pid, comm, root)
        return self.stop_all(timeout)

    def notes(self) -> List[str]:
        if not self.children:
            return self.main.notes() + self.notes_
        said = [
            f"bpftrace #{c.number}: root {c.root}, from pid {c.pids[0]} "
            + (
                f"(not held, {c.not_held}: it ran untraced for the {c.waited_s:.1f} s until it was on)"
                if c.not_held
                else f"(held {c.waited_s:.1f} s until it was on)"
            )
            for c in self.children
        ]
        first = (
            "bpftrace #1: the roots seen when tracing began; "
            + "; ".join(said)
            + "; what a late process did before its bpftrace was on is not in the report"
        )
        return self.main.notes() + [first] + self.notes_

    def kill(self) -> None:
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
        for arrivals in pending.values():
            for a in arrivals:
                if a.tether:
                    a.tether.close()
        for d in self._drivers():
            d.kill()
        self._copies.remove()
