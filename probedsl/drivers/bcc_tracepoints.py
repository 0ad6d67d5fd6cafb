"""The programs BPF() would attach by their names' prefix (tracepoint__, raw_tracepoint__) are
loaded on the compile's thread (load) and attached by the loader (attach), once the arrays they
tail-call through are filled (bcc_unwinders): attached as BPF() compiles them, a system call's
program would run before its unwinder is there, and count what it acquired meanwhile as
untracked. A system call is traced from then on, as a uprobe is from its attach."""

from __future__ import annotations

from typing import List

from probedsl.errors import ProbedslError

# the programs BPF() attaches by their names' prefix: probedsl generates these...
KINDS = {b"tracepoint__": "TRACEPOINT", b"raw_tracepoint__": "RAW_TRACEPOINT"}
# ...and never these (a kept compile that has one is not used: bcc_kept)
NEVER_GENERATED = (b"kprobe__", b"kretprobe__", b"kfunc__", b"kretfunc__", b"lsm__")

_classes: dict = {}


def unattached(bcc):
    """bcc.BPF whose construction attaches nothing; program_names() lists the programs it can
    load. (BCC 0.26-0.37 attach from _trace_autoload; were a later one to attach elsewhere,
    attach() would find them attached and leave them.)"""
    cls = _classes.get(bcc)
    if cls is None:

        class Unattached(bcc.BPF):
            def _trace_autoload(self) -> None:
                pass

            def program_names(self) -> List[bytes]:
                lib = bcc.libbcc.lib
                return [lib.bpf_function_name(self.module, i) for i in range(lib.bpf_num_functions(self.module))]

        cls = _classes[bcc] = Unattached
    return cls


def load(bcc, bpf) -> None:
    """Each such program of bpf (unattached()) loaded: verified on the compile's thread, where a
    refusal is the compile's error (and a kept compile's, a fresh compile)."""
    for name in bpf.program_names():
        if name.startswith(NEVER_GENERATED):
            raise Exception(f"a program BPF() would attach by its name: {name.decode()}")
        for prefix, kind in KINDS.items():
            if name.startswith(prefix):
                bpf.load_func(name, getattr(bcc.BPF, kind))


def attach(bcc, bpf) -> None:
    """Each loaded program attached as BPF() attaches it (tracepoint__category__event,
    raw_tracepoint__event)."""
    for name in bpf.program_names():
        try:
            if name.startswith(b"tracepoint__"):
                tp = name[len(b"tracepoint__") :].replace(b"__", b":")
                if tp not in bpf.tracepoint_fds:
                    bpf.attach_tracepoint(tp=tp, fn_name=name)
            elif name.startswith(b"raw_tracepoint__"):
                tp = name[len(b"raw_tracepoint__") :]
                if tp not in bpf.raw_tracepoint_fds:
                    bpf.attach_raw_tracepoint(tp=tp, fn_name=name)
        except Exception as exc:  # BCC raises bare Exception
            raise ProbedslError(f"BCC could not attach {name.decode()}: {exc}") from None
