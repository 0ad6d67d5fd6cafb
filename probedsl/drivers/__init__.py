"""Drivers: load one generated program, attach its probes, and read its maps back as
snapshots (probedsl.drivers.rundata) while the run lasts. Which one a run uses is its target's choice."""

from __future__ import annotations

from probedsl import ir
from probedsl.targets.base import Generated, Target


def for_target(target: Target, program: ir.Program, generated: Generated):
    """The driver that runs `generated` (made for `target`) and reads its maps."""
    if target.backend == "bcc":
        from .bcc import BccDriver  # imports BCC's Python module: only when it runs

        return BccDriver(program, generated)
    from .bpftrace import BpftraceDriver

    return BpftraceDriver(program, generated, target)
