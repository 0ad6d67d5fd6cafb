"""--estimate: count calls of the probed functions for a moment with the cheapest probe (an
empty-bodied counter at entry), then say what tracing them will cost.

The cost is the kernel's traps, not our BPF work: per call, the hit where the probe sits
(~0.5 us where the kernel emulates the instruction, ~5 us where it single-steps it:
probedsl.passes.placement) and, for a function probed at return, the return's (~0.5 us).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Dict, List

from probedsl import backends, ir, targets
from probedsl.binaries import x86
from probedsl.errors import ProbedslError


@dataclass
class Estimate:
    seconds: float
    calls: Dict[str, int]  # probe label -> calls seen
    us_per_call: Dict[str, float]  # probe label -> the traps one call costs

    def lines(self) -> List[str]:
        busy = sorted(self.calls.items(), key=lambda kv: -kv[1])
        calls = ", ".join(f"{k.split(':')[-1]} {n / self.seconds:,.0f}/s" for k, n in busy if n) or "no calls"
        costs = ", ".join(f"{k.split(':')[-1]} {self.us_per_call[k]:.1f} us" for k, n in busy if n)
        cpu_ms = sum(n * self.us_per_call[k] for k, n in self.calls.items()) / self.seconds / 1000
        return [
            f"estimate: in {self.seconds:.1f} s the target called {calls}",
            f"estimate: tracing adds per call {costs or 'nothing'}: ~{cpu_ms:,.0f} ms of CPU per second "
            f"({cpu_ms / 10:.1f}% of one CPU) spread over the traced threads, at this call rate",
        ]


def process_age() -> float:
    """Seconds since this process started (the kernel's start time, 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")


def startup_line(marks: Dict[str, float]) -> str:
    """-- CMD: when the command was let go, from probedsl's own start (marks: process ages
    at "generated", "attached", "released")."""
    generated, attached, released = marks["generated"], marks["attached"], marks["released"]
    return (
        f"estimate: the command was let go {released:.2f} s after probedsl started: {generated:.2f} s to "
        f"start Python, read the recipe and generate the program, {attached - generated:.2f} s to "
        f"compile, load and attach it, {released - attached:.2f} s the rest"
    )


def measure(program: ir.Program, target: "targets.Target", seconds: float = 1.0) -> Estimate:
    """target: the one that will trace (where it attaches decides each hit's cost)."""
    exe = shutil.which("bpftrace")
    if exe is None:
        raise ProbedslError("--estimate uses bpftrace, which is not installed (run scripts/setup.sh)")
    bpftrace = targets.detect("bpftrace")
    scope = replace(program.scope, follow_forks=False)  # counting needs no children's map
    hits: Dict[str, float] = {}
    for res in program.resources:
        for p in res.probes:
            if p.kind == ir.ProbeKind.UPROBE:
                label = f"uprobe:{p.path}:{p.function}"
                cost = x86.hit_us(p.path, p.function, target.attaches_at(p, p.path))
                hits[label] = max(hits.get(label, 0), cost + (x86.RETURN_US if p.at_return else 0))
    if not hits:
        raise ProbedslError("--estimate: this recipe probes no user functions (tracepoints cost little)")
    # the script on stdin; "--": a process name like "-x" is an argument, not an option
    argv = [exe, "-f", "json", *bpftrace.options(scope), "--", "/dev/stdin", *bpftrace.positional(scope)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    script = backends.for_target(bpftrace).count_script(replace(program, scope=scope))
    # the counts at each tick, the window measured between two ticks: the interval probe, last
    # in the script, is attached last, so every tick comes after the probes are on
    proc.stdin.write(script + 'interval:ms:100 { print(@calls); printf("tick %lld\\n", nsecs); }\n')
    proc.stdin.close()
    current: Dict[str, int] = {}
    first, calls, elapsed = None, {}, 0.0
    for line in proc.stdout:
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("type") == "map":
            current = {label: int(n) for label, n in (msg["data"].get("@calls") or {}).items()}
        elif msg.get("type") == "printf" and msg.get("data", "").startswith("tick "):
            now = int(msg["data"].split()[1])
            if first is None:
                first = (now, dict(current))  # an empty map prints nothing: no calls yet
            elif now - first[0] >= seconds * 1e9:
                elapsed = (now - first[0]) / 1e9
                calls = {label: current.get(label, 0) - first[1].get(label, 0) for label in hits}
                break
    proc.kill()
    proc.wait()
    if not elapsed:
        errors = [l for l in proc.stderr.read().splitlines() if "RLIMIT_MEMLOCK" not in l]
        raise ProbedslError("--estimate: bpftrace gave no counts: " + "; ".join(errors[:2]))
    return Estimate(elapsed, calls, hits)
