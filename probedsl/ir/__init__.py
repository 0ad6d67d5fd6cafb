"""The backend-neutral program: probes, per-thread scratch, keyed tables, aggregations."""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Sequence, Tuple, Union

from probedsl.errors import NO_SPAN, Span


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


def _arg_indexes(v: Value) -> List[int]:
    if isinstance(v, Arg):
        return [v.index]
    if isinstance(v, Deref):
        return _arg_indexes(v.address)
    if isinstance(v, (Int32, Not)):
        return _arg_indexes(v.operand)
    if isinstance(v, BinOp):
        return _arg_indexes(v.left) + _arg_indexes(v.right)
    return []


def _at_entry(v: Value) -> Optional[Value]:
    """The value computed from the entry's registers (saved arguments read as arguments), or
    None when it needs the return (ret, an out-parameter)."""
    if isinstance(v, (Const, Arg)):
        return v
    if isinstance(v, Saved):
        return Arg(v.arg_index)
    if isinstance(v, (Int32, Not)):
        inner = _at_entry(v.operand)
        return None if inner is None else replace(v, operand=inner)
    if isinstance(v, BinOp):
        left, right = _at_entry(v.left), _at_entry(v.right)
        return None if left is None or right is None else replace(v, left=left, right=right)
    return None


# --- program -----------------------------------------------------------------------------
class ProbeKind(str, enum.Enum):
    """Where a probe attaches. A new kind is a member here and one lowering in each generator;
    a generator meeting a kind it does not lower refuses it (never a default)."""
    UPROBE = "uprobe"            # a function in a file (entry, or return with at_return)
    TRACEPOINT = "tracepoint"    # category:event
    USDT = "usdt"                # provider:name sites in a file's notes
    SYSCALL = "syscall"          # sys_enter_NAME / sys_exit_NAME

    def __str__(self) -> str:    # labels and generated text say "uprobe", not ProbeKind.UPROBE
        return self.value


class Aggregation(str, enum.Enum):
    """A report column's function. `of` is the one place a group's value is computed."""
    SUM = "sum"                  # sum(size): bytes
    COUNT = "count"              # count(): entries
    HIST = "hist"                # hist(age): a lifetime report's histogram, not a column value

    def __str__(self) -> str:
        return self.value

    def of(self, nbytes: int, count: int) -> int:
        if self is Aggregation.SUM:
            return nbytes
        if self is Aggregation.COUNT:
            return count
        raise ValueError(f"{self.value} is not a column of an outstanding report")


@dataclass(frozen=True)
class Action:
    kind: str                              # acquire | release | change
    key: Tuple[Value, ...]
    guard: Optional[Value]
    size: Optional[Value] = None           # acquire only
    # release only: every key from `key` to the one whose last part is `through`, at most
    # the target's range_keys of them (close_range's descriptors)
    through: Optional[Value] = None
    # acquire and change: the entry ends with its process image (at exec) when this holds, else
    # it outlives the exec; a change sets that of the entry already under `key`
    until_exec: Optional[Value] = None


