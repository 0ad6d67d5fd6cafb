"""`probedsl run`: launch or find the target, drive a backend, print reports until the end."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import List, Optional

from probedsl.passes import allocators
from probedsl.report import history, timeseries
from probedsl import compiler, drivers, faults, targets, threads
from probedsl.run import bearers, doctor, estimate, late_roots, pyhold, signals
from probedsl.trust import escape
from probedsl.outputs import prometheus
from probedsl.reachability import scanner
from probedsl.errors import ProbedslError, one_line
from probedsl.process import pidns, roots
from probedsl.process.launcher import HeldCommand
from probedsl.process.unprobed import UnprobedRoots
from probedsl.process.procfs import Ending, process_alive, processes_named
from probedsl.process.mappings import MappingTracker
from probedsl.passes.private_libs import PrivateLibraries
from probedsl.drivers.rundata import Snapshot
from probedsl.stacks.symbolizer import Symbolizer
from probedsl.binaries import sourcelines
from probedsl.process.tree_tether import TreeTether
from probedsl.run.options import (RunOptions, scope_of, check_output, traced, probed_files, bystander_notes,
                                  end_command, read_ahead)
from probedsl.run.reporting import Reporting, next_time

METRICS_REFRESH_S = 10         # --prometheus alone: how often the gauges are refreshed
INCOMPLETE = 3                 # exit status: the report says "complete": false (docs/usage.md)


def run(opts: RunOptions, out=sys.stdout, err=sys.stderr) -> int:
    return Session(opts, out, err).run()


class Session(Reporting):
    """One `probedsl run`, in the states below; Session.run is the only place that moves
    between them, so a new part of a run is started and ended at a named step.

    prepare   the program compiled for the target and the scope resolved (a `-- CMD` is
              forked, blocked before its exec); nothing is attached yet
    start     1. the mapping tracker (perf rings, its thread): before any probe, so no mmap is missed
              2. the driver: program loaded, maps created, every probe attached
              3. feeders: the driver's unwinder told of mappings (tracker -> kernel maps)
              4. the tether (--reachability), then the command let go ("tracing ..." is said)
    trace     reports at intervals until a signal, the target's end, --duration or the tracer's end
              (bpftrace --comm/--all: a bpftrace more for each root that appears, run/late_roots.py)
    end       always, in this order, each step run even if one before it failed:
              1. feeders stopped: listeners detached, the unwinder closed to writes, the
                 tracker's thread joined (bounded)
              2. the final snapshot (scanned first with --reachability)
              3. the report rendered and written, with every thread failure in its notes
              4. the maps closed (driver.kill: the kernel's uprobe teardown)
              5. the target let go: tether detached, a command never released abandoned
              6. the exporter closed, private library copies removed, signal handlers restored
    A failure before "tracing" is a one-line error; after it, the run always ends with a report.
    """

    def __init__(self, opts: RunOptions, out=sys.stdout, err=sys.stderr):
        self.opts, self.out, self.err = opts, out, err
        self.stop = signals.Stop()
        self.notes: List[str] = []
        self.held: Optional[HeldCommand] = None
        self.unprobed: Optional[UnprobedRoots] = None
        self.scanner: Optional[scanner.Scanner] = None
        self.follower: Optional[TreeTether] = None              # holds each forked child (_hold_forks)
        self.fork_refusal: Optional[str] = None
        self.exit_hold: Optional[pyhold.ExitHold] = None    # a Python command held at its exit
        self.incomplete: List[str] = []
        self.series: Optional[timeseries.Series] = None    # json, html: live memory over time
        self.view = None                                    # --live's screen

    def say(self, text: str) -> None:
        # may quote the traced program's names (its command line, errors naming its files);
        # a closed terminal is no error: the report still goes to -o
        with contextlib.suppress(OSError):
            print(f"probedsl: {escape.for_terminal(text, escape.MAX_MESSAGE)}", file=self.err, flush=True)

    def run(self) -> int:
        if not doctor.has_tracing_rights():
            raise ProbedslError(f"probedsl run needs root, or {doctor.CAP_NAMES}, to attach probes "
                                "(probedsl doctor says what is missing)")
        check_output(self.opts.output)
        threads.reset()
        self.tracing = False
        with contextlib.ExitStack() as self.cleanup:          # end steps 6, 5 and 4, in that order
            handlers: dict = {}
            self.cleanup.callback(signals.restore, handlers)          # last: a Ctrl-C in any cleanup is held
            self.prepare()
            signals.catch(self.stop, handlers)
            self.cleanup.callback(self._let_go)
            self.cleanup.callback(self.driver.kill)
            with contextlib.ExitStack() as self.feeders:       # end step 1
                try:
                    self.start()
                    self.trace()
                except Exception as exc:       # once tracing, whatever fails, the report is made
                    if not self.tracing:
                        raise
                    self.incomplete.append(f"the run failed while tracing: {one_line(exc)}")
            return self.finish()

    def prepare(self) -> None:
        opts, cleanup = self.opts, self.cleanup
        recipe = compiler.load(opts.recipe)
        self.target = target = targets.detect(opts.backend)
        scanner.check_options(opts.reachability, opts.leaks_only, opts.pid, opts.command, opts.sample)
        self.max_live = compiler.check_choices(target, compiler.Choices(max_live=opts.max_live or 0, stacks=opts.stacks))
        scope, resolver, self.held = scope_of(opts, target)
        # the other roots whose files the probes go on: a root that appears later is not one
        self.probed_roots = [k for k in (roots.root_key(p) for p in resolver.others) if k]
        if self.held:
            cleanup.callback(self.held.abandon)        # a no-op once the command was released
        self.private = None
        if self.held and opts.private_libs and not target.scopes_uprobes(scope) and not resolver.root:
            self.private = PrivateLibraries()
            cleanup.callback(self.private.cleanup)
        held, private = self.held, self.private
        choices = compiler.Choices(
            sets=opts.sets, allocator=allocators.choose(opts.allocator, opts.object, opts.symbols_prefix, resolver.resolve),
            max_live=opts.max_live or 0, min_size=opts.min_size, max_size=opts.max_size, scope=scope,
            sample=opts.sample, read_live=bool(opts.ages or opts.reachability), min_age=opts.min_age,
            stacks=opts.stacks, placed=opts.probe_at == "placed",
            private=(lambda program: private.apply(program, held.exe)) if private and held else None)
        program, notes = compiler.plan(recipe, target, choices, resolver)
        for note in notes:
            self.say(note)
        if opts.min_size is not None or opts.max_size is not None:
            self.notes.append("--min-size/--max-size: blocks outside the size range are not recorded, so their "
                              "releases count as releases of unknown keys")
        if opts.reachability:
            scanner.check_program(program)
        self.program = program
        ns = pidns.own()    # in a container: the pids the program compares are its namespace's
        self.driver = drivers.for_target(target, program, compiler.generate(
            program, target, ready_pid=os.getpid(), pidns_ino=ns.ino if ns else 0))
        if target.backend == "bpftrace" and late_roots.applies(target, program.scope):   # a bpftrace per new root
            lowering = late_roots.lowering(recipe, target, choices, opts, ns.ino if ns else 0)
            self.driver = late_roots.LateRoots(self.driver, lowering, self.say, stopping=self.ending)
        self.marks = {"generated": estimate.process_age()}      # --estimate with -- CMD says them
        self.exporter = None
        if opts.prometheus:
            self.exporter = prometheus.Exporter(opts.prometheus)
            cleanup.callback(self.exporter.close)
        self.resolver_root = resolver.root
        self.describe = {"all": "all processes", "comm": f"comm {scope.comm}", "pid": f"pid {scope.pid}",
                         "cmd": f"command {' '.join(opts.command)} (pid {scope.pid})"}[scope.mode]

    def start(self) -> None:
        opts, scope = self.opts, self.program.scope
        self.tracker = MappingTracker().start()        # 1: before attaching, so no mmap is missed
        if scope.mode in ("pid", "cmd") and scope.follow_forks:
            self.tracker.follow(scope.pid)             # its children from their first fork
        self.cleanup.callback(self.tracker.close)      # after the report: it names the frames
        self.cleanup.callback(sourcelines.stop_warm)   # (the read-ahead's addr2lines)
        if late_roots.applies(self.target, scope):
            self.unprobed = UnprobedRoots(scope.comm if scope.mode == "comm" else None, self.probed_roots, self.say)
            if isinstance(self.driver, late_roots.LateRoots):
                self.driver.watch(self.unprobed)
            self.tracker.listen(self.unprobed)
        self.feeders.callback(self.tracker.stop_thread)
        if self.resolver_root:
            self.tracker.files.known_roots.add(self.resolver_root)
        if opts.estimate and not self.held:        # a command has no calls to count before it runs
            for line in estimate.measure(self.program, self.target).lines():
                self.say(line)
        for pid in ([scope.pid] if scope.mode == "pid" else
                    processes_named(scope.comm) if scope.mode == "comm" else []):
            self.tracker.snapshot(pid)                  # mapped before we started listening
        faults.wait("attach")
        self._hold_forks()                             # before the probes: no fork is missed
        read_ahead(self.program, self.held, self.private.env if self.private else None, self.tracker)
        self.driver.start()                            # 2
        self._watch_bearers(self.follower)
        if self.follower and scope.tracks_children:
            if self.held:               # a copy of probedsl until its exec: traced from there
                self.follower.on_exec = lambda: self.driver.trace_from_exec(self.held.pid)
            self.follower.follow(self.driver.attach_child)
        self.marks["attached"] = estimate.process_age()
        if self.opts.reachability and scope.mode == "pid":
            self._tie(scope.pid)
            self._watch_bearers(self.scanner.tether if self.scanner else None)
        # 3: the unwinder's rows for what the command will map, and for every process as it maps
        self.feeders.callback(self.driver.stop_following, self.tracker)
        self.driver.follow_mappings(self.tracker, [self.held.exe] + probed_files(self.program) if self.held else [],
                                    traced(scope, self.tracker), python=self.opts.python_frames)
        if self.stop.signal is not None:      # interrupted while attaching: no command runs
            raise KeyboardInterrupt
        self._tracing()
        # scripts and tests wait for this line: every probe is attached
        self.say(f"tracing {self.describe} with {self.target.name}; Ctrl-C ends with a report")
        unwinder = self.driver.unwind_memory()
        self.say(f"note: BPF maps hold {self.driver.map_memory() / 2**20:.0f} MB of kernel memory (live tables "
                 f"sized for --max-live {self.max_live}"
                 + (f"; {unwinder / 2**20:.0f} MB for --stacks dwarf's unwind tables and stacks" if unwinder else "")
                 + ")")
        for line in self.target.notes(self.program) + bystander_notes(self.program, self.target, self.private,
                                                                       self.fork_refusal):
            self.say(f"note: {line}")
        python = pyhold.bpftrace_note(self.target.backend, scope.mode, scope.pid, self.held.exe if self.held else "")
        if python:
            self.notes.append(python)
            self.say(f"note: {python}")
        if self.held:
            self._release()                            # 4
            if opts.estimate:
                self.marks["released"] = estimate.process_age()
                self.say(estimate.startup_line(self.marks))

    def _release(self) -> None:
        """Let the command exec; with dwarf stacks, held at its exec until its image's and the loader's
        rows are in (the mapping hold, on with the unwinder for a command, holds each library as it is mapped)."""
        env = self.private.env if self.private else None
        at_exec = None
        if self.driver.unwinds_stacks():
            def at_exec():
                faults.wait("exec-hold")
                self.tracker.snapshot(self.held.pid)
        if self.follower and at_exec:
            self.follower.hold_exec(at_exec)
        if self.opts.reachability:
            self._tie(self.held.pid, at_exec)
        elif at_exec and self.opts.python_frames:
            self.exit_hold = pyhold.ExitHold.start(self.held.pid, self.held.exe, at_exec, self.notes, self.follower)
        tether = self.follower or (self.scanner.tether if self.scanner else None)
        tether = tether or (self.exit_hold.tether if self.exit_hold else None)
        self._watch_bearers(tether)
        self.held.release(env, at_exec, tether=tether)

    def _hold_forks(self) -> None:
        """--pid or a command where the target attaches uprobes per process: a tether (ptrace, the
        command's reaper) holds each child at its fork (following forks) until its uprobes are on,
        and moves a process's uprobes off its main thread when that ends alone (process.rebind).
        Refused (another tracer holds it): every process is probed and the BPF filter keeps the
        traced ones, as a note says; not following forks, the uprobes stay on the main thread."""
        scope = self.program.scope
        if not (scope.mode in ("pid", "cmd") and self.target.scopes_uprobes(scope)):
            return
        forks = scope.tracks_children
        tether = TreeTether(scope.pid, forks=forks, hold_exit=self.opts.reachability, launched=bool(self.held),
                            purpose="following forks" if forks else "following the main thread")
        try:
            tether.start()
        except ProbedslError as exc:
            if forks:
                self.fork_refusal = str(exc)
            self.notes.append(f"{exc}: " + ("children are followed by uprobes on every process" if forks else
                                            "allocations after its main thread ends alone (pthread_exit) would "
                                            "not be recorded"))
            return
        self.cleanup.callback(tether.close)
        self.follower = tether
        if self.held:
            self.held.tether = tether
        self.driver.held_forks = forks

    def _watch_bearers(self, tether) -> None:
        bearers.watch(tether, self.driver, self.target.name, self.target.scopes_uprobes(self.program.scope), self.notes)

    def _tie(self, pid: int, exec_hold=None) -> None:
        """--reachability: hold the process under ptrace; a refusal is a note, not the end."""
        children = self.program.scope.tracks_children       # each child held and scanned at its exit
        if children:
            self.driver = scanner.Serialized(self.driver)
        try:
            self.scanner = scanner.Scanner(self.program, self.driver, pid, self.opts.leaks_only, exec_hold,
                                           tether=self.follower, children=children)
        except ProbedslError as exc:
            self.notes.append(str(exc))
            self.say(f"note: {exc}")
            return
        if self.target.backend == "bpftrace":
            self.say("note: --reachability pauses the process while bpftrace prints every live block, naming "
                     "each frame (~0.4 ms a block: 7 s for 16,000); --backend bcc reads them in ~12 us a block")

    def _let_go(self) -> None:
        """End step 5: the target runs on (or was reaped); never left stopped. (A command never
        released is abandoned by prepare's callback, which runs after this.)"""
        if self.scanner:
            self.scanner.close()
        if self.exit_hold:
            self.exit_hold.close()

    def _at_exit(self) -> None:
        """A command held at its exit: scanned (--reachability) or its stacks read, then let go."""
        if self.scanner:
            self.scanner.at_exit()
        elif self.exit_hold:
            self.exit_hold.at_exit(self.driver)

    def ending(self) -> bool:
        """A signal came or --duration is over: the run is to end (no new work begins)."""
        if self.stop.signal is not None:
            return True
        return bool(self.tracing and self.opts.duration and time.monotonic() - self.started >= self.opts.duration)

    def ended(self) -> bool:
        """Whether the run is over: a signal, the command or pid gone, --duration, the tracer gone."""
        scope, held = self.program.scope, self.held
        if self.ending() or (held and held.poll() is not None) or (scope.mode == "pid" and not process_alive(scope.pid)):
            return True
        if not self.driver.alive():
            self.incomplete.append(f"{self.target.name} ended early: {self.driver.explain_failure()}")
            return True
        return False

    def _tracing(self) -> None:
        """From here on the run ends with a report: what finish() needs exists."""
        self.symbolizer = Symbolizer(self.tracker)
        self.symbolizer.keep_interpreter = self.opts.python_native
        self.growth = history.Growth(self.opts.growth_intervals)
        self.sequence = 0
        self.started = time.monotonic()
        self.last_snapshot = None
        self.tracing = True

    def trace(self) -> None:
        """Reports at intervals until the run ends."""
        opts, driver = self.opts, self.driver
        self._start_series()
        next_report = self.started + opts.interval if opts.interval else None
        # --prometheus without --interval: the gauges are refreshed this often, nothing printed
        next_metrics = self.started + METRICS_REFRESH_S if self.exporter and not opts.interval else None
        self.cleanup.callback((end := Ending(self.program.scope.pid)).close)  # (0 but with a pid or command)
        while True:
            self._at_exit()
            if self.ended():
                break
            if next_report and time.monotonic() >= next_report:
                if opts.count and self.sequence >= opts.count - 1:
                    break  # the count-th report is the final one
                next_report = self.interval_report(next_report)
            if next_metrics and time.monotonic() >= next_metrics:
                next_metrics = next_time(next_metrics, METRICS_REFRESH_S)
                snap = driver.snapshot(timeout=5)
                if snap is not None:
                    self.last_snapshot = snap
                    self.exporter.publish(self.build_report(snap))
            self._sample_if_due()
            driver.idle(*end.turn(0.05))
        if self.held and self.held.poll() is None and self.stop.signal is not None:
            end_command(self.held, self.stop.signal, self.notes, self._at_exit)
        if self.stop.signal is not None:
            # a second Ctrl-C now would cost the report: say what happens instead
            signals.catch(signals.finishing, {})

    def finish(self) -> int:
        """End steps 2 and 3: the final snapshot and its report; the exit status."""
        faults.wait("final")
        driver, held = self.driver, self.held
        exit_status = held.poll() if held else None
        try:
            if self.scanner:
                final, reach = self.scanner.final(driver.stop)
                self.notes += self.scanner.notes
            else:
                try:
                    self._at_exit()
                except Exception as exc:       # the final snapshot is still taken
                    self.notes.append(f"the snapshot at the command's exit failed ({one_line(exc)}): "
                                      "Python frames of code freed at its end may be unnamed")
                final, reach = driver.stop(), None
        except Exception as exc:              # BCC raises bare Exception
            self.incomplete.append(f"the final snapshot failed: {one_line(exc)}")
            final, reach = None, None
        if final is None:
            why = f"{self.target.name} gave no final snapshot: {driver.explain_failure()}"
            if self.last_snapshot is None:
                self.incomplete.append(why + "; nothing was read")
                final = Snapshot(time.monotonic_ns(), None, {}, final=True)
            else:
                self.incomplete.append(why + "; this is the last report's data")
                final = self.last_snapshot
        if held and exit_status is None:
            exit_status = held.poll()
        if self.view is not None:
            self.view.close()                  # the screen gives way to the final report
        rep = self.emit(final, exit_status, reachability=reach)
        for why in rep.incomplete:
            self.say(f"the report is incomplete: {why}")
        status = exit_status if exit_status is not None else 0
        if not self.saved:
            return status or 1
        return INCOMPLETE if rep.incomplete and status == 0 else status

