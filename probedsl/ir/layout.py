"""The storage a program needs, computed once from the IR: the maps each generator declares
and writes, and that each driver reads back (names, record fields, counter slots)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from probedsl import ir


# entries per map: the live table holds --max-live; scratch one per thread inside a probed
# call; tallies one per group (keyed by stack: as many as the stack table has buckets);
# grouped lifetime histograms one per group and log2 bucket
THREADS = 65_536
# BCC keeps a resource's live entries in an array of this many slots first (bcc.c.j2's front;
# has_front): the hash then holds the rest
FRONT_SLOTS = 65_536
GROUPS = ir.STACK_BUCKETS
HISTOGRAM_GROUPS = 65_536
# bpftrace's tallies pack bytes above the low TALLY_SHIFT bits of the entry count (one map
# update for both): a group's count stays below 2^24 because --max-live must, bytes below 2^39
TALLY_SHIFT = 24
# the kernel's set of ended images holds this many (pid, image) pairs; past that, an old
# image's entries stay in the report (runs of this many execs are unusual for a traced program)
ENDED_IMAGES = 65_536


class Counter(enum.IntEnum):
    """In-kernel counters per resource, in slot order (rundata.Totals has the same order).
    untracked: acquisitions the full live table refused (with BCC's dwarf stacks, also the rare
    ones no program could store: a third preempting two on a CPU); replaced: a key acquired
    again with no release seen (the old entry is dropped); ungrouped: entries the full
    group-tally table could not count; ended_by_exec: entries whose process image an exec ended (the kernel counts
    those a new image's acquisition found under its key, the driver the rest: probedsl.drivers.images)."""

    ACQUIRED = 0
    RELEASED = 1
    UNKNOWN_RELEASES = 2
    UNTRACKED = 3
    REPLACED = 4
    UNGROUPED = 5
    ENDED_BY_EXEC = 6

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Tally:
    """Live (bytes, count, seen) per group of live-record fields `keys` (() : the total). The
    kernel keys a resource that ends with its process image by (pid, image) too: `shown` are
    the report's fields, what the groups are folded to once the ended images are taken out."""

    map: str
    keys: Tuple[str, ...]
    size: int = GROUPS
    shown: Optional[Tuple[str, ...]] = None  # None: the same as keys

    @property
    def seen_map(self) -> str:  # bpftrace keeps `seen` in a map of its own
        return f"{self.map}_seen"


@dataclass(frozen=True)
class Histogram:
    """log2(ns) of released lifetimes per group of live-record fields `keys`."""

    map: str
    keys: Tuple[str, ...]
    size: int = HISTOGRAM_GROUPS


@dataclass(frozen=True)
class ResourceLayout:
    name: str
    live: str  # key -> live record
    live_size: int  # --max-live
    key_arity: int
    fields: Tuple[str, ...]  # the live record, in storage order
    scratch: str  # tid -> (probe, sp, saved arguments) between entry and return
    scratch_width: int
    scratch_size: int
    counters: str  # one slot per Counter (or one map per counter: counter_map)
    tallies: Tuple[Tally, ...]
    lifetime: Optional[Histogram]
    ends_with_image: bool = False  # entries end at exec (ends_with_image)
    front_slots: int = 0  # BCC: key -> live record in an array of these first, then `live`

    @property
    def front(self) -> str:
        """The front's array ("": none)."""
        return f"{self.name}_front" if self.front_slots else ""

    def counter_map(self, counter: Counter) -> str:
        return f"{self.name}_{counter.label}"

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Dict[str, Any]) -> "ResourceLayout":
        hist = doc["lifetime"]
        return cls(
            doc["name"],
            doc["live"],
            doc["live_size"],
            doc["key_arity"],
            tuple(doc["fields"]),
            doc["scratch"],
            doc["scratch_width"],
            doc["scratch_size"],
            doc["counters"],
            tuple(
                Tally(t["map"], tuple(t["keys"]), t["size"], tuple(t["shown"]) if t.get("shown") is not None else None)
                for t in doc["tallies"]
            ),
            Histogram(hist["map"], tuple(hist["keys"]), hist["size"]) if hist else None,
            doc.get("ends_with_image", False),
            doc.get("front_slots", 0),
        )


def ends_with_image(res: ir.Resource) -> bool:
    """Whether a resource's entries (all or some) end when their process's image does (exec
    replaces the address space): every entry of a resource acquired by the process's own code
    (every_entry_ends_with_image), and those of a resource with `until exec when COND` whose
    COND held (descriptors that close-on-exec closes)."""
    return every_entry_ends_with_image(res) or any(a.until_exec is not None for p in res.probes for a in p.actions)


