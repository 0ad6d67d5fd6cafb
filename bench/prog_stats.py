"""Benchmark: what each of memleak's BCC programs costs per hit, by the kernel's own count.

    sudo .venv/bin/python -m bench.prog_stats [--runs 5] [--calls 300000] [--stacks fp] [--depth N] [--tree NAME=DIR]

bench.run's malloc/free loop (2 threads) traced by `probedsl run memleak --pid P
--no-follow-forks --backend bcc`, with kernel.bpf_stats_enabled on: each loaded program's
run_time_ns / run_cnt, read from the tracer's descriptors once the loop is done. --depth N
runs bench.stacks' workload instead (one thread, each pair from N nested calls, -O2), to see
what the unwinder's programs cost per frame. This leaves out
what the uprobes cost whatever runs in them (the trap, the return trampoline), which is most of
bench.run's loop time and most of its noise. The counting itself adds ~47 ns per hit on this VM
(an empty program reads so): compare rows, not absolute values. --tree NAME=DIR adds the same
from another checkout (its .venv), interleaved.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import struct
import subprocess
import tempfile

from bench import run, stacks
from bench.run import ROOT

STATS = "/proc/sys/kernel/bpf_stats_enabled"
SYS_BPF, SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 321, 434, 438
BPF_OBJ_GET_INFO_BY_FD = 15
NAME_AT = 64  # struct bpf_prog_info: char name[16]
_libc = ctypes.CDLL(None, use_errno=True)


def program_name(pid: int, fd: int) -> str:
    """The name of the BPF program behind another process's descriptor (the first 15 bytes)."""
    pidfd = _libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    own = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0) if pidfd >= 0 else -1
    if own < 0:
        if pidfd >= 0:
            os.close(pidfd)
        return f"fd {fd}"
    try:
        info = ctypes.create_string_buffer(256)
        attr = ctypes.create_string_buffer(struct.pack("IIQ", own, len(info), ctypes.addressof(info)))
        if _libc.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD, attr, len(attr)) != 0:
            return f"fd {fd}"
        return info.raw[NAME_AT : NAME_AT + 16].split(b"\0")[0].decode()
    finally:
        os.close(own)
        os.close(pidfd)


def counts(pid: int) -> dict:
    """{program name: [run_time_ns, run_cnt]} of the programs of pid that ran more than a
    thousand times (names cut to 15 bytes: those alike add up)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
        except OSError:
            continue
        runs = int(info.get("run_cnt", "0").strip() or 0)
        if runs > 1000:
            name = out.setdefault(program_name(pid, int(fd)), [0, 0])
            name[0] += int(info["run_time_ns"])
            name[1] += runs
    return out


def one_run(exe: str, args, tree: str) -> dict:
    argv = [exe, str(args.depth), str(args.calls)] if args.depth else [exe, "2", str(args.calls), "0", "held"]
    pairs = args.calls if args.depth else 2 * args.calls
    workload = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    command = [os.path.join(tree, ".venv", "bin", "python"), "-m", "probedsl", "run", "memleak", "--backend", "bcc"]
    command += ["--stacks", args.stacks, "--pid", str(workload.pid), "--no-follow-forks", "--format", "json"]
    tracer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tree)
    try:
        while "tracing" not in (tracer.stderr.readline() or "tracing"):
            pass
        workload.stdin.write("g\n")
        workload.stdin.flush()
        loop = float(workload.stdout.readline())
        programs = counts(tracer.pid)
        out = {name: ns / runs for name, (ns, runs) in programs.items()}
        out["(all, per pair)"] = sum(ns for ns, _ in programs.values()) / pairs
        out["(loop s)"] = loop
        return out
    finally:
        workload.stdin.close()
        workload.wait()
        tracer.communicate(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300_000)
    ap.add_argument("--stacks", choices=("fp", "dwarf"), default="fp")
    ap.add_argument("--depth", type=int, default=0, help="bench.stacks' workload: pairs from DEPTH nested calls")
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    args = ap.parse_args()
    trees = {"this": str(ROOT)}
    for spec in args.tree:
        name, _, tree = spec.partition("=")
        if not name or not os.access(os.path.join(tree, ".venv", "bin", "python"), os.X_OK):
            ap.error(f"--tree {spec}: NAME=DIR, a checkout with its .venv (scripts/setup.sh)")
        trees[name] = os.path.abspath(tree)
    exe = (stacks.build if args.depth else run.build)(tempfile.mkdtemp(prefix="probedsl-bench-"))
    with open(STATS) as f:
        was = f.read().strip()
    samples = {name: [] for name in trees}
    try:
        with open(STATS, "w") as f:
            f.write("1")
        for _ in range(args.runs):
            for name, tree in trees.items():
                samples[name].append(one_run(exe, args, tree))
    finally:
        with open(STATS, "w") as f:
            f.write(was)
    shape = f", {args.depth} nested calls" if args.depth else ""
    print(f"\nns per hit by bpf_stats, medians of {args.runs} interleaved runs (--stacks {args.stacks}{shape})\n")
    print("| tree | program | ns per hit |")
    print("|---|---|---:|")
    for name, runs in samples.items():
        programs = sorted({p for r in runs for p in r})
        for p in programs:
            values = [r[p] for r in runs if p in r]
            shown = f"{statistics.median(values):.3f}" if p == "(loop s)" else f"{statistics.median(values):.0f}"
            print(f"| {name} | {p} | {shown} |")


if __name__ == "__main__":
    main()
