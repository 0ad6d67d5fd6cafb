"""What a run was asked: RunOptions, checked, and the scope they choose (a command forked and held before its exec); which processes are traced, and what bystanders pay."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import List, Optional

from probedsl import ir, targets
from probedsl.process import roots
from probedsl.errors import ProbedslError
from probedsl.process.launcher import HeldCommand
from probedsl.process import pidns, procfs
from probedsl.process.procfs import process_alive, processes_named
from probedsl.process.libraries import LibraryResolver, dynamic_loader, linked_libraries
from probedsl.process.mappings import MappingTracker
from probedsl.passes.private_libs import PrivateLibraries
from probedsl.stacks import stacktrust, unwind_tables


@dataclass
class RunOptions:
    recipe: str
    backend: str = targets.DEFAULT_BACKEND
    comm: Optional[str] = None
    pid: Optional[int] = None
    all: bool = False  # every process (system-wide)
    follow_forks: bool = True  # --pid/-- CMD: trace forked children too
    private_libs: bool = True  # -- CMD: probe private copies of its libraries
    command: List[str] = field(default_factory=list)
    interval: int = 0
    duration: float = 0
    count: int = 0  # COUNT after INTERVAL: the count-th report, the final one, ends the run
    top: Optional[int] = None
    sets: dict = field(default_factory=dict)
    format: str = "text"
    output: Optional[str] = None  # each report replaces this file's content
    color: Optional[bool] = None  # None: colour when writing text to a terminal
    min_age: Optional[float] = None  # seconds; overrides the recipe's min_age
    ages: bool = False  # read every live entry at each report (exact oldest ages)
    sample: int = 1  # record one acquisition in N
    estimate: bool = False  # count calls for a second first and print the expected cost
    per_process: bool = False  # --comm: attach to each matching process only
    growth_intervals: int = 3
    max_live: Optional[int] = None  # None: the target's default
    stacks: Optional[str] = None  # dwarf | fp; None: dwarf where the target can
    probe_at: str = "placed"  # placed (probedsl.passes.placement) | entry
    reachability: bool = False  # scan the process at each report: valgrind's leak kinds
    leaks_only: bool = False  # with reachability: stack entries leave still-reachable blocks out
    python_native: bool = False  # keep the interpreter's frames that Python frames explain
    python_frames: bool = True  # BCC dwarf: the Python walk (off: a CPython's stacks are native only)
    prometheus: Optional[str] = None  # ADDR:PORT to serve the latest report's gauges on
    allocator: Optional[str] = None  # probedsl.passes.allocators.KNOWN
    object: Optional[str] = None  # -O: the library allocation calls are in
    symbols_prefix: Optional[str] = None
    min_size: Optional[int] = None  # only acquisitions of min_size <= size <= max_size
    max_size: Optional[int] = None
    live: bool = False  # a full-screen view refreshed at each report (probedsl.outputs.live)


def scope_of(opts: RunOptions, target: targets.Target):
    """(scope, library resolver, held command or None) for the options."""
    chosen = [x for x in (opts.comm, opts.pid, opts.command or None, opts.all or None) if x is not None]
    if len(chosen) != 1:
        raise ProbedslError("choose one target: --comm NAME, --pid PID, --all, or -- CMD ARGS...")
    if opts.per_process and opts.comm is None:
        raise ProbedslError("--per-process goes with --comm NAME")
    if opts.all:
        # processes in other roots (containers) load other files: probe theirs too
        return ir.Scope("all"), LibraryResolver(others=roots.one_per_other_root(procfs.everyone())), None
    if opts.comm is not None:
        if opts.per_process and not target.per_process_comm:
            backends = " or ".join(sorted({t.backend for t in targets.TARGETS if t.per_process_comm}))
            raise ProbedslError(
                f"--per-process: {target.name} cannot attach uprobes per process; use --backend {backends}"
            )
        comm = procfs.valid_comm(opts.comm)
        # --per-process: BCC resolves each process's libraries in its own root as it attaches
        others = [] if opts.per_process else roots.one_per_other_root(processes_named(comm))
        resolver = LibraryResolver(others=others)
        return ir.Scope("comm", comm=comm, per_process=opts.per_process), resolver, None
    if opts.pid is not None:
        if opts.pid <= 0 or not process_alive(opts.pid):
            raise ProbedslError(f"--pid {opts.pid}: no such process")
        if target.backend == "bpftrace" and pidns.nested(opts.pid):
            raise ProbedslError(
                f"--pid {opts.pid}: the process runs in a PID namespace nested in probedsl's, "
                "where bpftrace cannot read its pid; use --backend bcc, or run probedsl in its namespace"
            )
        return ir.Scope("pid", pid=opts.pid, follow_forks=opts.follow_forks), LibraryResolver(pid=opts.pid), None
    held = HeldCommand(opts.command)
    root, command = roots.chroot_command([held.exe] + opts.command[1:])
    if root:  # chroot ROOT CMD: the libraries CMD loads there
        inside = (
            shutil.which(command[0], path=":".join(root + d for d in os.defpath.split(":") + ["/usr/sbin"]))
            if "/" not in command[0]
            else root + command[0]
        )
        if inside is None:
            held.abandon()
            raise ProbedslError(f"command not found in {root}: {command[0]}")
        resolver = LibraryResolver(command=inside[len(root) :], root=root)
    else:
        resolver = LibraryResolver(command=held.exe)
    return ir.Scope("cmd", pid=held.pid, follow_forks=opts.follow_forks), resolver, held


def traced(scope: ir.Scope, tracker: MappingTracker):
    """Which processes' mappings the unwinder needs: the traced ones (None: every process). On
    a busy machine the others' files would cost rows computed for nothing."""
    if scope.mode in ("pid", "cmd"):
        root = scope.pid
        if not scope.follow_forks:
            return lambda pid: pid == root
        return tracker.descends_from
    if scope.mode == "comm":
        return lambda pid: procfs.named(pid, scope.comm)
    return None


