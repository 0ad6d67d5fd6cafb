"""Benchmark: leak finders on real programs, start-up and the traced work reported apart.

    sudo .venv/bin/python -m bench.programs [--runs 3] [--only python-json,sqlite3,git]

Each program runs under each tool: untraced; heaptrack; valgrind (memcheck, --leak-check=full,
--trace-children=yes); probedsl run memleak -- CMD on BCC and bpftrace. The program is started
by a bash that writes $EPOCHREALTIME just before and after it (bash's own cost is microseconds),
so a tool's time splits into:
  start-up  the tool started -> the program started (for probedsl: generate, compile, attach)
  work      the program's own run, traced
  after     the program ended -> the tool returned control (reports, teardown)
heaptrack does not follow a child (it records bash alone), so it runs inside that bash: its own
start-up (~20 ms) and its final write are in its work column.
Runs are interleaved (drift hits all alike); the figures are medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
JSON_LOOP = (
    "import json\n"
    "doc = {'id': 1, 'tags': ['a', 'b', 'c'], 'nested': {'x': [1.5, 2.5] * 20, 'name': 'n' * 40}}\n"
    "for i in range(40000):\n"
    "    doc['id'] = i\n"
    "    json.loads(json.dumps(doc))\n"
)
SQL = (
    "create table t(a integer primary key, b text);"
    "with recursive c(x) as (select 1 union all select x + 1 from c where x < 200000)"
    " insert into t select x, hex(randomblob(16)) from c;"
    "create index tb on t(b); select count(*) from t;"
)


def programs(tmp: str) -> dict:
    repo = os.path.join(tmp, "repo")  # a fixed copy of this repository: git reads the same history every run
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), repo], check=True)
    return {
        "python-json": ["/usr/bin/python3", "-c", JSON_LOOP],
        "sqlite3": ["sqlite3", ":memory:", SQL],
        "git": ["git", "-C", repo, "-c", "core.pager=cat", "log", "-p", "-n", "400"],
    }


def tools(tmp: str) -> dict:
    probedsl = [PY, "-m", "probedsl", "run", "memleak", "--top", "1", "-o", "/dev/null"]
    found = {
        "untraced": [],
        "heaptrack": [],  # inside the timed bash (see once)
        "valgrind": ["valgrind", "-q", "--leak-check=full", "--trace-children=yes", "--log-file=/dev/null"],
        "probedsl-bcc": [*probedsl, "--backend", "bcc", "--"],
        "probedsl-bpftrace": [*probedsl, "--backend", "bpftrace", "--"],
    }
    if not shutil.which("heaptrack"):
        del found["heaptrack"]
    return {name: argv for name, argv in found.items() if not argv or shutil.which(argv[0])}


def once(name: str, tool: list, program: list, tmp: str) -> tuple:
    """(start-up, work, after) in seconds for one run of program under tool."""
    if name == "heaptrack":
        program = ["heaptrack", "-o", os.path.join(tmp, "heaptrack"), *program]
    marks = os.path.join(tmp, "marks")
    timed = ["bash", "-c", f'echo $EPOCHREALTIME > {marks}; "$@" > /dev/null; echo $EPOCHREALTIME >> {marks}', "bash"]
    started = time.time()
    subprocess.run([*tool, *timed, *program], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ended = time.time()
    before, after = (float(line) for line in Path(marks).read_text().split())
    return before - started, after - before, ended - after


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench.programs: run as root (probedsl traces)")
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", default="", help="programs to run, comma-separated")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        progs = programs(tmp)
        if opts.only:
            progs = {name: progs[name] for name in opts.only.split(",")}
        configs = tools(tmp)
        times: dict = {(p, t): [] for p in progs for t in configs}
        for _ in range(opts.runs):
            for p, program in progs.items():
                for t, tool in configs.items():
                    times[p, t].append(once(t, tool, program, tmp))
    print(f"medians of {opts.runs}, load {os.getloadavg()[0]:.1f} at the end")
    print("| program | tool | start-up (s) | work (s) | after (s) | total (s) | work vs untraced |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for p in progs:
        base = statistics.median(w for _, w, _ in times[p, "untraced"])
        for t in configs:
            parts = [statistics.median(run[i] for run in times[p, t]) for i in range(3)]
            print(
                f"| {p} | {t} | {parts[0]:.2f} | {parts[1]:.2f} | {parts[2]:.2f} | {sum(parts):.2f} |"
                f" {parts[1] / base:.1f}x |"
            )


if __name__ == "__main__":
    main()
