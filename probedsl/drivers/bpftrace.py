"""Runs a generated bpftrace script and turns its JSON output into Snapshots."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional

from probedsl import ir
from probedsl.targets.base import Generated
from probedsl.drivers import images
from probedsl.ir import layout
from probedsl.ir.layout import TALLY_SHIFT, Counter, counted
from probedsl.targets.bpftrace import READY_MARK, SNAPSHOT_MARK, Bpftrace
from probedsl.process import procfs
from probedsl.process.procfs import map_memory
from probedsl.errors import ProbedslError
from probedsl import threads
from probedsl.drivers.rundata import Live, Snapshot, Totals

# harmless here: memory is accounted by cgroup; kernel-function lists matter to kprobes only
NOISE = ("couldn't set RLIMIT_MEMLOCK", "available_filter_functions")
LEFT_OUT = ("No matches for", "no valid attach points", "ailed to attach")  # (bpftrace 0.27.1's words)
LOCATED = re.compile(r"\S+\.bt:(\d+)(?:-\d+)?:(?:[\d-]+:)?\s*(.*)")  # FILE.bt:LINE[-L]:COL[-C]: message


def errors_first(lines: List[str]) -> List[str]:
    """bpftrace's messages with its warnings left out when it also printed errors: a warning
    (0.25+ warn about generated code) comes with the source line and a marker line under it."""
    if not any("ERROR" in line for line in lines):
        return lines
    out, in_warning = [], False
    for line in lines:
        if "WARNING" in line or "ERROR" in line:
            in_warning = "ERROR" not in line
        if not in_warning:
            out.append(line)
    return out


# a frame line starts with its address in hex; bpftrace 0.27 prints a stack that is part of a
# map key with every space removed ("7f6a37500cb00x7f6a37500cb0([unknown])"), so the address
# ends at a space, at the "0x" of its repetition, or at "("; a kernel address is 16 digits,
# then its symbol, which may start with a hex letter ("ffffffff81652e9fdo_eventfd+12")
_FRAME = re.compile(r"\s*([0-9a-fA-F]{16}|[0-9a-fA-F]+?(?=\s|0x|\(|$))")


def parse_stack(text: str) -> tuple:
    """ustack(perf)/kstack(perf) text -> addresses. bpftrace 0.23 escapes a stack that is a map
    key once more in JSON (a literal \\n, \\t); 0.27 also drops its spaces."""
    out = []
    for line in text.replace("\\n", "\n").replace("\\t", "\t").splitlines():
        m = _FRAME.match(line)
        if m:
            out.append(int(m.group(1), 16))
    return tuple(out)


PR_SET_PDEATHSIG = 1


def _dies_with(parent: int):
    """For bpftrace's child before its exec: it is killed when probedsl's thread that started it
    (the main thread) ends, however it ends. A probedsl killed with SIGKILL must not leave a
    bpftrace behind with its probes on every process of the machine."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it

    def arm() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(126)  # could not arm, or probedsl already ended

    return arm


class _Pairs(list):
    """A JSON object whose keys repeat: bpftrace prints a map keyed by a stored stack once per
    thread that captured it, with the same text; a dict would keep only the last."""

    def items(self):
        return list(self)

    def get(self, key, default=None):
        return next((v for k, v in self if k == key), default)


def _pairs(pairs):
    keys = [k for k, _ in pairs]
    return _Pairs(pairs) if len(set(keys)) != len(keys) else dict(pairs)


def _buckets(raw) -> list:
    return [
        (int(b.get("min", 0)), int(b.get("max", b.get("min", 0))), int(b["count"])) for b in raw or [] if b.get("count")
    ]


def _key_value(field: str, text: str):
    if field in ("ustack", "kstack"):
        return parse_stack(text)
    return text if field == "comm" else int(text)


def _group(text: str, keys: List[str]) -> tuple:
    """A printed map key -> the values of its parts; multi-part keys are joined with ',' and
    only the first part may contain one (ir.group_keys puts comm first)."""
    parts = text.rsplit(",", len(keys) - 1) if len(keys) > 1 else [text]
    return tuple(_key_value(k, v) for k, v in zip(keys, parts))


