"""Benchmark: how much of a new process's start `--comm NAME --per-process` (BCC) misses, and
whether it keeps up when processes come one after another; with --bystanders, what an
unrelated process pays while a run follows another process's forks.

    sudo .venv/bin/python -m bench.per_process [--processes 10] [--gap 0,2]
    sudo .venv/bin/python -m bench.per_process --bystanders [--runs 5] [--calls 2000000]

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
    tracer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            "bcc",
            "--comm",
            "early_drip",
            "--per-process",
            "--format",
            "json",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


# a debugger holding the process: forks cannot be held, so children are followed machine-wide
HOLDER = """
import os, sys
from probedsl.process import ptrace
pid = int(sys.argv[1])
ptrace.request(ptrace.SEIZE, pid)
print("attached", flush=True)
while True:
    _, status = os.waitpid(pid, ptrace.WALL)
    if not os.WIFSTOPPED(status):
        break
    ptrace.request(ptrace.CONT, pid, 0, 0 if status >> 16 else os.WSTOPSIG(status))
"""


def timed(proc: subprocess.Popen) -> tuple:
    """(the loop's wall time, the CPU time the whole process used): on a busy machine the
    wall time waits for a core; the CPU time counts what the process itself paid (traps too)."""
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return float(out.strip().splitlines()[-1]), usage.ru_utime + usage.ru_stime


def beside(exe: str, args, backend: str, *target) -> float:
    """The workload's loop time, started a second after `probedsl run memleak ... TARGET` says it
    is tracing (what the run does once, right after, is not the steady cost)."""
    from bench import run as bench_run

    with bench_run.tracing(backend, *target):
        time.sleep(1)
        return timed(bench_run.workload(exe, args, 0))


def bystanders(runs: int, threads: int, calls: int, backend: str) -> None:
    """bench/workloads/mallocfree (THREADS x CALLS malloc/free, its own loop timed) run beside
    `probedsl run memleak` (default options) tracing a sleeping process by --pid, a sleeping
    launched command (-- CMD), and --pid of a process a debugger holds (today's fallback:
    uprobes on every process); medians of interleaved runs."""
    from bench import run as bench_run

    exe = bench_run.build(tempfile.mkdtemp(prefix="probedsl-bench-"))
    args = argparse.Namespace(threads=threads, calls=calls)
    sleeper = [exe, "1", "1", "3600"]  # sleeps before a loop it never reaches

    def by_pid(held: bool = False):
        target = subprocess.Popen(sleeper, stdout=subprocess.DEVNULL)
        holder = (
            subprocess.Popen(
                [sys.executable, "-c", HOLDER, str(target.pid)], stdout=subprocess.PIPE, text=True, cwd=ROOT
            )
            if held
            else None
        )
        try:
            if holder:
                assert holder.stdout.readline() == "attached\n"
            return beside(exe, args, backend, "--pid", str(target.pid))
        finally:
            target.kill()
            target.wait()
            if holder:
                holder.wait()

    configs = {
        "untraced": lambda: timed(bench_run.workload(exe, args, 0)),
        "--pid P": by_pid,
        "-- CMD": lambda: beside(exe, args, backend, "--", *sleeper),
        "--pid P, held by a debugger": lambda: by_pid(held=True),
    }
    times = {name: [] for name in configs}
    for _ in range(runs):
        for name, run in configs.items():
            times[name].append(run())
    wall = {name: statistics.median(w for w, _ in t) for name, t in times.items()}
    cpu = {name: statistics.median(c for _, c in t) for name, t in times.items()}
    print(f"| {backend}: bystander beside | loop time (s) | vs untraced | CPU time (s) | vs untraced |")
    print("|---|---:|---:|---:|---:|")
    for name in times:
        print(
            f"| {name} | {wall[name]:.4f} | {wall[name] / wall['untraced']:.2f}x | {cpu[name]:.4f} | "
            f"{cpu[name] / cpu['untraced']:.2f}x |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--gap", default="0,2", help="seconds between one process's end and the next start")
    ap.add_argument("--bystanders", action="store_true", help="an unrelated process's malloc loop instead")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=2_000_000)
    ap.add_argument("--backend", default="bcc")
    args = ap.parse_args()
    if args.bystanders:
        bystanders(args.runs, args.threads, args.calls, args.backend)
        return
    exe = os.path.join(tempfile.mkdtemp(prefix="probedsl-bench-"), "early_drip")
    subprocess.run(["gcc", "-O0", "-o", exe, str(ROOT / "bench" / "workloads" / "early_drip.c")], check=True)
    print("| gap (s) | processes | missed ms: min | median | max |")
    print("|---:|---:|---:|---:|---:|")
    for gap in (float(g) for g in args.gap.split(",")):
        m = missed(exe, args.processes, gap)
        print(f"| {gap:g} | {len(m)} | {min(m)} | {statistics.median(m):g} | {max(m)} |", flush=True)


if __name__ == "__main__":
    main()
