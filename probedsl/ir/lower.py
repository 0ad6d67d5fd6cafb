"""Checked AST -> IR: bind names to where their values live, and plan entry/return correlation."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Union

from probedsl.language import ast
from probedsl import ir
from probedsl.language.checker import event_exprs, names_in, derefs_in
from probedsl.errors import ProbedslError


def _needs_return(event: ast.Event) -> bool:
    return any(n.name == "ret" for e in event_exprs(event) for n in names_in(e)) or any(
        True for e in event_exprs(event) for _ in derefs_in(e)
    )


class _Binder:
    """Turns AST expressions into IR values for one probe."""

    def __init__(self, probe: ast.Probe, at_return: bool, params: Mapping[str, int]):
        self.probe = probe
        self.at_return = at_return
        self.params = params
        self.arg_index = (
            {a.name: i for i, a in enumerate(probe.args)} if isinstance(probe, (ast.UProbe, ast.Usdt)) else {}
        )
        self.saved: List[int] = []  # argument indexes saved at entry, in slot order
        self.syscall = isinstance(probe, ast.Syscall)
        self.fields: List[str] = []  # syscall: entry fields saved for the exit (Probe.fields)

    def value(self, expr: ast.Expr) -> ir.Value:
        if isinstance(expr, ast.Number):
            return ir.Const(expr.value)
        if isinstance(expr, ast.Name):
            name = expr.name
            if name in self.arg_index:
                index = self.arg_index[name]
                if not self.at_return:
                    return ir.Arg(index)
                if index not in self.saved:
                    self.saved.append(index)
                return ir.Saved(self.saved.index(index), index)
            if self.syscall and name not in ("pid", "tid") and name not in self.params:
                if name == "ret" or not self.at_return:
                    return ir.Field(name)
                if name not in self.fields:
                    self.fields.append(name)
                index = self.fields.index(name)
                if index not in self.saved:
                    self.saved.append(index)
                return ir.Saved(self.saved.index(index), index)
            if name in ("ret", "pid", "tid"):
                return ir.Builtin(name)
            if name in self.params:
                return ir.Const(self.params[name])
            return ir.Field(name)
        if isinstance(expr, ast.Deref):
            return ir.Deref(self.value(expr.operand))
        if isinstance(expr, ast.Index):
            return ir.Deref(self.value(expr.array), offset=4 * expr.index, size=4)
        if isinstance(expr, ast.Not):
            return ir.Not(self.value(expr.operand))
        if isinstance(expr, ast.Int32):
            return ir.Int32(self.value(expr.operand))
        return ir.BinOp(expr.op, self.value(expr.left), self.value(expr.right))

    def guard(self, exprs: Sequence[ast.Expr]) -> Optional[ir.Value]:
        result = None
        for e in exprs:
            v = self.value(e)
            result = v if result is None else ir.BinOp("&&", result, v)
        return result


def parameter_values(recipe: ast.Recipe, overrides: Mapping[str, str]) -> Dict[str, int]:
    values = {p.name: p.default for p in recipe.params}
    for name, text in overrides.items():
        if name not in values:
            known = ", ".join(values) or "none"
            raise ProbedslError(f"--set {name}: the recipe has no parameter '{name}' (parameters: {known})")
        try:
            values[name] = int(text, 0)
        except ValueError:
            raise ProbedslError(f"--set {name}={text}: parameters are integers") from None
        if values[name] < 0:
            raise ProbedslError(f"--set {name}={text}: parameters cannot be negative")
    return values


def _report_number(value: Union[int, ast.ParamRef, None], params: Mapping[str, int], default: int) -> int:
    if value is None:
        return default
    if isinstance(value, ast.ParamRef):
        return params[value.name]
    return value


def lower(recipe: ast.Recipe, params: Mapping[str, int], max_live: int = ir.DEFAULT_MAX_LIVE) -> ir.Program:
    resources = []
    for res in recipe.resources:
        probes: List[ir.Probe] = []
        for event in res.events:
            at_return = _needs_return(event)
            bind = _Binder(event.probe, at_return, params)
            actions = [
                ir.Action(
                    "release",
                    tuple(bind.value(k) for k in extra.key),
                    bind.guard([extra.guard] if extra.guard is not None else []),
                )
                for extra in event.also_releases
            ]
            size = next((bind.value(a.value) for a in event.assigns if a.target.name == "size"), None)
            actions.append(
                ir.Action(
                    event.kind,
                    tuple(bind.value(k) for k in event.key),
                    bind.guard(event.guards),
                    size if event.kind == "acquire" else None,
                    bind.value(event.through[0]) if event.through else None,
                    bind.value(event.until_exec[0]) if event.until_exec else None,
                )
            )
            for extra in event.also_acquires:
                guard = bind.guard(list(event.guards) + ([extra.guard] if extra.guard is not None else []))
                actions.append(
                    ir.Action(
                        "acquire",
                        tuple(bind.value(k) for k in extra.key),
                        guard,
                        size,
                        until_exec=actions[-1].until_exec,
                    )
                )
            for change in event.also_changes:
                guard = bind.guard([change.guard] if change.guard is not None else [])
                actions.append(
                    ir.Action(
                        "change",
                        tuple(bind.value(k) for k in change.key),
                        guard,
                        until_exec=bind.value(change.until_exec),
                    )
                )
            p = event.probe
            kind, library, function = (
                ("uprobe", p.library, p.function)
                if isinstance(p, ast.UProbe)
                else ("usdt", "", f"{p.provider}:{p.name}")
                if isinstance(p, ast.Usdt)
                else ("syscall", "", p.name)
                if isinstance(p, ast.Syscall)
                else ("tracepoint", "", f"{p.category}:{p.event}")
            )
            # a process fires one provider's probes (otel_memory or ddheap): those not in its
            # files are left out, with a note
            probes.append(
                ir.Probe(
                    id=len(probes) + 1,
                    resource=res.name,
                    kind=ir.ProbeKind(kind),
                    library=library,
                    function=function,
                    at_return=at_return,
                    saved_args=tuple(bind.saved),
                    fields=tuple(bind.fields),
                    actions=tuple(actions),
                    span=event.probe.span,
                    optional=kind == ir.ProbeKind.USDT,
                )
            )
        record = tuple(sorted({f.name for rec in res.records for f in rec.fields}))
        resources.append(ir.Resource(res.name, res.key_names, record, tuple(probes), max_live))
    reports = []
    for rep in recipe.reports:
        columns = tuple((a.function, a.column) for a in rep.aggregations)
        reports.append(
            ir.Report(
                rep.kind,
                rep.resource.name,
                tuple(g.name for g in rep.group_by),
                columns,
                _report_number(rep.top, params, 10),
                _report_number(rep.min_age, params, 0),
            )
        )
    return ir.Program(
        recipe.name,
        recipe.description,
        recipe.filename,
        tuple(resources),
        tuple(reports),
        tuple(sorted(params.items())),
    )