@dataclass(frozen=True)
class Probe:
    id: int                                # 1-based within its resource; tags scratch entries
    resource: str
    kind: ProbeKind
    library: str                           # as written in the recipe (uprobe)
    function: str                          # function (uprobe), "category:event" (tracepoint), name (syscall)
    at_return: bool                        # actions run at return (uretprobe, sys_exit_NAME)
    saved_args: Tuple[int, ...]            # argument indexes saved at entry for the return
    actions: Tuple[Action, ...]            # releases first, so realloc's in-place shrink works
    # syscall: the entry tracepoint's fields that saved_args index (a tracepoint has no argument
    # registers: the exit reads what the entry saved)
    fields: Tuple[str, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    path: str = ""                         # resolved library path; set by probedsl.passes.resolve
    # the same library in other roots (a chroot, a container's mount namespace), where it is
    # another file: the probe is attached to each of those too
    also: Tuple[str, ...] = ()
    # (file, offset, instruction, code): where in the function the probe sits in that file,
    # when not at its entry, and the bytes (hex) from the entry to there, which a loader checks
    # again before attaching inside the function (probedsl.passes.placement)
    places: Tuple[Tuple[str, int, str, str], ...] = ()
    # checked at entry before any map work (--min-size/--max-size): a call failing it is not
    # traced at all (only probes that acquire and release nothing get one)
    entry_guard: Optional["Value"] = None
    # moved to another allocator's library (--allocator, -O): dropped, with a note, where that
    # library lacks the function (jemalloc has no pvalloc)
    optional: bool = False
    # usdt: the sites of provider:name in `path` (probedsl.binaries.usdt.Site), each a uprobe
    sites: Tuple[Any, ...] = ()
    # branches that enter this function's probed instructions again within one call (tail
    # jumps, probedsl.passes.reentry.Site): the hit after one is that call's second, not counted
    reentered: Tuple[Any, ...] = ()
    # files where every call of this function jumps to another probed one: not probed there
    forwards: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ProbeKind(self.kind))     # a name from a test or a dump

    @property
    def files(self) -> Tuple[str, ...]:
        return (self.path, *self.also) if self.path else ()

    @property
    def attached_files(self) -> Tuple[str, ...]:
        """The files this probe is attached to (all but those where it only forwards)."""
        return tuple(f for f in self.files if f not in self.forwards)

    def place_in(self, path: str) -> Tuple[int, str]:
        """(offset from the entry, instruction there) in that file; (0, "") at the entry."""
        return next(((off, ins) for file, off, ins, _ in self.places if file == path), (0, ""))

    def code_in(self, path: str) -> str:
        """The bytes (hex) from the entry to the placed instruction in that file; "" at the entry."""
        return next((code for file, _, _, code in self.places if file == path), "")

    @property
    def args_read(self) -> Tuple[int, ...]:
        """The argument registers read where the probe sits (at the entry)."""
        guarded = _arg_indexes(self.entry_guard) if self.entry_guard is not None else []
        if self.at_return:
            return tuple(sorted({*self.saved_args, *guarded}))
        values = [v for a in self.actions for v in (*a.key, a.guard, a.size) if v is not None]
        return tuple(sorted({*guarded, *(i for v in values for i in _arg_indexes(v))}))

    @property
    def filtered(self) -> bool:
        """Whether the target filter applies. A kernel object is often freed in another task's
        context (softirq, a worker), and its key is global: tracepoint releases see all tasks."""
        return not (self.kind == ProbeKind.TRACEPOINT and all(a.kind == "release" for a in self.actions))

    @property
    def label(self) -> str:
        return f"{self.library}:{self.function}" if self.kind == ProbeKind.UPROBE else f"{self.kind}:{self.function}"


def attach_order(probes: Tuple[Probe, ...]) -> List[Probe]:
    """Probes that only release first: a block acquired while its release was not probed yet
    would stay live for ever (attaching memleak's 17 uprobes system-wide takes a while, and a
    busy shell loop left ~900 such blocks); a release seen without its acquire is just an
    unknown release."""
    return sorted(probes, key=lambda p: any(a.kind == "acquire" for a in p.actions))


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

    @functools.cached_property
    def block_address(self) -> Optional[int]:
        """For blocks of a process's memory (keyed by (pid, address), with a size, acquired by
        uprobes), which key part is the address; None for anything else (--reachability)."""
        acquires = [a for p in self.probes for a in p.actions if a.kind == "acquire"]
        if (self.key_arity == 2 and self.records("size") and acquires
                and all(p.kind == ProbeKind.UPROBE for p in self.probes)
                and all(a.key[0] == Builtin("pid") for a in acquires)):
            return 1
        return None


@dataclass(frozen=True)
class Report:
    kind: str                              # outstanding | lifetime
    resource: str
    group_by: Tuple[str, ...]
    columns: Tuple[Tuple[str, str], ...]   # (aggregation, label): ("sum", "bytes"), ("count", "blocks")
    top: int
    min_age_ms: int


