"""Benchmark: what --stacks dwarf (BCC's call-frame unwinder) costs against --stacks fp.

    sudo .venv/bin/python -m bench.stacks [--runs 5] [--calls 100000] [--depths 16,64]

bench/workloads/deepchain.c (-O2) does CALLS malloc/free pairs from DEPTH nested calls (the
stack memleak records has DEPTH + main + libc's start frames, capped at 64). Each run attaches
`probedsl run memleak --backend bcc --pid PID --no-follow-forks` first, then releases the loop;
"extra us per acquisition" = (dwarf loop time - fp loop time) / CALLS, medians of interleaved
runs. Also: the time to decode .eh_frame into rows (libc, python3) and the unwinder's kernel
memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import held

ROOT = Path(__file__).resolve().parent.parent


def build(tmp: str) -> str:
    """bench/workloads/deepchain.c built -O2 (no frame pointers) in tmp."""
    exe = os.path.join(tmp, "deepchain")
    subprocess.run(["gcc", "-O2", "-o", exe, str(ROOT / "bench" / "workloads" / "deepchain.c")], check=True)
    return exe


def loop_seconds(exe: str, depth: int, calls: int, stacks: str) -> float:
    return held.loop_seconds(
        [exe, str(depth), str(calls)], ["memleak", "--backend", "bcc", "--stacks", stacks, "--top", "1"]
    )


def table_times() -> list:
    """(file, rows, cold s, from the disk cache s) of a file's unwinder rows: decoded from
    .eh_frame on the first run, read back by build id on the next."""
    from probedsl.binaries import cfi
    from probedsl.stacks import unwind_tables

    rows = []
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="probedsl-bench-cache-")
    for path in ("/lib/x86_64-linux-gnu/libc.so.6", os.path.realpath("/usr/bin/python3")):
        times = []
        for _ in range(2):
            cfi._load.cache_clear()
            t = time.perf_counter()
            encoded = unwind_tables.rows_of(path)
            times.append(time.perf_counter() - t)
        rows.append((os.path.basename(path), len(encoded), *times))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--depths", default="16,64")
    args = ap.parse_args()
    exe = build(tempfile.mkdtemp(prefix="probedsl-bench-"))
    print("| nested calls | fp loop (s) | dwarf loop (s) | extra us per acquisition (dwarf - fp) |")
    print("|---:|---:|---:|---:|")
    for depth in (int(d) for d in args.depths.split(",")):
        times = {"fp": [], "dwarf": []}
        for _ in range(args.runs):
            for stacks in times:
                times[stacks].append(loop_seconds(exe, depth, args.calls, stacks))
        fp, dwarf = statistics.median(times["fp"]), statistics.median(times["dwarf"])
        print(f"| {depth} | {fp:.3f} | {dwarf:.3f} | {(dwarf - fp) / args.calls * 1e6:.2f} |")
    print()
    print("| file | rows | decode, cold (s) | from the disk cache (s) |")
    print("|---|---:|---:|---:|")
    for name, n, cold, cached in table_times():
        print(f"| {name} | {n} | {cold:.3f} | {cached:.4f} |")


if __name__ == "__main__":
    main()
