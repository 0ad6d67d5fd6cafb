"""Benchmark: what BCC's start costs before attaching, per recipe: clang's compile (with the maps'
creation), and each program's load, which is the kernel's verification.

    sudo .venv/bin/python -m bench.verify [--stacks dwarf] [RECIPE ...]

Per program: the load's seconds and the instructions the verifier walked (the kernel's
verified_insns); the programs BCC loads itself (tracepoints) are counted with the compile.
"""

from __future__ import annotations

import argparse
import time

from probedsl import backends, compiler, ir, targets
from probedsl.process import libraries
from probedsl.drivers import bcc_compile
from probedsl.drivers.bcc import _import_bcc


def verified_instructions(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("verified_insns:")), 0)


def measure(recipe: str, stacks: str) -> None:
    bcc = _import_bcc()
    program = compiler.build(compiler.load(recipe), resolver=libraries.LibraryResolver())
    program = program.with_scope(ir.Scope("pid", pid=1)).walking_stacks(stacks)
    gen = backends.for_target(targets.detect("bcc")).generate(program)
    started = time.monotonic()
    bpf = bcc.BPF(text=gen.text, cflags=bcc_compile.cflags(gen.text, 1))
    compiled = time.monotonic() - started
    kinds = {f: bcc.BPF.KPROBE for p in gen.manifest["probes"] for f in (p["entry"], p["return"]) if f}
    kinds.update(
        {
            name: bcc.BPF.TRACEPOINT if u["type"] == "tracepoint" else bcc.BPF.KPROBE
            for u in gen.manifest.get("unwinders", [])
            for name in (u["program"], u["frames"])
        }
    )
    rows, total = [], 0.0
    try:
        for name, kind in kinds.items():
            started = time.monotonic()
            fn = bpf.load_func(name, kind)
            took = time.monotonic() - started
            total += took
            rows.append((name, took, verified_instructions(fn.fd)))
    finally:
        bpf.cleanup()
    print(
        f"### {recipe}, --stacks {stacks}: compile and maps {compiled:.2f} s, loads {total:.2f} s "
        f"({len(rows)} programs)"
    )
    print("| program | load (ms) | verified instructions |")
    print("|---|---:|---:|")
    for name, took, insns in rows:
        print(f"| {name} | {took * 1000:.1f} | {insns} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stacks", choices=("fp", "dwarf"), default="dwarf")
    ap.add_argument("recipes", nargs="*", default=["memleak"])
    args = ap.parse_args()
    for recipe in args.recipes:
        measure(recipe, args.stacks)


if __name__ == "__main__":
    main()
