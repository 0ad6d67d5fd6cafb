"""Snapshot -> report model: aggregated, symbolized, plain data that round-trips through JSON.

The model is what every format renders (probedsl.formats) and what `probedsl report` and
`probedsl diff` read back from a saved JSON run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple

from . import ir, layout, stacktrust
from .rundata import Live, Snapshot
from .symbolizer import Frame, Symbolizer

SCHEMA = "probedsl.report"
# valgrind's leak kinds (probedsl.heapscan), worst first
KINDS = ("definitely_lost", "indirectly_lost", "possibly_lost", "still_reachable")
VERSION = 3                # 2: oldest_age_s may be null (tallied reports); sample, replaced
                           # 3: --reachability's kinds (resources.NAME.reachability, entries' reachability, reachability_scan)
                           # (fields added since without a bump, as readers ignore unknown ones: series)


@dataclass
class Entry:
    values: Dict[str, int]             # column label -> value ("bytes", "blocks")
    oldest_age_s: Optional[float]      # None unless every live entry was read (--ages, --min-age)
    pids: List[int]
    stack: List[Frame] = field(default_factory=list)
    kernel_stack: List[Frame] = field(default_factory=list)
    pid: Optional[int] = None
    comm: Optional[str] = None
    delta: Dict[str, int] = field(default_factory=dict)   # since the previous interval report
    growing: bool = False              # grew in each of the last K interval reports
    histogram: List[Tuple[int, int, int]] = field(default_factory=list)  # lifetime reports by group
    # --reachability: {kind: {"bytes": N, "blocks": N}} of its blocks (probedsl.heapscan.KINDS)
    kinds: Dict[str, Dict[str, int]] = field(default_factory=dict)
    # the live keys of its entries, when every live entry was read (--ages...): a check against
    # the kernel's own record (fdleak's (pid, fd) against /proc/PID/fd); a merge drops them
    keys: List[Tuple[int, ...]] = field(default_factory=list)

    def signature(self) -> str:
        """Identity across reports and runs: symbolic frames, not addresses (ASLR moves those)."""
        parts = [f"{f.function or hex(f.address)}+{f.offset}@{f.module.rsplit('/', 1)[-1]}"
                 for f in self.stack + self.kernel_stack if not f.inlined]
        if self.pid is not None:
            parts.append(f"pid={self.pid}")
        if self.comm is not None:
            parts.append(f"comm={self.comm}")
        return ";".join(parts)


@dataclass
class Reachability:
    """What a scan found (probedsl.heapscan): the kind of each block it saw, how it went."""
    kinds: Dict[Tuple[int, int], str]      # (pid, address) -> one of KINDS
    scan: dict                             # pid, at ("exit" | "report"), pause_ms, scanned_bytes, scan_s
    leaks_only: bool = False               # stack entries leave still-reachable blocks out
    notes: List[str] = field(default_factory=list)

    def kind_of(self, res: ir.Resource, live: Live) -> Optional[str]:
        at = res.block_address
        return None if at is None else self.kinds.get((live.pid, live.key[at]))


def _kind_totals(blocks) -> Dict[str, Dict[str, int]]:
    """{kind: {bytes, blocks}} of (kind, size) pairs; blocks no scan saw count as not_scanned."""
    totals = {k: {"bytes": 0, "blocks": 0} for k in KINDS}
    for kind, size in blocks:
        t = totals.setdefault(kind or "not_scanned", {"bytes": 0, "blocks": 0})
        t["bytes"] += size
        t["blocks"] += 1
    return totals


@dataclass
class Section:
    kind: str                          # outstanding | lifetime
    resource: str
    by: List[str] = field(default_factory=list)
    columns: List[str] = field(default_factory=list)
    top: int = 0
    min_age_ms: int = 0
    entries: List[Entry] = field(default_factory=list)
    total_entries: int = 0
    omitted: Dict[str, int] = field(default_factory=dict)  # summed values of entries past top
    histogram: List[Tuple[int, int, int]] = field(default_factory=list)  # (min_ns, max_ns, count)
    cut_stacks: Dict[str, int] = field(default_factory=dict)   # entries whose stack ends early, by why


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
    sequence: int = 0                  # 1, 2, ... for interval reports of one run
    sample: int = 1                    # 1 in `sample` acquisitions recorded; values are scaled
    backend_version: str = ""          # the tracer's version ("0.23.2"), when known
    # --reachability: the scan behind the kinds: pid, at ("exit" | "report"), pause_ms,
    # scanned_bytes, scan_s
    scan: Optional[dict] = None
    series: Optional[dict] = None      # live memory over time (probedsl.timeseries), saved as is
    # why the data may miss something (a thread failed, the tracer died, a read never settled);
    # empty: complete. JSON: "complete" and "incomplete" (the reasons)
    incomplete: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        doc = {"schema": SCHEMA, "version": VERSION, "recipe": self.recipe, "backend": self.backend,
               "backend_version": self.backend_version, "target": self.target, "duration_s": round(self.duration_s, 3), "final": self.final,
               "sequence": self.sequence, "sample": self.sample, "exit_status": self.exit_status,
               "complete": not self.incomplete, "incomplete": self.incomplete, "notes": self.notes,
               "resources": self.resources, "reports": []}
        if self.scan is not None:
            doc["reachability_scan"] = self.scan
        if self.series is not None:
            doc["series"] = self.series
        for s in self.sections:
            if s.kind == "lifetime":
                item = {"kind": "lifetime", "resource": s.resource, "by": s.by, "top": s.top}
                if s.by:
                    item["entries"] = [{"released": e.values["released"], **_group_fields(e, s.by),
                                        "histogram_ns": _hist_json(e.histogram)} for e in s.entries]
                    item["omitted"] = {"entries": s.total_entries - len(s.entries), **s.omitted}
                else:
                    item["histogram_ns"] = _hist_json(s.histogram)
                doc["reports"].append(item)
                continue
            entries = []
            for e in s.entries:
                item = dict(e.values)
                item.update(oldest_age_s=e.oldest_age_s, pids=e.pids)
                if e.delta:
                    item["delta"] = e.delta
                item["growing"] = e.growing
                if e.kinds:
                    item["reachability"] = e.kinds
                if e.keys:
                    item["keys"] = [list(k) for k in e.keys]
                item.update(_group_fields(e, s.by))
                entries.append(item)
            doc["reports"].append({"kind": "outstanding", "resource": s.resource, "by": s.by,
                                   "columns": s.columns, "top": s.top, "min_age_ms": s.min_age_ms,
                                   "total_entries": s.total_entries, "entries": entries,
                                   "omitted": {"entries": s.total_entries - len(s.entries), **s.omitted},
                                   **({"cut_stacks": s.cut_stacks} if "ustack" in s.by else {})})
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> "Report":
        if doc.get("schema") != SCHEMA:
            raise ValueError("not a probedsl report (no \"schema\": \"probedsl.report\")")
        if doc.get("version", 0) > VERSION:
            raise ValueError(f"report version {doc.get('version')} is newer than this probedsl reads ({VERSION})")
        sections = []
        for r in doc["reports"]:
            if r["kind"] == "lifetime":
                by = r.get("by", [])
                entries = [_entry_from_dict(e, ["released"], _hist_tuples(e["histogram_ns"])) for e in r.get("entries", [])]
                omitted = {k: v for k, v in r.get("omitted", {}).items() if k != "entries"}
                sections.append(Section("lifetime", r["resource"], by, ["released"] if by else [],
                                        top=r.get("top", len(entries)), entries=entries, omitted=omitted,
                                        total_entries=len(entries) + r.get("omitted", {}).get("entries", 0),
                                        histogram=_hist_tuples(r.get("histogram_ns", []))))
                continue
            columns = r["columns"]
            entries = [_entry_from_dict(e, columns) for e in r["entries"]]
            omitted = {k: v for k, v in r["omitted"].items() if k != "entries"}
            sections.append(Section("outstanding", r["resource"], r["by"], columns, r["top"], r["min_age_ms"],
                                    entries, r["total_entries"], omitted, cut_stacks=r.get("cut_stacks", {})))
        return cls(doc["recipe"], doc["backend"], doc["target"], doc["duration_s"], doc["final"],
                   doc["resources"], sections, doc.get("exit_status"), doc.get("notes", []),
                   doc.get("sequence", 0), doc.get("sample", 1), doc.get("backend_version", ""),
                   doc.get("reachability_scan"), doc.get("series"), doc.get("incomplete", []))


def stack_entries(report: Report):
    """(section, root-first [(frame, in the kernel)], weight) of each stack entry of the
    outstanding sections, weight = the first column: what the stack formats draw."""
    for s in report.sections:
        if s.kind != "outstanding" or not s.columns:
            continue
        for e in s.entries:
            # innermost first, the kernel's frames (a system call's) inside the user's
            frames = [(f, True) for f in e.kernel_stack] + [(f, False) for f in e.stack]
            yield s, frames[::-1], e.values[s.columns[0]]


def _hist_json(buckets) -> List[dict]:
    return [{"min": lo, "max": hi, "count": n} for lo, hi, n in buckets]


def _hist_tuples(items) -> List[Tuple[int, int, int]]:
    return [(b["min"], b["max"], b["count"]) for b in items]


def _group_fields(e: Entry, by: Sequence[str]) -> dict:
    out = {}
    if e.pid is not None:
        out["pid"] = e.pid
    if e.comm is not None:
        out["comm"] = e.comm
    if "ustack" in by:
        out["stack"] = [f.as_dict() for f in e.stack]
        out["truncated"] = bool(e.stack and e.stack[-1].truncated)
    if "kstack" in by:
        out["kernel_stack"] = [f.as_dict() for f in e.kernel_stack]
    return out


def _entry_from_dict(e: dict, columns: Sequence[str], histogram=()) -> Entry:
    return Entry(values={c: e[c] for c in columns}, oldest_age_s=e.get("oldest_age_s"),
                 pids=e.get("pids", []), stack=[Frame.from_dict(f) for f in e.get("stack", [])],
                 kernel_stack=[Frame.from_dict(f) for f in e.get("kernel_stack", [])],
                 pid=e.get("pid"), comm=e.get("comm"), delta=e.get("delta", {}),
                 growing=e.get("growing", False), histogram=list(histogram), kinds=e.get("reachability", {}),
                 keys=[tuple(k) for k in e.get("keys", [])])


def _group_key(live: Live, by: Sequence[str], generation=lambda pid, t: 0,
               trusted=lambda pid, stack, t: stack) -> Tuple:
    parts = []
    for g in by:
        if g == "ustack":
            # addresses only mean something in one address space: a process, since an exec
            parts.append((live.pid, generation(live.pid, live.time_ns), trusted(live.pid, live.ustack, live.time_ns)))
        else:
            parts.append(getattr(live, g))
    return tuple(parts)


def referenced_pids(program: ir.Program, snapshot: Snapshot) -> Set[int]:
    """Processes whose mappings a report of this snapshot may need: owners of live entries,
    tally groups and lifetime groups keyed by pid."""
    pids = {l.pid for l in snapshot.live or []}
    for res in program.resources:
        for keys, groups in snapshot.tallies.get(res.name, {}).items():
            if "pid" in keys:
                pids.update(group[keys.index("pid")] for group in groups)
        keys = ir.lifetime_keys(program, res)
        t = snapshot.totals.get(res.name)
        if t and "pid" in keys:
            pids.update(group[keys.index("pid")] for group in t.lifetime)
    return pids


def live_totals(program: ir.Program, snapshot: Snapshot, res: ir.Resource) -> Tuple[int, int]:
    """(bytes, entries) live for a resource: from its entries when read, else from a tally."""
    if snapshot.live is not None:
        live = [l for l in snapshot.live if l.resource == res.name]
        return sum(l.size for l in live), len(live)
    groups = snapshot.tallies.get(res.name, {}).get(ir.tallies(program, res)[0], {})
    return sum(g[0] for g in groups.values()), sum(g[1] for g in groups.values())


def _stackless(program: ir.Program, snapshot: Snapshot, res: ir.Resource) -> int:
    """Live entries with no user stack (the kernel's stack table dropped it)."""
    if snapshot.live is not None:
        return sum(1 for l in snapshot.live if l.resource == res.name and not l.ustack)
    for keys, groups in snapshot.tallies.get(res.name, {}).items():
        if "ustack" in keys:
            at = keys.index("ustack")
            return sum(g[1] for group, g in groups.items() if not group[at])
    return 0


def build(program: ir.Program, snapshot: Snapshot, symbolizer: Symbolizer, *, backend: str, target: str,
          backend_version: str = "",
          duration_s: float, top: Optional[int] = None, min_age_s: Optional[float] = None,
          exit_status: Optional[int] = None, notes: Sequence[str] = (),
          reachability: Optional[Reachability] = None, complete: bool = False) -> Report:
    """The report of a snapshot. Sections keep their `top` (what the text view shows); with
    `complete` they hold every entry, symbolized (saved and machine formats), else only the
    top ones and a sum of the rest (the text view: symbolizing thousands of stacks takes
    seconds)."""
    scale = program.sample                 # 1 in `scale` acquisitions recorded
    resources = {}
    for res in program.resources:
        t = snapshot.totals.get(res.name)
        live_bytes, live_count = live_totals(program, snapshot, res)
        resources[res.name] = {
            **({"live_bytes": live_bytes * scale} if res.records("size") else {}),
            "live_blocks": live_count * scale,
            "acquired": t.acquired if t else 0, "released": (t.released if t else 0) * scale,
            "unknown_releases": t.unknown_releases if t else 0,
            "untracked": (t.untracked if t else 0) * scale,
            "replaced": t.replaced if t else 0,
            "ended_by_exec": (t.ended_by_exec if t else 0) * scale}
        if t and scale == 1:
            # every report checks itself: what the counters say is live against what it shows
            expected = t.acquired - t.released - t.untracked - t.replaced - t.ended_by_exec
            missing = expected - live_count - (t.ungrouped if snapshot.live is None else 0)
            resources[res.name]["unaccounted"] = missing
            if missing:
                cause = ("read while tracing: events in flight between the counters and the tallies"
                         if not snapshot.final else "the per-group tallies lost or gained entries")
                notes = [*notes, f"{missing} live {res.name} entries unaccounted for: the counters say {expected} "
                                 f"(acquired - released - untracked - replaced - ended_by_exec), the report "
                                 f"holds {live_count}; "
                                 f"{cause}"]
        if reachability is not None and res.block_address is not None and snapshot.live is not None:
            resources[res.name]["reachability"] = _kind_totals(
                (reachability.kind_of(res, l), l.size) for l in snapshot.live if l.resource == res.name)
        if layout.ends_with_image(res):
            resources[res.name].update(images_ended=t.images_ended if t else 0, image_lost=t.image_lost if t else 0)
        if t and t.image_lost:
            notes = [*notes, f"{t.image_lost} process-image records lost (a full table refused them): the "
                             f"{res.name} entries of an image an exec ended may be reported as leaks"]
        if t and t.ended_by_exec:
            notes = [*notes, f"{t.ended_by_exec * scale} {res.name} entries ended with their process image at "
                             f"exec (the old program's, gone with its address space): not reported as leaks"]
        if t and t.untracked:
            notes = [*notes, f"{t.untracked} {res.name} acquisitions not tracked (table full at "
                             f"{res.max_live} live; raise --max-live)"]
        if t and t.ungrouped:
            notes = [*notes, f"{t.ungrouped} {res.name} entries are missing from the per-group tallies "
                             f"(tally table full); the totals above are exact"]
        if res.records("ustack"):
            # the kernel's stack table drops a stack whose hash bucket is taken, the unwinder one
            # it cannot take while preempted: say so
            lost = _stackless(program, snapshot, res)
            resources[res.name]["no_stack"] = lost * scale
            if lost:
                cause = ("the stack table was full, or the probe preempted another one's walk on the "
                         "same CPU" if program.stacks == "dwarf" and backend == "bcc"
                         else "stack table collision or full")
                notes = [*notes, f"{lost * scale} live {res.name} entries have no user stack ({cause}); "
                                 f"they are grouped under an empty stack"]
    if scale > 1:
        notes = [*notes, f"sampled: 1 in {scale} acquisitions recorded; live bytes, counts and releases are "
                         f"estimates (x{scale}); releases of unsampled entries count as unknown releases"]
    symbolizer.refresh()                   # the mappings told so far, for every stack below
    sections = []
    for rep in program.reports:
        if rep.kind == "lifetime":
            sections.append(_lifetime(program, rep, snapshot, symbolizer, top if top is not None else rep.top,
                                      complete))
            continue
        min_age_ms = rep.min_age_ms if min_age_s is None else int(min_age_s * 1000)
        res = next(r for r in program.resources if r.name == rep.resource)
        leaf_returns = all(p.at_return for p in res.probes if any(a.kind == "acquire" for a in p.actions))
        shown = top if top is not None else rep.top
        if snapshot.live is None:
            sections.append(_tallied(rep, snapshot, symbolizer, shown, leaf_returns, scale, complete))
        else:
            sections.append(_outstanding(rep, snapshot, symbolizer, shown, min_age_ms, leaf_returns, scale,
                                         res, reachability, complete))
    cut = {e.stack[-1].truncated.split(" in ")[-1] for sec in sections for e in sec.entries
           if e.stack and e.stack[-1].truncated.startswith("no frame pointer")}
    if cut:
        notes = [*notes, "stacks end at the first frame whose code keeps no frame pointer ("
                         + ", ".join(sorted(cut)) + "): the kernel's frame-pointer walk cannot be "
                         "trusted past it, so those frames are not shown (marked [truncated: ...]); "
                         "--backend bcc --stacks dwarf unwinds them"]
    for sec in sections:
        if sec.cut_stacks:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(sec.cut_stacks.items()))
            notes = [*notes, f"{sum(sec.cut_stacks.values())} of {sec.total_entries} {sec.resource} stacks end early "
                             f"({kinds}): their last line says why"]
    return Report(program.name, backend, target, duration_s, snapshot.final, resources, sections,
                  exit_status, list(notes), sample=scale, backend_version=backend_version,
                  scan=reachability.scan if reachability is not None else None)


