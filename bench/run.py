"""Benchmark: per-call overhead of tracing malloc/free, interleaved runs, medians and ratios.

    sudo .venv/bin/python -m bench.run [--runs 5] [--threads 2] [--calls 1000000]

Configurations, each run in turn R times (interleaved, so drift hits all alike):
  untraced          the workload alone
  floor             bpftrace with empty probes on malloc entry+return and free entry (the naive floor)
  floor-bcc-entry   the same with BCC's empty programs; floor-bcc-placed: free's where probedsl places it
  probedsl-bpftrace probedsl run memleak --pid PID --no-follow-forks (bpftrace backend)
  probedsl-bcc      probedsl run memleak --pid PID --no-follow-forks --backend bcc (fp stacks,
                    probes placed); -at-entry: --probe-at entry; -dwarf: --stacks dwarf
  probedsl-*-sample10  the same with --sample 10 (one acquisition in ten recorded)
  bcc-memleak       BCC's memleak-bpfcc -p PID (when installed)
  NAME-bcc[-dwarf]  with --tree NAME=DIR: probedsl-bcc[-dwarf] run from another checkout (an A/B)
and the bystander cost: an unrelated process's loop while probedsl traces --comm of another
name (bystander-*; bystander-bcc-per-process: BCC attaching per matching process), or a launched command (bystander-of-cmd-*: probes on private copies on bpftrace, per-process
uprobes on BCC). The workload times its own loop, so start-up and reporting are not in the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
FLOOR = (
    f"uprobe:{LIBC}:malloc {{}} uretprobe:{LIBC}:malloc {{}} uprobe:{LIBC}:free {{}} "
    f"tracepoint:syscalls:sys_enter_getppid /pid == $1/ {{ printf(\"ready\\n\"); }}"
)
DELAY = 6  # seconds the workload waits before its loop: tracers attach meanwhile


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "mallocfree")
    subprocess.run(
        ["gcc", "-O1", "-pthread", "-o", exe, str(ROOT / "bench" / "workloads" / "mallocfree.c")], check=True
    )
    return exe


def workload(exe: str, args, delay: int) -> subprocess.Popen:
    return subprocess.Popen([exe, str(args.threads), str(args.calls), str(delay)], stdout=subprocess.PIPE, text=True)


def loop_seconds(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate(timeout=600)
    return float(out.strip().splitlines()[-1])


def run_untraced(exe, args):
    return loop_seconds(workload(exe, args, 0))


def run_floor(exe, args):
    tracer = subprocess.Popen(
        ["bpftrace", "-e", FLOOR, str(os.getpid())], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    os.set_blocking(tracer.stdout.fileno(), False)
    buf, deadline = b"", time.monotonic() + 60
    while b"ready" not in buf and time.monotonic() < deadline:  # attached: the sentinel fired
        os.getppid()
        try:
            buf += os.read(tracer.stdout.fileno(), 4096)
        except BlockingIOError:
            pass
        time.sleep(0.05)
    try:
        return loop_seconds(workload(exe, args, 0))
    finally:
        tracer.kill()
        tracer.wait()


# empty BCC programs on malloc's entry and return and on free, at the entry or where
# probedsl.passes.placement puts free's probe (floor-bcc-entry / floor-bcc-placed)
BCC_FLOOR = """
import sys, time
from bcc import BPF
b = BPF(text="int f(void *ctx) { return 0; }")
libc, free_at = sys.argv[1], int(sys.argv[2])
b.attach_uprobe(name=libc, sym="malloc", fn_name="f")
b.attach_uretprobe(name=libc, sym="malloc", fn_name="f")
b.attach_uprobe(name=libc, sym="free", sym_off=free_at, fn_name="f")
print("ready", flush=True)
time.sleep(3600)
"""


def run_floor_bcc(exe, args, placed: bool):
    from probedsl.binaries import x86

    where = x86.place(LIBC, "free", (0,)) if placed else None
    tracer = subprocess.Popen(
        [sys.executable, "-c", BCC_FLOOR, LIBC, str(where.offset if where else 0)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert tracer.stdout.readline().strip() == "ready"
        return loop_seconds(workload(exe, args, 0))
    finally:
        tracer.kill()
        tracer.wait()


def run_probedsl(exe, args, backend, *more, tree=None):
    """tree: another checkout of probedsl (its own .venv) to run instead of this one."""
    proc = workload(exe, args, DELAY)
    extra = ["--no-follow-forks", *more]  # one process: a pid filter, and per-pid uprobes on BCC
    tracer = subprocess.Popen(
        [
            os.path.join(tree, ".venv", "bin", "python") if tree else sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            backend,
            "--pid",
            str(proc.pid),
            "--format",
            "json",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tree or ROOT,
    )
    try:
        return loop_seconds(proc)
    finally:
        if tracer.wait(timeout=120):  # (else the loop ran untraced)
            raise SystemExit(f"probedsl run {' '.join(more)} from {tree or ROOT} failed")


def run_bcc_memleak(exe, args):
    tool = shutil.which("memleak-bpfcc")
    proc = workload(exe, args, DELAY)
    tracer = subprocess.Popen([tool, "-p", str(proc.pid), "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return loop_seconds(proc)
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=30)
        except subprocess.TimeoutExpired:
            tracer.kill()


def detachers() -> set:
    """Pids of the processes that close a run's probes after it returns (drivers.teardown)."""
    from probedsl.process.procfs import processes_named

    return set(processes_named("probedsl-detach"))


