"""A run's reports: the snapshot built into a report, the time series sampled, each report written and exported."""

from __future__ import annotations

import contextlib
import signal
import time

from probedsl.report import assemble
from probedsl import faults, notices, report, targets, threads
from probedsl.outputs import formats
from probedsl.outputs import live
from probedsl.report import timeseries
from probedsl.outputs.write import write_report
from probedsl.run.options import use_color


def next_time(due: float, every: float) -> float:
    """The time after due: every later or, when that has passed (a late report), every after
    now, as top's: the times a late one overran are not made up back to back."""
    return due + every if due + every > time.monotonic() else time.monotonic() + every


class Reporting:
    """What Session does at each report (a base of Session: it reads the session's state)."""

    def interval_report(self, due: float) -> float:
        """The report due (none as --duration ends: the final one is), then when the next is
        due (next_time; never just before --duration's end)."""
        opts = self.opts
        if not (opts.duration and due - self.started >= opts.duration - 1e-6):
            faults.wait("report")
            if self.scanner and self.scanner.tether.attached:
                snap, reach = self.scanner.scan(lambda: self.driver.snapshot(timeout=5))
            else:
                snap, reach = self.driver.snapshot(timeout=5), None
            if snap is not None:
                self.last_snapshot = snap
                self.emit(snap, reachability=reach)
        due = next_time(due, opts.interval)
        if opts.duration and due - self.started > opts.duration - opts.interval / 2:
            return self.started + opts.duration  # (the final's)
        return due

    def build_report(self, snap, exit_status=None, reachability=None) -> report.Report:
        program, tracker = self.program, self.tracker
        lost = [f"{tracker.lost} process-mapping records were lost; some frames may be unnamed"] if tracker.lost else []
        rep = assemble.build(
            program,
            snap,
            self.symbolizer,
            backend=self.target.backend,
            backend_version=targets.version_text(self.target.version),
            target=self.describe,
            duration_s=time.monotonic() - self.started,
            top=self.opts.top,
            min_age_s=self.opts.min_age,
            exit_status=exit_status,
            notes=self.notes + lost + self.driver.notes() + (reachability.notes if reachability else []),
            reachability=reachability,
            complete=self.opts.format != "text",
        )
        rep.incomplete = list(dict.fromkeys(self.incomplete + snap.incomplete + threads.failures()))
        # said while the stacks were named (a debug file refused, a file over a parser's bound)
        rep.notes = rep.notes + [n for n in notices.all_notes() if n not in rep.notes]
        if self.unprobed and (untraced := self.unprobed.note()):
            rep.notes.append(untraced)
            rep.untraced = self.unprobed.processes()
        if self.series is not None:
            rep.series = self.series.to_dict(
                timeseries.signer(program, self.symbolizer),
                snap if snap.live is not None else None,
                int(self.started * 1e9),
            )
        tracker.prune(assemble.referenced_pids(program, snap))
        self.growth.annotate(rep)
        return rep

    def _start_series(self) -> None:
        """Live memory over time, one sample a period (probedsl.report.timeseries), for the formats that
        keep it (a sample is a snapshot: bpftrace prints every tally); --live's screen."""
        self.series = timeseries.Series(self.program) if self.opts.format in ("json", "html") else None
        self.next_sample = self.started if self.series is not None else float("inf")
        if self.opts.live:
            self.view = live.start(self.out, self.opts.interval or 1, self.say)
            if self.view is not None:
                self.cleanup.callback(self.view.close)

    def _sample_if_due(self) -> None:
        """One snapshot a period at most, off the probes' path; slow snapshots (bpftrace prints
        every tally) stretch the period. Also the --live view's keys (q ends the run)."""
        if self.view is not None and self.view.poll():
            self.stop.signal = signal.SIGINT
        if time.monotonic() < self.next_sample:
            return
        began = time.monotonic()
        snap = self.driver.snapshot(timeout=5)
        if snap is not None:
            self.last_snapshot = snap
            self._sampled(snap, time.monotonic() - began)

    def _sampled(self, snap, cost_s: float = 0.0) -> None:
        if self.series is None:  # not kept by this format, or no report before tracing
            return
        self.series.add(max(0.0, time.monotonic() - self.started), snap)
        self.next_sample = time.monotonic() + self.series.next_delay(cost_s)

    def emit(self, snap, exit_status=None, reachability=None) -> report.Report:
        """Render and write one report; self.saved is False if it could not go where asked
        (then it went to stdout, and the error was said)."""
        self.sequence += 1
        self._sampled(snap)
        rep = self.build_report(snap, exit_status, reachability)
        if self.view is not None and not self.view.closed:
            rep.sequence = self.sequence  # --live: interval reports go to the screen
            self.view.show(rep)
            self.saved = True
            return rep
        rep.sequence = self.sequence
        if self.exporter:
            self.exporter.publish(rep)
        text = formats.render(rep, self.opts.format, use_color(self.opts, self.out))
        self.saved = False
        try:
            write_report(text, self.opts.output, self.out)
            self.saved = True
        except OSError as exc:
            if not self.opts.output:
                self.say(f"error: cannot write the report: {exc.strerror or exc}")
                return rep
            self.say(f"error: cannot write the report to {self.opts.output}: {exc.strerror or exc}; it follows here")
            with contextlib.suppress(OSError):
                write_report(text, None, self.out)
        return rep
