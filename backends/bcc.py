"""IR -> BCC: C text plus a manifest that the fixed loader (probedsl.drivers.bcc) attaches."""
from __future__ import annotations

import pprint
from typing import List

from probedsl import ir
from probedsl.errors import ProbedslError

from probedsl.ir import layout, stackformat
from probedsl.ir.layout import Counter, ResourceLayout

from probedsl.targets.base import Generated

from .base import Backend
from probedsl.backends.bcc_unwinder import FRAMES_PER_RUN, PY_WINDOW, WINDOW, UnwinderViews


def usdt_read(loc, ctx: str) -> str:
    """A C expression (a statement expression for memory) giving the argument as a u64, as
    the probed code saw it: sign- or zero-extended from its size."""
    ctype = {1: "s8", 2: "s16", 4: "s32", 8: "s64"}[loc.size] if loc.signed else \
        {1: "u8", 2: "u16", 4: "u32", 8: "u64"}[loc.size]
    if loc.constant is not None:
        return f"(u64)(s64){int(loc.constant)}"
    if not loc.memory:
        return f"(u64)({ctype}){ctx}->{loc.register}"
    return (f"({{ {ctype} v_ = 0; probedsl_read_user(&v_, sizeof(v_), (void *)({ctx}->{loc.register} + "
            f"({int(loc.offset)}))); (u64)v_; }})")


def _arg(self, v: ir.Arg) -> str:
    if self.usdt_site is not None:            # where this site's note says the argument is
        return usdt_read(self.usdt_site.location(v.index), "ctx")
    if v.index >= self.target.max_args:
        raise ProbedslError(f"BCC reads only the first {self.target.max_args} arguments")
    return f"PT_REGS_PARM{v.index + 1}(ctx)"


def _call_ends(n: str, probe: ir.Probe) -> List[str]:
    """A return's first lines: the entry's scratch taken into s, or nothing more done."""
    return [f"struct {n}_scratch_t s = {{}};", f"if (!{n}_call_end(tid, {probe.id}, &s)) return 0;"]


# the stack table's buckets where a program walks frame pointers itself and leaves to the kernel
# only the stacks through a pending uretprobe (rare): preallocated, 131,072 took up to 0.3 s
KERNEL_WALK_BUCKETS = 4096
# the places a key may take in its resource's front (bcc.c.j2): all are looked at for it
FRONT_PROBES = 4

# the unwinder's numbers, as the runtime writes and reads them (probedsl.ir.stackformat)
_UNWINDER = {
    "maps": stackformat.MAX_MAPS, "rows": stackformat.ROWS, "processes": stackformat.PROCESSES,
    "row_steps": stackformat.ROWS.bit_length(), "chunk_shift": stackformat.CHUNK_SHIFT,
    "per_chunk": stackformat.PER_CHUNK, "chunks": stackformat.CHUNKS, "returns": stackformat.RETURNS,
    "ancestors": stackformat.ANCESTORS, "frames_per_run": FRAMES_PER_RUN, "window": WINDOW,
    "invalid": stackformat.INVALID, "cfa_rbp": stackformat.CFA_RBP, "outermost": stackformat.OUTERMOST,
    "signal": stackformat.SIGNAL, "plt": stackformat.PLT, "rbp_at_cfa": stackformat.RBP_AT_CFA,
    "complete": hex(stackformat.COMPLETE), "no_info": hex(stackformat.NO_UNWIND_INFO),
    "depth_limit": hex(stackformat.DEPTH_LIMIT), "fp_walk": hex(stackformat.FP_WALK),
    "hashed_id": hex(stackformat.HASHED_ID),
}

# the Python frame walk's numbers (probedsl.stacks.pyframes reads what it records)
_PYTHON = {
    "frames": stackformat.PY_FRAMES, "entry_shift": stackformat.PY_ENTRY_SHIFT, "threads": stackformat.PY_THREADS,
    "processes": stackformat.PY_PROCESSES, "threads_known": stackformat.PY_THREADS_KNOWN,
    "frame_read": stackformat.PY_FRAME_READ, "window": PY_WINDOW,
    "truncated": hex(stackformat.PY_TRUNCATED),
}


