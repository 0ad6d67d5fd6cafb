"""Benchmark: the HTML report (--format html) at 1,000 and 20,000 stacks, and the time series'
memory over a one-hour run.

    .venv/bin/python -m bench.html [--stacks 1000,20000] [--hours 1]

For each size: a synthetic saved run (stacks of 8-24 frames over a 600-point series, one
stack in ten followed over time) rendered with `probedsl report --format html`: the file's
size, the render's time in Python, and in Debian's headless Chromium the page's own time to
first render (navigation start to the end of its first draw: JSON parse, chart, table, trees,
flame graph) and the time to redraw every view for a time window (the URL's #window=).
Then a one-hour run simulated: 3,600 samples of 2,000 tallied stacks whose sizes drift, fed
to timeseries.Series: its memory (tracemalloc) and the cost of one sample.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

from probedsl import report
from probedsl.report import timeseries


def synthetic(stacks: int, samples: int = 600, seed: int = 1) -> dict:
    """A saved run (schema probedsl.report) with `stacks` entries and a series of `samples`."""
    rng = random.Random(seed)
    names = [f"fn_{i}" for i in range(max(50, stacks // 4))]
    t = [float(i) for i in range(samples)]
    entries, series_stacks, total = [], [], [0] * samples
    for i in range(stacks):
        depth = rng.randint(8, 24)
        frames = [
            {
                "address": hex(0x400000 + i * 64 + d),
                "function": rng.choice(names) if d else f"alloc_{i % 97}",
                "offset": d,
                "module": "/usr/bin/app",
                "vaddr": hex(0x1000 + d),
                "file": "app.c",
                "line": d,
                "inlined": False,
                "text": "",
            }
            for d in range(depth)
        ]
        frames.append(
            {
                "address": hex(0x401000),
                "function": "main",
                "offset": 1,
                "module": "/usr/bin/app",
                "vaddr": "0x1000",
                "file": "app.c",
                "line": 1,
                "inlined": False,
                "text": "",
            }
        )
        start = rng.randrange(samples)
        rate = rng.choice((0, 0, 0, 8, 64))
        base = rng.randint(8, 4096)
        values = [0 if j < start else base + rate * (j - start) for j in range(samples)]
        for j, v in enumerate(values):
            total[j] += v
        entries.append(
            {
                "bytes": values[-1],
                "blocks": max(1, values[-1] // 32),
                "oldest_age_s": None,
                "pids": [1],
                "growing": rate > 0,
                "stack": frames,
                "truncated": False,
            }
        )
        if rate or i % 50 == 0:
            sig = report._entry_from_dict(entries[-1], ["bytes", "blocks"]).signature()
            series_stacks.append(
                {"resource": "heap", "signature": sig, "bytes": values, "blocks": [v // 32 for v in values]}
            )
    entries.sort(key=lambda e: -e["bytes"])
    # a run follows at most MAX_TRACKED stacks over time: the largest
    series_stacks = sorted(series_stacks, key=lambda s: -s["bytes"][-1])[: timeseries.MAX_TRACKED]
    live = sum(e["bytes"] for e in entries)
    return {
        "schema": "probedsl.report",
        "version": 3,
        "recipe": "memleak",
        "backend": "bcc",
        "backend_version": "0.26",
        "target": "synthetic",
        "duration_s": float(samples),
        "final": True,
        "sequence": 1,
        "sample": 1,
        "exit_status": 0,
        "notes": [],
        "resources": {
            "heap": {
                "live_bytes": live,
                "live_blocks": sum(e["blocks"] for e in entries),
                "acquired": 0,
                "released": 0,
                "unknown_releases": 0,
                "untracked": 0,
                "replaced": 0,
            }
        },
        "series": {
            "period_s": 1.0,
            "t": t,
            "max_points": 512,
            "thinned": 0,
            "untracked_stacks": 0,
            "resources": {"heap": {"bytes": total, "blocks": [v // 32 for v in total]}},
            "groups": series_stacks,
        },
        "reports": [
            {
                "kind": "outstanding",
                "resource": "heap",
                "by": ["ustack"],
                "columns": ["bytes", "blocks"],
                "top": 10,
                "min_age_ms": 0,
                "total_entries": stacks,
                "entries": entries,
                "omitted": {"entries": 0, "bytes": 0, "blocks": 0},
                "cut_stacks": {},
            },
            {
                "kind": "lifetime",
                "resource": "heap",
                "by": [],
                "histogram_ns": [{"min": 1 << k, "max": (2 << k) - 1, "count": 100 - k} for k in range(10, 30)],
            },
        ],
    }


def chromium_dom(url: str) -> str:
    exe = shutil.which("chromium")
    if exe is None:
        sys.exit("bench.html needs Debian's chromium (scripts/setup.sh installs it)")
    out = subprocess.run(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1400,1000",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.stdout


def page_times(path: str, window: str) -> tuple:
    """(ms to first render, ms to redraw for the window) as the page measured them."""
    first = re.search(r'data-rendered-ms="([\d.]+)"', chromium_dom(f"file://{path}"))
    dom = chromium_dom(f"file://{path}#window={window}")
    windowed = re.search(r'data-update-ms="([\d.]+)"', dom)
    return float(first.group(1)), float(windowed.group(1))


def html_numbers(sizes) -> list:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            saved = os.path.join(tmp, f"run{n}.json")
            with open(saved, "w") as f:
                json.dump(synthetic(n), f)
            page = os.path.join(tmp, f"run{n}.html")
            began = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "probedsl", "report", saved, "--format", "html", "-o", page], check=True
            )
            render_s = time.monotonic() - began
            first, windowed = zip(*(page_times(page, "300-450") for _ in range(3)))
            out.append((n, os.path.getsize(page), render_s, sorted(first)[1], sorted(windowed)[1]))
    return out


class _Program:
    """What Series reads of a program: one resource, a report grouped by user stack."""

    def __init__(self):
        from probedsl import compiler

        self.real = compiler.build(compiler.load("memleak"), {})

    def __getattr__(self, name):
        return getattr(self.real, name)


def series_numbers(hours: float, stacks: int = 2000) -> tuple:
    from probedsl import ir
    from probedsl.ir import layout
    from probedsl.drivers.rundata import Snapshot, Totals

    program = _Program().real
    res = program.resources[0]
    keys = tuple(ir.group_keys(next(r for r in program.reports if r.kind == "outstanding").group_by))
    tally_keys = layout.of(program, res).tallies[0].keys
    rng = random.Random(2)
    sizes = [rng.randint(8, 4096) for _ in range(stacks)]
    tracemalloc.start()
    series = timeseries.Series(program)
    base = tracemalloc.get_traced_memory()[0]
    samples = int(hours * 3600)
    spent = 0.0
    for i in range(samples):
        for j in range(0, stacks, 37):
            sizes[j] += rng.randint(-64, 128)
        group = {(tuple(range(j, j + 12)), 1000): (max(0, s), max(1, s // 32), 0) for j, s in enumerate(sizes)}
        tallies = {res.name: {keys: group, tally_keys: group}}
        snap = Snapshot(i * 10**9, None, {res.name: Totals()}, False, tallies)
        began = time.perf_counter()
        series.add(float(i), snap)
        spent += time.perf_counter() - began
    del group, tallies, snap  # the simulated snapshot: not the series' memory
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return samples, len(series.t), len(series.stacks), used, spent / samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stacks", default="1000,20000")
    ap.add_argument("--hours", type=float, default=1.0)
    args = ap.parse_args()
    print("| stacks | HTML size | render in Python (s) | first render in Chromium (ms) | redraw for a window (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for n, size, render_s, first, windowed in html_numbers([int(x) for x in args.stacks.split(",")]):
        print(f"| {n:,} | {size / 2**20:.1f} MiB | {render_s:.2f} | {first:.0f} | {windowed:.0f} |")
    samples, points, tracked, used, per = series_numbers(args.hours)
    print(
        f"\ntime series over {samples:,} samples of 2,000 stacks: {points} points kept, {tracked} stacks followed, "
        f"{used / 1024:.0f} KiB, {per * 1000:.2f} ms a sample"
    )


if __name__ == "__main__":
    main()