def probed_files(program: ir.Program) -> List[str]:
    return sorted({f for r in program.resources for p in r.probes if p.kind == ir.ProbeKind.UPROBE for f in p.files})


def read_ahead(program: ir.Program, held: Optional[HeldCommand], env: Optional[dict], tracker: MappingTracker) -> None:
    """The call-frame tables the report (fp) or the unwinder (dwarf) will read, read on a thread
    while the backend compiles: the probed libraries' and the command's; with dwarf stacks, the
    unwinder's rows of every file a pid maps, or of those the loader maps for the command (with
    env)."""
    if not any(r.records("ustack") for r in program.resources):
        return
    scope, dwarf = program.scope, program.stacks == "dwarf"
    mapped = tracker.mappings(scope.pid) if dwarf and scope.mode == "pid" else []
    # as the kernel names them (/usr/lib/..., not ld.so's /lib/...): the unwinder asks by that name
    linked = [os.path.realpath(p) for p in linked_libraries(held.exe, env)] if held and dwarf else []
    loader = [os.path.realpath(dynamic_loader())] if linked else []  # (its own PT_INTERP may be another)
    # in the order the command needs them: its image and the loader at its exec, then its libraries
    files = ([held.exe] if held else []) + loader + linked + probed_files(program)
    files += [m.path if m.file is None else m.file for m in mapped]
    (unwind_tables if dwarf else stacktrust).read_ahead([f for f in files if f])


def bystander_notes(
    program: ir.Program, target: targets.Target, private: Optional[PrivateLibraries], fork_refusal: Optional[str] = None
) -> List[str]:
    """Say when processes we do not trace pay the uprobe trap anyway (it comes before any filter).
    fork_refusal: why forks could not be held (the children are then followed machine-wide)."""
    scope = program.scope
    paths = [p.path for r in program.resources for p in r.probes if p.kind == ir.ProbeKind.UPROBE]
    scoped = target.scopes_uprobes(scope) and not fork_refusal
    if scoped or (private is not None and all(private.owns(p) for p in paths)):
        return []
    files = sorted(set(paths))
    if not files:
        return []
    scoping = [t for t in targets.TARGETS if t.per_pid_uprobes]
    avoid = (
        f"-- CMD (private library copies), --comm NAME --per-process (bcc), or --pid PID "
        f"--no-follow-forks ({', '.join(t().name for t in scoping)}) avoid it"
        if scope.mode != "cmd"
        else "the command loads them from elsewhere; see docs/usage.md"
    )
    return [
        f"every process using {', '.join(os.path.basename(f) for f in files)} pays a uprobe trap "
        f"(~2 us per probed call) while this runs; {avoid}"
    ]


def use_color(opts: RunOptions, out) -> bool:
    if opts.format != "text" or opts.output:
        return False
    if opts.color is not None:
        return opts.color
    return hasattr(out, "isatty") and out.isatty() and "NO_COLOR" not in os.environ


def check_output(output: Optional[str]) -> None:
    """-o where no report could be written is said before tracing begins."""
    if not output:
        return
    try:
        real = os.path.realpath(output)
    except OSError as exc:
        raise ProbedslError(f"-o {output}: {exc.strerror}") from None
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise ProbedslError(f"-o {output}: no such directory {folder}")
    if os.path.isdir(real):
        raise ProbedslError(f"-o {output}: is a directory")
    special = os.path.exists(real) and not os.path.isfile(real)
    if not os.access(real if special else folder, os.W_OK):
        raise ProbedslError(f"-o {output}: not writable")


def end_command(held: HeldCommand, signum: int, notes: List[str], at_exit=None) -> None:
    """Ctrl-C from a terminal reaches the command too; give it a moment, then pass the
    signal on (SIGTERM sent to probedsl alone), and report even if it still runs. at_exit:
    called meanwhile (--reachability scans a command held at its exit)."""
    for wait_s, forward in ((1.0, True), (5.0, False)):
        deadline = time.monotonic() + wait_s
        while held.poll() is None and time.monotonic() < deadline:
            if at_exit:
                at_exit()
            time.sleep(0.05)
        if held.poll() is not None:
            return
        if forward:
            os.kill(held.pid, signum)
    notes.append(f"the command (pid {held.pid}) was still running when the report was taken")
