"""Reports across time and hosts: growth between intervals, the diff of two saved runs, the merge of many."""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from probedsl.report import Entry, Report, Section


class Growth:
    """Across interval reports: change since the last report, and a steady-growth flag when
    an entry grew in each of the last `intervals` reports (a leak does; a cache that fills
    and then stops does not)."""

    def __init__(self, intervals: int = 3):
        self.intervals = intervals
        self._last: Dict[Tuple[str, str], Dict[str, int]] = {}
        self._streak: Dict[Tuple[str, str], int] = {}

    def annotate(self, report: Report) -> None:
        seen = {}
        for s in report.sections:
            if s.kind != "outstanding":
                continue
            for e in s.entries:
                key = (s.resource, e.signature())
                before = self._last.get(key)
                first = s.columns[0] if s.columns else None
                if before is not None:
                    e.delta = {c: e.values[c] - before.get(c, 0) for c in s.columns}
                    grew = first is not None and e.delta[first] > 0
                    self._streak[key] = self._streak.get(key, 0) + 1 if grew else 0
                else:
                    e.delta = {}
                    self._streak[key] = 0
                e.growing = self._streak[key] >= self.intervals
                seen[key] = dict(e.values)
        self._last = seen


def diff(old: Report, new: Report) -> List[dict]:
    """Entries of two saved runs matched by symbolic stack: what grew, shrank, appeared."""
    rows = []
    for s_new in new.sections:
        if s_new.kind != "outstanding":
            continue
        s_old = next(
            (s for s in old.sections if s.kind == "outstanding" and s.resource == s_new.resource and s.by == s_new.by),
            None,
        )
        before = {e.signature(): e for e in (s_old.entries if s_old else [])}
        after = {e.signature(): e for e in s_new.entries}
        # a run saved with only its top entries (by an older probedsl) may hold
        # the stack among those it summed: not "new" or "gone" then, but unknown
        old_whole = s_old is None or s_old.total_entries == len(s_old.entries)
        new_whole = s_new.total_entries == len(s_new.entries)
        for sig in list(after) + [k for k in before if k not in after]:
            a, b = before.get(sig), after.get(sig)
            values = {c: ((a.values.get(c, 0) if a else 0), (b.values.get(c, 0) if b else 0)) for c in s_new.columns}
            status = (
                "both"
                if a and b
                else "new"
                if b and old_whole
                else "gone"
                if a and new_whole
                else "not in the other run's top entries"
            )
            rows.append(
                {"resource": s_new.resource, "signature": sig, "values": values, "entry": b or a, "status": status}
            )
    first = lambda r: next(iter(r["values"].values()), (0, 0))
    rows.sort(key=lambda r: -(first(r)[1] - first(r)[0]))
    return rows


def merge(reports: Sequence[Report]) -> Report:
    """Saved runs of many hosts as one: entries matched by symbolic stack (addresses differ
    between hosts) and summed, totals and leak kinds summed, lifetime histograms added."""
    first = reports[0]
    resources: Dict[str, dict] = {}
    for r in reports:
        for name, counts in r.resources.items():
            _add_counts(resources.setdefault(name, {}), counts)
    sections: List[Section] = []
    for r in reports:
        for s in r.sections:
            into = next((m for m in sections if (m.kind, m.resource, m.by) == (s.kind, s.resource, s.by)), None)
            if into is None:
                into = Section(s.kind, s.resource, list(s.by), list(s.columns), s.top, s.min_age_ms)
                sections.append(into)
            _merge_section(into, s)
    for s in sections:
        first_column = s.columns[0] if s.columns else None
        s.entries.sort(key=lambda e: -(e.values.get(first_column, 0) if first_column else 0))
    targets = "; ".join(dict.fromkeys(r.target for r in reports))
    notes = [f"merged from {len(reports)} runs: {targets}"]
    cut = sum(1 for r in reports for s in r.sections if s.total_entries > len(s.entries))
    if cut:
        notes.append(
            f"{cut} sections of the runs held only their top entries: their other entries are "
            "summed in `omitted`, not matched by stack"
        )
    from probedsl.report.timeseries import merge as merge_series

    return Report(
        first.recipe,
        first.backend,
        f"{len(reports)} runs",
        max(r.duration_s for r in reports),
        all(r.final for r in reports),
        resources,
        sections,
        None,
        notes,
        0,
        max(r.sample for r in reports),
        first.backend_version,
        series=merge_series([r.series for r in reports if r.series]),
    )


def _add_counts(into: dict, counts: dict) -> None:
    """Numbers summed, nested dicts (leak kinds) summed field by field."""
    for key, value in counts.items():
        if isinstance(value, dict):
            _add_counts(into.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value


def _merge_section(into: Section, s: Section) -> None:
    by_signature = {e.signature(): e for e in into.entries}
    for e in s.entries:
        same = by_signature.get(e.signature())
        if same is None:
            same = Entry(
                values={},
                oldest_age_s=None,
                pids=[],
                stack=e.stack,
                kernel_stack=e.kernel_stack,
                pid=e.pid,
                comm=e.comm,
            )
            by_signature[e.signature()] = same
            into.entries.append(same)
            into.total_entries += 1
        _add_counts(same.values, e.values)
        _add_counts(same.kinds, e.kinds)
        same.pids = sorted(set(same.pids) | set(e.pids))
        if e.oldest_age_s is not None:
            same.oldest_age_s = max(same.oldest_age_s or 0, e.oldest_age_s)
        same.histogram = _add_buckets(same.histogram, e.histogram)
    into.total_entries += s.total_entries - len(s.entries)
    _add_counts(into.omitted, s.omitted)
    into.histogram = _add_buckets(into.histogram, s.histogram)
    for kind, n in s.cut_stacks.items():
        into.cut_stacks[kind] = into.cut_stacks.get(kind, 0) + n


def _add_buckets(a, b) -> List[Tuple[int, int, int]]:
    counts: Dict[Tuple[int, int], int] = {}
    for lo, hi, n in list(a) + list(b):
        counts[(lo, hi)] = counts.get((lo, hi), 0) + n
    return [(lo, hi, n) for (lo, hi), n in sorted(counts.items())]
