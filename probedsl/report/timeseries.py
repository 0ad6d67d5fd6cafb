"""Live bytes and blocks over time: per resource, and per top stack, sampled once a period.

What the HTML report charts and the live view's growth columns read. Memory stays bounded on
long runs: past `max_points` samples, the older half keeps every second point (a gauge's value
at the kept times stays exact; old points get sparser, recent ones stay one per period).
Stacks are keyed by their raw group during the run (no symbolizing at each sample) and by
symbolic signature (report.Entry.signature, as diff and merge match entries) once saved.
"""

from __future__ import annotations

import heapq
from array import array
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from probedsl import ir
from probedsl.drivers.rundata import Snapshot

PERIOD_S = 1.0
MAX_POINTS = 512  # per series; past it the older half is thinned by two
TOP_PER_SAMPLE = 32  # the largest stacks of each sample join the tracked ones...
MAX_TRACKED = 128  # ...up to this many per run
NULL = -1  # not tracked yet at that point (arrays hold no None)
BUDGET = 0.1  # at most this share of the run goes to taking samples


def _stack_report(program: ir.Program, resource: str) -> Optional[ir.Report]:
    """The outstanding report grouping this resource by user stack, whose groups we follow."""
    return next(
        (r for r in program.reports if r.kind == "outstanding" and r.resource == resource and "ustack" in r.group_by),
        None,
    )


