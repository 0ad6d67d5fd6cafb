"""A target: one backend at a range of its versions, and everything that depends on which.

The CLI, session, estimate and report ask a target; none of them names a backend or a version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Dict, List, Optional, Tuple

from probedsl import ir
from probedsl.errors import Span

Version = Tuple[int, int, int]


def version_text(v: Optional[Version]) -> str:
    return ".".join(map(str, v)) if v else "unknown"


class Target:
    backend: ClassVar[str] = ""
    # inclusive (major, minor) bounds of the versions this class generates for
    first: ClassVar[Tuple[int, int]] = (0, 0)
    last: ClassVar[Tuple[int, int]] = (0, 0)
    # capabilities
    per_pid_uprobes: ClassVar[bool] = False  # the tracer can scope a uprobe to one process
    holds_forks: ClassVar[bool] = False  # follows forks by attaching each child, held at its fork
    probe_offsets: ClassVar[bool] = False  # a uprobe may sit inside a function (free+3)
    map_declarations: ClassVar[bool] = False  # maps are sized one by one
    per_process_comm: ClassVar[bool] = False  # --comm --per-process: uprobes on each matching process
    follows_new_roots: ClassVar[bool] = False  # --comm, --all: probe another root's libraries as it appears
    dwarf_stacks: ClassVar[bool] = False  # unwinds user stacks from call-frame rows (--stacks dwarf)
    # limits
    max_args: ClassVar[int] = 6  # x86-64 integer argument registers
    # keys a release `through` LAST releases at most per event: the verifier walks each turn of
    # the loop (bpftrace 0.17 at 1,024: ~60 s more to load under load; 128: ~1 s)
    range_keys: ClassVar[int] = 128
    # the same for a resource that ends with its process image (its tallies keyed by image too)
    range_keys_with_image: ClassVar[int] = 128
    default_max_live: ClassVar[int] = ir.DEFAULT_MAX_LIVE
    max_live_limit: ClassVar[Optional[int]] = None

    def __init__(self, version: Optional[Version] = None):
        self.version = version  # None: generated without a tracer installed (compile)

    @classmethod
    def covers(cls, version: Version) -> bool:
        return cls.first <= version[:2] <= cls.last

    @classmethod
    def range_text(cls) -> str:
        first, last = ".".join(map(str, cls.first)), ".".join(map(str, cls.last))
        return first if first == last else f"{first}-{last}"

    @property
    def name(self) -> str:
        """ "bpftrace 0.23.2" or, with no tracer installed, "bpftrace 0.20-0.23"."""
        return f"{self.backend} {version_text(self.version) if self.version else self.range_text()}"

    def scopes_uprobes(self, scope: ir.Scope) -> bool:
        """Whether the kernel keeps uprobes off processes outside the scope (no bystander trap)."""
        if scope.mode == "comm":
            return scope.per_process and self.per_process_comm
        # forks followed: each child attached as it is forked, held by the tether meanwhile
        return self.per_pid_uprobes and scope.mode in ("pid", "cmd") and (not scope.tracks_children or self.holds_forks)

    def attaches_at(self, probe: ir.Probe, path: str) -> int:
        """The offset in the function where this target attaches the probe (0: its entry)."""
        return probe.place_in(path)[0] if self.probe_offsets else 0

    # tail jumps that enter a probed release again within one call (probedsl/passes/reentry.py)
    def reentries(self, probe: ir.Probe) -> list:
        """The branches entering the probe again that pass where this target attaches it."""
        return [s for s in probe.reentered if s.target <= self.attaches_at(probe, s.path)]

    def reentry_branches(self, probe: ir.Probe) -> list:
        """Those this target probes by address: none where it attaches at entries only (a
        bpftrace built without bfd refuses a probe by address)."""
        return self.reentries(probe) if self.probe_offsets else []

    def asks_reentry(self, probe: ir.Probe) -> bool:
        """Whether the probe's release of an unknown key asks whether it is a second hit."""
        return bool(self.reentries(probe))

    def marks_reentry(self, res: ir.Resource, probe: ir.Probe) -> bool:
        """Whether the probe itself leaves (thread, rsp) after its release: where the branches
        cannot be probed, the function whose code holds them does on every call (its rsp at the
        entry is the branch's)."""
        return not self.probe_offsets and any(s.origin == probe.function for p in res.probes for s in self.reentries(p))

    def notes(self, program: ir.Program) -> List[str]:
        """What this target cannot do for the program, said once at start."""
        scope = program.scope
        notes = []
        on_files = any(p.kind in (ir.ProbeKind.UPROBE, ir.ProbeKind.USDT) for r in program.resources for p in r.probes)
        if scope.mode in ("all", "comm") and not scope.per_process and not self.follows_new_roots and on_files:
            notes.append(
                f"{self.name}: a process in a root that none had at start (a container started later) may "
                "load other library files: those get a bpftrace of their own, started while the process "
                "is held (when ptrace may hold it; else it runs untraced meanwhile); what it did before "
                "is not seen; --backend bcc follows it in one process"
            )
        if not self.probe_offsets:
            unplaced = [
                f"{p.function}+{off}"
                for r in program.resources
                for p in r.probes
                for off, _ in [p.place_in(p.path)]
                if off
            ]
            if unplaced:
                notes.append(
                    f"{self.name} attaches uprobes at function entries only, where the kernel "
                    "single-steps the first instruction (a second trap a call) of functions probedsl "
                    f"would probe further in ({', '.join(unplaced)}); --backend bcc or bpftrace 0.20+ "
                    "probe there"
                )
        return notes


@dataclass
class Generated:
    """Backend text plus a map from generated line (1-based) to the recipe span it came from."""

    text: str
    line_map: Dict[int, Span] = field(default_factory=dict)
    loader: str = ""  # BCC: the Python loader that runs the C text
    manifest: dict = field(default_factory=dict)  # BCC: what the loader attaches

    @property
    def standalone(self) -> str:
        """What `probedsl compile` prints: the loader that runs the text, or the text itself."""
        return self.loader or self.text

    def recipe_span(self, line: int):
        best = None
        for gen_line, span in sorted(self.line_map.items()):
            if gen_line <= line:
                best = span
        return best
