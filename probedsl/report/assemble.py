"""A snapshot -> a report: live entries grouped and named, tallies ranked, notes on what could not be known."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set, Tuple

from probedsl import ir
from probedsl.ir import layout
from probedsl.stacks import stacktrust
from probedsl.drivers.rundata import Live, Snapshot
from probedsl.stacks.symbolizer import Symbolizer
from probedsl.report import Entry, Reachability, Report, Section, kind_totals


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
            resources[res.name]["reachability"] = kind_totals(
                (reachability.kind_of(res, l), l.size) for l in snapshot.live if l.resource == res.name)
        if layout.ends_with_image(res):
            resources[res.name].update(images_ended=t.images_ended if t else 0, image_lost=t.image_lost if t else 0)
        if t and t.image_lost:
            notes = [*notes, f"{t.image_lost} process-image records lost (a full table refused them): the "
                             f"{res.name} entries of an image an exec ended may be reported as leaks"]
        if t and t.ended_by_exec:
            how = ("the old program's, gone with its address space" if layout.every_entry_ends_with_image(res)
                   else "close-on-exec closed them")
            notes = [*notes, f"{t.ended_by_exec * scale} {res.name} entries ended with their process image at "
                             f"exec ({how}): not reported as leaks"]
        if t and t.untracked:
            also = ("; or, rarely, on a CPU where two probes had preempted another's stack walk"
                    if program.stacks == "dwarf" and backend == "bcc" else "")
            notes = [*notes, f"{t.untracked} {res.name} acquisitions not tracked (table full at "
                             f"{res.max_live} live; raise --max-live{also})"]
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
                         + ", ".join(sorted(cut)) + "): a frame-pointer walk cannot be "
                         "trusted past it, so those frames are not shown (marked [truncated: ...]); "
                         "--backend bcc --stacks dwarf unwinds them"]
    for sec in sections:
        if sec.cut_stacks:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(sec.cut_stacks.items()))
            notes = [*notes, f"{sum(sec.cut_stacks.values())} of {sec.total_entries} {sec.resource} stacks end early "
                             f"({kinds}): their last line says why"]
    return Report(program.name, backend, target, duration_s, snapshot.final, resources, sections,
                  exit_status, list(notes), sample=scale, backend_version=backend_version,
                  scan=reachability.scan if reachability is not None else None,
                  scans=reachability.scans if reachability is not None else [])


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
            kinds=kind_totals((kind_of(m), m.size * scale) for m in members) if scanned else {},
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
