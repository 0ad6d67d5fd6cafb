"""Soak: a long interval run against a steadily leaking program; records probedsl's own RSS
after every report. `python -m bench.soak --backend bcc --seconds 3600` for the hour-long run;
tests/test_losses_and_failures.py runs a 12-second version."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def rss_kb(pid: int) -> Optional[int]:
    """The process's resident memory; None once it has exited (a zombie has no VmRSS)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), None)
    except OSError:
        return None


def soak(backend: str, seconds: int, interval: int = 1, exe: str = "") -> list:
    """Trace `drip SECONDS+5` with --interval; sample probedsl's RSS after each report."""
    if not exe:
        exe = os.path.join(tempfile.mkdtemp(prefix="probedsl-soak-"), "drip")
        subprocess.run(["gcc", "-O0", "-g", "-o", exe, str(ROOT / "tests" / "fixtures" / "drip.c")], check=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            backend,
            "--interval",
            str(interval),
            "--format",
            "json",
            "--duration",
            str(seconds),
            "--",
            exe,
            str(seconds + 5),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    samples, started = [], time.monotonic()
    for line in proc.stdout:
        rss = rss_kb(proc.pid) if line.startswith('  "sequence"') else None
        if rss is not None:  # (the last report's process may already have exited)
            samples.append({"t": round(time.monotonic() - started, 1), "rss_kb": rss})
    proc.wait()
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backend", default="bpftrace", choices=["bpftrace", "bcc"])
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--interval", type=int, default=10)
    args = ap.parse_args()
    samples = soak(args.backend, args.seconds, args.interval)
    first, last = samples[min(3, len(samples) - 1)]["rss_kb"], samples[-1]["rss_kb"]
    print(
        json.dumps(
            {
                "backend": args.backend,
                "reports": len(samples),
                "rss_kb_after_warmup": first,
                "rss_kb_last": last,
                "growth_kb": last - first,
            }
        )
    )


if __name__ == "__main__":
    main()