@contextlib.contextmanager
def tracing(backend, *target):
    """`probedsl run memleak ... TARGET`, from the moment it says it is tracing until it is
    stopped (SIGINT, its report read) and its probes are gone (the next measurement would
    otherwise run while machine-wide uprobes are still being closed)."""
    before = detachers()
    tracer = subprocess.Popen(
        [sys.executable, "-m", "probedsl", "run", "memleak", "--backend", backend, *target],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    while "tracing" not in (tracer.stderr.readline() or "tracing"):
        pass
    try:
        yield tracer
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=120)
        deadline = time.monotonic() + 60
        while detachers() - before and time.monotonic() < deadline:
            time.sleep(0.05)


def loop_while_tracing(exe, args, backend, *target):
    """The workload's loop time while `probedsl run memleak ... TARGET` traces something else."""
    with tracing(backend, *target):
        return loop_seconds(workload(exe, args, 0))


def run_bystander(exe, args, backend, *extra):
    """An unrelated process (named mallocfree) while probedsl traces --comm nosuchprog."""
    return loop_while_tracing(exe, args, backend, "--comm", "nosuchprog", *extra)


def run_bystander_of_command(exe, args, backend):
    """An unrelated process while probedsl traces a launched (sleeping) command: the command's
    probes sit on private library copies, so this one should run at full speed."""
    return loop_while_tracing(exe, args, backend, "--", exe, "1", "1000", "30")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=1_000_000)
    ap.add_argument("--only", help="comma-separated configurations to run (untraced and floor always run)")
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also run probedsl-bcc and -dwarf from another checkout (its .venv): rows NAME-bcc, NAME-bcc-dwarf",
    )
    args = ap.parse_args()
    exe = build(tempfile.mkdtemp(prefix="probedsl-bench-"))
    configs = {
        "untraced": lambda: run_untraced(exe, args),
        "floor": lambda: run_floor(exe, args),
        "probedsl-bpftrace": lambda: run_probedsl(exe, args, "bpftrace"),
        "probedsl-bcc": lambda: run_probedsl(exe, args, "bcc", "--stacks", "fp"),
        "floor-bcc-entry": lambda: run_floor_bcc(exe, args, placed=False),
        "floor-bcc-placed": lambda: run_floor_bcc(exe, args, placed=True),
        "probedsl-bcc-at-entry": lambda: run_probedsl(exe, args, "bcc", "--stacks", "fp", "--probe-at", "entry"),
        "probedsl-bcc-dwarf": lambda: run_probedsl(exe, args, "bcc", "--stacks", "dwarf"),
        "probedsl-bpftrace-sample10": lambda: run_probedsl(exe, args, "bpftrace", "--sample", "10"),
        "probedsl-bcc-sample10": lambda: run_probedsl(exe, args, "bcc", "--stacks", "fp", "--sample", "10"),
        "bystander-bpftrace": lambda: run_bystander(exe, args, "bpftrace"),
        "bystander-bcc": lambda: run_bystander(exe, args, "bcc"),
        "bystander-bcc-per-process": lambda: run_bystander(exe, args, "bcc", "--per-process"),
        "bystander-of-cmd-bpftrace": lambda: run_bystander_of_command(exe, args, "bpftrace"),
        "bystander-of-cmd-bcc": lambda: run_bystander_of_command(exe, args, "bcc"),
    }
    from_trees = {}  # --tree's rows: always run
    for name, tree in (t.split("=", 1) if "=" in t else ap.error(f"--tree {t}: NAME=DIR") for t in args.tree):
        tree = os.path.abspath(tree)
        if f"{name}-bcc" in configs or not os.access(os.path.join(tree, ".venv", "bin", "python"), os.X_OK):
            ap.error(f"--tree {name}={tree}: a new name, and a checkout with its .venv (scripts/setup.sh)")
        from_trees[f"{name}-bcc"] = lambda tree=tree: run_probedsl(exe, args, "bcc", "--stacks", "fp", tree=tree)
        from_trees[f"{name}-bcc-dwarf"] = lambda tree=tree: run_probedsl(
            exe, args, "bcc", "--stacks", "dwarf", tree=tree
        )
    configs.update(from_trees)
    if shutil.which("memleak-bpfcc"):
        configs["bcc-memleak"] = lambda: run_bcc_memleak(exe, args)
    if args.only:
        wanted = {"untraced", "floor", *args.only.split(","), *from_trees}
        configs = {name: fn for name, fn in configs.items() if name in wanted}
    times = {name: [] for name in configs}
    for r in range(args.runs):
        for name, fn in configs.items():
            times[name].append(fn())
            print(f"run {r + 1}/{args.runs} {name}: {times[name][-1]:.3f} s", file=sys.stderr, flush=True)
    calls = 2 * args.threads * args.calls  # each pair is a malloc and a free
    base = statistics.median(times["untraced"])
    floor = (statistics.median(times["floor"]) - base) / calls * 1e9
    print(f"\n{args.threads} threads x {args.calls} malloc/free, medians of {args.runs} interleaved runs\n")
    print("| configuration | loop time (s) | extra ns per call | vs floor | vs untraced |")
    print("|---|---:|---:|---:|---:|")
    for name, samples in times.items():
        med = statistics.median(samples)
        extra = (med - base) / calls * 1e9
        print(f"| {name} | {med:.3f} | {extra:.0f} | {extra / floor:.2f}x | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
