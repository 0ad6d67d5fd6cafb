"""What BCC's generator says about the DWARF unwinder: whether a program unwinds, defers its entries to the unwinder program by a tail call, keeps the return addresses pending uretprobes replaced, holds a launched command at its mappings."""

from __future__ import annotations

from typing import List

from probedsl import ir
from probedsl.errors import ProbedslError

from probedsl.ir import layout
from probedsl.ir.layout import ResourceLayout

# frames the unwinder's frames program walks before it tail-calls itself: the verifier walks
# each of them (the program: ~49,000 instructions, bench.verify --stacks dwarf); each tail
# call costs an acquisition some tens of ns (bench.stacks at 64 frames: +0.6 us, near its
# noise). 64 frames take 16 runs: 17 tail calls with the acquire program's, of the kernel's 33
# in a row (tests/test_backends.py).
FRAMES_PER_RUN = 4
# bytes of the walked stack the unwinder copies at once (a power of two): 512 and 1,024
# measured the same on bench.prog_stats --depth 16's 16-byte frames; real frames of 100-500
# bytes take fewer copies at 1,024
WINDOW = 1024
# bytes of a thread's CPython data stack the Python walk copies at once, a frame's header at
# their end (a power of two: 2,048 and 4,096 measured slower, bench/README.md)
PY_WINDOW = 1024


