"""Semantic checks on a parsed recipe: every problem found at once, each located."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from probedsl.language import ast
from probedsl.errors import Diagnostic, RecipeError, Span

# (category, event) -> the tracepoint's field names, None when it does not exist, ("*",) unknown
Fields = Callable[[str, str], Optional[Tuple[str, ...]]]

BUILTINS = ("pid", "tid")
SETTABLE = ("size",)
GROUPABLE = ("ustack", "kstack", "pid", "comm")
AGGREGATIONS = {"outstanding": ("sum", "count"), "lifetime": ("hist",)}


def names_in(expr: ast.Expr) -> Iterator[ast.Name]:
    if isinstance(expr, ast.Name):
        yield expr
    elif isinstance(expr, ast.Index):
        yield expr.array
    elif isinstance(expr, (ast.Deref, ast.Not, ast.Int32)):
        yield from names_in(expr.operand)
    elif isinstance(expr, ast.BinOp):
        yield from names_in(expr.left)
        yield from names_in(expr.right)


def derefs_in(expr: ast.Expr) -> Iterator[Union[ast.Deref, ast.Index]]:
    """Reads through out-parameters (`*out`, `fds[1]`): they happen at return."""
    if isinstance(expr, (ast.Deref, ast.Index)):
        yield expr
    if isinstance(expr, (ast.Deref, ast.Not, ast.Int32)):
        yield from derefs_in(expr.operand)
    elif isinstance(expr, ast.BinOp):
        yield from derefs_in(expr.left)
        yield from derefs_in(expr.right)


def event_exprs(event: ast.Event) -> Iterator[ast.Expr]:
    yield from event.key
    yield from event.guards
    for a in event.assigns:
        yield a.value
    for r in event.also_releases + event.also_acquires:
        yield from r.key
        if r.guard is not None:
            yield r.guard
    yield from event.through
    yield from event.until_exec
    for c in event.also_changes:
        yield from c.key
        if c.guard is not None:
            yield c.guard
        yield c.until_exec


class _Checker:
    def __init__(self, recipe: ast.Recipe, tracepoint_fields: Fields):
        self.recipe = recipe
        self.tracepoint_fields = tracepoint_fields
        self.diagnostics: List[Diagnostic] = []
        self.params: Dict[str, ast.Param] = {}

    def error(self, span: Span, message: str) -> None:
        self.diagnostics.append(Diagnostic(self.recipe.filename, span, message))

    def run(self) -> List[Diagnostic]:
        for p in self.recipe.params:
            if p.name in self.params:
                self.error(p.span, f"parameter '{p.name}' is defined twice")
            self.params[p.name] = p
        seen: Set[str] = set()
        for res in self.recipe.resources:
            if res.name in seen:
                self.error(res.span, f"resource '{res.name}' is defined twice")
            seen.add(res.name)
            self.check_resource(res)
        if not self.recipe.resources:
            self.error(self.recipe.span, "a recipe needs at least one resource")
        for rep in self.recipe.reports:
            self.check_report(rep)
        return self.diagnostics

    def check_resource(self, res: ast.Resource) -> None:
        if len(set(res.key_names)) != len(res.key_names):
            self.error(res.span, f"resource '{res.name}' repeats a key name")
        recorded: Set[str] = set()
        for rec in res.records:
            for f in rec.fields:
                if f.name not in ast.RECORDABLE:
                    self.error(f.span, f"cannot record '{f.name}'; choose from {', '.join(ast.RECORDABLE)}")
                recorded.add(f.name)
        if not any(e.kind == "acquire" for e in res.events):
            self.error(res.span, f"resource '{res.name}' has no acquire")
        for event in res.events:
            self.check_event(res, event)

    def check_event(self, res: ast.Resource, event: ast.Event) -> None:
        probe = event.probe
        allowed: Set[str] = set(BUILTINS) | set(self.params)
        args: Set[str] = set()
        if isinstance(probe, (ast.UProbe, ast.Usdt)):
            for a in probe.args:
                if a.name in args:
                    self.error(a.span, f"argument '{a.name}' is named twice")
                if a.name in ("ret",) + BUILTINS:
                    self.error(a.span, f"'{a.name}' is a built-in name; call the argument something else")
                args.add(a.name)
            allowed |= args | ({"ret"} if isinstance(probe, ast.UProbe) else set())
            if isinstance(probe, ast.Usdt):
                for expr in event_exprs(event):
                    for d in derefs_in(expr):
                        self.error(d.span, "a usdt probe has no return: it cannot read out-parameters")
        elif isinstance(probe, ast.Syscall):
            enter = self.tracepoint_fields("syscalls", f"sys_enter_{probe.name}")
            leave = self.tracepoint_fields("syscalls", f"sys_exit_{probe.name}")
            if enter is None or leave is None:
                self.error(
                    probe.span,
                    f"system call '{probe.name}' has no tracepoints "
                    f"syscalls:sys_enter_{probe.name}/sys_exit_{probe.name} on this kernel",
                )
            if enter in (None, ("*",)):
                args = {n.name for e in event_exprs(event) for n in names_in(e)} - {"ret"}
            else:
                args = set(enter) - {"__syscall_nr"}
            allowed |= args | {"ret"}
        else:
            fields = self.tracepoint_fields(probe.category, probe.event)
            if fields == ("*",):  # tracefs unreadable: trust the names
                allowed |= {n.name for e in event_exprs(event) for n in names_in(e)}
            elif fields is None:
                self.error(probe.span, f"tracepoint {probe.category}:{probe.event} does not exist on this kernel")
                allowed |= {n.name for e in event_exprs(event) for n in names_in(e)}
            else:
                allowed |= set(fields)
        self.check_key(res, event.key, event.span)
        for extra in event.also_releases + event.also_acquires:
            if event.kind != "acquire":
                word = "releases" if isinstance(extra, ast.AlsoRelease) else "acquires"
                self.error(extra.span, f"'{word}' belongs on an acquire")
            self.check_key(res, extra.key, extra.span)
        if event.through and (event.kind != "release" or len(event.through) > 1):
            self.error(
                event.through[-1].span if event.kind == "release" else event.span,
                "'through LAST' belongs on a release, once (it releases KEY up to LAST)",
            )
        self.check_until_exec(res, event)
        for assign in event.assigns:
            if assign.target.name not in SETTABLE:
                self.error(
                    assign.target.span, f"cannot set '{assign.target.name}'; an acquire can set: {', '.join(SETTABLE)}"
                )
            if event.kind != "acquire":
                self.error(assign.span, f"a {event.kind} cannot set values; move this to the acquire")
        for expr in event_exprs(event):
            for n in names_in(expr):
                if n.name not in allowed:
                    where = "a tracepoint field" if isinstance(probe, (ast.Tracepoint, ast.Syscall)) else "an argument"
                    hint = (
                        " (a usdt probe has no return value)" if n.name == "ret" and isinstance(probe, ast.Usdt) else ""
                    )
                    self.error(
                        n.span,
                        f"unknown name '{n.name}': not {where}, a parameter or one of "
                        f"{', '.join(('ret',) + BUILTINS if isinstance(probe, (ast.UProbe, ast.Syscall)) else BUILTINS)}"
                        + hint,
                    )
            for d in derefs_in(expr):
                target = d.array if isinstance(d, ast.Index) else d.operand
                if not (isinstance(target, ast.Name) and target.name in args):
                    self.error(d.span, "'*' reads through an out-parameter: write '*ARG' with an argument name")

    def check_until_exec(self, res: ast.Resource, event: ast.Event) -> None:
        """`until exec when COND` (an acquire's, a change's, a `changes` clause's): the entry ends
        with its process's image when COND holds. The image is the calling process's, so the key
        starts with pid; entries the process's own code acquires end with it already."""
        clauses = [(e.span, event.key) for e in event.until_exec] + [(c.span, c.key) for c in event.also_changes]
        if event.kind == "change" and len(event.until_exec) != 1:
            self.error(event.span, "a change says what it changes once: 'until exec when COND'")
        elif event.kind == "release" and event.until_exec:
            self.error(event.until_exec[0].span, "'until exec' belongs on an acquire or a change")
        elif len(event.until_exec) > 1:
            self.error(event.until_exec[1].span, "'until exec when COND' is written once per event")
        for c in event.also_changes:
            if event.kind != "acquire":
                self.error(c.span, "'changes' belongs on an acquire (or write a change event)")
            self.check_key(res, c.key, c.span)
        if not clauses:
            return
        if isinstance(event.probe, (ast.UProbe, ast.Usdt)):
            self.error(
                clauses[0][0],
                "'until exec' is for system calls and tracepoints: entries acquired by the process's "
                "own code (functions, usdt) end with its image already",
            )
        if len(res.key_names) < 2 or any(
            not (key and isinstance(key[0], ast.Name) and key[0].name == "pid") for _, key in clauses
        ):
            self.error(clauses[0][0], "'until exec' needs a key that starts with pid: (pid, ...)")

    def check_key(self, res: ast.Resource, key: Sequence[ast.Expr], span: Span) -> None:
        if len(key) != len(res.key_names):
            self.error(
                span,
                f"resource '{res.name}' is keyed by {len(res.key_names)} value(s) "
                f"({', '.join(res.key_names)}) but this key has {len(key)}",
            )

    def check_report(self, rep: ast.Report) -> None:
        resources = {r.name: r for r in self.recipe.resources}
        res = resources.get(rep.resource.name)
        if res is None:
            self.error(rep.resource.span, f"unknown resource '{rep.resource.name}'")
            return
        if rep.kind not in AGGREGATIONS:
            self.error(rep.span, f"unknown report '{rep.kind}'; choose from {', '.join(AGGREGATIONS)}")
            return
        recorded = {f.name for rec in res.records for f in rec.fields}
        for g in rep.group_by:
            if g.name not in GROUPABLE:
                self.error(g.span, f"cannot group by '{g.name}'; choose from {', '.join(GROUPABLE)}")
            elif g.name not in recorded:
                self.error(g.span, f"'{g.name}' is not recorded; add 'record {g.name}' to resource '{res.name}'")
        if rep.kind == "lifetime":
            if any(
                r.kind == "lifetime" and r.resource.name == rep.resource.name and r.span != rep.span
                for r in self.recipe.reports[: self.recipe.reports.index(rep)]
            ):
                self.error(rep.span, f"resource '{res.name}' already has a lifetime report")
        if any(g.name == "ustack" for g in rep.group_by) and "pid" not in recorded:
            self.error(rep.span, "a report by ustack needs 'record pid' (stacks are named per process)")
        labels: Set[str] = set()
        for agg in rep.aggregations:
            if agg.column in labels:
                self.error(agg.span, f"column '{agg.column}' is already in this report; name one with 'as'")
            labels.add(agg.column)
            if agg.function not in AGGREGATIONS[rep.kind]:
                self.error(
                    agg.span,
                    f"'{agg.function}' is not an aggregation of a {rep.kind} report; "
                    f"use {', '.join(AGGREGATIONS[rep.kind])}",
                )
            want = {"sum": "size", "hist": "age", "count": None}.get(agg.function)
            got = agg.argument.name if agg.argument else None
            if agg.function in AGGREGATIONS[rep.kind] and got != want:
                self.error(agg.span, f"write {agg.function}({want or ''})")
            if agg.function == "sum" and "size" not in recorded:
                self.error(agg.span, f"sum(size) needs 'record size' in resource '{res.name}'")
            if agg.function == "hist" and "time" not in recorded:
                self.error(agg.span, f"hist(age) needs 'record time' in resource '{res.name}'")
        for value in (rep.top, rep.min_age):
            if isinstance(value, ast.ParamRef) and value.name not in self.params:
                self.error(value.span, f"unknown parameter '{value.name}'")


def check(recipe: ast.Recipe, tracepoint_fields: Optional[Fields] = None) -> None:
    """Raise RecipeError listing every semantic problem in `recipe`.

    `tracepoint_fields(category, event)` returns a tracepoint's field names, or None when it
    does not exist; by default it reads the running kernel's tracefs.
    """
    from probedsl.language.tracepoints import fields as kernel_fields

    diagnostics = _Checker(recipe, tracepoint_fields or kernel_fields).run()
    if diagnostics:
        raise RecipeError(diagnostics, recipe.source)