def _entries(raw) -> list:
    """A printed map's (key text, value) pairs; a map without keys prints as a bare number."""
    return list(raw.items()) if hasattr(raw, "items") else [("", raw or 0)]


def _tally(raw, raw_seen, keys: List[str]) -> dict:
    """Per-group packed sums ((bytes << TALLY_SHIFT) + count) -> {group: (bytes, count, seen
    ns)}. A stored stack keys one entry per thread that captured it (same text), so equal
    groups add up here, before unpacking."""
    totals: Dict[tuple, int] = {}
    for text, value in _entries(raw):
        group = _group(text, keys) if keys else ()
        totals[group] = totals.get(group, 0) + int(value)
    seen: Dict[tuple, int] = {}
    for text, value in _entries(raw_seen):
        group = _group(text, keys) if keys else ()
        seen[group] = max(seen.get(group, 0), int(value))
    out = {}
    for group, total in totals.items():
        count, nbytes = total & ((1 << TALLY_SHIFT) - 1), total >> TALLY_SHIFT
        if count > 0:
            out[group] = (nbytes, count, seen.get(group, 0))
    return out


def _lifetime(raw, keys: List[str]) -> dict:
    """bpftrace hist output -> {group key: buckets}; a multi-key map joins keys with ','."""
    if not keys:
        return {(): _buckets(raw)} if raw else {}
    merged: Dict[tuple, Dict[tuple, int]] = {}
    for text, buckets in (raw or {}).items():
        group = merged.setdefault(_group(text, keys), {})
        # bpftrace keys a stored stack by thread too: equal stacks of two threads merge here
        for lo, hi, n in _buckets(buckets):
            group[(lo, hi)] = group.get((lo, hi), 0) + n
    return {key: [(lo, hi, n) for (lo, hi), n in sorted(g.items())] for key, g in merged.items()}


def snapshot_from_maps(program: ir.Program, maps: Dict[str, object], now_ns: int, final: bool) -> Snapshot:
    live: Optional[List[Live]] = [] if program.read_live else None
    totals: Dict[str, Totals] = {}
    tallied: Dict[str, dict] = {}
    for res in program.resources:
        lay = layout.of(program, res)
        fields = lay.fields
        for key, value in (maps.get(f"@{lay.live}") or {}).items():
            record = dict(zip(fields, value if isinstance(value, list) else [value]))
            live.append(
                Live(
                    resource=res.name,
                    key=tuple(int(k) for k in str(key).split(",")),
                    time_ns=int(record["time"]),
                    size=int(record.get("size", 0)),
                    pid=int(record.get("pid", 0)),
                    tid=int(record.get("tid", 0)),
                    ustack=parse_stack(record.get("ustack", "")),
                    kstack=parse_stack(record.get("kstack", "")),
                    comm=str(record.get("comm", "")),
                    image=int(record.get("image", 0)),
                )
            )
        t = Totals(*(int(maps.get(f"@{lay.counter_map(c)}") or 0) for c in Counter))
        t.lifetime = _lifetime(maps.get(f"@{lay.lifetime.map}"), list(lay.lifetime.keys)) if lay.lifetime else {}
        totals[res.name] = t
        tallied[res.name] = {
            t_.keys: _tally(maps.get(f"@{t_.map}"), maps.get(f"@{t_.seen_map}"), list(t_.keys)) for t_ in lay.tallies
        }
        # counters the kernel does not keep (layout.counted)
        kept = counted(program, lay)
        if Counter.RELEASED not in kept:  # each release adds one lifetime-histogram entry
            t.released = sum(n for buckets in t.lifetime.values() for _, _, n in buckets)
        if Counter.ACQUIRED not in kept:  # every acquisition is live, released, replaced or untracked
            live_count = sum(count for _, count, _ in next(iter(tallied[res.name].values())).values())
            t.acquired = live_count + t.released + t.replaced + t.untracked + t.ended_by_exec
    snap = Snapshot(now_ns, live, totals, final, tallied)
    ended = [tuple(int(k) for k in str(text).split(",")) for text, _ in _entries(maps.get("@probedsl_ended") or {})]
    return images.settle(
        [layout.of(program, res) for res in program.resources], snap, ended, int(maps.get("@probedsl_image_lost") or 0)
    )


