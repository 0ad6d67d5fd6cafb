"""Report model -> text, JSON, folded stacks, speedscope. Renderers never compute; they lay out."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Callable, Dict, List

from probedsl.trust.escape import MAX_MESSAGE, for_folded, for_terminal

from probedsl.outputs.pprof import to_pprof
from probedsl.outputs.flamegraph import to_svg
from probedsl.outputs.html_report import to_html
from probedsl.report import Report, Section, stack_entries
from probedsl.stacks.symbolizer import Frame

SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"


class _Style:
    def __init__(self, color: bool):
        self.color = color

    def _wrap(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def bold(self, t):
        return self._wrap("1", t)

    def dim(self, t):
        return self._wrap("2", t)

    def red(self, t):
        return self._wrap("1;31", t)

    def value(self, t):
        return self._wrap("33", t)


def _frame_text(f: Frame, style: _Style) -> str:
    # names come from the traced program and its files: escaped, each capped
    text = str(replace(f, function=for_terminal(f.function), module=for_terminal(f.module), file=for_terminal(f.file)))
    if f.file and style.color:
        head, _, where = text.rpartition(" ")
        return f"{head} {style.dim(where)}"
    return text


def _histogram_text(buckets, out: List[str], indent: str = "  ") -> None:
    peak = max((n for _, _, n in buckets), default=0)
    width = max((len(f"[{lo}, {hi}]") for lo, hi, _ in buckets), default=0)
    for lo, hi, n in buckets:
        bar = "@" * (round(40 * n / peak) if peak else 0)
        out.append(f"{indent}{f'[{lo}, {hi}]':<{width}} {n:>10} |{bar}")
    if not buckets:
        out.append(f"{indent}(no releases)")


def _section_text(s: Section, style: _Style, out: List[str]) -> None:
    if s.kind == "lifetime":
        if not s.by:
            out.append(style.bold(f"Lifetime of released {s.resource} (ns):"))
            _histogram_text(s.histogram, out)
            return
        shown, rest = _top(s)
        out.append(
            style.bold(
                f"Lifetime of released {s.resource} (ns) by {', '.join(s.by)}: "
                f"{len(shown)} of {s.total_entries} entries"
            )
        )
        for e in shown:
            who = f" pid {e.pid}" if e.pid is not None else ""
            who += f" comm {for_terminal(e.comm)}" if e.comm is not None else ""
            out.append(f"  {style.value(str(e.values['released']))} released{who}")
            for f in e.stack + e.kernel_stack:
                out.append("      " + _frame_text(f, style))
            _histogram_text(e.histogram, out, indent="    ")
        if s.total_entries > len(shown):
            out.append(f"  ... and {s.total_entries - len(shown)} more entries: {rest.get('released', 0)} released")
        return
    by = ", ".join(s.by) or "all"
    shown, rest = _top(s)
    out.append(
        style.bold(
            f"Outstanding {s.resource} by {by}: {len(shown)} of {s.total_entries} entries"
            + (f", older than {s.min_age_ms} ms" if s.min_age_ms else "")
        )
    )
    if not shown:
        out.append("  (none)")
        return
    aged = any(e.oldest_age_s is not None for e in shown)  # ages come only from read entries
    heads = s.columns + (["oldest"] if aged else [])
    cells = [[str(e.values[c]) for c in s.columns] + ([f"{e.oldest_age_s or 0:.2f}s"] if aged else []) for e in shown]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    out.append("  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
    for e, row in zip(shown, cells):
        line = "  " + "  ".join(style.value(f"{c:>{w}}") for c, w in zip(row, widths))
        extra = []
        if e.delta and s.columns:
            change = e.delta[s.columns[0]]
            extra.append(f"{change:+d} {s.columns[0]} since last report")
        if e.growing:
            extra.append(style.red("GROWING"))
        if e.pid is not None:
            extra.append(f"pid {e.pid}")
        if e.comm is not None:
            extra.append(f"comm {for_terminal(e.comm)}")
        lost = [f"{k.replace('_', ' ')} {v['bytes']}/{v['blocks']}" for k, v in e.kinds.items() if v["blocks"]]
        if lost:
            extra.append(", ".join(lost))
        if "pid" not in s.by:
            extra.append(f"pids {','.join(map(str, e.pids[:8]))}{',...' if len(e.pids) > 8 else ''}")
        out.append(line + "   " + "; ".join(extra))
        for f in e.stack + e.kernel_stack:
            out.append("      " + _frame_text(f, style))
    if s.total_entries > len(shown):
        out.append(
            f"  ... and {s.total_entries - len(shown)} more entries: " + ", ".join(f"{v} {k}" for k, v in rest.items())
        )


def _top(s: Section):
    """(the entries the text view shows: the section's top, the summed values of the rest);
    a section may hold every entry (saved and machine formats) or only its top."""
    shown = s.entries[: s.top] if s.top else s.entries
    rest = dict(s.omitted)
    for e in s.entries[len(shown) :]:
        for k, v in e.values.items():
            rest[k] = rest.get(k, 0) + v
    return shown, rest


def _leak_summary(report: Report, out: List[str], style: _Style) -> None:
    """valgrind's LEAK SUMMARY, per resource a --reachability scan classified."""
    scan = report.scan
    for name, r in report.resources.items():
        kinds = r.get("reachability")
        if not kinds or scan is None:
            continue
        when = "at its exit" if scan["at"] == "exit" else "while running"
        out.append("")
        if len(report.scans) > 1:
            scans = report.scans
            where = "each at its exit" if all(x["at"] == "exit" for x in scans) else "at their exits or while running"
            head = (
                f"{len(scans)} processes, {where}: "
                f"{sum(x['scanned_bytes'] for x in scans)} bytes scanned in {sum(x['scan_s'] for x in scans):.2f} s, "
                f"paused {sum(x['pause_ms'] for x in scans):.1f} ms in all"
            )
        else:
            head = (
                f"pid {scan['pid']} {when}: {scan['scanned_bytes']} bytes "
                f"scanned in {scan['scan_s']:.2f} s, paused {scan['pause_ms']:.1f} ms"
            )
        out.append(style.bold(f"LEAK SUMMARY ({name}, {head}):"))
        for kind, label in _KIND_LABELS:
            if kind in kinds:
                text = f"{label:>17}: {kinds[kind]['bytes']} bytes in {kinds[kind]['blocks']} blocks"
                out.append("  " + (style.red(text) if kind == "definitely_lost" and kinds[kind]["blocks"] else text))
        if len(report.scans) > 1:
            _by_process(report.scans, name, out)


_KIND_LABELS = (
    ("definitely_lost", "definitely lost"),
    ("indirectly_lost", "indirectly lost"),
    ("possibly_lost", "possibly lost"),
    ("still_reachable", "still reachable"),
    ("not_scanned", "not scanned"),
)
MAX_PROCESSES = 20  # processes listed in the text LEAK SUMMARY (JSON: every one)


def _by_process(scans: List[dict], name: str, out: List[str]) -> None:
    """One line a process: its kinds (bytes/blocks), the most definitely lost first."""
    rows = [(s, s.get("resources", {}).get(name, {})) for s in scans]
    rows.sort(key=lambda row: (-row[1].get("definitely_lost", {}).get("bytes", 0), row[0]["pid"]))
    out.append("  by process (definitely/indirectly/possibly lost, still reachable: bytes/blocks):")
    for s, kinds in rows[:MAX_PROCESSES]:
        cells = "  ".join(
            f"{kinds[k]['bytes']}/{kinds[k]['blocks']}" if k in kinds else "-" for k, _ in _KIND_LABELS[:4]
        )
        what = for_terminal(s.get("command", ""), 60)
        out.append(f"    pid {s['pid']:>7}  {cells}  {what}")
    if len(rows) > MAX_PROCESSES:
        out.append(f"    ... and {len(rows) - MAX_PROCESSES} more processes (--format json lists each)")


def to_text(report: Report, color: bool = False) -> str:
    style = _Style(color)
    kind = "final" if report.final else f"interval {report.sequence}"
    head = f"probedsl {for_terminal(report.recipe)} report ({kind}): {for_terminal(report.target, MAX_MESSAGE)}, {report.backend}"
    head += f" {report.backend_version}" if report.backend_version else ""
    head += f", {report.duration_s:.1f}s"
    if report.exit_status is not None:
        head += f", exit status {report.exit_status}"
    if report.sample > 1:
        head += f", ESTIMATES from 1 in {report.sample} acquisitions"
    out = [style.bold(head)]
    for name, r in report.resources.items():
        size = f"{r['live_bytes']} bytes in " if "live_bytes" in r else ""
        replaced = f", {r['replaced']} acquired again without a release" if r.get("replaced") else ""
        out.append(
            f"  {for_terminal(name)}: {size}{r['live_blocks']} live; {r['acquired']} acquired, {r['released']} released, "
            f"{r['unknown_releases']} releases of unknown keys{replaced}"
        )
    for note in report.notes:
        out.append(f"  note: {for_terminal(note, MAX_MESSAGE)}")
    for why in report.incomplete:
        out.append(style.bold(f"  INCOMPLETE: {for_terminal(why, MAX_MESSAGE)}"))
    _leak_summary(report, out, style)
    for s in report.sections:
        out.append("")
        _section_text(s, style, out)
    return "\n".join(out) + "\n"


def to_json(report: Report, color: bool = False) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def to_folded(report: Report, color: bool = False) -> str:
    """Brendan Gregg's folded stacks (flamegraph.pl, inferno): root;...;leaf weight. Names keep
    their spaces (flamegraph.pl splits the weight off at the last one); kernel frames end
    `_[k]` and inlined ones `_[i]`, which flamegraph.pl colours."""
    lines = []
    for s, frames, weight in stack_entries(report):
        names = [for_folded(s.resource)] + [
            for_folded(f.name) + ("_[k]" if kernel else "_[i]" if f.inlined else "") for f, kernel in frames
        ]
        lines.append(f"{';'.join(names)} {weight}")
    return "\n".join(lines) + ("\n" if lines else "")


def to_speedscope(report: Report, color: bool = False) -> str:
    frames: List[dict] = []
    index: Dict[tuple, int] = {}
    profiles = {}
    for s, stack, weight in stack_entries(report):
        prof = profiles.setdefault(
            s.resource,
            {
                "type": "sampled",
                "name": f"{report.recipe}: outstanding {s.resource} ({s.columns[0]})",
                "unit": "bytes" if s.columns[0] == "bytes" else "none",
                "startValue": 0,
                "endValue": 0,
                "samples": [],
                "weights": [],
            },
        )
        sample = []
        for f, _ in stack:
            key = (f.name, f.module, f.file, f.line)
            if key not in index:
                index[key] = len(frames)
                item = {"name": f.name}
                if f.file:
                    item["file"] = f.file
                if f.line:
                    item["line"] = f.line
                frames.append(item)
            sample.append(index[key])
        prof["samples"].append(sample)
        prof["weights"].append(weight)
        prof["endValue"] += weight
    doc = {
        "$schema": SPEEDSCOPE_SCHEMA,
        "shared": {"frames": frames},
        "profiles": list(profiles.values()),
        "name": f"probedsl {report.recipe} ({report.target})",
        "activeProfileIndex": 0,
        "exporter": "probedsl",
    }
    return json.dumps(doc) + "\n"


FORMATS: Dict[str, Callable[..., object]] = {
    "text": to_text,
    "json": to_json,
    "folded": to_folded,
    "speedscope": to_speedscope,
    "pprof": to_pprof,
    "svg": to_svg,
    "html": to_html,
}


def render(report: Report, fmt: str, color: bool = False):
    """The report in a format: text, or bytes for pprof (gzipped protobuf)."""
    return FORMATS[fmt](report, color)


def diff_text(rows: List[dict], color: bool = False) -> str:
    style = _Style(color)
    out = [style.bold("probedsl diff: entries matched by symbolic stack, largest growth first")]
    for r in rows:
        cols = ", ".join(f"{k} {a} -> {b} ({b - a:+d})" for k, (a, b) in r["values"].items())
        out.append(
            f"  {for_terminal(r['resource'])}: {cols}{'' if r['status'] == 'both' else '  [' + r['status'] + ']'}"
        )
        for f in r["entry"].stack + r["entry"].kernel_stack:
            out.append("      " + _frame_text(f, style))
    if not rows:
        out.append("  (no outstanding entries in either run)")
    return "\n".join(out) + "\n"


def diff_json(rows: List[dict], color: bool = False) -> str:
    doc = {
        "schema": "probedsl.diff",
        "version": 1,
        "entries": [
            {
                "resource": r["resource"],
                "status": r["status"],
                "values": {k: {"before": a, "after": b, "change": b - a} for k, (a, b) in r["values"].items()},
                "stack": [f.as_dict() for f in r["entry"].stack],
                "kernel_stack": [f.as_dict() for f in r["entry"].kernel_stack],
            }
            for r in rows
        ],
    }
    return json.dumps(doc, indent=2) + "\n"