class Series:
    """Samples of one run. add() per period; to_dict() when a report is built."""

    def __init__(
        self,
        program: ir.Program,
        period_s: float = PERIOD_S,
        max_points: int = MAX_POINTS,
        top: int = TOP_PER_SAMPLE,
        tracked: int = MAX_TRACKED,
    ):
        self.program, self.period_s, self.max_points = program, period_s, max_points
        self.top, self.cap = top, tracked
        self.t = array("d")
        self.totals: Dict[str, Tuple[array, array]] = {r.name: (array("q"), array("q")) for r in program.resources}
        # raw group (resource, keys, group values) -> (bytes, blocks) arrays, NULL before it was tracked
        self.stacks: Dict[Tuple, Tuple[array, array]] = {}
        self.seen: Dict[Tuple, int] = {}  # raw group -> an acquisition time (which image)
        self.untracked = 0  # groups that would have joined past the cap
        # the first `exact` samples followed every group: a stack first seen later had 0 in them
        self.exact = 0
        self.every_s = period_s  # the sampling period, stretched when snapshots are slow
        self.thinned = 0  # how many times the older half was thinned

    def next_delay(self, cost_s: float) -> float:
        """Seconds to the next sample after one that took cost_s: the period, or longer when a
        snapshot is slow (bpftrace prints every tally: ~0.9 s for 4,000 stacks here)."""
        delay = max(self.period_s, cost_s / BUDGET)
        self.every_s = max(self.every_s, delay)
        return delay

    def add(self, t: float, snapshot: Snapshot) -> None:
        """One sample: t seconds since the run started."""
        from probedsl.report.assemble import live_totals

        scale = self.program.sample
        self.t.append(round(t, 3))
        current: Dict[Tuple, Tuple[int, int, int]] = {}
        for res in self.program.resources:
            nbytes, blocks = live_totals(self.program, snapshot, res)
            self.totals[res.name][0].append(nbytes * scale)
            self.totals[res.name][1].append(blocks * scale)
            current.update(self._groups(snapshot, res.name))
        largest = heapq.nlargest(self.top, current, key=lambda k: current[k][0])
        for key in largest:
            if key not in self.stacks:
                if len(self.stacks) >= self.cap:
                    self.untracked += 1
                    continue
                before = len(self.t) - 1
                prefix = array("q", [0]) * self.exact + array("q", [NULL]) * (before - self.exact)
                self.stacks[key] = (prefix, array("q", prefix))
                self.seen[key] = current[key][2]
        for key, (b, n) in self.stacks.items():
            nbytes, blocks, _ = current.get(key, (0, 0, 0))
            b.append(nbytes * scale)
            n.append(blocks * scale)
        if self.exact == len(self.t) - 1 and all(key in self.stacks for key in current):
            self.exact += 1
        if len(self.t) > self.max_points:
            self._thin()

    def _groups(self, snapshot: Snapshot, resource: str) -> Dict[Tuple, Tuple[int, int, int]]:
        """raw group -> (bytes, blocks, an acquisition time) of a resource's stack groups."""
        rep = _stack_report(self.program, resource)
        if rep is None:
            return {}
        keys = tuple(ir.group_keys(rep.group_by))
        out: Dict[Tuple, Tuple[int, int, int]] = {}
        tally = snapshot.tallies.get(resource, {}).get(keys)
        if tally is not None:
            for group, (nbytes, count, seen) in tally.items():
                out[(resource, keys, group)] = (nbytes, count, seen)
        elif snapshot.live is not None:
            for live in snapshot.live:
                if live.resource == resource:
                    key = (resource, keys, tuple(getattr(live, k) for k in keys))
                    b, n, _ = out.get(key, (0, 0, 0))
                    out[key] = (b + live.size, n + 1, live.time_ns)
        return out

    def _thin(self) -> None:
        """Keep every second point of the older half (the later of each pair)."""
        half = len(self.t) // 2
        keep = list(range(1, half, 2)) + list(range(half, len(self.t)))
        self.exact = sum(1 for i in keep if i < self.exact)
        for arr in [
            self.t,
            *(a for pair in self.totals.values() for a in pair),
            *(a for pair in self.stacks.values() for a in pair),
        ]:
            kept = [arr[i] for i in keep]
            del arr[:]
            arr.extend(kept)
        self.thinned += 1

    def to_dict(
        self,
        signature: Callable[[List[Tuple]], List[str]],
        snapshot: Optional[Snapshot] = None,
        started_ns: Optional[int] = None,
    ) -> dict:
        """The saved form. signature(raw groups) names the tracked groups (report.Entry.signature
        of their symbolized stacks); groups of one signature are summed. With a snapshot that read
        every live entry, `acquired` holds each stack's live blocks by acquisition second."""
        keys = list(self.stacks)
        names = signature([(k, self.seen.get(k, 0)) for k in keys]) if keys else []
        stacks: Dict[Tuple[str, str], Tuple[List, List]] = {}
        for key, sig in zip(keys, names):
            b, n = self.stacks[key]
            into = stacks.get((key[0], sig))
            if into is None:
                stacks[(key[0], sig)] = ([_none(v) for v in b], [_none(v) for v in n])
            else:
                for i in range(len(b)):
                    into[0][i] = _add(into[0][i], _none(b[i]))
                    into[1][i] = _add(into[1][i], _none(n[i]))
        doc = {
            "period_s": self.period_s,
            "t": list(self.t),
            "max_points": self.max_points,
            "thinned": self.thinned,
            "untracked_stacks": self.untracked,
            "slowest_period_s": round(self.every_s, 3),
            "resources": {name: {"bytes": list(b), "blocks": list(n)} for name, (b, n) in self.totals.items()},
            "groups": [
                {"resource": res, "signature": sig, "bytes": b, "blocks": n} for (res, sig), (b, n) in stacks.items()
            ],
        }
        if snapshot is not None and snapshot.live is not None and started_ns is not None:
            doc["acquired"] = self._acquired(snapshot, started_ns, signature)
        return doc

    def _acquired(self, snapshot: Snapshot, started_ns: int, signature) -> List[dict]:
        """Live blocks per stack by acquisition time (period buckets, seconds since the start)."""
        per: Dict[Tuple, Dict[float, List[int]]] = {}
        for live in snapshot.live:
            rep = _stack_report(self.program, live.resource)
            if rep is None:
                continue
            keys = tuple(ir.group_keys(rep.group_by))
            key = (live.resource, keys, tuple(getattr(live, k) for k in keys))
            self.seen.setdefault(key, live.time_ns)
            at = max(0.0, (live.time_ns - started_ns) / 1e9)
            bucket = round(at - at % self.period_s, 3)
            cell = per.setdefault(key, {}).setdefault(bucket, [0, 0])
            cell[0] += live.size * self.program.sample
            cell[1] += self.program.sample
        keys = list(per)
        names = signature([(k, self.seen.get(k, 0)) for k in keys]) if keys else []
        merged: Dict[Tuple[str, str], Dict[float, List[int]]] = {}
        for key, sig in zip(keys, names):
            into = merged.setdefault((key[0], sig), {})
            for at, (b, n) in per[key].items():
                cell = into.setdefault(at, [0, 0])
                cell[0] += b
                cell[1] += n
        return [
            {"resource": res, "signature": sig, "times": [[at, b, n] for at, (b, n) in sorted(cells.items())]}
            for (res, sig), cells in merged.items()
        ]


def _none(v: int) -> Optional[int]:
    return None if v == NULL else v


