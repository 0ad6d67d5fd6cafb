"""`probedsl run`: launch or find the target, drive a backend, print reports until the end."""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional

from . import compiler, estimate, formats, ir, report
from .drivers.bcc import BccDriver
from .drivers.bpftrace import BpftraceDriver
from .errors import ProbedslError
from .launcher import HeldCommand
from .procfs import process_alive, processes_named
from .libraries import LibraryResolver
from .mappings import MappingTracker
from .private_libs import PrivateLibraries
from .symbolizer import Symbolizer

TASK_COMM_LEN = 16


@dataclass
class RunOptions:
    recipe: str
    backend: str = "bpftrace"
    comm: Optional[str] = None
    pid: Optional[int] = None
    all: bool = False                  # every process (system-wide)
    follow_forks: bool = True          # --pid/-- CMD: trace forked children too
    private_libs: bool = True          # -- CMD: probe private copies of its libraries
    command: List[str] = field(default_factory=list)
    interval: int = 0
    duration: float = 0
    top: Optional[int] = None
    sets: dict = field(default_factory=dict)
    format: str = "text"
    output: Optional[str] = None       # each report replaces this file's content
    color: Optional[bool] = None       # None: colour when writing text to a terminal
    min_age: Optional[float] = None    # seconds; overrides the recipe's min_age
    ages: bool = False                 # read every live entry at each report (exact oldest ages)
    sample: int = 1                    # record one acquisition in N
    estimate: bool = False             # count calls for a second first and print the expected cost
    per_process: bool = False          # --comm on BCC: attach to each matching process only
    growth_intervals: int = 3
    max_live: Optional[int] = None     # None: the backend's default (ir.BACKEND_MAX_LIVE)


def validate_comm(comm: str) -> str:
    raw = comm.encode()
    if not raw or len(raw) >= TASK_COMM_LEN:
        raise ProbedslError(f"--comm {comm!r}: a process name is 1 to {TASK_COMM_LEN - 1} bytes "
                            "(the kernel keeps only the first 15)")
    if re.search(r"[\x00-\x1f\x7f]", comm):
        raise ProbedslError(f"--comm {comm!r}: control characters cannot appear in a process name")
    return comm


def _target(opts: RunOptions):
    chosen = [x for x in (opts.comm, opts.pid, opts.command or None, opts.all or None) if x is not None]
    if len(chosen) != 1:
        raise ProbedslError("choose one target: --comm NAME, --pid PID, --all, or -- CMD ARGS...")
    if opts.all:
        return ir.Target("all"), LibraryResolver(), None
    if opts.comm is not None:
        if opts.per_process and opts.backend != "bcc":
            raise ProbedslError("--per-process needs --backend bcc (bpftrace 0.17 cannot scope a uprobe to a pid)")
        return ir.Target("comm", comm=validate_comm(opts.comm), per_process=opts.per_process), LibraryResolver(), None
    if opts.pid is not None:
        if opts.pid <= 0 or not process_alive(opts.pid):
            raise ProbedslError(f"--pid {opts.pid}: no such process")
        return ir.Target("pid", pid=opts.pid, follow_forks=opts.follow_forks), LibraryResolver(pid=opts.pid), None
    held = HeldCommand(opts.command)
    return ir.Target("cmd", pid=held.pid, follow_forks=opts.follow_forks), LibraryResolver(command=held.exe), held


