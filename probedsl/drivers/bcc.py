"""The BCC loader: compiles the generated C, attaches what the manifest lists, reads maps."""
from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Dict, List, Optional, Tuple

from probedsl import elf, images, roots, stackformat, teardown, x86
from probedsl.drivers.bcc_compile import Compilation
from probedsl.errors import ProbedslError
from probedsl.layout import Counter, ResourceLayout
from probedsl.drivers.bcc_images import EndedImages
from probedsl.libraries import LibraryResolver
from probedsl.procfs import has_memory, is_process, map_memory, process_alive, processes_named
from probedsl.rundata import Live, Snapshot, Totals
from probedsl.mapping_hold import MappingHold
from probedsl.unwind_tables import UnwindTables


def _import_bcc():
    try:
        import bcc  # Debian's python3-bpfcc, linked into the venv by scripts/setup.sh
    except ImportError:
        raise ProbedslError("the bcc Python module is missing (apt-get install python3-bpfcc, "
                            "or run scripts/setup.sh)") from None
    _pass_the_ref_ctr_offset(bcc.libbcc.lib)
    _resolve_each_symbol_once(bcc.BPF)
    return bcc


class _Semaphore:
    """The ref_ctr_offset the next attach passes: a usdt site's semaphore, else 0."""
    offset = 0


_semaphore = _Semaphore()


def _pass_the_ref_ctr_offset(lib) -> None:
    """bcc 0.26's Python declares bpf_attach_uprobe with 6 arguments; libbcc takes a 7th,
    ref_ctr_offset, which then gets whatever is on the stack (iovisor/bcc#5236). The kernel
    keeps one ref_ctr_offset per probed address: a garbage one (6, measured) makes the attach
    fail with EINVAL ("ref_ctr_offset mismatch" in dmesg) whenever a plain uprobe already sits
    there, and otherwise makes the kernel bump a 16-bit "semaphore" in every process mapping
    the file. Every attach goes through a wrapper that passes 0, as bpftrace does, or the
    semaphore of the usdt site being attached."""
    if getattr(lib.bpf_attach_uprobe, "probedsl_wrapped", False):
        return
    real = lib.bpf_attach_uprobe
    real.restype = ctypes.c_int
    real.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p,
                     ctypes.c_ulonglong, ctypes.c_int, ctypes.c_uint32]

    def attach(progfd, attach_type, ev_name, path, offset, pid):
        return real(progfd, attach_type, ev_name, path, offset, pid, _semaphore.offset)
    attach.probedsl_wrapped = True
    lib.bpf_attach_uprobe = attach


def _resolve_each_symbol_once(bpf_class) -> None:
    """BCC resolves the symbol again (an ELF symbol-table walk, ~0.3 ms) for every attach;
    --per-process attaches every uprobe (17 for memleak) to each new process, and what the
    process does until they are on is missed. The answer (file, offset) is kept per file
    version, and used for a process that sees the same file at that path; one in another
    mount namespace (a container) sees another file there and is resolved by BCC as before."""
    real = bpf_class._check_path_symbol
    if getattr(real, "probedsl_wrapped", False):
        return
    known: Dict[tuple, tuple] = {}

    def resolve(module, symname, addr, pid, sym_off=0):
        module = os.fsencode(module)
        try:
            ours = os.stat(module)
            if pid > 0 and not os.path.samestat(ours, os.stat(b"/proc/%d/root%s" % (pid, module))):
                return real(module, symname, addr, pid, sym_off)
        except (OSError, ValueError):       # a short name ("c"), or the process is gone
            return real(module, symname, addr, pid, sym_off)
        key = (module, symname, addr, sym_off, ours.st_dev, ours.st_ino, ours.st_mtime_ns)
        if key not in known:
            known[key] = real(module, symname, addr, -1, sym_off)
        return known[key]
    resolve.probedsl_wrapped = True
    bpf_class._check_path_symbol = staticmethod(resolve)