def _add(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return b if a is None else a if b is None else a + b


def growing_since(t: Sequence[float], values: Sequence[Optional[int]], steps: int, period_s: float) -> Optional[float]:
    """When a series' current run of growth began, if it grew in each of its last `steps`
    steps (a leak does; a cache that filled once does not); else None. A last step shorter
    than a period (the final report's sample) is joined to the one before it."""
    points = [(at, v) for at, v in zip(t, values) if v is not None]
    if len(points) >= 2 and points[-1][0] - points[-2][0] < period_s:
        points = points[:-2] + points[-1:]
    run = 0
    for i in range(len(points) - 1, 0, -1):
        if points[i][1] > points[i - 1][1]:
            run += 1
        else:
            break
    return points[len(points) - 1 - run][0] if run >= steps and run > 0 else None


def merge(docs: Sequence[dict]) -> Optional[dict]:
    """Series of several runs as one, aligned on time since each run's start (at the coarsest
    period): totals and same-signature stacks summed, each run's last value carried forward."""
    docs = [d for d in docs if d and d.get("t")]
    if not docs:
        return None
    period = max(d.get("period_s", PERIOD_S) for d in docs)
    grid = sorted({_slot(at, period) for d in docs for at in d["t"]})
    index = {slot: i for i, slot in enumerate(grid)}

    def resampled(d: dict, values: Sequence[Optional[int]]) -> List[Optional[int]]:
        out: List[Optional[int]] = [None] * len(grid)
        for at, v in zip(d["t"], values):
            out[index[_slot(at, period)]] = v
        last = None
        for i, v in enumerate(out):  # a gauge holds its value between samples
            if v is None:
                out[i] = last
            else:
                last = v
        return out

    def total(into: Dict, key, series: List[Optional[int]]) -> None:
        into[key] = [_add(a, b) for a, b in zip(into[key], series)] if key in into else series

    resources: Dict = {}
    stacks: Dict = {}
    for d in docs:
        for name, r in d["resources"].items():
            for col in ("bytes", "blocks"):
                total(resources, (name, col), resampled(d, r[col]))
        for s in d["groups"]:
            for col in ("bytes", "blocks"):
                total(stacks, (s["resource"], s["signature"], col), resampled(d, s[col]))
    names = dict.fromkeys(k[0] for k in resources)
    sigs = dict.fromkeys(k[:2] for k in stacks)
    return {
        "period_s": period,
        "t": [round(slot * period, 3) for slot in grid],
        "max_points": max(d.get("max_points", MAX_POINTS) for d in docs),
        "thinned": max(d.get("thinned", 0) for d in docs),
        "untracked_stacks": sum(d.get("untracked_stacks", 0) for d in docs),
        "resources": {
            n: {
                "bytes": [v or 0 for v in resources[(n, "bytes")]],
                "blocks": [v or 0 for v in resources[(n, "blocks")]],
            }
            for n in names
        },
        "groups": [
            {"resource": r, "signature": s, "bytes": stacks[(r, s, "bytes")], "blocks": stacks[(r, s, "blocks")]}
            for r, s in sigs
        ],
        **({"acquired": _merge_acquired(docs, period)} if any("acquired" in d for d in docs) else {}),
    }


def _merge_acquired(docs: Sequence[dict], period: float) -> List[dict]:
    cells: Dict[Tuple[str, str], Dict[float, List[int]]] = {}
    for d in docs:
        for a in d.get("acquired", []):
            into = cells.setdefault((a["resource"], a["signature"]), {})
            for at, b, n in a["times"]:
                cell = into.setdefault(round(_slot(at, period) * period, 3), [0, 0])
                cell[0] += b
                cell[1] += n
    return [
        {"resource": r, "signature": s, "times": [[at, b, n] for at, (b, n) in sorted(c.items())]}
        for (r, s), c in cells.items()
    ]


def _slot(at: float, period: float) -> int:
    return int(round(at / period))


def signer(program: ir.Program, symbolizer) -> Callable[[List[Tuple]], List[str]]:
    """Names raw groups as the report names their entries: Entry.signature of the stack
    symbolized the same way (trusted part, leaf return addresses as assemble.build treats them)."""
    from probedsl.report import Entry

    def sign(groups: List[Tuple]) -> List[str]:
        metas, batches = [], {}
        for i, ((resource, keys, group), seen) in enumerate(groups):
            res = next(r for r in program.resources if r.name == resource)
            leaf_returns = all(p.at_return for p in res.probes if any(a.kind == "acquire" for a in p.actions))
            fields = dict(zip(keys, group))
            # one symbolizer batch (one addr2line per module) per kind of leaf
            batches.setdefault(leaf_returns, []).append((i, (fields.get("pid", 0), fields.get("ustack", ()), seen)))
            metas.append((_stack_report(program, resource), fields))
        stacks: Dict[int, list] = {}
        for leaf_returns, asks in batches.items():
            for (i, _), stack in zip(asks, symbolizer.user_stacks([a for _, a in asks], leaf_returns)):
                stacks[i] = stack
        names = []
        for i, (rep, fields) in enumerate(metas):
            by = rep.group_by if rep else []
            names.append(
                Entry(
                    values={},
                    oldest_age_s=None,
                    pids=[],
                    stack=stacks[i],
                    kernel_stack=symbolizer.kernel_stack(fields["kstack"]) if "kstack" in fields else [],
                    pid=fields.get("pid") if "pid" in by else None,
                    comm=fields.get("comm") if "comm" in by else None,
                ).signature()
            )
        return names

    return sign