def every_entry_ends_with_image(res: ir.Resource) -> bool:
    """Those acquired by the process's own code (uprobes, USDT probes: heap blocks, mappings,
    FILE*, zlib streams, objects), keyed by the pid first. Objects of the kernel acquired at
    system calls or tracepoints (descriptors, kernel memory) outlive an exec unless the recipe
    says `until exec when COND`."""
    acquires = [a for p in res.probes for a in p.actions if a.kind == "acquire"]
    return (
        bool(acquires)
        and all(
            p.kind in (ir.ProbeKind.UPROBE, ir.ProbeKind.USDT)
            for p in res.probes
            if any(a.kind == "acquire" for a in p.actions)
        )
        and all(a.key and a.key[0] == ir.Builtin("pid") for a in acquires)
    )


def image_stamp(res: ir.Resource, action: ir.Action) -> Union[bool, ir.Value]:
    """What an acquisition or change stamps its entry with: True, the process's image (the entry
    ends with it); False, no image (0: it outlives every exec); a condition, the image when it
    holds (`until exec when COND`)."""
    if every_entry_ends_with_image(res):
        return True
    return action.until_exec if action.until_exec is not None else False


# the live-record and tally fields that tie an entry to its process image: the pid, and the
# image: CLOCK_MONOTONIC ns of the exec that started it, or the process's start time (0: none,
# the entry outlives every exec)
IMAGE_FIELDS = ("pid", "image")


def of(program: ir.Program, res: ir.Resource) -> ResourceLayout:
    hist = ir.lifetime_report(program, res)
    ends = ends_with_image(res)
    fields = list(ir.live_fields(res))
    if ends:
        fields += [f for f in IMAGE_FIELDS if f not in fields]

    def tally(i: int, keys: Tuple[str, ...]) -> Tally:
        if not ends:
            return Tally(f"{res.name}_tally{i}", keys)
        return Tally(f"{res.name}_tally{i}", tuple(dict.fromkeys(keys + IMAGE_FIELDS)), shown=keys)

    return ResourceLayout(
        name=res.name,
        live=f"{res.name}_live",
        live_size=res.max_live,
        key_arity=res.key_arity,
        fields=tuple(fields),
        scratch=f"{res.name}_scratch",
        scratch_width=res.scratch_width,
        scratch_size=THREADS,
        counters=f"{res.name}_counters",
        tallies=tuple(tally(i, keys) for i, keys in enumerate(ir.tallies(program, res))),
        lifetime=Histogram(f"{res.name}_lifetime", tuple(ir.lifetime_keys(program, res))) if hist else None,
        ends_with_image=ends,
        front_slots=FRONT_SLOTS if has_front(res) else 0,
    )


def has_front(res: ir.Resource) -> bool:
    """Whether BCC keeps the resource's entries in a front first: where --max-live leaves room
    for it, and no release takes a range of keys (close_range: its loop of look-ups in the
    front, 1,024 keys of 4 places each, is more than the verifier walks)."""
    ranged = any(a.through is not None for p in res.probes for a in p.actions)
    return res.max_live >= 4 * FRONT_SLOTS and not ranged


def dump(program: ir.Program) -> str:
    lines = []
    for res in program.resources:
        lay = of(program, res)
        lines.append(f"layout {lay.name}")
        lines.append(f"  {lay.live}[{lay.live_size}]: ({', '.join(res.key_names)}) -> ({', '.join(lay.fields)})")
        if lay.front:
            lines.append(f"  BCC: {lay.front}[{lay.front_slots}] first, {lay.live} the rest")
        lines.append(f"  {lay.scratch}[{lay.scratch_size}]: tid -> (probe, sp, {lay.scratch_width} saved argument(s))")
        lines.append(f"  {lay.counters}: {', '.join(c.label for c in Counter)}")
        if lay.ends_with_image:
            which = "entries" if every_entry_ends_with_image(res) else "entries whose `until exec` held"
            lines.append(f"  {which} end with their process image (exec): tallies keyed by (pid, image) too")
        for t in lay.tallies:
            lines.append(f"  {t.map}[{t.size}]: ({', '.join(t.keys)}) -> (bytes, count, seen)")
        if lay.lifetime:
            lines.append(
                f"  {lay.lifetime.map}[{lay.lifetime.size}]: ({', '.join(lay.lifetime.keys)}) -> log2(ns) histogram"
            )
    return "\n".join(lines) + "\n"


def counted(program: ir.Program, lay: ResourceLayout) -> List[Counter]:
    """The counters kept in the kernel; the driver derives the others, saving a map update on
    every acquire and release (~0.04x of the uprobe floor each): `released` is the number of
    lifetime-histogram entries, `acquired` is live + released + replaced + untracked, unless
    sampled (then only the counter is exact). `ungrouped` is BCC's (a failed stack id)."""
    derived = {Counter.UNGROUPED}
    if lay.lifetime:
        derived.add(Counter.RELEASED)
    res = next(r for r in program.resources if r.name == lay.name)
    if not any(a.kind == "release" for p in res.probes for a in p.actions):
        # never written, so never declared: bpftrace refuses to print such a map
        derived |= {Counter.RELEASED, Counter.UNKNOWN_RELEASES}
    if program.sample == 1:
        derived.add(Counter.ACQUIRED)
    if not lay.ends_with_image:
        derived.add(Counter.ENDED_BY_EXEC)
    return [c for c in Counter if c not in derived]
