"""Benchmark: how long a user waits, start to finish, for a leak check of a short command.

    sudo .venv/bin/python -m bench.startup [--runs 5] [--bystanders 2] [--only NAME,NAME]

For memleak on `-- /bin/true` and `-- python3 -c pass`: probedsl with BCC (dwarf and fp
stacks) and bpftrace, each with its cache cold (an empty XDG_CACHE_HOME: a first run, with what
the install built, scripts/setup.sh) and warm (one run before); BCC also with nothing kept
anywhere (`none`: cold, and PROBEDSL_INSTALL_CACHE=0, as on an install that built nothing: the
whole compile, every file's rows decoded); beside heaptrack and valgrind on the same commands.
Runs are interleaved (drift hits all alike); the figures are medians. Columns:
  to exec   probedsl started -> the command let go ("probedsl: tracing" is said right before
            it execs; with dwarf stacks it is then held until its libraries are mapped, a few ms)
  to exit   started -> the tool returned control (the report printed)
  generate, compile...  probedsl's own account (--estimate): from its process start to the program
            generated (Python, imports, recipe, generation), then to every probe attached
  clean     started -> every process the run left ended (probedsl's detach holder, bpftrace
            dying): the kernel has removed the probes. The bench is a child subreaper, so those
            orphans become its children and are waited for.
--profile runs probedsl under cProfile instead (BCC dwarf and fp, bpftrace; /bin/true, warm cache)
and prints the medians of where its main thread spends the time (the compile runs on its own
thread: what shows is the wait for it).
--bystanders N runs N CPU-bound loops meanwhile (a busy machine). --version LABEL=PYTHON adds
the same probedsl rows run by another interpreter (e.g. a worktree of the code before a change,
`--version before=/path/.venv/bin/python`), interleaved with these: on a shared machine, before
and after then see the same load.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PR_SET_CHILD_SUBREAPER = 36
COMMANDS = {"true": ["/bin/true"], "python": ["/usr/bin/python3", "-c", "pass"]}
PROBEDSL = {
    "bcc-dwarf": ["--backend", "bcc", "--stacks", "dwarf"],
    "bcc-fp": ["--backend", "bcc", "--stacks", "fp"],
    "bpftrace": ["--backend", "bpftrace"],
}
OTHERS = {"untraced": [], "heaptrack": ["heaptrack"], "valgrind": ["valgrind", "--leak-check=full"]}


def become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise SystemExit("bench.startup: cannot become a child subreaper")


BYSTANDERS: set = set()  # our children that run throughout (--bystanders)


def reap_all() -> None:
    """Wait for every child left but the bystanders (orphans re-parented to us included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if _children() <= BYSTANDERS:
                return
            time.sleep(0.01)


def _children() -> set:
    found = set()
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            found.update(int(p) for p in f.read().split())
    return found


def once(argv, env, cwd) -> tuple:
    """(to exec or None, to exit, clean, (generate, compile-load-attach) or None) in seconds
    for one run of argv; the last from probedsl's --estimate line."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    to_exec = parts = None
    for line in proc.stderr:
        if to_exec is None and line.startswith(b"probedsl: tracing "):
            to_exec = time.monotonic() - started
        if b"estimate: the command was let go" in line:
            parts = tuple(float(x) for x in re.findall(rb"(\d+\.\d+) s", line)[1:3])
    proc.wait()
    to_exit = time.monotonic() - started
    reap_all()
    return to_exec, to_exit, time.monotonic() - started, parts


def configurations(only, versions, commands):
    """(name, command key, cache kind, argv)."""
    out = []
    for cmd in commands:
        for name, options in PROBEDSL.items():
            for label, python in versions:
                for cache in ("cold", "warm") + (("none",) if name.startswith("bcc") else ()):
                    said = ["--estimate"] if not label else []  # the breakdown (older versions refuse it)
                    argv = [python, "-m", "probedsl", "run", "memleak", *options, *said, "--", *COMMANDS[cmd]]
                    out.append((f"{name}{label}", cmd, cache, argv))
        for name, prefix in OTHERS.items():
            if not prefix or shutil.which(prefix[0]):
                out.append((name, cmd, "-", prefix + COMMANDS[cmd]))
    return [c for c in out if not only or c[0].split(" ")[0] in only]


def bystanders(n: int) -> list:
    loop = [sys.executable, "-c", "while True: pass"]
    started = [subprocess.Popen(loop) for _ in range(n)]
    BYSTANDERS.update(p.pid for p in started)
    return started


# (file suffix, function) -> phase; cumulative seconds in the main thread
PHASES = {
    ("probedsl/cli.py", "<module>"): "imports",
    ("probedsl/run/session.py", "prepare"): "prepare (recipe, placement, generate)",
    ("bcc_compile.py", "result"): "wait for BCC's compile",
    ("bcc/__init__.py", "load_func"): "load (the verifier)",
    ("drivers/bcc_loader.py", "_attach"): "attach (load included)",
    ("drivers/bpftrace.py", "start"): "bpftrace start (LLVM, maps, attach)",
    ("probedsl/process/mappings.py", "start"): "mapping tracker start",
    ("drivers/bcc_loader.py", "_placed"): "placement checks",
    ("drivers/bcc_loader.py", "close"): "detach (probedsl's part)",
    ("drivers/bpftrace.py", "kill"): "detach (probedsl's part)",
    ("probedsl/run/session.py", "finish"): "final snapshot and report",
}


# probedsl under cProfile: `probedsl run` ends with os._exit (no interpreter teardown), so the
# profile is written there, by the run's own process only (its detach holder is a fork)
PROFILED = """
import cProfile, os, runpy, sys
out, me, real_exit, prof = sys.argv[1], os.getpid(), os._exit, cProfile.Profile()
def leave(status):
    if os.getpid() == me:
        prof.disable()
        prof.dump_stats(out)
    real_exit(status)
os._exit = leave
sys.argv = ["probedsl"] + sys.argv[2:]
prof.enable()
runpy.run_module("probedsl", run_name="__main__")
"""


def profile(runs: int, work: Path) -> None:
    import pstats

    for name, options in PROBEDSL.items():
        phases: dict = {}
        for i in range(runs + 1):  # the first warms the cache
            out = work / f"{name}-{i}.prof"
            env = dict(os.environ, XDG_CACHE_HOME=str(work / "cache"))
            subprocess.run(
                [sys.executable, "-c", PROFILED, str(out), "run", "memleak", *options, "--", "/bin/true"],
                env=env,
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )
            reap_all()
            if i == 0:
                continue
            for (path, _, func), (_, _, _, cumulative, _) in pstats.Stats(str(out)).stats.items():
                for (suffix, wanted), phase in PHASES.items():
                    if func == wanted and path.endswith(suffix):
                        phases.setdefault(phase, []).append(cumulative)
        print(f"{name}: " + ", ".join(f"{phase} {statistics.median(v):.2f}" for phase, v in phases.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bystanders", type=int, default=0, help="CPU-bound loops running meanwhile")
    ap.add_argument("--only", default="", help="comma-separated: " + ", ".join([*PROBEDSL, *OTHERS]))
    ap.add_argument(
        "--version",
        action="append",
        default=[],
        metavar="LABEL=PYTHON",
        help="also run probedsl with this interpreter (its installed probedsl)",
    )
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated: " + ", ".join(COMMANDS))
    ap.add_argument("--profile", action="store_true", help="where probedsl's main thread spends its start and end")
    args = ap.parse_args()
    become_subreaper()
    if args.profile:
        work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
        try:
            profile(args.runs, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    versions = [("", sys.executable)] + [(f" ({v.split('=', 1)[0]})", v.split("=", 1)[1]) for v in args.version]
    commands = args.commands.split(",")
    if set(commands) - set(COMMANDS):
        ap.error(f"--commands: {', '.join(sorted(set(commands) - set(COMMANDS)))} is not one of {', '.join(COMMANDS)}")
    configs = configurations(set(filter(None, args.only.split(","))), versions, commands)
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    warm = {}
    busy = bystanders(args.bystanders)
    try:
        for name, cmd, cache, argv in configs:  # warm caches: one run each, not counted
            if cache == "warm":
                warm[name, cmd] = work / f"warm-{name}-{cmd}"
                warm[name, cmd].mkdir()
                once(argv, dict(os.environ, XDG_CACHE_HOME=str(warm[name, cmd])), work)
        results = {c[:3]: [] for c in configs}
        for i in range(args.runs):
            for name, cmd, cache, argv in configs:
                env = dict(os.environ)
                if cache == "warm":
                    env["XDG_CACHE_HOME"] = str(warm[name, cmd])
                elif cache in ("cold", "none"):
                    env["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix=f"{cache}{i}-", dir=work)
                if cache == "none":
                    env["PROBEDSL_INSTALL_CACHE"] = "0"
                results[name, cmd, cache].append(once(argv, env, work))
    finally:
        for p in busy:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"medians of {args.runs}, {args.bystanders} CPU-bound bystanders, {os.cpu_count()} CPUs")
    print(
        "| tool | command | cache | to exec (s) | to exit (s) | clean (s) | generate (s) | compile, load, attach (s) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (name, cmd, cache), runs in results.items():

        def median(values):
            values = [v for v in values if v is not None]
            return f"{statistics.median(values):.2f}" if values else "-"

        parts = [r[3] for r in runs if r[3]]
        print(
            f"| {name} | {' '.join(COMMANDS[cmd])} | {cache} | {median(r[0] for r in runs)} | "
            f"{median(r[1] for r in runs)} | {median(r[2] for r in runs)} | {median(p[0] for p in parts)} | "
            f"{median(p[1] for p in parts)} |"
        )


if __name__ == "__main__":
    main()