class _Stop:
    """Set by SIGINT/SIGTERM; the run then ends with a final report. The handler only stores
    the signal: it runs in the main thread, and an Event.set() there deadlocked when the
    signal came while the main thread held that Event's lock inside Event.wait() (seen: a
    tracer hung at Ctrl-C)."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def run(opts: RunOptions, out=sys.stdout, err=sys.stderr) -> int:
    if os.geteuid() != 0:
        raise ProbedslError("probedsl run needs root (or CAP_BPF and CAP_PERFMON) to attach probes")
    recipe = compiler.load(opts.recipe)
    if opts.estimate and opts.command:
        raise ProbedslError("--estimate counts calls of a running process: use it with --pid, --comm or --all")
    target, resolver, held = _target(opts)
    private = None
    try:
        max_live = opts.max_live or ir.BACKEND_MAX_LIVE[opts.backend]
        program = compiler.build(recipe, opts.sets, resolver=resolver, max_live=max_live).with_target(target)
        program = program.sampled(opts.sample).reading_live(opts.ages or program.needs_live(opts.min_age))
        if held and opts.private_libs:
            private = PrivateLibraries()
            program = private.apply(program, held.exe)
        generated = compiler.generate(program, opts.backend, ready_pid=os.getpid())
        driver = {"bpftrace": BpftraceDriver, "bcc": BccDriver}[opts.backend](program, generated)
        tracker = MappingTracker().start()       # before attaching, so no mmap is missed
    except BaseException:
        if held:
            held.abandon()
        if private:
            private.cleanup()
        raise
    if opts.estimate:
        try:
            for line in estimate.measure(program).lines():
                print(f"probedsl: {line}", file=err, flush=True)
        except BaseException:
            driver.kill()
            tracker.stop()
            raise
    for pid in ([target.pid] if target.mode == "pid" else
                processes_named(target.comm) if target.mode == "comm" else []):
        tracker.snapshot(pid)                  # mapped before we started listening
    stop = _Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    describe = {"all": "all processes", "comm": f"comm {target.comm}", "pid": f"pid {target.pid}",
                "cmd": f"command {' '.join(opts.command)} (pid {target.pid})"}[target.mode]
    symbolizer = Symbolizer(tracker)
    notes: List[str] = []
    exit_status = None
    try:
        try:
            driver.start()
        except BaseException:
            if held:
                held.abandon()
            raise
        print(f"probedsl: tracing {describe} with {opts.backend}; Ctrl-C ends with a report", file=err, flush=True)
        mb = driver.map_memory() / 2**20
        print(f"probedsl: note: BPF maps hold {mb:.0f} MB of kernel memory (live tables sized for --max-live "
              f"{max((r.max_live for r in program.resources), default=0)}"
              f"{'; bpftrace sizes every keyed map so' if opts.backend == 'bpftrace' else ''})",
              file=err, flush=True)
        for line in _bystander_notes(program, opts, private):
            print(f"probedsl: note: {line}", file=err, flush=True)
        if held:
            held.release(private.env if private else None)
        started = time.monotonic()
        next_report = started + opts.interval if opts.interval else None

        growth = report.Growth(opts.growth_intervals)
        sequence = 0

        def emit(snap):
            nonlocal sequence
            sequence += 1
            lost = [f"{tracker.lost} process-mapping records were lost; some frames may be unnamed"] \
                if tracker.lost else []
            rep = report.build(program, snap, symbolizer, backend=opts.backend, target=describe,
                               duration_s=time.monotonic() - started, top=opts.top, min_age_s=opts.min_age,
                               exit_status=exit_status, notes=notes + lost)
            rep.sequence = sequence
            tracker.prune(report.referenced_pids(program, snap))
            growth.annotate(rep)
            write_report(formats.render(rep, opts.format, _use_color(opts, out)), opts.output, out)

        while stop.signal is None:
            if held and held.poll() is not None:
                break
            if target.mode == "pid" and not process_alive(target.pid):
                break
            if opts.duration and time.monotonic() - started >= opts.duration:
                break
            if not driver.alive():
                notes.append(f"the {opts.backend} process ended early")
                break
            if next_report and time.monotonic() >= next_report:
                next_report += opts.interval
                snap = driver.snapshot(timeout=5)
                if snap is not None:
                    emit(snap)
            driver.idle(0.05)
        if held:
            if held.poll() is None and stop.signal is not None:
                _end_command(held, stop.signal, notes)
            exit_status = held.poll()
        final = driver.stop()
        if final is None:
            print("probedsl: the tracer ended without a final report: " +
                  getattr(driver, "explain_stderr", lambda: "no data")(), file=err)
            return 1
        emit(final)
    finally:
        driver.kill()
        tracker.stop()
        if private:
            private.cleanup()
        for s, handler in old.items():
            signal.signal(s, handler)
    return exit_status if exit_status is not None else 0


def _bystander_notes(program: ir.Program, opts: RunOptions, private: Optional[PrivateLibraries]) -> List[str]:
    """Say when processes we do not trace pay the uprobe trap anyway (it comes before any filter)."""
    target = program.target
    scoped = (private is not None and all(private.owns(p.path)
                                          for r in program.resources for p in r.probes if p.kind == "uprobe")) \
        or (opts.backend == "bcc" and target.mode in ("pid", "cmd") and not target.tracks_children) \
        or target.per_process
    if scoped:
        return []
    files = sorted({p.path for r in program.resources for p in r.probes if p.kind == "uprobe"})
    if not files:
        return []
    avoid = ("-- CMD (private library copies), --backend bcc --comm NAME --per-process, or --backend bcc "
             "--pid PID --no-follow-forks avoid it"
             if target.mode != "cmd" else "the command loads them from elsewhere; see docs/usage.md")
    return [f"every process using {', '.join(os.path.basename(f) for f in files)} pays a uprobe trap "
            f"(~3 us per probed call) while this runs; {avoid}"]


def _use_color(opts: RunOptions, out) -> bool:
    if opts.format != "text" or opts.output:
        return False
    if opts.color is not None:
        return opts.color
    return hasattr(out, "isatty") and out.isatty() and "NO_COLOR" not in os.environ


def write_report(text: str, output: Optional[str], out) -> None:
    if output:
        tmp = f"{output}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, output)             # readers never see half a report
    else:
        out.write(text)
        out.flush()


def _end_command(held: HeldCommand, signum: int, notes: List[str]) -> None:
    """Ctrl-C from a terminal reaches the command too; give it a moment, then pass the
    signal on (SIGTERM sent to probedsl alone), and report even if it still runs."""
    for wait_s, forward in ((1.0, True), (5.0, False)):
        deadline = time.monotonic() + wait_s
        while held.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if held.poll() is not None:
            return
        if forward:
            os.kill(held.pid, signum)
    notes.append(f"the command (pid {held.pid}) was still running when the report was taken")


def run_generated_bcc(c_text: str, manifest: dict, argv: List[str]) -> int:
    """Minimal runner for a compiled BCC loader: --pid PID (optional), until Ctrl-C."""
    from .drivers.bcc import BccLoader
    pid = int(argv[argv.index("--pid") + 1]) if "--pid" in argv else 0
    loader = BccLoader(c_text, manifest, pid)
    print("tracing; Ctrl-C to print live resources", file=sys.stderr)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    snap = loader.snapshot(final=True)
    for name, t in snap.totals.items():
        groups = next(iter(snap.tallies.get(name, {}).values()), {})     # any tally covers every entry
        print(f"{name}: {sum(g[1] for g in groups.values())} live, {sum(g[0] for g in groups.values())} bytes; "
              f"{t.acquired} acquired, "
              f"{t.released} released, {t.unknown_releases} unknown releases")
    loader.close()
    return 0
