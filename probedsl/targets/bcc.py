"""BCC 0.26 and newer: C text compiled by libbcc's clang, loaded and read from Python."""
from __future__ import annotations

from typing import List

from probedsl import ir

from .base import Target


class Bcc(Target):
    backend = "bcc"
    first, last = (0, 26), (0, 37)
    per_pid_uprobes = True
    probe_offsets = True
    per_process_comm = True
    follows_new_roots = True
    dwarf_stacks = True
    range_keys = 1024

    def generator(self):
        from probedsl.backends.bcc import BccBackend
        return BccBackend(self)

    def notes(self, program: ir.Program) -> List[str]:
        from probedsl.backends.bcc import TASK_PT_REGS, syscall_registers
        notes = super().notes(program)
        if program.stacks == "dwarf" and not syscall_registers() and any(
                p.kind == "syscall" for r in program.resources if r.records("ustack") for p in r.probes):
            notes.append(f"{self.name}: this kernel gives a system call's probe no user registers to unwind "
                         f"from (bpf_task_pt_regs, {TASK_PT_REGS[0]}.{TASK_PT_REGS[1]}+): stacks are "
                         "frame-pointer walks")
        return notes

    def driver(self, program: ir.Program, generated):
        from probedsl.drivers.bcc import BccDriver
        return BccDriver(program, generated)
