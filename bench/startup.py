"""Benchmark: start-up, from `probedsl run` to "tracing" (every probe attached and proven), per
backend and live-table size.

    sudo .venv/bin/python -m bench.startup [--runs 3]

The traced command is `/bin/sleep 0.1`, held until the probes are attached, so the time is
probedsl's start, compile, map creation and attach; the kernel's uprobe teardown after it is
reported apart ("total").
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def once(backend: str, max_live: str) -> tuple:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "probedsl", "run", "memleak", "--backend", backend,
                             "--max-live", max_live, "--", "/bin/sleep", "0.1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    attached = None
    for line in proc.stderr:
        if "tracing" in line and attached is None:
            attached = time.monotonic() - started
    proc.wait()
    return attached, time.monotonic() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print("| backend | --max-live | attached after (s) | whole run (s) |")
    print("|---|---:|---:|---:|")
    for backend, sizes in (("bpftrace", ("4096", "262144", "1000000")), ("bcc", ("4096", "1000000"))):
        for size in sizes:
            runs = [once(backend, size) for _ in range(args.runs)]
            print(f"| {backend} | {size} | {statistics.median(r[0] for r in runs):.2f} | "
                  f"{statistics.median(r[1] for r in runs):.2f} |", flush=True)


if __name__ == "__main__":
    main()
