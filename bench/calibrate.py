"""Calibration: what one uprobe hit costs on the running kernel, per kind of instruction
probed, against what probedsl.passes.placement believes the kernel emulates.

    sudo .venv/bin/python -m bench.calibrate [--calls 200000] [--runs 3]

bench/workloads/entries.c has one function per first instruction (push, jcc, nop: emulated;
test, mov, lea, endbr64: single-stepped out of line). Each is called CALLS times with an empty
BCC program on its first instruction, and once untraced; ns per hit = (traced - untraced) /
CALLS, medians of interleaved runs. A kind whose measured cost disagrees with the table (under
2 us but believed single-stepped, or the reverse) is flagged: the table in x86.py is
then wrong for this kernel.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("op_push", "op_jcc", "op_nop", "op_test", "op_mov", "op_lea", "op_endbr")
EMPTY_PROBE = """
import sys, time
from bcc import BPF
b = BPF(text="int f(void *ctx) { return 0; }")
b.attach_uprobe(name=sys.argv[1], sym=sys.argv[2], sym_off=int(sys.argv[3]), fn_name="f")
print("ready", flush=True)
time.sleep(3600)
"""


def loop_seconds(exe: str, kind: str, calls: int, probed_at: int = -1) -> float:
    """The loop's seconds with an empty probe at kind+probed_at (-1: none)."""
    tracer = None
    if probed_at >= 0:
        tracer = subprocess.Popen(
            [sys.executable, "-c", EMPTY_PROBE, exe, kind, str(probed_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert tracer.stdout.readline().strip() == "ready", "the empty probe did not attach"
    try:
        out = subprocess.run([exe, kind, str(calls)], capture_output=True, text=True, check=True).stdout
        return float(out.split()[-1])
    finally:
        if tracer:
            tracer.kill()
            tracer.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from probedsl.binaries import elf, x86
    from probedsl.process import procfs

    exe = os.path.join(tempfile.mkdtemp(prefix="probedsl-calibrate-"), "entries")
    subprocess.run(["gcc", "-O1", "-o", exe, str(ROOT / "bench" / "workloads" / "entries.c")], check=True)
    syms = elf.symbols(exe)
    release = procfs.kernel_release()
    print(f"kernel {os.uname().release}, {args.calls} calls, medians of {args.runs} interleaved runs\n")
    print("| probed at | instruction | x86.py says | ns per hit | measured | agrees |")
    print("|---|---|---|---:|---|---|")
    for kind in KINDS:
        places = [0]
        placed = x86.place(exe, kind, ())
        if placed:  # where probedsl would probe instead (endbr64: past it)
            places.append(placed.offset)
        for offset in places:
            untraced, traced = [], []
            for _ in range(args.runs):
                untraced.append(loop_seconds(exe, kind, args.calls))
                traced.append(loop_seconds(exe, kind, args.calls, offset))
            ns = (statistics.median(traced) - statistics.median(untraced)) / args.calls * 1e9
            code = syms.read(syms.address_of(kind) + offset, 15)
            believed, measured = x86.emulated(code, release), ns < 2000
            text = x86.disassemble(code)
            print(
                f"| {kind}+{offset} | {text} | {'emulated' if believed else 'single-stepped'} | {ns:.0f} | "
                f"{'emulated' if measured else 'single-stepped'} | {'yes' if believed == measured else 'NO'} |"
            )


if __name__ == "__main__":
    main()