class BpftraceDriver:
    def __init__(self, program: ir.Program, generated: Generated, target: Bpftrace):
        self.program, self.generated, self.target = program, generated, target
        self.snapshots: "queue.Queue[Snapshot]" = queue.Queue()
        self.last: Optional[Snapshot] = None  # the latest one printed (END's, if bpftrace ended)
        self.stderr: List[str] = []
        self.ready = threading.Event()
        self.proc: Optional[subprocess.Popen] = None
        self._dir = tempfile.mkdtemp(prefix="probedsl-")
        self.env: Dict[str, str] = {}  # added to bpftrace's environment

    def start(self, timeout: float = 60, cancelled: Optional[Callable[[], bool]] = None) -> None:
        """Run bpftrace and wait until its probes are on; cancelled: asked while waiting
        (the run's end), bpftrace is then killed and ProbedslError raised."""
        exe = shutil.which("bpftrace")
        if exe is None:
            raise ProbedslError("bpftrace is not installed (apt-get install bpftrace, or run scripts/setup.sh)")
        script = os.path.join(self._dir, f"{self.program.name}.bt")
        with open(script, "w") as f:
            f.write(self.generated.text)
        # "--": a name like "-x" is not an option
        scope = self.program.scope
        options = [*self.target.options(scope), *self.target.raw_tracepoint_options(self.generated.text, self._dir)]
        argv = [exe, "-f", "json", *options, "--", script, *self.target.positional(scope)]
        max_live = max((r.max_live for r in self.program.resources), default=1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BPFTRACE_")}
        env.update(self.target.environment(max_live))
        env.update(self.env)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
            preexec_fn=_dies_with(os.getpid()),
        )
        self._reader = threads.start("probedsl-bpftrace-stdout", self._read_stdout)
        self._errors = threads.start("probedsl-bpftrace-stderr", self._read_stderr)
        deadline = time.monotonic() + timeout
        # "attached_probes" is printed before attaching, so it proves nothing: wait for the
        # sentinel probe, attached after all others, to fire on our own getppid()
        while not self.ready.is_set():
            os.getppid()
            if self.proc.poll() is not None:
                time.sleep(0.1)
                raise ProbedslError(f"{self.target.name} failed to start: " + self.explain_failure())
            if time.monotonic() > deadline:
                self.kill()
                raise ProbedslError(f"bpftrace did not attach its probes within {timeout:.0f}s")
            if cancelled is not None and cancelled():
                self.kill()
                raise ProbedslError("the run ended while bpftrace attached its probes")
            self.ready.wait(0.005)  # each getppid() asks: the command waits at most this after the attach

    def explain_failure(self) -> str:
        """bpftrace's own errors, with generated line numbers mapped back to the recipe."""
        lines = []
        for line in errors_first(self.stderr):
            m = LOCATED.match(line)
            span = self.generated.recipe_span(int(m.group(1))) if m else None
            if span:
                line = f"{self.program.filename}:{span.line}:{span.column}: {m.group(2)}"
            lines.append(line)
        return "; ".join(lines[:3]) or f"exit status {self.proc.returncode}"

    def _read_stdout(self) -> None:
        maps: Dict[str, object] = {}
        for line in self.proc.stdout:
            try:
                msg = json.loads(line, object_pairs_hook=_pairs)
            except ValueError:
                continue
            kind, data = msg.get("type"), msg.get("data")
            if kind in ("map", "hist") and isinstance(data, dict):
                maps.update(data)
            elif kind == "printf" and isinstance(data, str):
                if data.startswith(READY_MARK):
                    self.ready.set()
                elif data.startswith(SNAPSHOT_MARK):
                    try:
                        self.last = snapshot_from_maps(self.program, maps, time.monotonic_ns(), False)
                        self.snapshots.put(self.last)
                    except (ValueError, TypeError, KeyError) as exc:  # said once the run ends
                        self.stderr.append(f"probedsl could not read bpftrace's maps: {exc!r}")
                    maps = {}

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            if line and not any(n in line for n in NOISE):
                self.stderr.append(line)

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        """Ask the script for its maps (its getpgid probe prints them) and wait for them; if
        bpftrace ends meanwhile, the maps its END probe printed."""
        self.expect()
        os.getpgid(0)
        return self.received(timeout)

    def expect(self) -> None:
        """Forget snapshots printed before: the next one is the answer to the coming ask (one
        getpgid() asks every bpftrace of the run, probedsl.run.late_roots)."""
        while not self.snapshots.empty():
            self.snapshots.get_nowait()

    def received(self, timeout: float = 30) -> Optional[Snapshot]:
        """The snapshot printed for the last ask; END's if bpftrace ended; None after timeout."""
        deadline = time.monotonic() + timeout
        while True:  # asked at least once: with a deadline shared by several, timeout may be 0
            try:
                return self.snapshots.get(timeout=0.1)
            except queue.Empty:
                if not self.alive():
                    self._reader.join(max(timeout, 1))  # it reads END's maps to the end of the pipe
                    return self.last
                if time.monotonic() >= deadline:
                    return None

    def idle(self, seconds: float, wake: Optional[int] = None) -> None:
        """The run loop's pause between turns."""
        procfs.pause(seconds, wake)

    def unwind_memory(self) -> int:
        return 0

    def unwinds_stacks(self) -> bool:
        return False

    def follow_mappings(self, tracker, preload, wanted=None, python=True) -> None:
        """bpftrace walks frame pointers in the kernel: nothing to load."""

    def stop_following(self, tracker) -> None:
        """Nothing follows mappings."""

    def notes(self) -> List[str]:
        """Probes bpftrace left out and went on without (missing_probes=warn), said in the
        report: the first of its warnings for each script line."""
        said = {}
        for m in filter(None, map(LOCATED.match, self.stderr)):
            warning = m.group(2).removeprefix("WARNING: ")
            if warning != m.group(2) and any(s in warning for s in LEFT_OUT):
                said.setdefault(m.group(1), f"bpftrace left a probe out: {warning}")
        return list(said.values())

    def map_memory(self) -> int:
        return map_memory(self.proc.pid) if self.proc is not None else 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30, asked: bool = False) -> Optional[Snapshot]:
        """The final snapshot, then end bpftrace. Once bpftrace has ended by itself (with -p it
        ends with its process), the one its END probe printed; None if it printed none.
        asked: the caller has called expect() and asked already."""
        if self.alive():
            last = self.received(timeout) if asked else self.snapshot(timeout)
        else:
            self._reader.join(timeout)
            last = self.last
            if last is not None and self.proc.returncode != 0:
                # its END probe did not print: what is here is an earlier print's
                last = dataclasses.replace(
                    last,
                    incomplete=last.incomplete
                    + [
                        f"bpftrace ended with status {self.proc.returncode} before its final print: "
                        "the data is its last print's"
                    ],
                )
        # SIGKILL: the data is in, and a clean exit only adds work. The kernel's uprobe
        # teardown (~2 s) goes on in its exit, not waited for (kill())
        if self.alive():
            self.proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
        if last is not None:
            last.final = True
        return last

    def kill(self) -> None:
        """SIGKILL, not waited for: bpftrace's exit closes its perf events, and the kernel
        removes each uprobe then (~0.15 s apiece) while probedsl ends; init reaps it. Its pipes
        may close after the perf events: the reader threads (daemons) are not waited for
        either; the final snapshot was read before."""
        if self.proc is not None and self.alive():
            self.proc.kill()

    def discard(self) -> None:
        """After a start that failed: killed, its script's directory removed, reaped by a
        thread (its exit removes the uprobes it placed, which takes a while)."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
        proc = self.proc
        if proc is not None:

            def reap() -> None:
                proc.wait()

            threads.start("probedsl-bpftrace-reap", reap)
