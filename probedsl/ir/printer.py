"""The IR's text form, as `probedsl compile --dump ir` prints it (the storage layout it implies
follows, from probedsl.ir.layout)."""

from __future__ import annotations

from probedsl.ir import Arg, ProbeKind, Builtin, Const, Deref, Field, Int32, Not, Program, Saved, Value


def show(value: Value) -> str:
    if isinstance(value, Const):
        return str(value.value)
    if isinstance(value, Arg):
        return f"arg{value.index}"
    if isinstance(value, Saved):
        return f"saved[{value.slot}]=arg{value.arg_index}"
    if isinstance(value, (Builtin, Field)):
        return value.name if isinstance(value, Builtin) else f"field.{value.name}"
    if isinstance(value, Deref):
        return f"*{value.size}({show(value.address)} + {value.offset})"
    if isinstance(value, Int32):
        return f"int32({show(value.operand)})"
    if isinstance(value, Not):
        return f"!{show(value.operand)}"
    return f"({show(value.left)} {value.op} {show(value.right)})"


def dump(program: Program) -> str:
    lines = [
        f"program {program.name}: scope {program.scope.mode}"
        + (f" pid {program.scope.pid}" if program.scope.mode in ("pid", "cmd") else "")
        + (f" comm {program.scope.comm!r}" if program.scope.mode == "comm" else "")
        + f", sample 1/{program.sample}, read_live {program.read_live}"
    ]
    for res in program.resources:
        lines.append(
            f"resource {res.name} keyed by ({', '.join(res.key_names)}), records "
            f"({', '.join(res.record)}), max_live {res.max_live}"
        )
        for p in res.probes:
            where = "return" if p.at_return else "entry"
            saves = [f"field.{p.fields[i]}" if p.kind == ProbeKind.SYSCALL else f"arg{i}" for i in p.saved_args]
            lines.append(
                f"  probe {p.id} {p.label} at {where}"
                + (f" [{', '.join(p.files)}]" if p.path else "")
                + (f", saves ({', '.join(saves)})" if saves else "")
            )
            if p.entry_guard is not None:
                lines.append(f"    at entry, only when {show(p.entry_guard)}")
            for a in p.actions:
                text = f"    {a.kind} ({', '.join(show(k) for k in a.key)})"
                text += f" when {show(a.guard)}" if a.guard is not None else ""
                text += f" size {show(a.size)}" if a.size is not None else ""
                text += f" through {show(a.through)}" if a.through is not None else ""
                text += f" until exec when {show(a.until_exec)}" if a.until_exec is not None else ""
                lines.append(text)
    for r in program.reports:
        cols = ", ".join(f"{fn} as {label}" for fn, label in r.columns)
        lines.append(
            f"report {r.kind} {r.resource} by ({', '.join(r.group_by)})"
            + (f": {cols}" if cols else "")
            + f", top {r.top}, min_age {r.min_age_ms} ms"
        )
    return "\n".join(lines) + "\n"
