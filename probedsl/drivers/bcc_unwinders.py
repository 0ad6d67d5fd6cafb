"""--stacks dwarf on BCC: the unwinder's programs, each verified once, loaded into the arrays
the acquire programs tail-call (backends/bcc_unwinder.py says which), before any of those is
attached."""

from __future__ import annotations

import ctypes

from probedsl import faults
from probedsl.errors import ProbedslError


def load(bcc, bpf, uprobes, unwinders) -> None:
    """Each unwinder's programs into its array: the uprobes' ones as the same kind of program as
    they are (bcc_uprobes), the system calls' as tracepoint programs."""
    for u in unwinders:
        # the programs it tail-calls first: the first program can then call them at once
        unstacked = [(s["slot"], s["program"]) for s in u.get("unstacked", ())]
        for slot, name in (*unstacked, (1, u["frames"]), (0, u["program"])):
            try:
                if u["type"] == "tracepoint":
                    fn = bpf.load_func(name, bcc.BPF.TRACEPOINT)
                else:
                    fn = uprobes.load(name)
            except Exception as exc:  # BCC raises bare Exception when the kernel refuses it
                raise ProbedslError(f"BCC could not load the unwinder: {exc}") from None
            bpf.get_table(u["array"])[ctypes.c_int(slot)] = ctypes.c_int(fn.fd)
    if unwinders and faults.on("unwinder-busy"):
        busy = bpf.get_table("probedsl_unw_busy")
        busy[busy.Key(0)] = busy.Leaf(*[1] * busy.total_cpu)
