"""BCC 0.26 and newer: C text compiled by libbcc's clang, loaded and read from Python."""
from __future__ import annotations

from probedsl import ir

from .base import Target


class Bcc(Target):
    backend = "bcc"
    first, last = (0, 26), (0, 37)
    per_pid_uprobes = True
    holds_forks = True
    probe_offsets = True
    per_process_comm = True
    follows_new_roots = True
    dwarf_stacks = True

    def generator(self):
        from probedsl.backends.bcc import BccBackend
        return BccBackend(self)

    def driver(self, program: ir.Program, generated):
        from probedsl.drivers.bcc import BccDriver
        return BccDriver(program, generated)