def _rank(rows, labels, since):
    """Largest first column first, then most entries, then the earliest `since(row)`."""
    first = labels[0] if labels else None
    rows.sort(key=lambda r: (-(r[0][first] if first else 0), -r[1], since(r)))


def _tallied(rep: ir.Report, snapshot: Snapshot, symbolizer: Symbolizer, top: int, leaf_returns: bool,
             scale: int, complete: bool = False) -> Section:
    """The report from the kernel's per-group tallies: no entry is read, no oldest age."""
    keys = ir.group_keys(rep.group_by)
    groups = snapshot.tallies.get(rep.resource, {}).get(tuple(keys), {})
    if "ustack" in keys:         # stacks that read the same once cut where they stop being certain
        at, merged = keys.index("ustack"), {}
        for group, (nbytes, count, seen) in groups.items():
            fields = dict(zip(keys, group))
            key = group[:at] + (symbolizer.trusted(fields.get("pid", 0), group[at], seen),) + group[at + 1:]
            b, n, s = merged.get(key, (0, 0, 0))
            merged[key] = (b + nbytes, n + count, max(s, seen))
        groups = merged
    labels = [label for _, label in rep.columns]
    rows = []
    for group, (nbytes, count, seen) in groups.items():
        values = {label: ir.Aggregation(fn).of(nbytes, count) * scale for fn, label in rep.columns}
        rows.append((values, count, dict(zip(keys, group), seen=seen)))
    _rank(rows, labels, lambda r: r[2]["seen"])
    shown, rest = _keep(rows, top, complete)
    ustacks = symbolizer.user_stacks([(g["pid"], g["ustack"], g["seen"]) for _, _, g in shown], leaf_returns) \
        if "ustack" in keys else [[] for _ in shown]
    entries = [Entry(values=values, oldest_age_s=None, pids=[g["pid"]] if "pid" in g else [], stack=stack,
                     kernel_stack=symbolizer.kernel_stack(g["kstack"]) if "kstack" in g else [],
                     pid=g.get("pid") if "pid" in rep.group_by else None,
                     comm=g.get("comm") if "comm" in rep.group_by else None)
               for (values, _, g), stack in zip(shown, ustacks)]
    omitted = {label: sum(r[0][label] for r in rest) for label in labels}
    cut = _cut_stacks(g["ustack"] for _, _, g in rows) if "ustack" in keys else {}
    return Section("outstanding", rep.resource, list(rep.group_by), labels, top, 0, entries, len(rows), omitted,
                   cut_stacks=cut)