@dataclass(frozen=True)
class Scope:
    """Which processes the program traces; values are validated before they get here."""
    mode: str = "all"                      # all (system-wide) | pid | comm | cmd
    pid: int = 0
    comm: str = ""
    follow_forks: bool = True              # pid/cmd: children forked later are traced too
    per_process: bool = False              # comm (BCC): uprobes on each matching process only

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
    scope: Scope = Scope()
    # reports read the per-group tallies the kernel keeps; reading every live entry (exact
    # oldest ages, --min-age) is opt-in: a million entries take seconds to read
    read_live: bool = False
    sample: int = 1                        # record one acquisition in `sample` (1: all)
    # how user stacks are walked: fp (a frame-pointer walk, cut where it stops
    # being certain) or dwarf (BCC's unwinder over the call-frame rows of each mapped file)
    stacks: str = "fp"
    # labels of optional probes whose function the library lacks (see Probe.optional)
    unprobed: Tuple[str, ...] = ()

    def with_scope(self, scope: "Scope") -> "Program":
        return replace(self, scope=scope)

    def walking_stacks(self, kind: str) -> "Program":
        return replace(self, stacks=kind)

    def sampled(self, n: int) -> "Program":
        return replace(self, sample=int(n))

    def size_filtered(self, least: Optional[int], most: Optional[int]) -> "Program":
        """Only acquisitions of least <= size <= most are traced (BCC memleak's -z/-Z). Where the
        size is known at entry and the probe releases nothing, the test runs there, before any
        map work; realloc's must still see its release, so its test guards the acquire only."""
        if least is None and most is None:
            return self
        def within(size: Value) -> Value:
            tests = ([BinOp(">=", size, Const(least))] if least is not None else []) + \
                    ([BinOp("<=", size, Const(most))] if most is not None else [])
            return functools.reduce(lambda a, b: BinOp("&&", a, b), tests)
        resources = []
        for res in self.resources:
            probes = []
            for p in res.probes:
                sizes = [a.size for a in p.actions if a.kind == "acquire" and a.size is not None]
                at_entry = _at_entry(sizes[0]) if len(set(sizes)) == 1 else None
                if p.at_return and at_entry is not None and all(a.kind == "acquire" for a in p.actions):
                    p = replace(p, entry_guard=within(at_entry))
                elif sizes:
                    p = replace(p, actions=tuple(
                        replace(a, guard=within(a.size) if a.guard is None else BinOp("&&", a.guard, within(a.size)))
                        if a.kind == "acquire" and a.size is not None else a for a in p.actions))
                probes.append(p)
            resources.append(replace(res, probes=tuple(probes)))
        return replace(self, resources=tuple(resources))

    def reading_live(self, read: bool) -> "Program":
        return replace(self, read_live=bool(read))

    def needs_live(self, min_age_s: Optional[float] = None) -> bool:
        """Whether reports must read every live entry: some outstanding report filters by age."""
        ages = [min_age_s * 1000] if min_age_s is not None else [r.min_age_ms for r in self.reports
                                                                   if r.kind == "outstanding"]
        return any(a > 0 for a in ages)


# --- what the storage derives from (probedsl.ir.layout computes the maps) ----------------------
def live_fields(resource: Resource) -> List[str]:
    """Per-live-resource fields in storage order; time is always kept (age, presence test)."""
    return ["time"] + [f for f in ("size", "pid", "tid", "ustack", "kstack", "comm") if resource.records(f)]


def group_keys(group_by: Sequence[str]) -> List[str]:
    """Live-record fields that key a tally or histogram grouped `by` these names. A user stack
    needs its pid to be named; comm goes first because bpftrace joins multi-part keys with ','
    and only the first part may contain one."""
    keys = []
    for g in group_by:
        keys += ["ustack", "pid"] if g == "ustack" else [g]
    keys = list(dict.fromkeys(keys))
    return sorted(keys, key=lambda k: k != "comm")


def tallies(program: Program, resource: Resource) -> List[Tuple[str, ...]]:
    """The per-group tallies (bytes, count) the kernel keeps for a resource, as key-field tuples:
    one per distinct grouping of its outstanding reports; () is the ungrouped total, kept when
    no report groups the resource so that its live totals are known without reading entries."""
    groups = [tuple(group_keys(r.group_by)) for r in program.reports
              if r.kind == "outstanding" and r.resource == resource.name]
    return list(dict.fromkeys(groups)) or [()]


def lifetime_report(program: Program, resource: Resource) -> Optional[Report]:
    """The resource's lifetime report (one at most; the checker says so), or None."""
    return next((r for r in program.reports if r.kind == "lifetime" and r.resource == resource.name), None)


def lifetime_keys(program: Program, resource: Resource) -> List[str]:
    """Live-record fields that key the lifetime histogram; a user stack needs its pid to be named."""
    rep = lifetime_report(program, resource)
    return group_keys(rep.group_by if rep else ())


# Stacks keep their innermost STACK_DEPTH frames, on both backends. A stack table holds one
# 8-byte slot per frame for each of its buckets, so 64 frames instead of the kernel's 127
# buy twice the buckets (half the collisions, which cost a block its stack) on BCC, and half
# the kernel memory on bpftrace, whose table size is its own.
STACK_DEPTH = 64
STACK_BUCKETS = 131_072     # BCC's stack table, and each tally (groups are keyed by stack)
DEFAULT_MAX_LIVE = 1_000_000
