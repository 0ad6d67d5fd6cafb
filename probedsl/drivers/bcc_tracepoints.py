"""The programs BPF() would attach by their names' prefix (tracepoint__, raw_tracepoint__) are
attached by the loader instead, once the arrays they tail-call through are filled
(bcc_unwinders): attached as BPF() compiles them, a system call's program would run before its
unwinder is there, and lose what it acquired meanwhile."""

from __future__ import annotations

from typing import List

# programs BPF() attaches by their names' prefix; probedsl generates only the first two kinds
ATTACHED_HERE = (b"tracepoint__", b"raw_tracepoint__")
AUTOLOADED = (*ATTACHED_HERE, b"kprobe__", b"kretprobe__", b"kfunc__", b"kretfunc__", b"lsm__")

_classes: dict = {}


def unattached(bcc):
    """bcc.BPF whose construction attaches nothing (attach() does); program_names() lists the
    programs it can load."""
    cls = _classes.get(bcc)
    if cls is None:

        class Unattached(bcc.BPF):
            def _trace_autoload(self) -> None:
                others = [n for n in self.program_names() if n.startswith(AUTOLOADED[2:])]
                if others:  # never generated: BPF() would attach it, this does not
                    raise Exception(f"a program attached by its name: {others[0].decode()}")

            def program_names(self) -> List[bytes]:
                lib = bcc.libbcc.lib
                return [lib.bpf_function_name(self.module, i) for i in range(lib.bpf_num_functions(self.module))]

        cls = _classes[bcc] = Unattached
    return cls


def attach(bcc, bpf) -> None:
    """Each tracepoint__category__event and raw_tracepoint__event program of bpf (unattached()),
    attached as BPF() attaches them."""
    for name in bpf.program_names():
        if name.startswith(b"tracepoint__"):
            fn = bpf.load_func(name, bcc.BPF.TRACEPOINT)
            bpf.attach_tracepoint(tp=name[len(b"tracepoint__") :].replace(b"__", b":"), fn_name=fn.name)
        elif name.startswith(b"raw_tracepoint__"):
            fn = bpf.load_func(name, bcc.BPF.RAW_TRACEPOINT)
            bpf.attach_raw_tracepoint(tp=name[len(b"raw_tracepoint__") :], fn_name=fn.name)
