"""Reading a loaded BCC program's maps into a snapshot: counters, live entries, tallies and histograms, read again while the counters move under it."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Dict, List, Optional, Tuple

from probedsl.drivers import images
from probedsl.drivers.bcc_front import Front
from probedsl.ir import stackformat
from probedsl.ir.layout import Counter, ResourceLayout
from probedsl.process.procfs import process_alive
from probedsl.drivers.rundata import Live, Snapshot, Totals


class BccReading:
    """The reading half of BccLoader (a base of it: it reads the loader's maps)."""

    fronts: Dict[str, Front]
    fronts_lock: threading.Lock

    def snapshot(self, final: bool = False) -> Snapshot:
        """What the maps hold. Read while processes run, the counters and the tallies can be
        read across an event: they are read again until the counters did not move meanwhile.
        The final one first stops every probe, so it always settles."""
        if final:
            self.bpf["probedsl_stopped"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        for _ in range(READ_TRIES):
            counted = self._counters()
            snap = self._read(counted, final)
            if self._counters() == counted:
                break
        else:
            snap.incomplete.append(
                f"the counters moved during each of {READ_TRIES} reads: totals and tables "
                "may disagree by the events of one read"
            )
        return snap

    def live_of(self, pid: int) -> Tuple[List[Tuple[str, tuple, int]], int]:
        """One process's live entries (resource, key, size), its ended images' left out, and the
        acquisitions the tables refused: what a scan at its exit needs, without reading every
        stack and tally as a snapshot does."""
        counted = {name: Totals(*c) for name, c in self._counters().items()}
        ended = (
            {k.image for k, _ in _items(self.bpf["probedsl_ended"]) if k.pid == pid}
            if any(lay.ends_with_image for lay in self.layouts)
            else set()
        )
        out = []
        for lay in self.layouts:
            if "pid" not in lay.fields:
                continue
            t = counted[lay.name]
            for k, v in self.live_entries(lay, t.acquired - t.released - t.untracked):
                if v.pid == pid and not ("image" in lay.fields and v.image in ended):
                    size = v.size if "size" in lay.fields else 0
                    out.append((lay.name, tuple(k.k[i] for i in range(lay.key_arity)), size))
        return out, sum(t.untracked for t in counted.values())

    def live_entries(self, lay: ResourceLayout, population: Optional[int] = None) -> list:
        """A resource's live entries (key, record): its front's, then its hash's (population:
        about how many it holds, if known: a few are found without reading every bucket)."""
        out = [(e.k, e.v) for _, e in self.front(lay).items()] if lay.front else []
        table = self.bpf[lay.live]
        return out + (_items(table) if population is None else _sparse_items(table, max(0, population - len(out))))

    def front(self, lay: ResourceLayout) -> Front:
        """The resource's front, mapped once (by the first thread to ask)."""
        with self.fronts_lock:
            if lay.name not in self.fronts:
                self.fronts[lay.name] = Front(self.bpf[lay.front])
            return self.fronts[lay.name]

    def close_fronts(self) -> None:
        with self.fronts_lock:
            for front in self.fronts.values():
                try:
                    front.close()
                except BufferError:  # a reader's copy of the words still out: unmapped at exit
                    pass
            self.fronts.clear()

    def _counters(self) -> Dict[str, List[int]]:
        out = {}
        for lay in self.layouts:
            counters = self.bpf[lay.counters]
            out[lay.name] = [counters.sum(counters.Key(int(c))).value for c in Counter]
        return out

    def _read(self, counted: Dict[str, List[int]], final: bool) -> Snapshot:
        now = time.monotonic_ns()
        live: Optional[List[Live]] = None
        totals: Dict[str, Totals] = {}
        # self.bpf[name] caches each table: get_table() builds new ctypes key/leaf types on
        # every call, which are never freed (the hour-long soak grew ~32 MB that way)
        tables = {}
        for name in ("probedsl_stacks", "probedsl_ustacks"):  # the kernel's walks; those kept by hash
            try:
                tables[name] = self.bpf[name]
            except KeyError:  # the recipe records no such stacks
                pass
        walked: Dict[Tuple[str, int], tuple] = {}

        def stack(stack_id: int, field: str = "ustack") -> tuple:
            hashed = field == "ustack" and stack_id >= stackformat.HASHED_ID
            table = tables.get("probedsl_ustacks" if hashed else "probedsl_stacks")
            if stack_id < 0 or table is None:
                return ()
            if (field, stack_id) not in walked:
                try:  # not stacks.walk(): it reads 127 frames, the table holds fewer
                    walked[field, stack_id] = _frames(table[table.Key(stack_id)].ip)
                except KeyError:
                    walked[field, stack_id] = ()
                python = getattr(self, "python", None)
                if field == "ustack" and python is not None and walked[field, stack_id]:
                    # the Python frames go before the marker ending the stack
                    native = walked[field, stack_id]
                    walked[field, stack_id] = native[:-1] + python.frames_of(stack_id) + native[-1:]
            return walked[field, stack_id]

        tallies: Dict[str, dict] = {}
        for lay in self.layouts:
            name, fields = lay.name, lay.fields
            tallies[name] = {t.keys: self._tally(t.map, list(t.keys), stack) for t in lay.tallies}
            if self.manifest.get("read_live"):
                live = (live or []) + [
                    Live(
                        resource=name,
                        key=tuple(k.k[i] for i in range(lay.key_arity)),
                        time_ns=v.time,
                        size=v.size if "size" in fields else 0,
                        pid=v.pid if "pid" in fields else 0,
                        tid=v.tid if "tid" in fields else 0,
                        ustack=stack(v.ustack, "ustack") if "ustack" in fields else (),
                        kstack=stack(v.kstack, "kstack") if "kstack" in fields else (),
                        comm=v.comm.decode(errors="replace") if "comm" in fields else "",
                        image=v.image if "image" in fields else 0,
                    )
                    for k, v in self.live_entries(lay)
                ]
            t = Totals(*counted[name])
            if lay.lifetime:
                t.lifetime = _histograms(self.bpf[lay.lifetime.map], list(lay.lifetime.keys), stack)
            totals[name] = t
        snap = Snapshot(now, live, totals, final, tallies)
        if any(lay.ends_with_image for lay in self.layouts):
            lost = self.bpf["probedsl_image_lost"]
            images.settle(
                self.layouts,
                snap,
                ((k.pid, k.image) for k, _ in _items(self.bpf["probedsl_ended"])),
                lost[lost.Key(0)].value,
            )
            if self.ended_images is not None:
                self.ended_images.add_to(snap)
        return snap

    def _tally(self, table_name: str, keys: List[str], stack) -> dict:
        """{group: (bytes, count, seen ns)}; empty groups of exited processes are dropped from the table
        (no later event can touch them: their pid's entries are keyed by that pid)."""
        table, out, gone = self.bpf[table_name], {}, []
        for k, per_cpu in table.items():
            count = sum(v.count for v in per_cpu)
            if count <= 0:
                if "pid" in keys and not process_alive(k.pid):
                    gone.append(k)
                continue
            # two stack ids can read as the same frames (a garbage frame-pointer walk ends at
            # a 0 frame, and frames are read up to it): their groups add up, never replace
            group = _group(k, keys, stack)
            nbytes, n, seen = out.get(group, (0, 0, 0))
            out[group] = (nbytes + sum(v.bytes for v in per_cpu), n + count, max([seen] + [v.seen for v in per_cpu]))
        for k in gone:
            try:
                del table[k]
            except KeyError:
                pass
        return out


READ_TRIES = 3  # reads of a snapshot while the counters move under it


def _bucket(i: int, count: int) -> tuple:
    """BCC log2 slot i holds values in [2^(i-1), 2^i - 1] (slot 0: the value 0)."""
    return (0, 0, count) if i == 0 else (1 << (i - 1), (1 << i) - 1, count)


def _group(k, keys: List[str], stack) -> tuple:
    """A group key struct -> the values of its fields (stacks walked, comm decoded)."""
    return tuple(
        stack(getattr(k, f), f)
        if f in ("ustack", "kstack")
        else getattr(k, f).decode(errors="replace")
        if f == "comm"
        else getattr(k, f)
        for f in keys
    )


def _histograms(table, keys: List[str], stack) -> dict:
    """{group key: buckets}; keys name the fields of the histogram's key struct besides slot.
    The table is per-CPU: each value is one count per CPU."""
    groups: Dict[tuple, list] = {}
    for k, per_cpu in table.items():
        n = sum(per_cpu)
        if not n:
            continue
        if not keys:
            groups.setdefault((), []).append(_bucket(k.value, n))
            continue
        groups.setdefault(_group(k, keys, stack), []).append(_bucket(k.slot, n))
    return {g: sorted(b) for g, b in groups.items()}


def _items(table):
    """A hash table's (key, value) pairs, read in batches (one system call per few thousand:
    ~10x faster than items(), which looks each key up alone); items() where the kernel has no
    batch lookup (before 5.6)."""
    try:
        return list(table.items_lookup_batch())
    except Exception:  # bcc raises plain Exception for the failing system call
        return list(table.items())


SPARSE = 128  # slots per entry (estimated) above which a table's keys are walked, not read in batches


def _sparse_items(table, population: int):
    """A mostly empty hash table's pairs. A batch read visits every bucket, ~25 ms at 1,000,000
    slots whatever the table holds; walking its keys costs two calls an entry (measured at
    1,000,000 slots: 2.5-4.6 ms for 100 entries, 6-9 ms for 2,000, slower past ~15,000). A key
    deleted meanwhile restarts the kernel's walk: past a bound, the batch read after all."""
    bound = table.max_entries // SPARSE
    if population > bound:
        return _items(table)
    found: Dict[bytes, tuple] = {}
    for visits, k in enumerate(table.keys()):  # BCC's iterator: BPF_MAP_GET_NEXT_KEY
        if visits > 2 * bound:
            return _items(table)
        try:
            found[bytes(k)] = (k, table[k])
        except KeyError:  # released since its key was read
            pass
    return list(found.values())


def _frames(ips) -> tuple:
    """A stack's frames: up to the first zero (a kernel walk), or through the marker that ends
    an unwound one (what follows it in the table is stale)."""
    frames = []
    for ip in ips:
        if not ip:
            break
        frames.append(ip)
        if ip in stackformat.MARKERS:
            break
    return tuple(frames)