class UnwinderViews:
    """The unwinder's part of BccBackend (a base of it)."""

    def defers(self, program: ir.Program, lay: ResourceLayout) -> bool:
        """--stacks dwarf: an acquire program keeps its new entries in a per-CPU map and
        tail-calls the unwinder, which takes the stack and stores them; the kernel then
        verifies the unwinder once, not in every acquire program."""
        return self.unwinds(program) and "ustack" in lay.fields

    def deferring(self, program: ir.Program, probe: ir.Probe, lay: ResourceLayout, ctx: str) -> List[str]:
        """A program's actions, then the tail call to the unwinder if one deferred an entry."""
        actions = [line for a in probe.actions for line in self.action(program, lay, a, ctx)]
        if any(a.kind == "release" for a in probe.actions[[a.kind for a in probe.actions].index("acquire") :]):
            # a release after an acquire would run before the acquire's deferred store
            raise ProbedslError(f"{probe.label}: BCC --stacks dwarf cannot release after an acquire in one probe")
        syscall = probe.kind == "syscall"
        array = "probedsl_unwinders_syscall" if syscall else "probedsl_unwinders"
        slot = 2 + self._deferring_resources(program, syscall).index(lay.name)
        return [
            "int deferred = 0;",
            *actions,
            "if (deferred == 1) {",
            f"  {array}.call({ctx}, 0);  // the unwinder takes the stack and stores the entries",
            f"  {lay.name}_unstored(1);  // (it is not loaded: counted, untracked)",
            "  probedsl_unw_release();",
            "} else if (deferred == 2) {  // another program's walk was under way on this CPU",
            f"  {array}.call({ctx}, {slot});  // stored without a stack",
            f"  {lay.name}_unstored(2);",
            "}",
        ]

    def _deferring_resources(self, program: ir.Program, syscall: bool) -> List[str]:
        """The resources whose acquire programs of one array's kind (system calls', or the
        uprobes' and usdt probes') defer: one unstacked program each, in this order from slot 2."""
        return [
            res.name
            for res in program.resources
            if self.defers(program, layout.of(program, res))
            and any((p.kind == "syscall") == syscall for p in res.probes if any(a.kind == "acquire" for a in p.actions))
        ]

    def unwinder_programs(self, program: ir.Program) -> List[dict]:
        """The unwinder programs the acquire programs tail-call, one set per program type: the
        loader loads each and puts it in its array before attaching anything."""
        found = []
        uprobes, syscalls = (self._deferring_resources(program, syscall) for syscall in (False, True))
        if uprobes:
            found.append(_unwinder("probedsl_unwinder", "probedsl_unwinders", "kprobe", uprobes))
        if syscalls:
            found.append(_unwinder("probedsl_unwinder_syscall", "probedsl_unwinders_syscall", "tracepoint", syscalls))
        return found

    def ustack(self, program: ir.Program, ctx: str, probe=None) -> str:
        """The expression taking the user stack's id in probe's program (with dwarf stacks no
        program takes one itself: each defers its entries to the unwinder's programs)."""
        if self.unwinds(program):
            raise ProbedslError("BCC --stacks dwarf: a stack is taken only by the unwinder's programs")
        if probe is not None and self.walks_frames(probe):
            return f"probedsl_fp_stack({ctx})"
        return f"probedsl_stacks.get_stackid({ctx}, BPF_F_USER_STACK)"

    @staticmethod
    def walks_frames(probe: ir.Probe) -> bool:
        """A uretprobe's program walks the frame pointers itself (bcc.c.j2's probedsl_fp_stack);
        any other takes the kernel's walk. At an entry the kernel adds the caller from [rsp]
        where the instruction is push %rbp or endbr64 (stacktrust trusts it): at a return
        there is no such case."""
        return probe.kind == ir.ProbeKind.UPROBE and probe.at_return

    def stack_kinds(self, program: ir.Program) -> tuple:
        """(whether some program takes a kernel walk into the stack table, whether some walks
        frame pointers itself)."""
        kernel = walked = False
        for res in program.resources:
            acquiring = [p for p in res.probes if any(a.kind == "acquire" for a in p.actions)]
            kernel |= res.records("kstack")
            if res.records("ustack") and not self.unwinds(program):
                kernel |= any(not self.walks_frames(p) for p in acquiring)
                walked |= any(self.walks_frames(p) for p in acquiring)
        return kernel, walked

    def unwinds(self, program: ir.Program) -> bool:
        """--stacks dwarf, for user stacks taken in uprobes and system calls (whose user
        registers the task saved on entering the kernel: bpf_task_pt_regs, kernel 5.15); another
        tracepoint may fire in any context, and an older kernel has no such registers to start
        from: such a program keeps the frame-pointer walk (Bcc.notes says so)."""
        recorded = [
            p
            for r in program.resources
            if r.records("ustack")
            for p in r.probes
            if any(a.kind == "acquire" for a in p.actions)
        ]
        kinds = ("uprobe", "usdt", "syscall") if self.target.syscall_registers() else ("uprobe", "usdt")
        return program.stacks == "dwarf" and bool(recorded) and all(p.kind in kinds for p in recorded)

    def holds_mappings(self, program: ir.Program) -> bool:
        """A launched command (and what it forks) is stopped at each mmap of a file's code
        until its rows are in (the template's sys_exit_mmap). Not a --pid, --comm or --all
        target: a process probedsl did not start is never stopped for it."""
        return self.unwinds(program) and program.scope.mode == "cmd"

    def keeps_returns(self, program: ir.Program) -> bool:
        """Whether the unwinder needs the return addresses that pending uretprobes replaced: a
        stack of one resource can pass through a call another resource is waiting to return
        from (fopen -> malloc). Within one resource nested calls are skipped, so a single
        resource never pays the extra map update at each entry."""
        probed = [
            r for r in program.resources if any(p.kind in (ir.ProbeKind.UPROBE, ir.ProbeKind.USDT) for p in r.probes)
        ]
        return self.unwinds(program) and len(probed) > 1


def _unwinder(program: str, array: str, kind: str, resources: List[str]) -> dict:
    """The manifest's entry for one program type's unwinder: its first program (slot 0 of the
    array), its frames program (slot 1), each resource's unstacked program (slots 2...)."""
    unstacked = [{"program": f"{program}_unstacked_{r}", "resource": r, "slot": 2 + i} for i, r in enumerate(resources)]
    return {"program": program, "frames": f"{program}_frames", "array": array, "type": kind, "unstacked": unstacked}
