"""BCC 0.26 and newer: C text compiled by libbcc's clang, loaded and read from Python."""

from __future__ import annotations

from typing import List

from probedsl import ir
from probedsl.process import procfs

from .base import Target

# the kernel from which a task's saved user registers reach BPF (a system call's stack)
TASK_PT_REGS = (5, 15)


class Bcc(Target):
    backend = "bcc"
    first, last = (0, 26), (0, 37)
    per_pid_uprobes = True
    holds_forks = True
    probe_offsets = True
    per_process_comm = True
    follows_new_roots = True
    dwarf_stacks = True
    range_keys = range_keys_with_image = 1024

    def notes(self, program: ir.Program) -> List[str]:
        notes = super().notes(program)
        if (
            program.stacks == "dwarf"
            and not self.syscall_registers()
            and any(p.kind == ir.ProbeKind.SYSCALL for r in program.resources if r.records("ustack") for p in r.probes)
        ):
            notes.append(
                f"{self.name}: this kernel gives a system call's probe no user registers to unwind "
                f"from (bpf_task_pt_regs, {TASK_PT_REGS[0]}.{TASK_PT_REGS[1]}+): stacks are "
                "frame-pointer walks"
            )
        return notes

    def syscall_registers(self) -> bool:
        """Whether a BPF program can read a task's saved user registers (bpf_task_pt_regs)."""
        return procfs.kernel_release() >= TASK_PT_REGS