def _outstanding(rep: ir.Report, snapshot: Snapshot, symbolizer: Symbolizer, top: int, min_age_ms: int,
                 leaf_returns: bool, scale: int, res: Optional[ir.Resource] = None,
                 reachability: Optional[Reachability] = None, complete: bool = False) -> Section:
    """The report from every live entry (read on request): exact oldest ages, --min-age, and
    with a scan, each entry's leak kinds."""
    groups: Dict[Tuple, List[Live]] = {}
    tracker = getattr(symbolizer, "tracker", None)
    generation = tracker.generation_start if tracker is not None else (lambda pid, t: 0)
    scanned = reachability is not None and res is not None and res.block_address is not None
    kind_of = (lambda l: reachability.kind_of(res, l)) if scanned else (lambda l: None)
    for l in snapshot.live:
        if l.resource != rep.resource or (scanned and reachability.leaks_only and kind_of(l) == "still_reachable"):
            continue
        if snapshot.now_ns - l.time_ns >= min_age_ms * 1_000_000:
            groups.setdefault(_group_key(l, rep.group_by, generation, symbolizer.trusted), []).append(l)
    labels = [label for _, label in rep.columns]
    rows = []
    for members in groups.values():
        values = {label: ir.Aggregation(fn).of(sum(m.size for m in members), len(members)) * scale
                  for fn, label in rep.columns}
        rows.append((values, len(members), members))
    _rank(rows, labels, lambda r: min(m.time_ns for m in r[2]))
    shown, rest = _keep(rows, top, complete)
    # symbolize only what is shown, all stacks in one batch
    ustacks = symbolizer.user_stacks([(r[2][0].pid, r[2][0].ustack, r[2][0].time_ns) for r in shown], leaf_returns) \
        if "ustack" in rep.group_by else [[] for _ in shown]
    entries = []
    for (values, _, members), stack in zip(shown, ustacks):
        sample = members[0]
        entries.append(Entry(
            values=values, oldest_age_s=round((snapshot.now_ns - min(m.time_ns for m in members)) / 1e9, 3),
            pids=sorted({m.pid for m in members}), stack=stack,
            kernel_stack=symbolizer.kernel_stack(sample.kstack) if "kstack" in rep.group_by else [],
            pid=sample.pid if "pid" in rep.group_by else None,
            comm=sample.comm if "comm" in rep.group_by else None,
            kinds=_kind_totals((kind_of(m), m.size * scale) for m in members) if scanned else {},
            keys=sorted(m.key for m in members)))
    omitted = {label: sum(r[0][label] for r in rest) for label in labels}
    cut = _cut_stacks(key[rep.group_by.index("ustack")][2] for key in groups) if "ustack" in rep.group_by else {}
    return Section("outstanding", rep.resource, list(rep.group_by), labels, top, min_age_ms, entries,
                   len(rows), omitted, cut_stacks=cut)


