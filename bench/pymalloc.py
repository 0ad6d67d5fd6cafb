"""Benchmark: what a recipe on CPython's object allocator (PyObject_Malloc, _Calloc, _Realloc,
_Free) would cost and find, beside memleak with the program under PYTHONMALLOC=malloc.

    sudo .venv/bin/python -m bench.pymalloc [--runs 3] [--calls 200000] [--keep 10]

bench/workloads/pyobjects.py makes CALLS small dicts and keeps one in KEEP (a leak of small
objects). Each configuration attaches `probedsl run ... --backend bcc --pid` to the workload
held at its start (bench.python.held_run):
  untraced          the workload alone
  untraced+env      the same under PYTHONMALLOC=malloc
  memleak           the malloc family: pymalloc's objects are not seen
  memleak+env       memleak, the workload started with PYTHONMALLOC=malloc (a restart in real use)
  pymalloc          the recipe below on the interpreter's own PyObject_* functions (by --pid:
                    no restart); it is not bundled (docs/python.md says why)
Columns: the loop's time and its ratio to untraced; the BPF programs' own time per object made
(kernel stats, as bench.python); the blocks found at make()'s Python frame against the objects
kept (each kept dict is 1-2 blocks: the object, and its keys when they are not shared);
acquisitions and releases of blocks never seen acquired. Medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.python import PYTHON, ROOT, enable_bpf_stats, held_run

WORKLOAD = str(ROOT / "bench" / "workloads" / "pyobjects.py")
RECIPE = """recipe pymalloc "CPython objects never freed, by allocation stack"
resource object keyed by (pid, address) {{
  acquire "{exe}":PyObject_Malloc(size)        -> (pid, ret)  when ret != 0  size = size
  acquire "{exe}":PyObject_Calloc(n, each)     -> (pid, ret)  when ret != 0  size = n * each
  acquire "{exe}":PyObject_Realloc(old, size)  -> (pid, ret)  when ret != 0  size = size
      releases (pid, old) when old != 0 && ret != 0
  release "{exe}":PyObject_Free(ptr)           -> (pid, ptr)  when ptr != 0
  record size, ustack, time, pid
}}
report outstanding object by ustack: sum(size) as bytes, count() as blocks, top 30
"""


def configurations(recipe: str) -> dict:
    """name -> (run arguments, the workload's environment)."""
    bcc = ["--backend", "bcc", "--top", "30"]
    env = dict(os.environ)
    env.pop("PYTHONMALLOC", None)
    return {
        "untraced": ([], env),
        "untraced+env": ([], dict(env, PYTHONMALLOC="malloc")),
        "memleak": (["memleak", *bcc], env),
        "memleak+env": (["memleak", *bcc], dict(env, PYTHONMALLOC="malloc")),
        "pymalloc": ([recipe, *bcc], env),
    }


def found(report: dict) -> tuple:
    """(blocks whose stack passes make(), acquisitions, releases of unknown blocks)."""
    (counts,) = report["resources"].values()
    blocks = sum(
        e["blocks"]
        for e in report["reports"][0]["entries"]
        if any(f["module"] == "[python]" and f["function"] == "make" for f in e["stack"])
    )
    return blocks, counts["acquired"], counts["unknown_releases"]


def main() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench.pymalloc: run as root (probedsl traces)")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--keep", type=int, default=10)
    args = ap.parse_args()
    enable_bpf_stats()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="probedsl-bench-") as tmp:
        recipe = os.path.join(tmp, "pymalloc.probe")
        with open(recipe, "w") as f:
            f.write(RECIPE.format(exe=os.path.realpath(PYTHON)))
        configs = configurations(recipe)
        rows: dict = {name: [] for name in configs}
        for _ in range(args.runs):
            for name, (run, env) in configs.items():
                argv = [PYTHON, WORKLOAD, str(args.calls), str(args.keep)]
                said, spent, report = held_run(argv, run, tmp, env)
                blocks, acquired, unknown = found(report) if report else (0, 0, 0)
                rows[name].append((float(said[-1]), int(said[0]), spent / args.calls, blocks, acquired, unknown))
    print(f"medians of {args.runs}, {args.calls} objects made, load {load:.1f} at the start")
    print(
        "| configuration | loop (s) | vs untraced | BPF ns per object made | blocks at make() / kept | acquisitions"
        " | unknown releases |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(r[0] for r in rows["untraced"])
    for name, runs in rows.items():
        m = [statistics.median(r[i] for r in runs) for i in range(6)]
        print(
            f"| {name} | {m[0]:.3f} | {m[0] / base:.1f}x | {m[2]:.0f} | {m[3]:.0f} / {m[1]:.0f} | {m[4]:.0f} |"
            f" {m[5]:.0f} |"
        )


if __name__ == "__main__":
    main()
