"""--estimate: count calls of the probed functions for a moment with the cheapest probe (an
empty-bodied counter at entry), then say what tracing them will cost.

The cost is the kernel's trap, not our BPF work: ~1.9 us per probe hit on this kind of machine,
and a function probed at return is hit twice per call (entry and return).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, replace
from typing import Dict, List

from . import ir, targets
from .errors import ProbedslError

# per probe hit: bench.run's floor (uprobe + uretprobe on malloc, uprobe on free: 3 hits per
# malloc/free pair) adds 2,812 ns per call, i.e. 1.5 hits. (3 us was the cost per *call* and
# overstated a return probe's two hits by half.) Timing hits of a libc function called from
# Python through ctypes gave 10-13 us, far from what C callers pay, so it is not measured live.
TRAP_US = 1.9


@dataclass
class Estimate:
    seconds: float
    calls: Dict[str, int]          # probe label -> calls seen
    hits_per_call: Dict[str, int]  # 2 for a function probed at entry and return

    @property
    def hits_per_s(self) -> float:
        return sum(n * self.hits_per_call.get(k, 1) for k, n in self.calls.items()) / self.seconds

    def lines(self) -> List[str]:
        busy = sorted(self.calls.items(), key=lambda kv: -kv[1])
        calls = ", ".join(f"{k.split(':')[-1]} {n / self.seconds:,.0f}/s" for k, n in busy if n) or "no calls"
        cpu_ms = self.hits_per_s * TRAP_US / 1000
        return [f"estimate: in {self.seconds:.1f} s the target called {calls}",
                f"estimate: tracing adds ~{TRAP_US:.1f} us per probe hit: ~{cpu_ms:,.0f} ms of CPU per second "
                f"({cpu_ms / 10:.1f}% of one CPU) spread over the traced threads, at this call rate"]


def measure(program: ir.Program, seconds: float = 1.0) -> Estimate:
    if program.scope.mode == "cmd":
        raise ProbedslError("--estimate counts calls of a running process: use it with --pid, --comm or --all")
    exe = shutil.which("bpftrace")
    if exe is None:
        raise ProbedslError("--estimate uses bpftrace, which is not installed (run scripts/setup.sh)")
    bpftrace = targets.detect("bpftrace")
    scope = replace(program.scope, follow_forks=False)      # counting needs no children's map
    hits = {}
    for res in program.resources:
        for p in res.probes:
            if p.kind == "uprobe":
                label = f"uprobe:{p.path}:{p.function}"
                hits[label] = max(hits.get(label, 0), 2 if p.at_return else 1)
    if not hits:
        raise ProbedslError("--estimate: this recipe probes no user functions (tracepoints cost little)")
    # the script on stdin; "--": a process name like "-x" is an argument, not an option
    argv = [exe, "-f", "json", *bpftrace.options(scope), "--", "/dev/stdin", *bpftrace.positional(scope)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = 'printf("done\\n"); exit();'
    script = bpftrace.generator().count_script(replace(program, scope=scope))
    proc.stdin.write(script + f"interval:ms:{int(seconds * 1000)} {{ print(@calls); {done} }}\n")
    proc.stdin.close()
    calls: Dict[str, int] = {label: 0 for label in hits}
    counted = False
    for line in proc.stdout:
        msg = json.loads(line) if line.startswith("{") else {}
        if msg.get("type") == "map":
            for label, n in (msg["data"].get("@calls") or {}).items():
                calls[label] = int(n)
        elif msg.get("type") == "printf" and msg.get("data", "").startswith("done"):
            counted = True        # an empty map prints nothing: no calls at all
            break
    proc.kill()
    proc.wait()
    if not counted:
        errors = [l for l in proc.stderr.read().splitlines() if "RLIMIT_MEMLOCK" not in l]
        raise ProbedslError("--estimate: bpftrace gave no counts: " + "; ".join(errors[:2]))
    return Estimate(seconds, calls, hits)
