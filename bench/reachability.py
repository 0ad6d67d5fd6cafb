"""Benchmark: --reachability's scan of a large heap, and how long the process is paused.

    sudo .venv/bin/python -m bench.reachability [--sizes 1024:65536,1024:4096,256:1024]

bench/workloads/heapgraph.c builds TOTAL_MB of blocks of BLOCK bytes (a linked list from a
global, a pointer into a random earlier block, random data, one block in ten cut out), traced
by `probedsl run memleak --pid PID --reachability`; it exits on a line from us, where probedsl
holds it and scans it. From the final JSON report: bytes scanned, scan seconds (reading
/proc/PID/mem and classifying), the pause (snapshot of the live table + scan), and probedsl's
peak RSS (/usr/bin/time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BPFTRACE_MAX_LIVE = 262_144


def one(exe: str, total_mb: int, block: int, backend: str, out_dir: str) -> dict:
    workload = subprocess.Popen([exe, str(total_mb), str(block)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    report = os.path.join(out_dir, f"{backend}-{total_mb}-{block}.json")
    rss = os.path.join(out_dir, "rss")
    count = (total_mb << 20) // block
    tracer = subprocess.Popen(
        [
            "/usr/bin/time",
            "-f",
            "%M",
            "-o",
            rss,
            sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            backend,
            "--stacks",
            "fp",
            "--pid",
            str(workload.pid),
            "--reachability",
            "--format",
            "json",
            "-o",
            report,
            *(["--max-live", str(max(count * 2, 1_000_000))] if backend == "bcc" else []),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in tracer.stderr:  # every probe attached, and the process held
        if line.startswith("probedsl: tracing "):
            break
    else:
        raise SystemExit(f"probedsl ended before tracing: {tracer.communicate()}")
    workload.stdin.write(b"go\n")
    workload.stdin.flush()
    assert workload.stdout.readline() == b"ready\n"
    workload.stdin.write(b"exit\n")
    workload.stdin.flush()
    workload.wait()
    if tracer.wait():
        raise SystemExit(f"probedsl failed: {tracer.stderr.read()}")
    doc = json.load(open(report))
    scan = doc["reachability_scan"]
    return {
        **scan,
        "rss_mb": int(open(rss).read().split()[-1]) // 1024,
        "kinds": {k: v["blocks"] for k, v in doc["resources"]["heap"]["reachability"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024:65536,1024:4096,256:1024", help="TOTAL_MB:BLOCK,...")
    ap.add_argument("--backends", default="bcc,bpftrace")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="probedsl-bench-")
    exe = os.path.join(tmp, "heapgraph")
    subprocess.run(["gcc", "-O2", "-o", exe, str(ROOT / "bench" / "workloads" / "heapgraph.c")], check=True)
    print("| backend | heap | blocks | scanned (MB) | scan (s) | scan rate (GB/s) | pause (ms) | probedsl RSS (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for backend in args.backends.split(","):
        for size in args.sizes.split(","):
            total_mb, block = map(int, size.split(":"))
            if backend == "bpftrace" and (total_mb << 20) // block >= BPFTRACE_MAX_LIVE:
                print(
                    f"| {backend} | {total_mb} MB in {block}-byte blocks | (bpftrace 0.17-0.24 holds at most "
                    f"{BPFTRACE_MAX_LIVE} live blocks) | | | | | |"
                )
                continue
            r = one(exe, total_mb, block, backend, tmp)
            rate = r["scanned_bytes"] / r["scan_s"] / 2**30 if r["scan_s"] else 0
            print(
                f"| {backend} | {total_mb} MB in {block}-byte blocks | {r['blocks']} | "
                f"{r['scanned_bytes'] / 2**20:.0f} | {r['scan_s']:.2f} | {rate:.2f} | {r['pause_ms']:.0f} | "
                f"{r['rss_mb']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
