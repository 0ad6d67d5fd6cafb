"""Snapshot -> report model -> text or JSON. The same for every backend."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import ir
from .rundata import Live, Snapshot
from .symbolizer import Frame, Symbolizer

SCHEMA = "probedsl.report/1"


@dataclass
class Entry:
    group: Tuple                       # what the entry is grouped by (stack addresses, pid, comm)
    values: Dict[str, int]             # column label -> value
    oldest_age_s: float
    pids: List[int]
    ustack: List[Frame] = field(default_factory=list)
    kstack: List[Frame] = field(default_factory=list)
    pid: Optional[int] = None
    comm: Optional[str] = None


@dataclass
class Section:
    report: ir.Report
    entries: List[Entry]
    omitted_entries: int = 0
    omitted_values: Dict[str, int] = field(default_factory=dict)
    histogram: List[Tuple[int, int, int]] = field(default_factory=list)


@dataclass
class Report:
    recipe: str
    backend: str
    target: str
    duration_s: float
    final: bool
    resources: Dict[str, Dict[str, int]]
    sections: List[Section]
    exit_status: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def _group_key(live: Live, by: Sequence[str]) -> Tuple:
    parts = []
    for g in by:
        if g == "ustack":
            parts.append((live.pid, live.ustack))   # addresses only mean something per process
        else:
            parts.append(getattr(live, g))
    return tuple(parts)


def build(program: ir.Program, snapshot: Snapshot, symbolizer: Symbolizer, *, backend: str,
          target: str, duration_s: float, top: Optional[int] = None, exit_status: Optional[int] = None,
          notes: Sequence[str] = ()) -> Report:
    resources = {}
    for res in program.resources:
        live = [l for l in snapshot.live if l.resource == res.name]
        t = snapshot.totals.get(res.name)
        resources[res.name] = {
            **({"live_bytes": sum(l.size for l in live)} if res.records("size") else {}),
            "live_blocks": len(live),
            "acquired": t.acquired if t else 0, "released": t.released if t else 0,
            "unknown_releases": t.unknown_releases if t else 0}
    sections = []
    for rep in program.reports:
        if rep.kind == "lifetime":
            t = snapshot.totals.get(rep.resource)
            sections.append(Section(rep, [], histogram=list(t.lifetime) if t else []))
            continue
        min_age_ns = rep.min_age_ms * 1_000_000
        groups: Dict[Tuple, List[Live]] = {}
        for l in snapshot.live:
            if l.resource == rep.resource and snapshot.now_ns - l.time_ns >= min_age_ns:
                groups.setdefault(_group_key(l, rep.group_by), []).append(l)
        entries = [_entry(rep, key, members, snapshot.now_ns) for key, members in groups.items()]
        first = rep.columns[0][1] if rep.columns else None
        entries.sort(key=lambda e: (-(e.values.get(first, 0) if first else 0), -len(e.pids), e.oldest_age_s))
        limit = top if top is not None else rep.top
        shown, rest = entries[:limit], entries[limit:]
        for e in shown:
            _symbolize(e, rep, groups[e.group], symbolizer)
        omitted = {label: sum(e.values[label] for e in rest) for _, label in rep.columns}
        sections.append(Section(rep, shown, len(rest), omitted))
    return Report(program.name, backend, target, duration_s, snapshot.final, resources, sections,
                  exit_status, list(notes))


def _entry(rep: ir.Report, key: Tuple, members: List[Live], now_ns: int) -> Entry:
    values = {}
    for function, label in rep.columns:
        values[label] = sum(m.size for m in members) if function == "sum" else len(members)
    e = Entry(key, values, round((now_ns - min(m.time_ns for m in members)) / 1e9, 3),
              sorted({m.pid for m in members}))
    for g in rep.group_by:
        if g == "pid":
            e.pid = members[0].pid
        elif g == "comm":
            e.comm = members[0].comm
    return e


def _symbolize(e: Entry, rep: ir.Report, members: List[Live], symbolizer: Symbolizer) -> None:
    sample = members[0]
    if "ustack" in rep.group_by:
        e.ustack = symbolizer.user_stack(sample.pid, sample.ustack)
    if "kstack" in rep.group_by:
        e.kstack = symbolizer.kernel_stack(sample.kstack)


# --- rendering ---------------------------------------------------------------------------
def to_json(report: Report) -> str:
    doc = {
        "schema": SCHEMA, "recipe": report.recipe, "backend": report.backend, "target": report.target,
        "duration_s": round(report.duration_s, 3), "final": report.final, "exit_status": report.exit_status,
        "notes": report.notes, "resources": report.resources, "reports": [],
    }
    for s in report.sections:
        r = s.report
        if r.kind == "lifetime":
            doc["reports"].append({"kind": "lifetime", "resource": r.resource, "histogram_ns": [
                {"min": lo, "max": hi, "count": n} for lo, hi, n in s.histogram]})
            continue
        entries = []
        for e in s.entries:
            item = dict(e.values)
            item["oldest_age_s"] = e.oldest_age_s
            item["pids"] = e.pids
            if e.pid is not None:
                item["pid"] = e.pid
            if e.comm is not None:
                item["comm"] = e.comm
            if "ustack" in r.group_by:
                item["stack"] = [f.as_dict() for f in e.ustack]
            if "kstack" in r.group_by:
                item["kernel_stack"] = [f.as_dict() for f in e.kstack]
            entries.append(item)
        doc["reports"].append({"kind": "outstanding", "resource": r.resource, "by": list(r.group_by),
                               "top": r.top, "min_age_ms": r.min_age_ms, "entries": entries,
                               "omitted": {"entries": s.omitted_entries, **s.omitted_values}})
    return json.dumps(doc, indent=2)


def to_text(report: Report) -> str:
    out = [f"probedsl {report.recipe} report ({'final' if report.final else 'interval'}): "
           f"target {report.target}, backend {report.backend}, {report.duration_s:.1f}s"]
    if report.exit_status is not None:
        out.append(f"  target exited with status {report.exit_status}")
    for name, r in report.resources.items():
        size = f"{r['live_bytes']} bytes in " if "live_bytes" in r else ""
        out.append(f"  {name}: {size}{r['live_blocks']} live; "
                   f"{r['acquired']} acquired, {r['released']} released, "
                   f"{r['unknown_releases']} releases of unknown keys")
    for note in report.notes:
        out.append(f"  note: {note}")
    for s in report.sections:
        r = s.report
        out.append("")
        if r.kind == "lifetime":
            out.append(f"Lifetime of released {r.resource} (ns):")
            peak = max((n for _, _, n in s.histogram), default=0)
            for lo, hi, n in s.histogram:
                bar = "@" * (round(40 * n / peak) if peak else 0)
                out.append(f"  [{lo}, {hi}] {n:>10} |{bar}")
            if not s.histogram:
                out.append("  (no releases)")
            continue
        by = ", ".join(r.group_by) or "all"
        out.append(f"Outstanding {r.resource} by {by} (top {len(s.entries)}):")
        if not s.entries:
            out.append("  (none)")
        for e in s.entries:
            cols = ", ".join(f"{v} {k}" for k, v in e.values.items())
            who = f" pid {e.pid}" if e.pid is not None else ""
            who += f" comm {e.comm}" if e.comm is not None else ""
            out.append(f"  {cols}{who}, oldest {e.oldest_age_s:.3f}s, pids {','.join(map(str, e.pids))}")
            for f in e.ustack:
                out.append(f"      {f}")
            for f in e.kstack:
                out.append(f"      {f}")
        if s.omitted_entries:
            cols = ", ".join(f"{v} {k}" for k, v in s.omitted_values.items())
            out.append(f"  ... {s.omitted_entries} more entries: {cols}")
    return "\n".join(out) + "\n"
