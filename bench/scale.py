"""Benchmark: a report of a million live blocks. Time from the target's exit to the report,
probedsl's peak RSS, and the kernel memory of the tracer's BPF maps.

    sudo .venv/bin/python -m bench.scale [--blocks 1000000] [--backend bpftrace|bcc|both]

The workload (bench/workloads/holdmany.c) holds N blocks, waits on stdin, then exits; the
kernel memory is read from the tracer's map file descriptors (fdinfo "memlock") meanwhile.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from probedsl.process.procfs import map_memory

ROOT = Path(__file__).resolve().parent.parent


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "holdmany")
    subprocess.run(["gcc", "-O1", "-o", exe, str(ROOT / "bench" / "workloads" / "holdmany.c")], check=True)
    return exe


def children(pid: int):
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def peak_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(exe: str, backend: str, blocks: int) -> dict:
    argv = [
        sys.executable,
        "-m",
        "probedsl",
        "run",
        "memleak",
        "--backend",
        backend,
        "--no-color",
        "--max-live",
        str(blocks + 100_000),
        "--",
        exe,
        str(blocks),
    ]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while "held" not in (line := proc.stderr.readline()):
        if not line:
            raise SystemExit(f"probedsl ended early: {proc.stderr.read()}")
    held = time.monotonic()
    tracer = (
        proc.pid
        if backend == "bcc"
        else next(c for c in children(proc.pid) if open(f"/proc/{c}/comm").read().strip() == "bpftrace")
    )
    kernel = map_memory(tracer)
    rss = [peak_rss_kb(proc.pid)]

    def watch():
        while proc.poll() is None:
            try:
                rss.append(peak_rss_kb(proc.pid))
            except OSError:
                break
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    exited = time.monotonic()
    proc.stdin.write("\n")
    proc.stdin.close()
    first = proc.stdout.readline()
    reported = time.monotonic()
    rest = proc.stdout.read()
    proc.wait()
    assert "report" in first, first
    return {
        "backend": backend,
        "attach_and_hold_s": held - started,
        "report_s": reported - exited,
        "rss_mb": max(rss) / 1024,
        "kernel_mb": kernel / 2**20,
        "report": first + rest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--backend", choices=["bpftrace", "bcc", "both"], default="both")
    args = ap.parse_args()
    exe = build(tempfile.mkdtemp(prefix="probedsl-bench-"))
    print(f"{args.blocks} live blocks\n")
    print("| backend | start + hold (s) | target exit -> report (s) | probedsl peak RSS (MB) | BPF map memory (MB) |")
    print("|---|---:|---:|---:|---:|")
    for backend in ["bpftrace", "bcc"] if args.backend == "both" else [args.backend]:
        r = run(exe, backend, args.blocks)
        print(
            f"| {backend} | {r['attach_and_hold_s']:.2f} | {r['report_s']:.2f} | {r['rss_mb']:.0f} | "
            f"{r['kernel_mb']:.0f} |",
            flush=True,
        )
        if str(args.blocks) not in r["report"]:
            print(r["report"], file=sys.stderr)
            raise SystemExit(f"{backend}: the report does not show {args.blocks} blocks")


if __name__ == "__main__":
    main()
