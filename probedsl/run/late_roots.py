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
import os
import shutil
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Set, Tuple

from probedsl import compiler, drivers, ir, targets
from probedsl.drivers.merged import merged
from probedsl.drivers.rundata import Snapshot
from probedsl.errors import ProbedslError
from probedsl.passes import allocators
from probedsl.process import roots
from probedsl.process.libraries import LibraryResolver, loader_map
from probedsl.process.procfs import process_alive
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
    """(device, inode) of every file the program's probes sit on."""
    paths = [path for r in program.resources for p in r.probes if p.kind in FILE_KINDS for path in (p.path, *p.also)]
    return {k for k in map(roots.stat_key, paths) if k}


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


class LateRoots:
    """The run's driver: the first bpftrace (main) and one more per root that appears, read
    as one. What is not about roots is the first bpftrace's (__getattr__)."""

    def __init__(self, main, lower, say: Callable[[str], None]):
        self.main, self.lower, self.say = main, lower, say
        self.children: List[Child] = []
        self.notes_: List[str] = []
        self.unprobed: Optional[UnprobedRoots] = None
        self._libraries = sorted(
            {p.library for r in main.program.resources for p in r.probes if p.kind == ir.ProbeKind.UPROBE}
        )
        self._probed = files_of(main.program)  # a file probed twice would count each call twice
        # tracepoints and system calls alone fire for every process: a late root changes nothing
        self._on_files = any(p.kind in FILE_KINDS for r in main.program.resources for p in r.probes)
        self._pending: Dict[Tuple[int, int], List[Arrival]] = {}
        self._done: Set[Tuple[int, int]] = set()  # roots with a bpftrace (or nothing new to probe)
        self._failed: Set[Tuple[int, int]] = set()  # roots whose bpftrace did not start
        self._waiting: Dict[int, Tuple[str, str]] = {}  # pid -> (comm, root): libraries not mapped yet
        self._lock = threading.Lock()
        self._closed = False
        self._copies: Optional[str] = None  # our libraries' copies for the roots' bpftraces

    def __getattr__(self, name):
        return getattr(self.main, name)

    def watch(self, unprobed: UnprobedRoots) -> None:
        self.unprobed = unprobed
        unprobed.adopt = self.adopt

    # --- the mapping tracker's thread ---------------------------------------------------------
    def adopt(self, pid: int, key: Tuple[int, int], comm: str, root: str) -> Optional[bool]:
        """A process of the target in a root not probed: queued for its root's bpftrace (held
        meanwhile) once its maps name the recipe's libraries; None until then."""
        if not self._on_files:
            return True
        with self._lock:
            if self._closed:
                return False
            if key in self._done:
                self._waiting.pop(pid, None)
                return key not in self._failed
        resolver = LibraryResolver(pid=pid)
        if not all((path := resolver.resolve(lib)) and os.path.isfile(path) for lib in self._libraries):
            with self._lock:
                self._waiting[pid] = (comm, root)
            return None
        tether, why = Tether(pid, hold_exit=False, purpose="a root's bpftrace"), ""
        try:
            tether.start()
            if tether.pause() is None:  # it ended: it ran untraced
                tether.close()
                return False
        except ProbedslError as exc:
            tether.close()
            tether, why = None, str(exc)
        with self._lock:
            self._waiting.pop(pid, None)
            if self._closed:
                if tether:
                    tether.close()
                return False
            self._pending.setdefault(key, []).append(Arrival(pid, comm, root, tether, why))
        if key not in self._done:
            held = "held until its probes are on" if tether else f"not held ({why}): it runs untraced meanwhile"
            self.say(
                f"note: pid {pid} ({comm}) runs in a root that appeared after tracing began ({root}): "
                f"starting a bpftrace on its libraries; {held}"
            )
        return True

    # --- the run loop's thread ----------------------------------------------------------------
    def idle(self, seconds: float) -> None:
        """Between the run's turns: a bpftrace for each root queued since, then the pause."""
        self.start_pending()
        self.main.idle(seconds)

    def start_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for key, arrivals in pending.items():
            if key not in self._done:
                self._start(key, arrivals)
            for a in arrivals:
                if a.tether:
                    a.tether.close()  # detached: it runs on

    def _start(self, key: Tuple[int, int], arrivals: List[Arrival]) -> None:
        alive = [a for a in arrivals if process_alive(a.pid)]
        if not alive:  # its files are read through a live process: the next one in the root
            for a in arrivals:
                if self.unprobed:
                    self.unprobed.record(a.pid, a.comm, a.root)
            return
        first, began, driver = alive[0], time.monotonic(), None
        number = len(self.children) + 2
        try:
            if len(self.children) >= MAX_ROOTS:
                raise ProbedslError(f"{MAX_ROOTS} late roots have a bpftrace already (each holds its own maps)")
            program, generated = self.lower(LibraryResolver(pid=first.pid), self._new_files_only)
            if not any(r.probes for r in program.resources):
                self._done.add(key)
                self.notes_.append(
                    f"root {first.root} (pid {first.pid}): its libraries are files probed already; no bpftrace needed"
                )
                return
            driver = drivers.for_target(self.main.target, program, generated)
            driver.env = self._own_copies()
            driver.start()
        except Exception as exc:  # any failure: a note; the processes are named untraced
            if driver is not None:
                driver.kill()
            why = _one_line(exc)
            self.notes_.append(f"bpftrace #{number} for root {first.root} (pid {first.pid}) did not start: {why}")
            self.say(f"note: bpftrace #{number} for root {first.root} did not start: {why}")
            with self._lock:
                self._done.add(key)  # not tried again: each later process there is named
                self._failed.add(key)
            for a in arrivals:
                if self.unprobed:
                    self.unprobed.record(a.pid, a.comm, a.root)
            return
        self._probed |= files_of(program)
        with self._lock:
            self._done.add(key)
        if self.unprobed:
            self.unprobed.probed.add(key)
        self.children.append(
            Child(
                number, first.root, driver, [a.pid for a in arrivals], time.monotonic() - first.noticed, first.why_not
            )
        )
        self.say(
            f"bpftrace #{number} traces root {first.root} (pid {', '.join(str(a.pid) for a in arrivals)}), "
            f"started in {time.monotonic() - began:.1f} s; its maps hold {driver.map_memory() / 2**20:.0f} MB"
        )

    def _own_copies(self) -> Dict[str, str]:
        """The environment that has a root's bpftrace load copies of the probed libraries it
        uses itself (libc): on the files, each of the many allocations of its compile would
        trap into the first bpftrace's probes (it did not start within 60 s so)."""
        if self._copies is None:
            self._copies = tempfile.mkdtemp(prefix="probedsl-bpftrace-libs-")
            probed = {os.path.realpath(p.path) for r in self.main.program.resources for p in r.probes if p.path}
            exe = shutil.which("bpftrace")
            for name, path in loader_map(exe) if exe else []:
                if os.path.realpath(path) in probed and "/" not in name:
                    shutil.copy2(path, os.path.join(self._copies, name))
        paths = [self._copies] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
        return {"LD_LIBRARY_PATH": ":".join(paths)}

    def _new_files_only(self, program: ir.Program) -> ir.Program:
        """The root's program without what the first bpftrace already counts: probes on files
        probed already, tracepoints and syscalls (they fire for every process)."""
        resources = []
        for res in program.resources:
            kept = tuple(
                p for p in res.probes if p.kind in FILE_KINDS and not ({roots.stat_key(p.path)} & self._probed)
            )
            if kept:
                resources.append(dataclasses.replace(res, probes=kept))
        names = {r.name for r in resources}
        return dataclasses.replace(
            program, resources=tuple(resources), reports=tuple(r for r in program.reports if r.resource in names)
        )

    def _drivers(self) -> list:
        return [self.main] + [c.driver for c in self.children]

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        """One ask (getpgid) answered by every bpftrace, merged; None if the first gave none."""
        if not self.children:
            return self.main.snapshot(timeout)
        for d in self._drivers():
            d.expect()
        os.getpgid(0)
        return self._merge([self.main.received(timeout)] + [c.driver.received(timeout) for c in self.children])

    def stop(self, timeout: float = 30) -> Optional[Snapshot]:
        """Each bpftrace's final snapshot, then all ended; merged. Processes still waiting for
        their libraries, or queued for a bpftrace not started, are named untraced."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, {}
            waiting, self._waiting = self._waiting, {}
        for arrivals in pending.values():
            for a in arrivals:
                if a.tether:
                    a.tether.close()
                if self.unprobed:
                    self.unprobed.record(a.pid, a.comm, a.root)
        for pid, (comm, root) in waiting.items():
            if self.unprobed:
                self.unprobed.record(pid, comm, root)
        for d in self._drivers():
            d.expect()
        os.getpgid(0)
        return self._merge([d.stop(timeout, asked=True) for d in self._drivers()])

    def _merge(self, snaps: List[Optional[Snapshot]]) -> Optional[Snapshot]:
        if snaps[0] is None:
            return None
        got = [snaps[0]]
        for child, snap in zip(self.children, snaps[1:]):
            if snap is None:
                snaps[0].incomplete.append(f"bpftrace #{child.number} (root {child.root}) gave no snapshot")
            else:
                got.append(snap)
        return merged(got)

    def alive(self) -> bool:
        """The run lasts while the first bpftrace does; a root's bpftrace that ends is a note."""
        for c in self.children:
            if not c.ended_said and not c.driver.alive():
                c.ended_said = True
                self.notes_.append(f"bpftrace #{c.number} (root {c.root}) ended early: {c.driver.explain_failure()}")
        return self.main.alive()

    def map_memory(self) -> int:
        return sum(d.map_memory() for d in self._drivers())

    def notes(self) -> List[str]:
        if not self.children and not self.notes_:
            return self.main.notes()
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
            "bpftrace #1: the roots seen when tracing began"
            + ("; " + "; ".join(said) if said else "")
            + "; what a late process did before its bpftrace was on is not in the report"
        )
        return self.main.notes() + [first] + self.notes_

    def kill(self) -> None:
        with self._lock:
            self._closed = True
        for d in self._drivers():
            d.kill()
        if self._copies:  # mapped by a bpftrace still ending: its mapping keeps the file
            shutil.rmtree(self._copies, ignore_errors=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
