"""Benchmark: what holding a process tree at each process's exit costs (--reachability on a tree).

    sudo .venv/bin/python -m bench.tree_hold [--children 200] [--programs 16] [--backend bcc]
        [--max-live N] [--no-valgrind] [--no-make]

Two trees: `sh -c 'for i in $(seq N); do ./leaky_child; done'` (tests/fixtures/tree_leaks.c
`leaky`: one block lost, one reachable) and `make -j2` of M small C programs (each compiled
by gcc: cc1, as, collect2, ld, every one a process). Each is timed (wall seconds) alone,
under `probedsl run memleak --backend B` without and with --reachability, and under
`valgrind --trace-children=yes --leak-check=full`. From the --reachability report: processes
scanned and their summed pause.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEMLEAK = str(ROOT / "recipes" / "memleak.probe")
PROBEDSL = str(Path(sys.executable).parent / "probedsl")


def timed(argv, cwd: str) -> float:
    began = time.monotonic()
    subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.monotonic() - began


def make_tree(work: str, programs: int) -> list:
    src = Path(work, "make")
    src.mkdir(exist_ok=True)
    for i in range(programs):
        (src / f"p{i}.c").write_text(f"#include <stdio.h>\nint main(void) {{ printf(\"{i}\\n\"); return 0; }}\n")
    names = " ".join(f"p{i}" for i in range(programs))
    (src / "Makefile").write_text(f"all: {names}\n%: %.c\n\tgcc -O1 -o $@ $<\nclean:\n\trm -f {names}\n")
    return ["sh", "-c", "make -s clean && make -s -j2"]


def measure(name: str, cmd: list, cwd: str, backend: str, out: str, extra: list, valgrind: bool = True) -> dict:
    row = {"tree": name, "alone_s": round(timed(cmd, cwd), 2)}
    base = [PROBEDSL, "run", MEMLEAK, "--backend", backend, *extra]
    row["probedsl_s"] = round(timed([*base, "-o", "/dev/null", "--", *cmd], cwd), 2)
    report = os.path.join(out, f"{name}.json")
    row["reachability_s"] = round(
        timed([*base, "--reachability", "--format", "json", "-o", report, "--", *cmd], cwd), 2
    )
    scans = json.load(open(report)).get("reachability_scans", [])
    row["processes_scanned"] = len(scans)
    row["pause_ms_per_process"] = round(sum(s["pause_ms"] for s in scans) / max(1, len(scans)), 1)
    if valgrind:
        vg = ["valgrind", "--trace-children=yes", "--leak-check=full", f"--log-file={out}/vg.%p"]
        row["valgrind_s"] = round(timed([*vg, *cmd], cwd), 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--children", type=int, default=200)
    parser.add_argument("--programs", type=int, default=16)
    parser.add_argument("--backend", default="bcc")
    parser.add_argument("--max-live", type=int, default=0, help="probedsl's --max-live (0: its default)")
    parser.add_argument("--no-valgrind", action="store_true")
    parser.add_argument("--no-make", action="store_true")
    args = parser.parse_args()
    extra = ["--max-live", str(args.max_live)] if args.max_live else []
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(
            [
                "gcc",
                "-O0",
                "-g",
                "-pthread",
                "-o",
                f"{work}/leaky_child",
                str(ROOT / "tests" / "fixtures" / "tree_leaks.c"),
            ],
            check=True,
        )
        loop = ["sh", "-c", f"for i in $(seq {args.children}); do ./leaky_child; done"]
        vg = not args.no_valgrind
        print(json.dumps(measure(f"sh-loop-{args.children}", loop, work, args.backend, work, extra, vg)), flush=True)
        if not args.no_make:
            make = make_tree(work, args.programs)
            row = measure(f"make-j2-{args.programs}", make, f"{work}/make", args.backend, work, extra, vg)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
