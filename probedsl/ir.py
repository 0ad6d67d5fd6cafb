"""The backend-neutral program: probes, per-thread scratch, keyed tables, aggregations."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple, Union

from .ast import Span, NO_SPAN


# --- expressions, already bound to where their values live -------------------------------
@dataclass(frozen=True)
class Const:
    value: int


@dataclass(frozen=True)
class Arg:
    """Argument `index` of the probed function, read at function entry."""
    index: int


@dataclass(frozen=True)
class Saved:
    """Argument saved per thread at entry, read back at return from scratch slot `slot`."""
    slot: int
    arg_index: int


@dataclass(frozen=True)
class Builtin:
    name: str              # ret | pid | tid


@dataclass(frozen=True)
class Field:
    """A tracepoint field."""
    name: str


@dataclass(frozen=True)
class Deref:
    """The integer in user memory at `address + offset` (an out-parameter, read at return):
    8 bytes for a pointer (`*out`), 4 bytes sign-extended for an int array element (`fds[1]`)."""
    address: "Value"
    offset: int = 0
    size: int = 8


@dataclass(frozen=True)
class Int32:
    """Low 32 bits, sign-extended."""
    operand: "Value"


@dataclass(frozen=True)
class Not:
    operand: "Value"


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Value"
    right: "Value"


Value = Union[Const, Arg, Saved, Builtin, Field, Deref, Int32, Not, BinOp]


# --- program -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    kind: str                              # acquire | release
    key: Tuple[Value, ...]
    guard: Optional[Value]
    size: Optional[Value] = None           # acquire only


@dataclass(frozen=True)
class Probe:
    id: int                                # 1-based within its resource; tags scratch entries
    resource: str
    kind: str                              # uprobe | tracepoint
    library: str                           # as written in the recipe (uprobe)
    function: str                          # function (uprobe) or "category:event" (tracepoint)
    at_return: bool                        # actions run at return (uretprobe)
    saved_args: Tuple[int, ...]            # argument indexes saved at entry for the return
    actions: Tuple[Action, ...]            # releases first, so realloc's in-place shrink works
    span: Span = field(default=NO_SPAN, compare=False)
    path: str = ""                         # resolved library path; set by libraries.resolve

    @property
    def filtered(self) -> bool:
        """Whether the target filter applies. A kernel object is often freed in another task's
        context (softirq, a worker), and its key is global: tracepoint releases see all tasks."""
        return not (self.kind == "tracepoint" and all(a.kind == "release" for a in self.actions))

    @property
    def label(self) -> str:
        return f"{self.library}:{self.function}" if self.kind == "uprobe" else f"tracepoint:{self.function}"


@dataclass(frozen=True)
class Resource:
    name: str
    key_names: Tuple[str, ...]
    record: Tuple[str, ...]                # sorted subset of RECORDABLE
    probes: Tuple[Probe, ...]
    max_live: int

    @property
    def key_arity(self) -> int:
        return len(self.key_names)

    @property
    def scratch_width(self) -> int:
        return max((len(p.saved_args) for p in self.probes), default=0)

    def records(self, what: str) -> bool:
        return what in self.record


@dataclass(frozen=True)
class Report:
    kind: str                              # outstanding | lifetime
    resource: str
    group_by: Tuple[str, ...]
    columns: Tuple[Tuple[str, str], ...]   # (aggregation, label): ("sum", "bytes"), ("count", "blocks")
    top: int
    min_age_ms: int


@dataclass(frozen=True)
class Target:
    """Which processes the program traces; values are validated before they get here."""
    mode: str = "all"                      # all (system-wide) | pid | comm | cmd
    pid: int = 0
    comm: str = ""
    follow_forks: bool = True              # pid/cmd: children forked later are traced too

    @property
    def tracks_children(self) -> bool:
        return self.mode in ("pid", "cmd") and self.follow_forks


@dataclass(frozen=True)
class Program:
    name: str
    description: str
    filename: str
    resources: Tuple[Resource, ...]
    reports: Tuple[Report, ...]
    params: Tuple[Tuple[str, int], ...]
    target: Target = Target()

    def with_target(self, target: Target) -> "Program":
        return replace(self, target=target)


# --- record layout: shared by the backends (what they store) and drivers (what they read) ---
def live_fields(resource: Resource) -> List[str]:
    """Per-live-resource fields in storage order; time is always kept (age, presence test)."""
    return ["time"] + [f for f in ("size", "pid", "tid", "ustack", "kstack", "comm") if resource.records(f)]


COUNTERS = ["acquired", "released", "unknown_releases", "untracked"]


def counters(resource: Resource) -> List[str]:
    """In-kernel counters per resource; `untracked`: acquisitions the full live table refused."""
    return COUNTERS


def lifetime_report(program: Program, resource: Resource):
    """The resource's lifetime report (one at most; the checker says so), or None."""
    return next((r for r in program.reports if r.kind == "lifetime" and r.resource == resource.name), None)


def lifetime_keys(program: Program, resource: Resource) -> List[str]:
    """Live-record fields that key the lifetime histogram; a user stack needs its pid to be named."""
    rep = lifetime_report(program, resource)
    keys = []
    for g in (rep.group_by if rep else ()):
        keys += ["ustack", "pid"] if g == "ustack" else [g]
    return list(dict.fromkeys(keys))


RECORDABLE = ("comm", "kstack", "pid", "size", "tid", "time", "ustack")
DEFAULT_MAX_LIVE = 1_000_000
