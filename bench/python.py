"""Benchmark: what the Python walk (docs/python.md) costs on BCC.

    sudo .venv/bin/python -m bench.python [--runs 5] [--calls 100000] [--depths 10,50] [--imports 5]

1. Per acquisition: bench/workloads/pydeep.py does CALLS malloc/free pairs through ctypes from
   DEPTH Python frames. Each run attaches `probedsl run memleak --backend bcc --pid PID
   --no-follow-forks` first (with the walk, and with --no-python-frames), then lets the loop go;
   "extra us per acquisition" = (loop time with - without) / the acquisitions the run counted;
   "BPF ns per acquisition": the kernel's own account of the tracer's programs (run_time_ns in
   /proc/PID/fdinfo of its program descriptors, kept while this bench holds BPF_ENABLE_STATS;
   a tail-called unwinder's time counts in its caller's) over the run, per acquisition: the
   walk's cost without the traps' and the machine's noise. The walk reads at most 32 frames
   (PY_FRAMES): at 50 it reads 32 and marks the stack cut.
2. A short program: `python3 -c "import json"` start to exit (probedsl started -> it returned,
   the report written) under memleak with the walk (the command is held at its exit until its
   frames are named) and with --no-python-frames, beside the program untraced.
Runs are interleaved (drift hits all alike); the figures are medians.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import held

ROOT = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
WORKLOAD = str(ROOT / "bench" / "workloads" / "pydeep.py")
WALK = {"with": [], "without": ["--no-python-frames"]}


def enable_bpf_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): the kernel times every BPF program while the
    returned descriptor is open (closed with this process)."""
    attr = ctypes.create_string_buffer(16)  # union bpf_attr: enable_stats.type = 0
    fd = ctypes.CDLL(None, use_errno=True).syscall(321, 32, attr, 16)  # __NR_bpf, BPF_ENABLE_STATS
    if fd < 0:
        raise SystemExit(f"bench.python: BPF_ENABLE_STATS: {os.strerror(ctypes.get_errno())}")
    return fd


def bpf_ns(pid: int) -> int:
    """The run time, so far, of every BPF program process pid holds."""
    total = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                total += int(next(line.split()[1] for line in f if line.startswith("run_time_ns:")))
        except (OSError, StopIteration):
            continue
    return total


def held_run(argv, run_args, tmp: str, env=None) -> tuple:
    """(the words the workload printed, BPF ns, the final JSON report or None) of one run: the
    workload waits at its start while `probedsl run RUN_ARGS --pid` attaches (no run_args:
    untraced), then does its work."""
    work = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    if not run_args:
        return work.communicate("go\n", timeout=600)[0].split(), 0, None
    out = os.path.join(tmp, "report.json")
    tracer = held.attach(work.pid, [*run_args, "--format", "json", "-o", out])
    before = bpf_ns(tracer.pid)
    said, _ = work.communicate("go\n", timeout=600)
    spent = bpf_ns(tracer.pid) - before
    tracer.send_signal(signal.SIGINT)
    tracer.communicate(timeout=300)
    with open(out) as f:
        return said.split(), spent, json.load(f)


def loop_once(depth: int, calls: int, walk: str, tmp: str) -> tuple:
    """(loop seconds, BPF ns, acquisitions counted) of one traced run."""
    run = ["memleak", "--backend", "bcc", "--top", "1", *WALK[walk]]
    said, spent, report = held_run([PYTHON, WORKLOAD, str(depth), str(calls)], run, tmp)
    return float(said[-1]), spent, report["resources"]["heap"]["acquired"]


def exit_once(walk) -> float:
    """Seconds from start to exit of `python3 -c "import json"`, under memleak (walk: "with" or
    "without") or untraced (None)."""
    program = [PYTHON, "-c", "import json"]
    argv = program
    if walk is not None:
        argv = [sys.executable, "-m", "probedsl", "run", "memleak", "--backend", "bcc", "--top", "1"]
        argv += ["-o", "/dev/null", *WALK[walk], "--", *program]
    started = time.monotonic()
    subprocess.run(
        argv, cwd=ROOT, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.monotonic() - started


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench.python: run as root (probedsl traces)")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--depths", default="10,50")
    ap.add_argument("--imports", type=int, default=5, help="runs of the import json part (0: skip it)")
    args = ap.parse_args()
    enable_bpf_stats()
    print(f"medians of {args.runs}, load {os.getloadavg()[0]:.1f} at the start")
    print(
        "| Python frames | loop without walk (s) | loop with walk (s) | acquisitions | extra us per acquisition |"
        " BPF ns per acquisition, without | with | extra |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="probedsl-bench-") as tmp:
        for depth in (int(d) for d in args.depths.split(",")):
            times: dict = {walk: [] for walk in WALK}
            kernel: dict = {walk: [] for walk in WALK}
            counts = []
            for _ in range(args.runs):
                for walk in WALK:
                    seconds, spent, acquired = loop_once(depth, args.calls, walk, tmp)
                    times[walk].append(seconds)
                    kernel[walk].append(spent / acquired)
                    counts.append(acquired)
            with_, without = statistics.median(times["with"]), statistics.median(times["without"])
            acquired = statistics.median(counts)
            k_with, k_without = statistics.median(kernel["with"]), statistics.median(kernel["without"])
            print(
                f"| {depth} | {without:.3f} | {with_:.3f} | {acquired:.0f} | {(with_ - without) / acquired * 1e6:.2f} |"
                f" {k_without:.0f} | {k_with:.0f} | {k_with - k_without:.0f} |"
            )
    if args.imports:
        exits: dict = {walk: [] for walk in (None, "without", "with")}
        for _ in range(args.imports):
            for walk in exits:
                exits[walk].append(exit_once(walk))
        print()
        print(f'`python3 -c "import json"`, start to exit, medians of {args.imports}, load {os.getloadavg()[0]:.1f}')
        print("| configuration | seconds |")
        print("|---|---:|")
        for walk, label in ((None, "untraced"), ("without", "memleak --no-python-frames"), ("with", "memleak")):
            print(f"| {label} | {statistics.median(exits[walk]):.2f} |")


if __name__ == "__main__":
    main()