class BccBackend(UnwinderViews, Backend):
    name = "bcc"
    template = "bcc.c.j2"
    RENDER = {
        ir.Const: lambda self, v: f"{v.value}ULL" if v.value >= 0 else f"({v.value}LL)",
        ir.Arg: _arg,
        ir.Saved: lambda self, v: f"s.a[{v.slot}]",
        ir.Builtin: lambda self, v: {"ret": "PT_REGS_RC(ctx)", "pid": "(probedsl_id >> 32)",
                                     "tid": "(u32)probedsl_id"}[v.name],
        ir.Field: lambda self, v: f"(u64)args->{v.name}",
        ir.Deref: lambda self, v: (f"probedsl_read_u64({self.expr(v.address)} + {v.offset})" if v.size == 8
                                   else f"(u64)probedsl_read_s32({self.expr(v.address)} + {v.offset})"),
        ir.Int32: lambda self, v: f"(s64)(s32){self.expr(v.operand)}",
        ir.Not: lambda self, v: f"!{self.expr(v.operand)}",
        ir.BinOp: Backend.binop,
    }

    def signed(self, text: str) -> str:
        return f"(s64){text}"

    def filter_lines(self, scope: ir.Scope) -> List[str]:
        if scope.tracks_children:
            return ["u32 tgid = id >> 32;",
                    "if (!probedsl_traced.lookup(&tgid)) return 0;"]
        if scope.mode in ("pid", "cmd"):
            # the pid is filled in by the loader as a -D define, a validated integer
            return ["if ((id >> 32) != PROBEDSL_PID) return 0;"]
        if scope.mode == "all":
            # the loader fills in its own pid: its reading of the maps is not traced
            return ["if ((id >> 32) == PROBEDSL_SELF) return 0;"]
        if scope.mode == "comm":
            name = scope.comm.encode()
            lines = ["char comm[TASK_COMM_LEN] = {};", "bpf_get_current_comm(&comm, sizeof(comm));"]
            # byte-by-byte: the name never appears as C text, so it cannot inject anything
            checks = [f"comm[{i}] != {b}" for i, b in enumerate(name + b"\0")]
            lines.append(f"if ({' || '.join(checks)}) return 0;")
            return lines
        return []

    def count(self, lay: ResourceLayout, counter: Counter) -> str:
        return f"{lay.counters}.increment({int(counter)});  // {counter.label}"

    def action(self, program: ir.Program, lay: ResourceLayout, action: ir.Action, ctx: str = "ctx",
               ustack: str = "", again: bool = False) -> List[str]:
        """ctx: the program's context argument (`args` in a TRACEPOINT_PROBE); ustack: a variable
        holding the stack already taken, else the action takes it; again: a release of an unknown
        key asks whether it is its call's second hit."""
        n = lay.name
        key = [f"struct {n}_key_t k = {{}};"] + [f"k.k[{i}] = {self.expr(e)};" for i, e in enumerate(action.key)]
        if action.kind == "acquire":
            v = [f"struct {n}_live_t v = {{}};", "v.time = bpf_ktime_get_ns();"]
            deferred = self.defers(program, lay)
            setters = {
                "size": f"v.size = {self.expr(action.size) if action.size is not None else '0'};",
                "pid": "v.pid = probedsl_id >> 32;",
                "tid": "v.tid = (u32)probedsl_id;",
                # deferred: the unwinder takes the stack once the program's actions are done
                "ustack": "" if deferred else f"v.ustack = {ustack or self.ustack(program, ctx)};",
                "kstack": f"v.kstack = probedsl_stacks.get_stackid({ctx}, 0);",
                "comm": "bpf_get_current_comm(&v.comm, sizeof(v.comm));",
                "image": f"v.image = {self.stamp(program, lay, action)};",
            }
            v += [setters[f] for f in lay.fields if f != "time" and setters[f]]
            store = [f"{n}_defer_entry(&k, &v, &deferred);"] if deferred else self.store(lay)
            recorded = key + v + store
            if program.sample > 1:
                recorded = [f"if (bpf_get_prandom_u32() % {int(program.sample)} == 0) {{",
                            *["  " + s for s in recorded], "}"]
            body = [self.count(lay, Counter.ACQUIRED)] + recorded
        elif action.kind == "change":
            # the live entry under the key, if any, stamped anew: out of its tallies' group and
            # back into the new one (the image is part of their keys)
            body = key + ["void *place;", f"struct {n}_live_t *old = {n}_live_find(&k, &place);", "if (old) {",
                          f"  u64 image = {self.stamp(program, lay, action)};", "  if (image != old->image) {",
                          f"    {n}_tally(old, -1);", "    old->image = image;", f"    {n}_tally(old, 1);", "  }",
                          f"  {n}_live_done(&k, place, 0);", "}"]
        else:
            hit = [f"{n}_tally(old, -1);", f"{n}_live_done(&k, place, 1);", self.count(lay, Counter.RELEASED)]
            if lay.lifetime:
                keys, hist = lay.lifetime.keys, lay.lifetime.map
                if keys:
                    copy = ["__builtin_memcpy(&hk.comm, old->comm, sizeof(hk.comm));" if k == "comm"
                            else f"hk.{k} = old->{k};" for k in keys]
                    hit[:0] = [f"struct {n}_hist_key_t hk = {{}};", *copy,
                               "hk.slot = bpf_log2l(bpf_ktime_get_ns() - old->time);",
                               # (BCC 0.26's increment() does nothing on a per-CPU hash)
                               "u64 none = 0, *slot = " + f"{hist}.lookup_or_try_init(&hk, &none);",
                               "if (slot) __sync_fetch_and_add(slot, 1);"]
                else:
                    hit.insert(0, f"{hist}.increment(bpf_log2l(bpf_ktime_get_ns() - old->time));")
            unknown = [self.count(lay, Counter.UNKNOWN_RELEASES)]
            if again:         # the same call's second hit, after a tail jump (probedsl/passes/reentry.py)
                unknown = [f"u64 *again = {n}_reentered.lookup(&tid);",
                           f"if (again && *again == PT_REGS_SP(ctx)) {n}_reentered.delete(&tid);",
                           f"else {unknown[0]}"]
            body = key + ["void *place;", f"struct {n}_live_t *old = {n}_live_find(&k, &place);", "if (old) {",
                          *["  " + s for s in hit], "} else {", *["  " + s for s in unknown], "}"]
            if action.through is not None:
                # the range's keys, one by one (the others' fields, the pid, read once); most were
                # never acquired (close_range(3, ~0U)): no unknown release
                last = len(action.key) - 1
                body = [f"u64 first = {self.expr(action.key[-1])}, last = {self.expr(action.through)};", *key[:-1],
                        "#pragma clang loop unroll(disable)",
                        f"for (u32 i = 0; i < {int(self.target.range_keys)}; i++) {{", "  if (first + i > last) break;",
                        f"  k.k[{last}] = first + i;",
                        *["  " + s for s in body[len(key):-(2 + len(unknown))]], "  }", "}"]
        guard = self.expr(action.guard) if action.guard is not None else "1"
        return [f"if ({guard}) {{", *["  " + s for s in body], "}"]

    def stamp(self, program: ir.Program, lay: ResourceLayout, action: ir.Action) -> str:
        """The image an acquisition or change stamps its entry with (layout.image_stamp): the
        process's (probedsl_image registers it), or 0 (the entry outlives every exec)."""
        res = next(r for r in program.resources if r.name == lay.name)
        stamp = layout.image_stamp(res, action)
        if stamp is True or stamp is False:
            return "probedsl_image(probedsl_id >> 32)" if stamp else "0"
        return f"({self.expr(stamp)}) ? probedsl_image(probedsl_id >> 32) : 0"

    def store(self, lay: ResourceLayout) -> List[str]:
        """The lines storing a new entry v under key k, and adding it to its tallies."""
        n = lay.name
        replaced = ["  " + self.count(lay, Counter.REPLACED)]
        if lay.ends_with_image:
            # the entry of an image an exec ended: that image's end, not a replacement
            replaced = ["  struct probedsl_ended_t was = {.pid = v.pid, .image = stale->image};",
                        "  if (was.image != v.image && probedsl_ended.lookup(&was))",
                        "    " + self.count(lay, Counter.ENDED_BY_EXEC),
                        "  else",
                        "    " + self.count(lay, Counter.REPLACED)]
        # insert, not update: a key acquired again without a release we saw replaces the
        # old entry, which must leave its group's tally first
        return ["void *place;",
                f"struct {n}_live_t *stale;",
                f"int err = {n}_live_insert(&k, &v, &stale, &place);",
                "if (err == -17) {  // -EEXIST",
                # (gone meanwhile: its release, or the loader freeing an ended image's, counted it)
                "  if (stale) {",
                f"    {n}_tally(stale, -1);",
                *["  " + r for r in replaced],
                "  }",
                f"  err = {n}_live_replace(&k, &v, stale, place);",
                "}",
                f"if (err) {self.count(lay, Counter.UNTRACKED)}",
                f"else {n}_tally(&v, 1);"]

    usdt_site = None          # the usdt site whose program is being generated

    def probe_view(self, program: ir.Program, lay: ResourceLayout, probe: ir.Probe) -> dict:
        if probe.kind == ir.ProbeKind.USDT:
            return self.usdt_view(program, lay, probe)
        if probe.kind not in (ir.ProbeKind.UPROBE, ir.ProbeKind.TRACEPOINT, ir.ProbeKind.SYSCALL):
            raise ProbedslError(f"{probe.label}: BCC has no lowering for a {probe.kind.value} probe")
        n = lay.name
        ctx = "args" if probe.kind in (ir.ProbeKind.TRACEPOINT, ir.ProbeKind.SYSCALL) else "ctx"
        acquires = [a for a in probe.actions if a.kind == "acquire"]
        if self.defers(program, lay) and acquires:
            actions = self.deferring(program, probe, lay, ctx)
        elif "ustack" in lay.fields and len(acquires) > 1:
            # one walk for all (pipe's two descriptors): the unwinder is inlined where it is
            # called, and two copies of it overflow the program
            guards = " || ".join(f"({self.expr(a.guard)})" if a.guard is not None else "1" for a in acquires)
            actions = [f"s64 ustack = ({guards}) ? {self.ustack(program, ctx, probe)} : -1;"]
            actions += [line for a in probe.actions for line in self.action(program, lay, a, ctx, "ustack")]
        else:
            again = probe.kind == "uprobe" and self.target.asks_reentry(probe)
            taken = self.ustack(program, ctx, probe) if "ustack" in lay.fields and acquires else ""
            actions = [line for a in probe.actions for line in self.action(program, lay, a, ctx, taken, again)]
        fn = f"{n}_{probe.function.replace(':', '_')}_{probe.id}"
        if probe.kind == ir.ProbeKind.TRACEPOINT:
            category, event = probe.function.split(":")
            return {"label": self.comment(probe.label), "line": probe.span.line, "column": probe.span.column,
                    "filtered": probe.filtered, "tracepoint": (category, event), "entry_fn": "", "entry_body": actions,
                    "return_fn": "", "return_body": [], "placed": ""}
        if probe.kind == ir.ProbeKind.SYSCALL:
            return self.syscall_views(probe, lay, actions)
        # (at an entry, the thread's scratch is made there if it has none: the call begins)
        pending = f"{n}_slot(tid)" if probe.at_return else f"{n}_in_call(tid)"
        nest = [f"struct {n}_scratch_t *pending = {pending};",
                "// skip calls made inside another call of this resource (realloc -> malloc)",
                "if (pending && pending->probe && pending->sp > PT_REGS_SP(ctx)) return 0;"]
        if probe.entry_guard is not None:
            nest = [f"if (!({self.expr(probe.entry_guard)})) return 0;"] + nest
        if probe.at_return and self.keeps_returns(program):
            # the return address the uretprobe is about to replace, for the unwinder
            nest = ["probedsl_unw_keep_return(ctx, tid);"] + nest
        if probe.at_return:
            entry = nest + [f"struct {n}_scratch_t s = {{}};", f"s.probe = {probe.id};", "s.sp = PT_REGS_SP(ctx);"]
            entry += [f"s.a[{slot}] = {self.expr(ir.Arg(i))};" for slot, i in enumerate(probe.saved_args)]
            entry.append(f"{n}_call_begin(tid, pending, &s);")
            ret = ["probedsl_unw_drop_return(ctx, tid);"] if self.keeps_returns(program) else []
            ret += _call_ends(n, probe) + actions
        else:
            entry, ret = nest + actions, []
        sites = self.target.reentry_branches(probe)
        # each branch entering the probe again leaves the thread's stack pointer for that hit
        then = [{"label": self.comment(f"{s.origin} enters {probe.label} again at 0x{s.address:x} "
                                       "(a tail jump: the same call)"),
                 "line": probe.span.line, "column": probe.span.column, "filtered": True, "tracepoint": None,
                 "entry_fn": f"{fn}_reentry{i}", "return_fn": "", "return_body": [], "placed": "", "site": s,
                 "entry_body": ["u64 sp = PT_REGS_SP(ctx);", f"{n}_reentered.update(&tid, &sp);"]}
                for i, s in enumerate(sites)]
        return {"label": self.comment(probe.label), "line": probe.span.line, "column": probe.span.column,
                "filtered": True, "tracepoint": None, "entry_fn": fn + "_entry", "entry_body": entry,
                "return_fn": fn + "_return" if probe.at_return else "", "return_body": ret,
                "placed": self.placed(probe, probe.path), "then": then}

    def syscall_views(self, probe: ir.Probe, lay: ResourceLayout, actions: List[str]) -> dict:
        """A system call's entry and exit tracepoints (two views, rendered one after the other):
        the entry saves the fields the exit needs, per thread (system calls do not nest)."""
        def view(event, body):
            return {"label": self.comment(probe.label), "line": probe.span.line, "column": probe.span.column,
                    "filtered": True, "tracepoint": ("syscalls", f"{event}_{probe.function}"), "entry_fn": "",
                    "entry_body": ["u32 tid = (u32)probedsl_id;", *body] if body else [],
                    "return_fn": "", "return_body": [], "placed": ""}
        if not probe.at_return:
            return {**view("sys_enter", actions), "then": []}
        if not probe.saved_args:          # nothing to carry: the exit alone
            return {**view("sys_exit", actions), "then": []}
        n = lay.name
        entry = [f"struct {n}_scratch_t s = {{}};", f"s.probe = {probe.id};"]
        entry += [f"s.a[{slot}] = {self.expr(ir.Field(probe.fields[i]))};" for slot, i in enumerate(probe.saved_args)]
        entry.append(f"{n}_call_begin(tid, {n}_slot(tid), &s);")
        ret = _call_ends(n, probe) + actions
        return {**view("sys_enter", entry), "then": [view("sys_exit", ret)]}

    def usdt_view(self, program: ir.Program, lay: ResourceLayout, probe: ir.Probe) -> dict:
        """One program per site: each site's note says where its arguments are."""
        fn = f"{lay.name}_{probe.function.replace(':', '_')}_{probe.id}"
        sites = []
        for i, site in enumerate(probe.sites):
            self.usdt_site = site
            try:
                if self.defers(program, lay) and any(a.kind == "acquire" for a in probe.actions):
                    body = self.deferring(program, probe, lay, "ctx")
                else:
                    body = [line for a in probe.actions for line in self.action(program, lay, a, "ctx")]
            finally:
                self.usdt_site = None
            sites.append({"entry_fn": f"{fn}_site{i}", "entry_body": body, "address": site.address,
                          "ref_ctr": site.semaphore})
        return {"label": self.comment(probe.label), "line": probe.span.line, "column": probe.span.column,
                "filtered": True, "tracepoint": None, "usdt": sites, "entry_fn": "", "entry_body": [],
                "return_fn": "", "return_body": [], "placed": ""}

    @staticmethod
    def watches_roots(scope: ir.Scope) -> bool:
        """--comm and --all: the libraries of a root that appears later (a container) are probed
        as a process there arrives (--per-process attaches to each process anyway)."""
        return scope.mode == "all" or (scope.mode == "comm" and not scope.per_process)

    def manifest(self, program: ir.Program, views, layouts) -> dict:
        probes = []
        for res, res_views in zip(program.resources, views):
            views_of = dict(zip(res.probes, res_views))
            for probe in ir.attach_order(res.probes):
                view = views_of[probe]
                if probe.kind == ir.ProbeKind.USDT:
                    # by address, with the semaphore's file offset for the kernel to raise
                    probes += [{"path": probe.path, "library": "", "function": probe.label, "usdt": True,
                                "address": site["address"], "ref_ctr": site["ref_ctr"], "offset": 0,
                                "code": "", "entry": site["entry_fn"], "return": "", "also": False}
                               for site in view["usdt"]]
                if probe.kind == ir.ProbeKind.UPROBE:
                    # also: another root's copy, whose process may end before the attach
                    # offset: where in the function both probes sit (probedsl.passes.placement); code:
                    # the bytes up to it, checked again before attaching there
                    probes += [{"path": path, "library": probe.library, "function": probe.function,
                                "offset": self.target.attaches_at(probe, path), "code": probe.code_in(path),
                                "entry": view["entry_fn"], "return": view["return_fn"], "also": path != probe.path}
                               for path in probe.attached_files]
                    # by address, in that file only: the code is checked again before attaching
                    probes += [{"path": t["site"].path, "library": probe.library, "function": probe.function,
                                "reentry": True, "address": t["site"].address, "code": t["site"].code,
                                "offset": 0, "entry": t["entry_fn"], "return": "",
                                "also": t["site"].path != probe.path} for t in view.get("then", ())]
        return {
            "recipe": program.name, "target": program.scope.mode, "comm": program.scope.comm,
            "per_process": program.scope.mode == "comm" and program.scope.per_process,
            "watch_roots": self.watches_roots(program.scope),
            "follow_forks": program.scope.tracks_children,
            "dwarf": self.unwinds(program), "hold_mappings": self.holds_mappings(program),
            "probes": probes, "read_live": program.read_live, "sample": program.sample,
            "resources": [lay.to_json() for lay in layouts],
        }

    def generate(self, program: ir.Program, ready_pid: int = 0, pidns_ino: int = 0) -> Generated:
        # pidns_ino: the C takes the namespace as defines at load time (drivers/bcc_compile.py)
        views, resources = [], []
        layouts = [layout.of(program, res) for res in program.resources]
        for res, lay in zip(program.resources, layouts):
            res_views = [self.probe_view(program, lay, p) for p in res.probes]
            views.append(res_views)
            rendered = [v for view in res_views for v in (view, *view.get("then", ()))]
            resources.append({
                "name": res.name, "layout": lay, "probes": rendered, "width": max(lay.scratch_width, 1),
                "reentered": any(self.target.asks_reentry(p) for p in res.probes),
                "ncounters": len(Counter), "ungrouped": int(Counter.UNGROUPED), "untracked": int(Counter.UNTRACKED),
                "key_names": ", ".join(res.key_names), "pending": 0})
            if self.defers(program, lay):
                most = max(sum(a.kind == "acquire" for a in p.actions) for p in res.probes)
                resources[-1].update(store=self.store(lay), pending=1 << (most - 1).bit_length())
        unwinders = self.unwinder_programs(program)
        kernel_stacks, fp_walk = self.stack_kinds(program)
        gen = self.render_template(program=program, description=self.comment(program.description),
                                   scope=program.scope, watch_arrivals=program.scope.mode in ("comm", "all"),
                                   filename=self.comment(program.filename.rsplit("/", 1)[-1]),
                                   resources=resources, filter=self.filter_lines(program.scope),
                                   kernel_stacks=kernel_stacks, fp_walk=fp_walk, stack_depth=ir.STACK_DEPTH, front_probes=FRONT_PROBES,
                                   stack_buckets=ir.STACK_BUCKETS, kernel_walk_buckets=KERNEL_WALK_BUCKETS,
                                   dwarf=self.unwinds(program), keep_returns=self.keeps_returns(program),
                                   hold_maps=self.holds_mappings(program),
                                   kernel_types=any(p.kind in (ir.ProbeKind.TRACEPOINT, ir.ProbeKind.SYSCALL)
                                                    for r in program.resources for p in r.probes),
                                   images=any(lay.ends_with_image for lay in layouts), ended_images=layout.ENDED_IMAGES,
                                   threads=layout.THREADS,
                                   unw=_UNWINDER, py=_PYTHON, unwinders=unwinders)
        manifest = self.manifest(program, views, layouts)
        if unwinders:
            manifest["unwinders"] = unwinders
        # the C text goes in as a raw string unless it could end one; repr is always safe
        literal = f"r'''\n{gen.text}'''" if "'''" not in gen.text and not gen.text.endswith("\\") else repr(gen.text)
        gen.loader = self.env.get_template("bcc_loader.py.j2").render(
            c_text=literal, manifest=pprint.pformat(manifest, sort_dicts=True), program=program)
        gen.manifest = manifest
        return gen
