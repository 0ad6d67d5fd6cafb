"""The pass that places each uprobe: on the first instruction of its function's entry path
that the kernel emulates (probedsl.binaries.x86 decides where), instead of an entry the kernel must
single-step. The bytes from the entry to the place are kept with the probe, so a loader can
check the file still holds them before attaching inside the function."""

from __future__ import annotations

from dataclasses import replace as _replace

from probedsl import ir
from probedsl.binaries.x86 import code_before, place


def apply(program: ir.Program) -> ir.Program:
    """The program with each uprobe placed in each file it attaches to."""
    resources = []
    for res in program.resources:
        probes = []
        for probe in res.probes:
            if probe.kind == ir.ProbeKind.UPROBE:
                places = [
                    (path, p.offset, p.instruction, code_before(path, probe.function, p.offset))
                    for path in probe.files
                    for p in [place(path, probe.function, probe.args_read)]
                    if p
                ]
                probe = _replace(probe, places=tuple(places))
            probes.append(probe)
        resources.append(_replace(res, probes=tuple(probes)))
    return _replace(program, resources=tuple(resources))
