"""Benchmark: how much of a new process's start `--comm NAME --per-process` (BCC) misses, and
whether it keeps up when processes come one after another.

    sudo .venv/bin/python -m bench.per_process [--processes 10] [--gap 0,2]

bench/workloads/early_drip.c keeps one 16-byte block every millisecond from its first
moment, 200 in all; each run's report shows how many of those the tracer saw, so
200 - seen is the time (~1 ms each) from exec until the uprobes were on. A gap of 0 starts
each process as the previous one ends; its uprobes are still being closed then (the kernel
takes ~90 ms per uprobe, and a close holds up any attach).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = 200


def missed(exe: str, processes: int, gap: float) -> list:
    """200 - blocks seen, per process, in start order."""
    tracer = subprocess.Popen([sys.executable, "-m", "probedsl", "run", "memleak", "--backend", "bcc",
                               "--comm", "early_drip", "--per-process", "--format", "json"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "tracing" not in tracer.stderr.readline():
        assert tracer.poll() is None, "probedsl ended before tracing"
    pids = []
    for _ in range(processes):
        time.sleep(gap)
        pids.append(subprocess.Popen([exe, str(BLOCKS)]))
        pids[-1].wait()
    tracer.send_signal(signal.SIGINT)
    out, _ = tracer.communicate(timeout=600)
    seen = {}
    for report in json.loads(out)["reports"]:
        for entry in report["entries"] if report["kind"] == "outstanding" else []:
            if any(f["function"] == "hold" for f in entry["stack"]):
                for pid in entry["pids"]:
                    seen[pid] = seen.get(pid, 0) + entry["blocks"]
    return [BLOCKS - seen.get(p.pid, 0) for p in pids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--gap", default="0,2", help="seconds between one process's end and the next start")
    args = ap.parse_args()
    exe = os.path.join(tempfile.mkdtemp(prefix="probedsl-bench-"), "early_drip")
    subprocess.run(["gcc", "-O0", "-o", exe, str(ROOT / "bench" / "workloads" / "early_drip.c")], check=True)
    print("| gap (s) | processes | missed ms: min | median | max |")
    print("|---:|---:|---:|---:|---:|")
    for gap in (float(g) for g in args.gap.split(",")):
        m = missed(exe, args.processes, gap)
        print(f"| {gap:g} | {len(m)} | {min(m)} | {statistics.median(m):g} | {max(m)} |", flush=True)


if __name__ == "__main__":
    main()