def _keep(rows: list, top: int, complete: bool):
    """(rows kept in the section, rows only summed)."""
    return (rows, []) if complete else (rows[:top], rows[top:])


def _cut_stacks(stacks) -> Dict[str, int]:
    """How many of these (trusted) stacks end early, by why."""
    counts: Dict[str, int] = {}
    for stack in stacks:
        kind = stacktrust.cut_kind(stack)
        if kind:
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def _lifetime(program: ir.Program, rep: ir.Report, snapshot: Snapshot, symbolizer: Symbolizer, top: int,
              complete: bool = False) -> Section:
    t = snapshot.totals.get(rep.resource)
    scale = program.sample
    groups = {k: [(lo, hi, n * scale) for lo, hi, n in b] for k, b in t.lifetime.items()} if t else {}
    if not rep.group_by:
        return Section("lifetime", rep.resource, histogram=groups.get((), []))
    res = next(r for r in program.resources if r.name == rep.resource)
    keys = ir.lifetime_keys(program, res)
    if "ustack" in keys:
        at, merged = keys.index("ustack"), {}
        for key, buckets in groups.items():
            fields = dict(zip(keys, key))
            cut = key[:at] + (symbolizer.trusted(fields.get("pid", 0), key[at]),) + key[at + 1:]
            counts = merged.setdefault(cut, {})
            for lo, hi, n in buckets:
                counts[(lo, hi)] = counts.get((lo, hi), 0) + n
        groups = {k: [(lo, hi, n) for (lo, hi), n in sorted(c.items())] for k, c in merged.items()}
    rows = sorted(groups.items(), key=lambda kv: -sum(n for _, _, n in kv[1]))
    shown, rest = _keep(rows, top, complete)
    named = [dict(zip(keys, key)) for key, _ in shown]
    stacks = symbolizer.user_stacks([(k.get("pid", 0), k.get("ustack", ())) for k in named]) \
        if "ustack" in keys else [[] for _ in shown]
    entries = []
    for (_key, buckets), fields, stack in zip(shown, named, stacks):
        entries.append(Entry(values={"released": sum(n for _, _, n in buckets)}, oldest_age_s=0.0,
                             pids=[fields["pid"]] if "pid" in fields else [], stack=stack,
                             kernel_stack=symbolizer.kernel_stack(fields["kstack"]) if "kstack" in fields else [],
                             pid=fields.get("pid") if "pid" in rep.group_by else None,
                             comm=fields.get("comm") if "comm" in rep.group_by else None, histogram=buckets))
    omitted = {"released": sum(n for _, b in rest for _, _, n in b)}
    return Section("lifetime", rep.resource, list(rep.group_by), ["released"], top, 0, entries, len(rows), omitted)


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
        s_old = next((s for s in old.sections if s.kind == "outstanding" and s.resource == s_new.resource
                      and s.by == s_new.by), None)
        before = {e.signature(): e for e in (s_old.entries if s_old else [])}
        after = {e.signature(): e for e in s_new.entries}
        # a run saved with only its top entries (by an older probedsl) may hold
        # the stack among those it summed: not "new" or "gone" then, but unknown
        old_whole = s_old is None or s_old.total_entries == len(s_old.entries)
        new_whole = s_new.total_entries == len(s_new.entries)
        for sig in list(after) + [k for k in before if k not in after]:
            a, b = before.get(sig), after.get(sig)
            values = {c: ((a.values.get(c, 0) if a else 0), (b.values.get(c, 0) if b else 0)) for c in s_new.columns}
            status = ("both" if a and b else "new" if b and old_whole else "gone" if a and new_whole
                      else "not in the other run's top entries")
            rows.append({"resource": s_new.resource, "signature": sig, "values": values,
                         "entry": b or a, "status": status})
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
        notes.append(f"{cut} sections of the runs held only their top entries: their other entries are "
                     "summed in `omitted`, not matched by stack")
    from .timeseries import merge as merge_series
    return Report(first.recipe, first.backend, f"{len(reports)} runs", max(r.duration_s for r in reports),
                  all(r.final for r in reports), resources, sections, None, notes, 0,
                  max(r.sample for r in reports), first.backend_version,
                  series=merge_series([r.series for r in reports if r.series]))


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
            same = Entry(values={}, oldest_age_s=None, pids=[], stack=e.stack, kernel_stack=e.kernel_stack,
                         pid=e.pid, comm=e.comm)
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
