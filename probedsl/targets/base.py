"""A target: one backend at a range of its versions, and everything that depends on which.

The CLI, session, estimate and report ask a target; none of them names a backend or a version.
"""
from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

from probedsl import ir

Version = Tuple[int, int, int]


def version_text(v: Optional[Version]) -> str:
    return ".".join(map(str, v)) if v else "unknown"


class Target:
    backend: ClassVar[str] = ""
    # inclusive (major, minor) bounds of the versions this class generates for
    first: ClassVar[Tuple[int, int]] = (0, 0)
    last: ClassVar[Tuple[int, int]] = (0, 0)
    # capabilities
    per_pid_uprobes: ClassVar[bool] = False     # the tracer can scope a uprobe to one process
    holds_forks: ClassVar[bool] = False         # follows forks by attaching each child, held at its fork
    probe_offsets: ClassVar[bool] = False       # a uprobe may sit inside a function (free+3)
    map_declarations: ClassVar[bool] = False    # maps are sized one by one
    per_process_comm: ClassVar[bool] = False    # --comm --per-process: uprobes on each matching process
    follows_new_roots: ClassVar[bool] = False   # --comm, --all: probe another root's libraries as it appears
    dwarf_stacks: ClassVar[bool] = False        # unwinds user stacks from call-frame rows (--stacks dwarf)
    # limits
    max_args: ClassVar[int] = 6                 # x86-64 integer argument registers
    default_max_live: ClassVar[int] = ir.DEFAULT_MAX_LIVE
    max_live_limit: ClassVar[Optional[int]] = None

    def __init__(self, version: Optional[Version] = None):
        self.version = version            # None: generated without a tracer installed (compile)

    @classmethod
    def covers(cls, version: Version) -> bool:
        return cls.first <= version[:2] <= cls.last

    @classmethod
    def range_text(cls) -> str:
        first, last = ".".join(map(str, cls.first)), ".".join(map(str, cls.last))
        return first if first == last else f"{first}-{last}"

    @property
    def name(self) -> str:
        """"bpftrace 0.23.2" or, with no tracer installed, "bpftrace 0.20-0.23"."""
        return f"{self.backend} {version_text(self.version) if self.version else self.range_text()}"

    def generator(self):
        """The code generator for this target (a probedsl.backends.Backend)."""
        raise NotImplementedError

    def driver(self, program: ir.Program, generated):
        """The runtime driver for one generated program (probedsl.drivers.base.Driver)."""
        raise NotImplementedError

    def scopes_uprobes(self, scope: ir.Scope) -> bool:
        """Whether the kernel keeps uprobes off processes outside the scope (no bystander trap)."""
        if scope.mode == "comm":
            return scope.per_process and self.per_process_comm
        return self.per_pid_uprobes and scope.mode in ("pid", "cmd") and (not scope.tracks_children or self.holds_forks)

    def attaches_at(self, probe: ir.Probe, path: str) -> int:
        """The offset in the function where this target attaches the probe (0: its entry)."""
        return probe.place_in(path)[0] if self.probe_offsets else 0

    def notes(self, program: ir.Program) -> List[str]:
        """What this target cannot do for the program, said once at start."""
        scope = program.scope
        notes = []
        if scope.mode in ("all", "comm") and not scope.per_process and not self.follows_new_roots:
            notes.append(f"{self.name}: processes in a root that none had at start (a container started later) "
                         "load other library files, which are not probed; --backend bcc follows them")
        if not self.probe_offsets:
            unplaced = [f"{p.function}+{off}" for r in program.resources for p in r.probes
                        for off, _ in [p.place_in(p.path)] if off]
            if unplaced:
                notes.append(f"{self.name} attaches uprobes at function entries only, where the kernel "
                             "single-steps the first instruction (a second trap a call) of functions probedsl "
                             f"would probe further in ({', '.join(unplaced)}); --backend bcc or bpftrace 0.20+ "
                             "probe there")
        return notes
