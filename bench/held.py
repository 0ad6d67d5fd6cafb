"""A workload held at its start (it reads a line first) while `probedsl run ... --pid PID`
attaches, then let go: its own timing of its loop, with start-up and reporting outside it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent


def attach(pid: int, run_args: Sequence[str], env=None) -> subprocess.Popen:
    """`probedsl run RUN_ARGS --pid PID --no-follow-forks`, returned once it says it is tracing."""
    tracer = subprocess.Popen(
        [sys.executable, "-m", "probedsl", "run", *run_args, "--pid", str(pid), "--no-follow-forks"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    while "tracing" not in tracer.stderr.readline():
        assert tracer.poll() is None, "probedsl ended before tracing"
    return tracer


def loop_seconds(argv: Sequence[str], run_args: Sequence[str] = ()) -> float:
    """The seconds the workload argv prints last; run_args: `probedsl run` arguments before
    --pid (none: untraced)."""
    work = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tracer = attach(work.pid, run_args) if run_args else None
    out, _ = work.communicate("go\n", timeout=600)
    if tracer:
        tracer.send_signal(signal.SIGINT)
        tracer.communicate(timeout=300)
    return float(out.split()[-1])
