"""Reports: a snapshot -> a report (assemble), reports across time and hosts (history: growth,
diff, merge), live memory over time (timeseries). This module is the report model: plain data
that round-trips through JSON, what every format renders (probedsl.outputs) and what `probedsl
report` and `probedsl diff` read back from a saved run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from probedsl import ir
from probedsl.drivers.rundata import Live
from probedsl.stacks.symbolizer import Frame

SCHEMA = "probedsl.report"
# valgrind's leak kinds (probedsl.reachability.heapscan), worst first
KINDS = ("definitely_lost", "indirectly_lost", "possibly_lost", "still_reachable")
VERSION = 3  # 2: oldest_age_s may be null (tallied reports); sample, replaced
# 3: --reachability's kinds (resources.NAME.reachability, entries' reachability, reachability_scan)
# (fields added since without a bump, as readers ignore unknown ones: series)


@dataclass
class Entry:
    values: Dict[str, int]  # column label -> value ("bytes", "blocks")
    oldest_age_s: Optional[float]  # None unless every live entry was read (--ages, --min-age)
    pids: List[int]
    stack: List[Frame] = field(default_factory=list)
    kernel_stack: List[Frame] = field(default_factory=list)
    pid: Optional[int] = None
    comm: Optional[str] = None
    delta: Dict[str, int] = field(default_factory=dict)  # since the previous interval report
    growing: bool = False  # grew in each of the last K interval reports
    histogram: List[Tuple[int, int, int]] = field(default_factory=list)  # lifetime reports by group
    # --reachability: {kind: {"bytes": N, "blocks": N}} of its blocks (KINDS)
    kinds: Dict[str, Dict[str, int]] = field(default_factory=dict)
    # the live keys of its entries, when every live entry was read (--ages...): a check against
    # the kernel's own record (fdleak's (pid, fd) against /proc/PID/fd); a merge drops them
    keys: List[Tuple[int, ...]] = field(default_factory=list)

    def signature(self) -> str:
        """Identity across reports and runs: symbolic frames, not addresses (ASLR moves those)."""
        parts = [
            f"{f.function or hex(f.address)}+{f.offset}@{f.module.rsplit('/', 1)[-1]}"
            for f in self.stack + self.kernel_stack
            if not f.inlined
        ]
        if self.pid is not None:
            parts.append(f"pid={self.pid}")
        if self.comm is not None:
            parts.append(f"comm={self.comm}")
        return ";".join(parts)


@dataclass
class Reachability:
    """What a scan found (probedsl.reachability.heapscan): the kind of each block it saw, how it went."""

    kinds: Dict[Tuple[int, int], str]  # (pid, address) -> one of KINDS
    scan: dict  # pid, at ("exit" | "report"), pause_ms, scanned_bytes, scan_s
    leaks_only: bool = False  # stack entries leave still-reachable blocks out
    notes: List[str] = field(default_factory=list)
    scans: List[dict] = field(default_factory=list)  # one a process scanned (the tree of a run)

    def kind_of(self, res: ir.Resource, live: Live) -> Optional[str]:
        at = res.block_address
        return None if at is None else self.kinds.get((live.pid, live.key[at]))


def kind_totals(blocks) -> Dict[str, Dict[str, int]]:
    """{kind: {bytes, blocks}} of (kind, size) pairs; blocks no scan saw count as not_scanned."""
    totals = {k: {"bytes": 0, "blocks": 0} for k in KINDS}
    for kind, size in blocks:
        t = totals.setdefault(kind or "not_scanned", {"bytes": 0, "blocks": 0})
        t["bytes"] += size
        t["blocks"] += 1
    return totals


@dataclass
class Section:
    kind: str  # outstanding | lifetime
    resource: str
    by: List[str] = field(default_factory=list)
    columns: List[str] = field(default_factory=list)
    top: int = 0
    min_age_ms: int = 0
    entries: List[Entry] = field(default_factory=list)
    total_entries: int = 0
    omitted: Dict[str, int] = field(default_factory=dict)  # summed values of entries past top
    histogram: List[Tuple[int, int, int]] = field(default_factory=list)  # (min_ns, max_ns, count)
    cut_stacks: Dict[str, int] = field(default_factory=dict)  # entries whose stack ends early, by why


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
    sequence: int = 0  # 1, 2, ... for interval reports of one run
    sample: int = 1  # 1 in `sample` acquisitions recorded; values are scaled
    backend_version: str = ""  # the tracer's version ("0.23.2"), when known
    # --reachability: the scan behind the kinds: pid, at ("exit" | "report"), pause_ms,
    # scanned_bytes, scan_s
    scan: Optional[dict] = None
    series: Optional[dict] = None  # live memory over time (probedsl.report.timeseries), saved as is
    # why the data may miss something (a thread failed, the tracer died, a read never settled);
    # empty: complete. JSON: "complete" and "incomplete" (the reasons)
    incomplete: List[str] = field(default_factory=list)
    # processes of the target that could not be traced (process/unprobed.py): pid, comm, root
    untraced: List[dict] = field(default_factory=list)
    # --reachability: one scan a process (the traced one and each child at its exit), each with
    # pid, command and its kinds by resource
    scans: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        doc = {
            "schema": SCHEMA,
            "version": VERSION,
            "recipe": self.recipe,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "target": self.target,
            "duration_s": round(self.duration_s, 3),
            "final": self.final,
            "sequence": self.sequence,
            "sample": self.sample,
            "exit_status": self.exit_status,
            "complete": not self.incomplete,
            "incomplete": self.incomplete,
            "notes": self.notes,
            "resources": self.resources,
            "reports": [],
        }
        if self.untraced:
            doc["untraced"] = self.untraced
        if self.scan is not None:
            doc["reachability_scan"] = self.scan
        if self.scans:
            doc["reachability_scans"] = self.scans
        if self.series is not None:
            doc["series"] = self.series
        for s in self.sections:
            if s.kind == "lifetime":
                item = {"kind": "lifetime", "resource": s.resource, "by": s.by, "top": s.top}
                if s.by:
                    item["entries"] = [
                        {
                            "released": e.values["released"],
                            **_group_fields(e, s.by),
                            "histogram_ns": _hist_json(e.histogram),
                        }
                        for e in s.entries
                    ]
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
            doc["reports"].append(
                {
                    "kind": "outstanding",
                    "resource": s.resource,
                    "by": s.by,
                    "columns": s.columns,
                    "top": s.top,
                    "min_age_ms": s.min_age_ms,
                    "total_entries": s.total_entries,
                    "entries": entries,
                    "omitted": {"entries": s.total_entries - len(s.entries), **s.omitted},
                    **({"cut_stacks": s.cut_stacks} if "ustack" in s.by else {}),
                }
            )
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
                entries = [
                    _entry_from_dict(e, ["released"], _hist_tuples(e["histogram_ns"])) for e in r.get("entries", [])
                ]
                omitted = {k: v for k, v in r.get("omitted", {}).items() if k != "entries"}
                sections.append(
                    Section(
                        "lifetime",
                        r["resource"],
                        by,
                        ["released"] if by else [],
                        top=r.get("top", len(entries)),
                        entries=entries,
                        omitted=omitted,
                        total_entries=len(entries) + r.get("omitted", {}).get("entries", 0),
                        histogram=_hist_tuples(r.get("histogram_ns", [])),
                    )
                )
                continue
            columns = r["columns"]
            entries = [_entry_from_dict(e, columns) for e in r["entries"]]
            omitted = {k: v for k, v in r["omitted"].items() if k != "entries"}
            sections.append(
                Section(
                    "outstanding",
                    r["resource"],
                    r["by"],
                    columns,
                    r["top"],
                    r["min_age_ms"],
                    entries,
                    r["total_entries"],
                    omitted,
                    cut_stacks=r.get("cut_stacks", {}),
                )
            )
        return cls(
            doc["recipe"],
            doc["backend"],
            doc["target"],
            doc["duration_s"],
            doc["final"],
            doc["resources"],
            sections,
            doc.get("exit_status"),
            doc.get("notes", []),
            doc.get("sequence", 0),
            doc.get("sample", 1),
            doc.get("backend_version", ""),
            doc.get("reachability_scan"),
            doc.get("series"),
            doc.get("incomplete", []),
            doc.get("untraced", []),
            doc.get("reachability_scans", []),
        )


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
    return Entry(
        values={c: e[c] for c in columns},
        oldest_age_s=e.get("oldest_age_s"),
        pids=e.get("pids", []),
        stack=[Frame.from_dict(f) for f in e.get("stack", [])],
        kernel_stack=[Frame.from_dict(f) for f in e.get("kernel_stack", [])],
        pid=e.get("pid"),
        comm=e.get("comm"),
        delta=e.get("delta", {}),
        growing=e.get("growing", False),
        histogram=list(histogram),
        kinds=e.get("reachability", {}),
        keys=[tuple(k) for k in e.get("keys", [])],
    )
