"""The recipe's syntax tree: frozen dataclasses, each node with the span it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from probedsl.errors import NO_SPAN, Span


# what a recipe may record per live entry
RECORDABLE = ("comm", "kstack", "pid", "size", "tid", "time", "ustack")


# --- expressions -----------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    value: int
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Name:
    name: str
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Deref:
    """`*out`: the u64 that an out-parameter points to, read at return."""

    operand: "Expr"
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Index:
    """`fds[1]`: the i-th 32-bit int of an out-parameter array (pipe's fds), read at return."""

    array: "Name"
    index: int
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Int32:
    """`int(ret)`: the low 32 bits, sign-extended (functions returning C int leave the upper
    half of the register undefined, so -1 must be read this way)."""

    operand: "Expr"
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Not:
    operand: "Expr"
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class BinOp:
    op: str
    left: "Expr"
    right: "Expr"
    span: Span = field(default=NO_SPAN, compare=False)


Expr = Union[Number, Name, Deref, Index, Int32, Not, BinOp]


# --- probes and members ----------------------------------------------------------------
@dataclass(frozen=True)
class UProbe:
    library: str  # short name ("libc") or a path
    function: str
    args: Tuple[Name, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Tracepoint:
    category: str
    event: str
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Usdt:
    """`usdt:PROVIDER:NAME(args)`: a statically defined probe (sys/sdt.h) in the program or
    its libraries, naming its arguments; it fires where the program put it, with no return."""

    provider: str
    name: str
    args: Tuple[Name, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Syscall:
    """`syscall NAME`: the system call's entry and exit tracepoints (syscalls:sys_enter_NAME,
    sys_exit_NAME), correlated per thread like a function's entry and return: the entry's fields
    are names, `ret` is the exit's."""

    name: str
    span: Span = field(default=NO_SPAN, compare=False)


Probe = Union[UProbe, Tracepoint, Usdt, Syscall]


@dataclass(frozen=True)
class Assign:
    target: Name
    value: Expr
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class AlsoRelease:
    """`releases KEY [when COND]` on an acquire: realloc frees the old block."""

    key: Tuple[Expr, ...]
    guard: Optional[Expr]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class AlsoAcquire:
    """`acquires KEY [when COND]` on an acquire: pipe() opens two fds in one call."""

    key: Tuple[Expr, ...]
    guard: Optional[Expr]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class AlsoChange:
    """`changes KEY [when COND] until exec when EXEC` on an acquire: fcntl(F_SETFD) sets or
    clears close-on-exec of an open descriptor (whether its entry ends with the image)."""

    key: Tuple[Expr, ...]
    guard: Optional[Expr]
    until_exec: Expr
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Event:
    kind: str  # "acquire" | "release" | "change"
    probe: Probe
    key: Tuple[Expr, ...]
    guards: Tuple[Expr, ...]
    assigns: Tuple[Assign, ...]
    also_releases: Tuple[AlsoRelease, ...]
    also_acquires: Tuple[AlsoAcquire, ...] = ()
    span: Span = field(default=NO_SPAN, compare=False)
    # `through EXPR` on a release: every key from KEY to its last part = EXPR (close_range)
    through: Tuple[Expr, ...] = ()
    # `until exec when COND` on an acquire or a change: the entry ends with its process image
    # (at the process's next exec) when COND holds, else it outlives the exec (close-on-exec)
    until_exec: Tuple[Expr, ...] = ()
    also_changes: Tuple[AlsoChange, ...] = ()


@dataclass(frozen=True)
class Record:
    fields: Tuple[Name, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Resource:
    name: str
    key_names: Tuple[str, ...]
    events: Tuple[Event, ...]
    records: Tuple[Record, ...]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Param:
    name: str
    default: int
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class ParamRef:
    name: str
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Aggregation:
    function: str  # sum | count | hist (the checker refuses others)
    argument: Optional[Name]
    label: Optional[str]
    span: Span = field(default=NO_SPAN, compare=False)

    @property
    def column(self) -> str:
        """The column's name in reports: its `as` label, else sum_size, count, ..."""
        return self.label or (f"{self.function}_{self.argument.name}" if self.argument else self.function)


@dataclass(frozen=True)
class Report:
    kind: str  # outstanding | lifetime
    resource: Name
    group_by: Tuple[Name, ...]
    aggregations: Tuple[Aggregation, ...]
    top: Optional[Union[int, ParamRef]]
    min_age: Optional[Union[int, ParamRef]]
    span: Span = field(default=NO_SPAN, compare=False)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    params: Tuple[Param, ...]
    resources: Tuple[Resource, ...]
    reports: Tuple[Report, ...]
    filename: str = field(default="<recipe>", compare=False)
    source: str = field(default="", compare=False, repr=False)
    span: Span = field(default=NO_SPAN, compare=False)
