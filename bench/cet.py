"""Benchmark: a program built with -fcf-protection=full whose own functions a recipe probes.

    sudo .venv/bin/python -m bench.cet [--runs 5] [--calls 200000]

bench/workloads/cetpool.c gets and puts back CALLS blocks through pool_get/pool_put, each of
which starts with endbr64 (single-stepped by the kernel). A recipe tracks the blocks; it runs
with probedsl's placement (past endbr64, on the tail jump) and with --probe-at entry, on BCC
(both probes and the uretprobe move) and bpftrace (0.20+ moves the entry-only probe; 0.17
cannot). Extra ns per pair = (traced - untraced) / CALLS, medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from bench import held

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="probedsl-bench-")
    exe = os.path.join(tmp, "cetpool")
    subprocess.run(
        ["gcc", "-O2", "-fcf-protection=full", "-o", exe, str(ROOT / "bench" / "workloads" / "cetpool.c")], check=True
    )
    recipe = os.path.join(tmp, "pool.probe")
    with open(recipe, "w") as f:
        f.write((ROOT / "tests" / "fixtures" / "pool.probe").read_text().replace("EXE", exe))
    configs = {
        "untraced": (),
        "bcc placed": ("--backend", "bcc", "--stacks", "fp"),
        "bcc at entry": ("--backend", "bcc", "--stacks", "fp", "--probe-at", "entry"),
        "bpftrace placed": ("--backend", "bpftrace"),
        "bpftrace at entry": ("--backend", "bpftrace", "--probe-at", "entry"),
    }
    times = {name: [] for name in configs}
    for _ in range(args.runs):
        for name, options in configs.items():
            times[name].append(held.loop_seconds([exe, str(args.calls)], [recipe, *options] if options else []))
    base = statistics.median(times["untraced"])
    print(f"{args.calls} pool_get/pool_put pairs, medians of {args.runs} interleaved runs\n")
    print("| configuration | loop time (s) | extra ns per pair |")
    print("|---|---:|---:|")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"| {name} | {med:.3f} | {(med - base) / args.calls * 1e9:.0f} |")


if __name__ == "__main__":
    main()
