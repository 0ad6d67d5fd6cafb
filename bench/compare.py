"""Benchmark: what each leak finder costs the program it watches, on one workload.

    sudo .venv/bin/python -m bench.compare [--runs 3] [--calls 100000] [--threads 2]

bench/workloads/mallocfree.c (THREADS threads x CALLS malloc/free pairs, -O1) is launched
under each tool, which also starts it: untraced; valgrind (memcheck, --leak-check=full);
heaptrack (LD_PRELOAD hooks, its default recording); probedsl run memleak -- CMD on bcc and
bpftrace. (BCC's memleak-bpfcc 0.26 cannot launch one: its -c fails with "could not determine
address of symbol malloc in c"; bench.run measures it with -p.) The workload times its own loop, so start-up, attach
and the final report are not in the numbers. Medians of interleaved runs; "extra ns per call"
is (loop - untraced loop) / (THREADS x CALLS x 2 calls).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench.run import build

PY = sys.executable


def tools(exe: str, args, tmp: str) -> dict:
    workload = [exe, *args]
    found = {
        "untraced": workload,
        "valgrind": ["valgrind", "-q", "--leak-check=full", "--log-file=/dev/null", *workload],
        "heaptrack": ["heaptrack", "-o", os.path.join(tmp, "heaptrack"), *workload],
        "probedsl-bcc": [
            PY,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            "bcc",
            "--top",
            "1",
            "-o",
            "/dev/null",
            "--",
            *workload,
        ],
        "probedsl-bpftrace": [
            PY,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            "bpftrace",
            "--top",
            "1",
            "-o",
            "/dev/null",
            "--",
            *workload,
        ],
    }
    return {name: argv for name, argv in found.items() if shutil.which(argv[0])}


def loop_seconds(argv) -> float:
    """The workload prints its loop time as its one line of output of a float; the tools' own
    output goes elsewhere or is not a bare number."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    numbers = [line for line in out.splitlines() if line.replace(".", "", 1).isdigit()]
    return float(numbers[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=100000)
    ap.add_argument("--threads", type=int, default=2)
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        configs = tools(exe, [str(opts.threads), str(opts.calls), "0"], tmp)
        times = {name: [] for name in configs}
        for _ in range(opts.runs):
            for name, argv in configs.items():
                times[name].append(loop_seconds(argv))
    calls = opts.threads * opts.calls * 2
    base = statistics.median(times["untraced"])
    print(f"{opts.threads} threads x {opts.calls} malloc/free pairs, medians of {opts.runs}")
    print("| tool | loop time (s) | extra ns per call | vs untraced |")
    print("|---|---:|---:|---:|")
    for name, runs in times.items():
        t = statistics.median(runs)
        print(f"| {name} | {t:.3f} | {(t - base) / calls * 1e9:.0f} | {t / base:.1f}x |")


if __name__ == "__main__":
    main()