def _allow_many_uprobes() -> None:
    """--per-process holds every uprobe (17 for memleak) per traced process, each an open
    file: BCC refuses more than 1,000 in all (58 processes) unless BCC_PROBE_LIMIT says so. Raise the
    open-file limit to its hard maximum and let BCC use most of it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    os.environ.setdefault("BCC_PROBE_LIMIT", str(max(1000, soft - 256)))   # 256 for everything else


TRACEFS_UPROBES = ("/sys/kernel/tracing/uprobe_events", "/sys/kernel/debug/tracing/uprobe_events")


def remove_tracefs_uprobes(bcc_pid: int) -> int:
    """Remove the tracefs uprobe events libbcc made for process bcc_pid and left behind; returns
    how many. When attaching through perf fails (a --per-process target ending meanwhile),
    libbcc falls back to a tracefs event named ..._bcc_<its pid>, and keeps it when that fails
    too. Disabled, they cost nothing, but they outlive the run."""
    path = next((p for p in TRACEFS_UPROBES if os.path.exists(p)), None)
    if path is None:
        return 0
    try:
        with open(path) as f:
            names = [line.split()[0].split(":", 1)[1] for line in f if line.strip()]
    except (OSError, IndexError):
        return 0
    removed = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)    # not open(path, "a"): its seek fails on tracefs
    except OSError:
        return 0
    try:
        for name in (n for n in names if n.endswith(f"_bcc_{bcc_pid}")):
            try:
                os.write(fd, f"-:{name}\n".encode())
                removed += 1
            except OSError:                  # in use, or gone meanwhile
                pass
    finally:
        os.close(fd)
    return removed


ATTACH_TRIES = 3      # --per-process: attempts, RETRY_S apart, before a process is given up
ROOT_WAIT_S = 2.0     # --comm: how long an arrival in another root may take to map its libraries
RETRY_S = 0.05
# uprobes of ended processes are closed once no process has arrived for QUIET_S (each close
# delays a new process's attach), or when more than MAX_UNCLOSED wait (~20 processes' worth;
# fewer if BCC_PROBE_LIMIT is low)
QUIET_S = 3.0
MAX_UNCLOSED = 340
READ_TRIES = 3        # reads of a snapshot while the counters move under it


@contextlib.contextmanager
def _stderr_captured():
    """What C code (libbcc) writes to fd 2 meanwhile is kept, in the list yielded, not shown."""
    said: List[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            said.append(sink.read())


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _bucket(i: int, count: int) -> tuple:
    """BCC log2 slot i holds values in [2^(i-1), 2^i - 1] (slot 0: the value 0)."""
    return (0, 0, count) if i == 0 else (1 << (i - 1), (1 << i) - 1, count)


def _group(k, keys: List[str], stack) -> tuple:
    """A group key struct -> the values of its fields (stacks walked, comm decoded)."""
    return tuple(stack(getattr(k, f), f) if f in ("ustack", "kstack")
                 else getattr(k, f).decode(errors="replace") if f == "comm" else getattr(k, f) for f in keys)


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


class BccLoader:
    """Runs one compiled program; pid scopes uprobes to one process (0: all processes).
    held_forks: the caller holds each child the process forks until attach_child() has put
    the uprobes on it (probedsl.tether), so following forks needs no machine-wide uprobe."""

    def __init__(self, c_text: str, manifest: dict, pid: int = 0, held_forks: bool = False,
                 compiled: Optional[Compilation] = None):
        """compiled: the program's compile, begun earlier (BccDriver)."""
        bcc = _import_bcc()
        compiled = compiled or Compilation(bcc, c_text, pid)
        # placed probes checked once against the files (not again at each attach), while it compiles
        self.manifest = manifest = dict(manifest, probes=[_placed(p) for p in manifest["probes"]])
        self.layouts = [ResourceLayout.from_json(r) for r in manifest["resources"]]
        self.bpf = compiled.result()
        _load_unwinders(bcc, self.bpf, manifest.get("unwinders", ()))
        # entries of ended process images, freed between reports (not when every report reads them)
        self.ended_images = EndedImages(self.bpf, self.layouts, _items) \
            if any(lay.ends_with_image for lay in self.layouts) and not manifest.get("read_live") else None
        # --stacks dwarf: the unwinder's rows, loaded as processes map files
        self.unwind = UnwindTables(self.bpf) if manifest.get("dwarf") else None
        # a launched command stopped at each mmap of code until its rows are in
        self.hold = MappingHold(self.bpf) if manifest.get("hold_mappings") else None
        scope = pid or -1
        self.held_forks = held_forks and bool(manifest.get("follow_forks"))
        self.lock = threading.Lock()          # attach_child comes from the tether's thread
        self.closed = False
        if manifest.get("follow_forks"):
            # children inherit no pid-scoped uprobe: each is attached as it is forked (held
            # meanwhile), or else every process is, and the BPF filter keeps the traced ones
            # a launched command held before its exec: traced from its exec (trace_from_exec),
            # not while it is still a copy of probedsl
            if not (self.held_forks and manifest.get("target") == "cmd"):
                self.trace_from_exec(pid)
            scope = pid if self.held_forks else -1
        # --comm --per-process: uprobes on each process with the name, now and as they exec or
        # fork (admit); otherwise on every process, and the BPF filter compares names
        self.attached: Dict[int, List[bytes]] = {}     # pid -> its uprobe events (BCC's names)
        self.refusals: Dict[int, Tuple[int, float]] = {}  # pid -> (failed attempts, when to retry)
        self.unclosed: deque = deque()                     # uprobe events of ended processes
        self.last_arrival = 0.0
        self.per_process = bool(manifest.get("per_process"))
        if self.per_process or self.held_forks:
            _allow_many_uprobes()
            self.max_unclosed = min(MAX_UNCLOSED, bcc.BPF.get_probe_limit() // 4)
        if self.per_process:
            for p in manifest["probes"]:        # resolved and loaded now, not while a process waits
                if not p.get("usdt"):
                    bcc.BPF._check_path_symbol(p["path"], p["function"], None, -1)
                for fn in filter(None, (p["entry"], p["return"])):
                    self.bpf.load_func(fn, bcc.BPF.KPROBE)
            self.bpf["probedsl_doorbell"].open_ring_buffer(lambda ctx, data, size: 0)
            for found in processes_named(manifest["comm"]):
                self._attach_process(found)
        else:
            failure = self._attach(scope)
            if failure:
                raise ProbedslError(failure)
        # --comm: a process with the name in a root not seen yet (a container started later)
        # maps other library files: the probes go on those too, as it arrives
        self.watch_roots = bool(manifest.get("watch_roots"))
        self.unresolved: Dict[int, float] = {}    # arrivals whose libraries are not mapped yet
        self.probed = {(_identity(p["path"]), p["function"], p["entry"]) for p in manifest["probes"]}
        if self.watch_roots:
            self.bpf["probedsl_doorbell"].open_ring_buffer(lambda ctx, data, size: 0)

    def _attach_one(self, p: dict, path: str, placed: bool, pid: int) -> None:
        """The probe's uprobe (and uretprobe) on path: at the entry, or (placed) both at its
        offset (probedsl.placement: the return address is still at [rsp] there). A usdt site by
        its address, the kernel raising its semaphore while the uprobe is on."""
        if p.get("reentry"):      # a branch of that file (probedsl.reentry), by its address
            self.bpf.attach_uprobe(name=path, addr=p["address"], fn_name=p["entry"], pid=pid)
            return
        if p.get("usdt"):
            _semaphore.offset = p["ref_ctr"]
            try:
                self.bpf.attach_uprobe(name=path, addr=p["address"], fn_name=p["entry"], pid=pid)
            finally:
                _semaphore.offset = 0
            return
        if not (placed and p.get("offset")):
            self.bpf.attach_uprobe(name=path, sym=p["function"], fn_name=p["entry"], pid=pid)
            if p["return"]:
                self.bpf.attach_uretprobe(name=path, sym=p["function"], fn_name=p["return"], pid=pid)
            return
        self.bpf.attach_uprobe(name=path, sym=p["function"], sym_off=p["offset"], fn_name=p["entry"], pid=pid)
        if p["return"]:           # BCC has no sym_off for uretprobes: by address
            self.bpf.attach_uretprobe(name=path, addr=p["address"], fn_name=p["return"], pid=pid)

    def _attach(self, scope: int) -> Optional[str]:
        """Uprobes on every probe for scope (a pid, or -1: all processes); the failure, or None."""
        for p in self.manifest["probes"]:
            if p.get("gone"):         # the branch is not in the file any more: nothing enters again there
                continue
            try:
                self._attach_one(p, p["path"], True, scope)
            except Exception as exc:                  # BCC raises bare Exception
                if not p.get("also"):
                    return f"cannot attach to {p['function']} in {p['path']}: {exc}"
                print(f"probedsl: warning: not probing {p['path']} (its process ended?): {exc}", file=sys.stderr)
        return None

    def trace_from_exec(self, pid: int) -> None:
        """The process and the children it forks from now on pass the BPF filter."""
        self.bpf["probedsl_traced"][ctypes.c_uint32(pid)] = ctypes.c_uint8(1)

    def attach_child(self, pid: int) -> None:
        """A child forked by a traced process, held until this returns: its own uprobes (they
        follow its execs). A refusal is said; the child then runs untraced."""
        with self.lock:
            if self.closed:
                return
            if pid in self.attached:                 # an ended process's pid, taken again
                self._detach(pid)
            self._attach_process(pid, last_try=True, quiet=False)
            self.refusals.pop(pid, None)
            self.last_arrival = time.monotonic()

    def reap(self, wait_s: float) -> None:
        """Following held forks: the uprobes of children that ended are closed, one a turn,
        once none has arrived for QUIET_S (a close holds up the next attach ~90 ms)."""
        with self.lock:
            for pid in [p for p in self.attached if not process_alive(p)]:
                self._detach(pid)
            closing = self.unclosed and (time.monotonic() - self.last_arrival > QUIET_S
                                         or len(self.unclosed) > self.max_unclosed)
            if closing:
                self._close_one()
        if not closing:
            time.sleep(wait_s)

    def _attach_process(self, pid: int, last_try: bool = False, quiet: bool = True) -> None:
        """--per-process: uprobes on one process. A process between releasing its memory and
        becoming a zombie (or a kernel thread) refuses them with EINVAL: it is skipped. A live
        one that refuses is tried again RETRY_S later, twice, then said and left untraced.
        quiet: libbcc's own messages are kept (fd 2 taken meanwhile: not from a second thread)."""
        before = set(self.bpf.uprobe_fds)
        with (_stderr_captured() if quiet else contextlib.nullcontext([""])) as chatter:
            failure = self._attach(pid)
        # by name: BCC's detach_uprobe resolves the path through /proc/PID again, which
        # fails once the process has ended (its uprobes then stayed open until the end)
        self.attached[pid] = [e for e in self.bpf.uprobe_fds if e not in before]
        if failure:
            self._detach(pid)
        else:
            self.refusals.pop(pid, None)
            return
        tries = ATTACH_TRIES if last_try else self.refusals.pop(pid, (0, 0))[0] + 1
        if not has_memory(pid):
            return
        if tries < ATTACH_TRIES:
            self.refusals[pid] = (tries, time.monotonic() + RETRY_S)
            return
        said = " ".join(chatter[0].split())
        print(f"probedsl: warning: pid {pid} is not traced: {failure}" + (f" ({said})" if said else ""),
              file=sys.stderr)

    def _detach(self, pid: int) -> None:
        """Queue the process's uprobes for closing. The kernel takes ~90 ms to unregister each,
        one at a time, and attaches wait meanwhile (measured, docs/design.md), so closing a
        process's 17 as it ended held up the next arrivals by up to 0.1 s; admit() closes one
        per turn once no process has arrived for QUIET_S, or when too many wait."""
        self.unclosed.extend(self.attached.pop(pid, []))

    def _close_one(self) -> None:
        event = self.unclosed.popleft()
        try:
            self.bpf.detach_uprobe_event(event)
        except Exception as exc:              # BCC raises bare Exception
            print(f"probedsl: warning: {exc}", file=sys.stderr)

    def admit(self, wait_s: float = 0) -> List[int]:
        """--comm: attach to processes that took the name since the last call (waiting up to
        wait_s for one: the doorbell rings at its exec or fork), detach from those that ended.
        Returns the pids newly attached."""
        if not (self.per_process or self.watch_roots):
            return []
        if self.watch_roots:
            self.bpf.ring_buffer_poll(max(1, int(wait_s * 1000)))
            now = time.monotonic()
            for pid in self._arrivals():
                self.unresolved.setdefault(pid, now + ROOT_WAIT_S)
            for pid, until in list(self.unresolved.items()):
                if self._probe_other_root(pid) or now > until or not process_alive(pid):
                    del self.unresolved[pid]
            return []
        closing = self.unclosed and (time.monotonic() - self.last_arrival > QUIET_S
                                     or len(self.unclosed) > self.max_unclosed)
        if wait_s > 0:      # closing a uprobe (~90 ms) is then the pause
            self.bpf.ring_buffer_poll(0 if closing else max(1, int(wait_s * 1000)))
        pids = self._arrivals()
        added, now = [], time.monotonic()
        for pid in set(pids) | {p for p, (_, retry_at) in self.refusals.items() if retry_at <= now}:
            if pid not in self.attached and is_process(pid):
                self._attach_process(pid)
                if pid in self.attached:
                    added.append(pid)
            elif pid in self.refusals and not is_process(pid):
                del self.refusals[pid]
        for pid in [p for p in self.attached if not process_alive(p)]:
            self._detach(pid)
        if added:
            self.last_arrival = time.monotonic()
        elif closing:
            self._close_one()
        return added

    def _arrivals(self) -> List[int]:
        """Pids that exec'd the name or were forked by such a process since the last call."""
        arrivals = self.bpf["probedsl_arrivals"]
        pids = [k.value for k in arrivals.keys()]
        for pid in pids:
            try:
                del arrivals[ctypes.c_uint32(pid)]
            except KeyError:
                pass
        return pids

    def _probe_other_root(self, pid: int) -> bool:
        """Attach every probe to the process's copy of its library when that is a file not
        probed yet; False (nothing attached) while a library cannot be found yet. At exec the
        process has not mapped its libraries: the copy is the one at the probed path inside
        its root, or the one its maps name once the loader has mapped it (admit() asks again
        meanwhile). Said once all of a file's probes are on."""
        if roots.root_prefix(pid) == "":
            return True
        copies: Dict[str, List[str]] = {}
        # usdt: the program's own files; a reentry branch: an address in the file it was found in
        uprobes = [p for p in self.manifest["probes"] if not p.get("usdt") and not p.get("reentry")]
        for p in uprobes:
            if p["library"] not in copies:
                mapped = LibraryResolver(pid=pid).resolve(p["library"])
                found = [roots.attach_path(pid, p["path"])] + ([mapped] if mapped else [])
                copies[p["library"]] = [path for path in found if _identity(path)]
                if not copies[p["library"]]:
                    return False
        new_files = []
        for p in uprobes:
            for path in copies[p["library"]]:
                key = (_identity(path), p["function"], p["entry"])
                if key in self.probed:
                    continue
                try:
                    self._attach_one(p, path, False, -1)    # another root's copy: at the entry
                except Exception as exc:          # BCC raises bare Exception
                    print(f"probedsl: warning: pid {pid}: cannot attach to {p['function']} in {path}: {exc}",
                          file=sys.stderr)
                    continue
                if not any(k[0] == key[0] for k in self.probed):
                    new_files.append((path, p["library"]))
                self.probed.add(key)
                break
        for path, library in new_files:
            print(f"probedsl: probing {path}, another root's copy of {library} (pid {pid})",
                  file=sys.stderr, flush=True)
        return True

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
            snap.incomplete.append(f"the counters moved during each of {READ_TRIES} reads: totals and tables "
                                   "may disagree by the events of one read")
        return snap

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
        for field, name in (("kstack", "probedsl_stacks"), ("ustack", "probedsl_stacks"),
                            ("ustack", "probedsl_ustacks")):      # the unwinder's, when dwarf
            try:
                tables[field] = self.bpf[name]
            except KeyError:                   # the recipe records no such stacks
                pass
        walked: Dict[Tuple[str, int], tuple] = {}

        def stack(stack_id: int, field: str = "ustack") -> tuple:
            table = tables.get(field)
            if stack_id < 0 or table is None:
                return ()
            if (field, stack_id) not in walked:
                try:          # not stacks.walk(): it reads 127 frames, the table holds fewer
                    walked[field, stack_id] = _frames(table[table.Key(stack_id)].ip)
                except KeyError:
                    walked[field, stack_id] = ()
            return walked[field, stack_id]

        tallies: Dict[str, dict] = {}
        for lay in self.layouts:
            name, fields = lay.name, lay.fields
            tallies[name] = {t.keys: self._tally(t.map, list(t.keys), stack) for t in lay.tallies}
            if self.manifest.get("read_live"):
                live = (live or []) + [Live(
                    resource=name, key=tuple(k.k[i] for i in range(lay.key_arity)), time_ns=v.time,
                    size=v.size if "size" in fields else 0, pid=v.pid if "pid" in fields else 0,
                    tid=v.tid if "tid" in fields else 0,
                    ustack=stack(v.ustack, "ustack") if "ustack" in fields else (),
                    kstack=stack(v.kstack, "kstack") if "kstack" in fields else (),
                    comm=v.comm.decode(errors="replace") if "comm" in fields else "",
                    image=v.image if "image" in fields else 0)
                    for k, v in _items(self.bpf[lay.live])]
            t = Totals(*counted[name])
            if lay.lifetime:
                t.lifetime = _histograms(self.bpf[lay.lifetime.map], list(lay.lifetime.keys), stack)
            totals[name] = t
        snap = Snapshot(now, live, totals, final, tallies)
        if any(lay.ends_with_image for lay in self.layouts):
            lost = self.bpf["probedsl_image_lost"]
            images.settle(self.layouts, snap, ((k.pid, k.image) for k, _ in _items(self.bpf["probedsl_ended"])),
                          lost[lost.Key(0)].value)
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

    def close(self, background: bool = False) -> None:
        """Detach everything. background: a process of its own closes the last copies of the
        descriptors (the kernel's ~0.15 s per uprobe, probedsl.teardown), and this returns at once."""
        with self.lock:
            self.closed = True
        if self.hold is not None:
            self.hold.close()
        if self.unwind is not None:
            self.unwind.close()
        holder = teardown.hand_over(remove_tracefs_uprobes) if background else None
        if holder is not None:
            # BCC's detach disables each event first (a call on each CPU, ~15 ms here) and
            # looks for a tracefs event: the holder's close does both's work
            for probes in (self.bpf.uprobe_fds, self.bpf.tracepoint_fds):
                for fd in probes.values():
                    os.close(fd)
                probes.clear()
        self.bpf.cleanup()
        if holder is not None:
            holder.release()
        else:
            remove_tracefs_uprobes(os.getpid())


class BccDriver:
    def __init__(self, program, generated):
        self.program, self.generated = program, generated
        self.loader: Optional[BccLoader] = None
        self._told = None                # the listener given to the mapping tracker
        self.held_forks = False          # set before start: a tether holds each child at its fork
        scope = program.scope
        self.pid = scope.pid if scope.mode in ("pid", "cmd") else 0
        # compiled while the session starts its tracker and the rest; loaded and attached in start()
        self.compiled = Compilation(_import_bcc(), generated.text, self.pid)

    def start(self, timeout: float = 60) -> None:
        self.loader = BccLoader(self.generated.text, self.generated.manifest, self.pid, self.held_forks,
                                self.compiled)

    def trace_from_exec(self, pid: int) -> None:
        if self.loader is not None:
            self.loader.trace_from_exec(pid)

    def attach_child(self, pid: int) -> None:
        loader = self.loader
        if loader is not None:
            loader.attach_child(pid)

    def snapshot(self, timeout: float = 30) -> Optional[Snapshot]:
        return self.loader.snapshot()

    def idle(self, seconds: float) -> None:
        """The run loop's pause between turns; with --per-process it ends as soon as a process
        takes the name, which is then attached at once."""
        if self.loader is not None and self.loader.ended_images is not None and self.loader.ended_images.due():
            self.loader.ended_images.sweep()
        if self.loader is not None and (self.loader.per_process or self.loader.watch_roots):
            self.loader.admit(wait_s=seconds)
        elif self.loader is not None and self.loader.held_forks:
            self.loader.reap(seconds)
        else:
            time.sleep(seconds)

    def alive(self) -> bool:
        return self.loader is not None

    def stop(self, timeout: float = 30) -> Optional[Snapshot]:
        """The final snapshot; detaching waits for kill(), after the report is out (and goes
        on in the background: probedsl.teardown)."""
        return self.loader.snapshot(final=True) if self.loader is not None else None

    def unwind_memory(self) -> int:
        return self.loader.unwind.memory() if self.unwinds_stacks() else 0

    def unwinds_stacks(self) -> bool:
        return self.loader is not None and self.loader.unwind is not None

    def follow_mappings(self, tracker, preload, wanted=None) -> None:
        if self.loader is not None and self.loader.unwind is not None:
            unwind = self.loader.unwind
            unwind.preload(preload)

            def told(pid, maps):
                if wanted is None or wanted(pid):
                    unwind.process(pid, maps)
            self._told = told
            tracker.listen(told)
            unwind.following = True
            if self.loader.hold is not None:
                tracker.on_turn(self.loader.hold.turn)
                self.loader.hold.start()

    def stop_following(self, tracker) -> None:
        if self.loader is not None and self.loader.unwind is not None:
            tracker.unlisten(self._told)
            if self.loader.hold is not None:
                tracker.off_turn(self.loader.hold.turn)
                self.loader.hold.close()
            self.loader.unwind.close()

    def notes(self) -> List[str]:
        if not self.unwinds_stacks():
            return []
        hold = self.loader.hold.notes() if self.loader.hold is not None else []
        return self.loader.unwind.notes() + hold

    def map_memory(self) -> int:
        return map_memory(os.getpid())

    def explain_failure(self) -> str:
        return "the BCC loader was closed" if self.loader is None else "no data"

    def kill(self) -> None:
        if self.loader is not None:
            self.loader.close(background=True)
            self.loader = None


def run_standalone(c_text: str, manifest: dict, argv: List[str]) -> int:
    """Entry point of a loader written by `probedsl compile --target bcc`: --pid PID
    (optional), until Ctrl-C, then the live totals."""
    pid = int(argv[argv.index("--pid") + 1]) if "--pid" in argv else 0
    loader = BccLoader(c_text, manifest, pid)
    print("tracing; Ctrl-C to print live resources", file=sys.stderr)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    snap = loader.snapshot(final=True)
    for name, t in snap.totals.items():
        groups = next(iter(snap.tallies.get(name, {}).values()), {})     # any tally covers every entry
        print(f"{name}: {sum(g[1] for g in groups.values())} live, {sum(g[0] for g in groups.values())} bytes; "
              f"{t.acquired} acquired, {t.released} released, {t.unknown_releases} unknown releases")
    loader.close()
    return 0


def _load_unwinders(bcc, bpf, unwinders) -> None:
    """--stacks dwarf: load the unwinder programs (verified once each) into the arrays the
    acquire programs tail-call, before any of those is attached."""
    for u in unwinders:
        kind = bcc.BPF.TRACEPOINT if u["type"] == "tracepoint" else bcc.BPF.KPROBE
        try:
            fn = bpf.load_func(u["program"], kind)
        except Exception as exc:          # BCC raises bare Exception when the kernel refuses it
            raise ProbedslError(f"BCC could not load the unwinder: {exc}") from None
        bpf.get_table(u["array"])[ctypes.c_int(0)] = ctypes.c_int(fn.fd)


def _items(table):
    """A hash table's (key, value) pairs, read in batches (one system call per few thousand:
    ~10x faster than items(), which looks each key up alone); items() where the kernel has no
    batch lookup (before 5.6)."""
    try:
        return list(table.items_lookup_batch())
    except Exception:                  # bcc raises plain Exception for the failing system call
        return list(table.items())


def _placed(p: dict) -> dict:
    """A manifest probe with its offset kept only while the file still holds the code it was
    placed in (a loader may run on another machine, or after an upgrade), and the address of
    its placed instruction."""
    if p.get("usdt"):
        return p
    if p.get("reentry"):
        return p if x86.still_at(p["path"], p["address"], p["code"]) else dict(p, gone=True)
    offset = p.get("offset", 0)
    if offset and not x86.still_there(p["path"], p["function"], offset, p.get("code", "")):
        print(f"probedsl: warning: {p['function']} in {p['path']} is not the code probedsl placed its probe "
              "in; probing its entry", file=sys.stderr)
        offset = 0
    address = elf.symbols(p["path"]).address_of(p["function"]) + offset if offset else 0
    return dict(p, offset=offset, address=address)


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
