"""A report as one self-contained HTML page (--format html): the summary, live memory over
time with growth marked, the stacks table with sparklines, top-down and bottom-up trees with
callers and callees, a flame graph, the lifetime histogram, and a time window that narrows
every view to what was acquired in it and is still live.

The page is a Jinja template (templates/report.html.j2) with hand-written script and SVG:
no library is fetched or vendored (a chart, trees and a flame graph of plain rectangles and
polylines are a few hundred lines; the views must stay fast at 20,000 stacks, which decides
the drawing more than any library would). The run's data is embedded as JSON; every string
from the traced process is made visible (escape.for_terminal) and the script inserts it as
text, never as markup.
"""

from __future__ import annotations

import functools
import json
from typing import Dict, List

import jinja2

from probedsl.trust import escape
from probedsl.report import timeseries
from probedsl.outputs.flamegraph import _Node, _color
from probedsl.report import Report

GROWTH_STEPS = 3  # a stack rising in each of its last 3 samples is flagged (as --growth-intervals)
KINDS = {"": 0, "kernel": 1, "inlined": 2, "marker": 3}


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("probedsl.outputs", "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )


def script_json(value) -> str:
    """JSON safe inside <script>: no `</script>`, `<!--`, or line separators that end a JS string."""
    text = json.dumps(value, separators=(",", ":"))
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def page_data(report: Report) -> dict:
    """What the page's script draws: frames once, entries as compact rows, the series."""
    series = report.series or {}
    t = series.get("t", [])
    period = series.get("period_s", timeseries.PERIOD_S)
    stack_index = {(s["resource"], s["signature"]): i for i, s in enumerate(series.get("groups", []))}
    acquired_index = {(a["resource"], a["signature"]): i for i, a in enumerate(series.get("acquired", []))}
    frames: List[list] = []
    colors: List[str] = []
    frame_index: Dict[tuple, int] = {}

    def frame_id(f, kernel: bool) -> int:
        kind = "kernel" if kernel else "inlined" if f.inlined else "marker" if f.truncated else ""
        key = (f.name, f.module, f.file, f.line, kind)
        found = frame_index.get(key)
        if found is None:  # escaped once per distinct frame
            found = frame_index[key] = len(frames)
            frames.append(
                [
                    escape.for_terminal(f.name),
                    escape.for_terminal(f.module.rsplit("/", 1)[-1] if f.module else ""),
                    escape.for_terminal(f"{f.file}:{f.line}" if f.file else ""),
                    KINDS[kind],
                ]
            )
            colors.append(_color(_Node(f.name, kind)))
        return found

    entries, resources, columns = [], [], {}
    for s in report.sections:
        if s.kind != "outstanding":
            continue
        if s.resource not in resources:
            resources.append(s.resource)
            columns[s.resource] = s.columns
        r = resources.index(s.resource)
        first = s.columns[0] if s.columns else None
        second = s.columns[1] if len(s.columns) > 1 else None
        for e in s.entries:
            stack = [(f, True) for f in e.kernel_stack] + [(f, False) for f in e.stack]
            ids = [frame_id(f, kernel) for f, kernel in reversed(stack)]  # root first
            sig = e.signature()
            k = stack_index.get((s.resource, sig), -1)
            since = None
            if k >= 0:
                since = timeseries.growing_since(t, series["groups"][k]["bytes"], GROWTH_STEPS, period)
            who = (f"pid {e.pid}" if e.pid is not None else "") + (
                f" comm {escape.for_terminal(e.comm)}" if e.comm is not None else ""
            )
            entries.append(
                [
                    r,
                    ids,
                    e.values.get(first, 0) if first else 0,
                    e.values.get(second, 0) if second else 0,
                    e.delta.get(first) if first and e.delta else None,
                    1 if e.growing or since is not None else 0,
                    k,
                    acquired_index.get((s.resource, sig), -1),
                    since,
                    who.strip(),
                ]
            )
    histograms = []
    for s in report.sections:
        if s.kind == "lifetime":
            buckets: Dict[tuple, int] = {}
            for lo, hi, n in list(s.histogram) + [b for e in s.entries for b in e.histogram]:
                buckets[(lo, hi)] = buckets.get((lo, hi), 0) + n
            histograms.append(
                {"resource": s.resource, "buckets": [[lo, hi, n] for (lo, hi), n in sorted(buckets.items())]}
            )
    totals_since = {
        name: timeseries.growing_since(t, r["bytes"] if any(r["bytes"]) else r["blocks"], GROWTH_STEPS, period)
        for name, r in series.get("resources", {}).items()
    }
    return {
        "resources": resources,
        "columns": columns,
        "frames": frames,
        "colors": colors,
        "entries": entries,
        "series": {
            "t": t,
            "period": period,
            "resources": series.get("resources", {}),
            "stacks": [{"b": s["bytes"], "n": s["blocks"]} for s in series.get("groups", [])],
            "acquired": [a["times"] for a in series.get("acquired", [])],
            "untracked": series.get("untracked_stacks", 0),
            "thinned": series.get("thinned", 0),
            "slowest": series.get("slowest_period_s", period),
            "totals_since": totals_since,
        },
        "histograms": histograms,
        "duration": report.duration_s,
    }


def to_html(report: Report, color: bool = False) -> str:
    counters = []
    for name, r in report.resources.items():
        counters.append(
            (name, [(k.replace("_", " "), v) for k, v in r.items() if not isinstance(v, dict)], r.get("reachability"))
        )
    kind = "final" if report.final else f"interval {report.sequence}"
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=escape.for_terminal(f"probedsl {report.recipe}: {report.target}", escape.MAX_MESSAGE),
            kind=kind,
            report=report,
            target=escape.for_terminal(report.target, escape.MAX_MESSAGE),
            notes=[escape.message(n) for n in report.notes],
            counters=counters,
            cut=[(s.resource, s.cut_stacks) for s in report.sections if s.cut_stacks],
            omitted=[
                (s.resource, s.total_entries - len(s.entries), s.omitted)
                for s in report.sections
                if s.kind == "outstanding" and s.total_entries > len(s.entries)
            ],
            data=script_json(page_data(report)),
        )
    )
