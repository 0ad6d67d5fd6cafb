"""IR -> one self-contained bpftrace script, in the dialect of its target (probedsl.targets.bpftrace)."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import List, Tuple

from probedsl import ir
from probedsl.errors import ProbedslError
from probedsl.ir import layout
from probedsl.ir.layout import TALLY_SHIFT, Counter, ResourceLayout, counted
from probedsl.targets.base import Generated
from probedsl.targets.bpftrace import READY_MARK, SNAPSHOT_MARK

from .base import Backend

LIVE_VALUE = {"time": "nsecs", "size": "{size}", "pid": "pid", "tid": "tid",
              "ustack": f"ustack({{mode}}, {ir.STACK_DEPTH})", "kstack": f"kstack({{mode}}, {ir.STACK_DEPTH})",
              "comm": "comm"}  # image: $img (stamp)


def _arg(self, v: ir.Arg) -> str:
    if v.index >= self.target.max_args:
        raise ProbedslError(f"bpftrace reads only the first {self.target.max_args} arguments on x86_64 "
                            f"(arg0..arg{self.target.max_args - 1})")
    return f"arg{v.index}"


def probe_path(path: str) -> str:
    """A library path in a probe: bpftrace's lexer splits a bare path at characters like '+'
    (libstdc++), so quote those; libraries.SAFE_PATH has already ruled out quotes and spaces."""
    return path if re.fullmatch(r"[A-Za-z0-9_./-]+", path) else f'"{path}"'


def _u64(text: str) -> str:
    return f"(uint64)({text})"


def is_u64(v: ir.Value, ids: bool = False) -> bool:
    """Whether bpftrace types it uint64: args, retval, scratch, 8-byte reads, unsigned arithmetic of those; ids: pid, tid."""
    if isinstance(v, ir.BinOp):
        return v.op in ("+", "*", "/", "%", "&", "|", "^", "<<", ">>") and is_u64(v.left, ids) and is_u64(v.right, ids)
    return isinstance(v, (ir.Arg, ir.Saved)) or (isinstance(v, ir.Builtin) and (v.name == "ret" or ids)) or (isinstance(v, ir.Deref) and v.size == 8)


class BpftraceBackend(Backend):
    name = "bpftrace"
    template = "bpftrace.bt.j2"
    RENDER = {
        ir.Const: lambda self, v: str(v.value) if v.value >= 0 else f"({v.value})",
        ir.Arg: _arg,
        ir.Saved: lambda self, v: f"$s.{v.slot + 2}",
        ir.Builtin: lambda self, v: {"ret": "retval", "pid": "pid", "tid": "tid"}[v.name],
        ir.Field: lambda self, v: f"args->{v.name}",
        ir.Deref: lambda self, v: (f"*(uint64 *)uptr({self.expr(v.address)} + {v.offset})" if v.size == 8
                                   else f"*(int32 *)uptr({self.expr(v.address)} + {v.offset})"),
        ir.Int32: lambda self, v: f"(int64)(int32){self.expr(v.operand)}",
        ir.Not: lambda self, v: f"!{self.expr(v.operand)}",
        ir.BinOp: lambda self, v: self.binop(v),
    }

    def binop(self, value: ir.BinOp) -> str:  # equal bits: no sign between uint64 values and literals >= 0
        plain = [is_u64(v, True) or (isinstance(v, ir.Const) and v.value >= 0) for v in (value.left, value.right)]
        if self.target.costly_casts and value.op in ("==", "!=") and all(plain):
            return f"({self.expr(value.left)} {value.op} {self.expr(value.right)})"
        return super().binop(value)

    def signed(self, text: str) -> str:
        return f"(int64){text}"

    def delete(self, map_name: str, key: List[str]) -> str:
        if not self.target.delete_with_key_argument:
            return f"delete({map_name}[{', '.join(key)}]);"
        call = f"delete({map_name}, {key[0] if len(key) == 1 else '(' + ', '.join(key) + ')'})"
        return f"$deleted = {call};" if self.target.delete_result_used else f"{call};"

    def u64(self, v: ir.Value) -> str:
        """The value as uint64 (map keys and record fields agree on it): no cast where the value
        has that type and the dialect warns about such a cast, or pays for each."""
        return self.expr(v) if self._elides and is_u64(v, self.target.costly_casts) else _u64(self.expr(v))

    def u64_text(self, text: str) -> str:
        """u64() for generated text: reg() and nsecs are uint64 already."""
        return text if self._elides and re.fullmatch(r'nsecs|reg\("\w+"\)|arg\d+', text) else _u64(text)

    @property
    def _elides(self) -> bool:
        return self.target.warns_same_type_cast or self.target.costly_casts

    def pid_key(self) -> str:
        return "pid" if self.target.costly_casts else "(uint64)pid"  # 0.17's pid is uint64

    def elapsed(self, since: str) -> str:
        """nsecs - since, without the sign warning of dialects whose subtraction is signed."""
        return f"(int64)nsecs - (int64){since}" if self.target.signed_subtraction else f"nsecs - {since}"

    def typing_writes(self, res: ir.Resource, lay: ResourceLayout) -> List[str]:
        """Writes, never run, typing the live and scratch maps for a checker that needs a write first."""
        values = ", ".join("(uint64)0" if f == "image" else LIVE_VALUE[f].format(size=_u64("0"), mode=self.target.stack_mode)
                           for f in lay.fields)
        lines = [f"@{lay.live}[{', '.join(['(uint64)0'] * lay.key_arity)}] = ({values});"]
        if any(self.target.asks_reentry(p) for p in res.probes):
            lines.append(f"@{self.reentered_map(lay)}[tid] = {_u64('0')};")
        if any(p.at_return for p in res.probes):
            lines.append(f"@{lay.scratch}[tid] = ({', '.join(['(uint64)0'] * (lay.scratch_width + 2))});")
        return lines

    def attach_order(self, probes) -> list:
        """The text order that makes bpftrace attach the release probes first."""
        order = ir.attach_order(probes)
        return order[::-1] if self.target.attaches_in_reverse else order

    pidns_ino = 0  # probedsl's PID namespace, when it runs in one (generate() sets it): see ours()

    def ours(self) -> str:
        """The start of a tracepoint's filter that keeps only tasks of probedsl's PID namespace, in
        which `pid` is defined (0.24+): for any other, bpftrace's namespaced `pid` fails its helper
        and prints a warning each time (measured on 0.27.1: one per fork on the host). "" on the
        host. Not in uprobes: 0.27.1 reads curtask there as user memory (its fields read 0, with
        an "Addrspace mismatch" warning): a host process mapping the same files (a namespace that
        shares the host's root) is traced there as pid 0 (docs/usage.md, "PID namespaces")."""
        if not self.pidns_ino:
            return ""
        level = "(uint64)curtask->thread_pid->level * sizeof(struct upid)"
        upid = f"(struct upid *)((uint64)curtask->thread_pid + offsetof(struct pid, numbers) + {level})"
        return f"({upid})->ns->ns.inum == {int(self.pidns_ino)} && "

    def filter(self, scope: ir.Scope, every_task: bool = False) -> str:
        """every_task: a tracepoint's (any task hits it): only this namespace's, see ours()."""
        ours = self.ours() if every_task else ""
        # a launched command (cmd) is started by probedsl itself, so it is traced by pid too
        if scope.tracks_children:
            return f"/{ours}@probedsl_traced[{self.pid_key()}]/"
        # all: $1 is probedsl's own pid (its reading of the maps is not traced)
        return "/" + ours + {"all": "pid != $1", "pid": f"pid == {int(scope.pid)}", "cmd": f"pid == {int(scope.pid)}",
                             "comm": "comm == str($1)"}[scope.mode] + "/"

    def key(self, action: ir.Action) -> List[str]:
        return [self.u64(k) for k in action.key]

    def declarations(self, res: ir.Resource, lay: ResourceLayout) -> List[str]:
        """Each keyed map sized for what it holds (sums and histograms live in per-CPU maps)."""
        maps = [("hash", lay.live, lay.live_size)]
        if any(p.at_return for p in res.probes):
            maps.append(("hash", lay.scratch, lay.scratch_size))
        if any(self.target.asks_reentry(p) for p in res.probes):
            maps.append(("hash", self.reentered_map(lay), lay.scratch_size))
        for t in lay.tallies:
            if t.keys:
                maps += [("percpuhash", t.map, t.size), ("hash", t.seen_map, t.size)]
        if lay.lifetime and lay.lifetime.keys:
            maps.append(("percpuhash", lay.lifetime.map, lay.lifetime.size))
        return [f"let @{name} = {kind}({int(size)});" for kind, name, size in maps]

    def tally(self, lay: ResourceLayout, record: str, sign: str) -> List[str]:
        """Add (sign "") or remove (sign "-") the live entry in tuple variable `record` from every
        tally of the resource: a per-CPU sum of (bytes << TALLY_SHIFT) + 1 per event (one update, no
        race); the group's first capture time, into a plain hash (a per-CPU one is slow to make)."""
        fields = lay.fields
        lines = []
        for t in lay.tallies:
            key = f"[{', '.join(f'{record}.{fields.index(k)}' for k in t.keys)}]" if t.keys else ""
            packed = f"(({record}.{fields.index('size')} << {TALLY_SHIFT}) + 1)" if "size" in fields else "1"
            lines.append(f"@{t.map}{key} = sum({sign}{packed});")
            if not sign:      # when its stack was captured: which process image names it
                lines.append(f"if (@{t.seen_map}{key} == 0) {{ @{t.seen_map}{key} = {record}.0; }}")
        return lines

    def count(self, lay: ResourceLayout, counter: Counter) -> str:
        return f"@{lay.counter_map(counter)} = count();"

    def action(self, program: ir.Program, lay: ResourceLayout, action: ir.Action, again: str = "") -> List[str]:
        """again: the map holding each thread's rsp at a tail jump, for a release that asks."""
        key = self.key(action)
        if action.through is not None:       # the range's keys, one by one: $first + $n; the pid read once
            key = ["$p" if v == ir.Builtin("pid") else k for v, k in zip(action.key, key[:-1])] + ["$first + $n"]
        live = f"@{lay.live}[{', '.join(key)}]"
        if action.kind == "change":
            body = self.change(program, lay, action, live)
        elif action.kind == "acquire":
            size = self.u64(action.size) if action.size is not None else _u64("0")
            stamped, image = self.stamp(program, lay, action)
            values = ", ".join(image if f == "image" else LIVE_VALUE[f].format(size=size, mode=self.target.stack_mode)
                               for f in lay.fields)
            # $o: an entry under this key with no release seen leaves its tallies first.
            # $w: a full map refuses the insert silently, so look the key up again
            replaced = ["  " + self.count(lay, Counter.REPLACED)]
            if lay.ends_with_image:
                # the entry of an image an exec ended: that image's end, not a replacement
                pid, image = (f"$o.{lay.fields.index(f)}" for f in layout.IMAGE_FIELDS)
                replaced = [f"  if ({image} != $w.{lay.fields.index('image')} && "
                            f"@probedsl_ended[{pid}, {image}] != 0) {{",
                            "    " + self.count(lay, Counter.ENDED_BY_EXEC), "  } else {",
                            "    " + self.count(lay, Counter.REPLACED), "  }"]
            recorded = [*stamped, f"$o = {live};", f"{live} = ({values});", f"$w = {live};",
                        "if ($o.0 != 0) {", *replaced,
                        *["  " + t for t in self.tally(lay, "$o", "-")], "}",
                        f"if ($w.0 == 0) {{ {self.count(lay, Counter.UNTRACKED)} }} else {{",
                        *["  " + t for t in self.tally(lay, "$w", "")], "}"]
            if program.sample > 1:
                recorded = [f"if (rand % {int(program.sample)} == 0) {{", *["  " + s for s in recorded], "}"]
            counts = Counter.ACQUIRED in counted(program, lay)
            body = [self.count(lay, Counter.ACQUIRED), *recorded] if counts else recorded
        else:
            hit = [*self.tally(lay, "$v", "-"), self.delete(f"@{lay.live}", key)]
            if not lay.lifetime:      # else the driver counts the histogram's entries
                hit.append(self.count(lay, Counter.RELEASED))
            else:
                keys = ", ".join(f"$v.{lay.fields.index(k)}" for k in lay.lifetime.keys)
                hit.append(f"@{lay.lifetime.map}{f'[{keys}]' if keys else ''} = hist({self.elapsed('$v.0')});")
            unknown = [self.count(lay, Counter.UNKNOWN_RELEASES)]
            if again:         # the same call's second hit, after a tail jump (probedsl/passes/reentry.py)
                unknown = [f'if ({again}[tid] == reg("sp")) {{', f"  {self.delete(again, ['tid'])}",
                           "} else {", f"  {unknown[0]}", "}"]
            body = [f"$v = {live};", "if ($v.0 != 0) {", *["  " + s for s in hit], "} else {",
                    *["  " + s for s in unknown], "}"]
            if action.through is not None:
                # most keys of a range were never acquired (close_range(3, ~0U)): no unknown release
                body = [f"$first = {self.u64(action.key[-1])};", f"$last = {self.u64(action.through)};",
                        *([f"$p = {self.pid_key()};"] if "$p" in key else []), "$n = (uint64)0;", f"while ($n < {int(self.range_keys(lay))}) {{", "  if ($first + $n > $last) { break; }",
                        *["  " + s for s in body[:-(2 + len(unknown))]], "  }", "  $n = $n + 1;", "}"]
        if action.guard is None:
            return body
        return [f"if ({self.expr(action.guard)}) {{", *["  " + s for s in body], "}"]

    def stamp(self, program: ir.Program, lay: ResourceLayout, action: ir.Action) -> Tuple[List[str], str]:
        """The lines computing the image an acquisition or change stamps its entry with
        (layout.image_stamp), and the variable holding it: the process's ($i), or 0 (the entry
        outlives every exec)."""
        if not lay.ends_with_image:
            return [], ""
        res = next(r for r in program.resources if r.name == lay.name)
        stamp = layout.image_stamp(res, action)
        if stamp is True:
            return self.register_image(), "$i"
        if stamp is False:
            return ["$img = (uint64)0;"], "$img"
        return ["$img = (uint64)0;", f"if ({self.expr(stamp)}) {{",
                *["  " + s for s in self.register_image()], "  $img = $i;", "}"], "$img"

    def change(self, program: ir.Program, lay: ResourceLayout, action: ir.Action, live: str) -> List[str]:
        """The live entry under the key, if any, stamped anew ($img): out of its tallies' group
        and back into the new one (the image is part of their keys)."""
        at = lay.fields.index("image")
        stamped, image = self.stamp(program, lay, action)
        values = ", ".join(image if i == at else f"$v.{i}" for i in range(len(lay.fields)))
        return [f"$v = {live};", "if ($v.0 != 0) {", *["  " + s for s in stamped],
                f"  if ({image} != $v.{at}) {{", *["    " + t for t in self.tally(lay, "$v", "-")],
                f"    {live} = ({values});", f"    $w = {live};",
                *["    " + t for t in self.tally(lay, "$w", "")], "  }", "}"]

    def range_keys(self, lay: ResourceLayout) -> int:
        return self.target.range_keys_with_image if lay.ends_with_image else self.target.range_keys

    def register_image(self) -> List[str]:
        """$i = the process's image (probedsl/drivers/images.py): its start time, registered by its
        first acquisition whichever thread comes first (a new process reusing the pid has another);
        a full table refuses it silently, so look again."""
        pid = self.pid_key()
        return [f"$i = @probedsl_images[{pid}];", "if ($i == 0) {",
                "  $i = curtask->group_leader->start_time;", f"  @probedsl_images[{pid}] = $i;",
                f"  if (@probedsl_images[{pid}] == 0) {{ @probedsl_image_lost = count(); }}", "}"]

    def probe_view(self, program: ir.Program, res: ir.Resource, lay: ResourceLayout, probe: ir.Probe) -> dict:
        if probe.kind == ir.ProbeKind.UPROBE:
            if not probe.path:
                raise ProbedslError(f"{probe.label}: library not resolved")
            paths = [probe_path(p) for p in probe.attached_files]
            entry = ", ".join(f"uprobe:{probe_path(path)}:{probe.function}{self.offset(probe, path)}"
                              for path in probe.attached_files)
            ret = ", ".join(f"uretprobe:{path}:{probe.function}" for path in paths)
        elif probe.kind == ir.ProbeKind.USDT:        # bpftrace reads the note: every site, its arguments, its semaphore
            entry, ret = f"usdt:{probe_path(probe.path)}:{probe.function}", ""
        elif probe.kind == ir.ProbeKind.SYSCALL:
            entry = f"tracepoint:syscalls:sys_enter_{probe.function}"
            ret = f"tracepoint:syscalls:sys_exit_{probe.function}"
            if probe.at_return and not probe.saved_args:    # nothing to carry: the exit alone
                probe, entry, ret = replace(probe, at_return=False), ret, ""
        elif probe.kind == ir.ProbeKind.TRACEPOINT:
            entry, ret = f"tracepoint:{probe.function}", ""
        else:
            raise ProbedslError(f"{probe.label}: bpftrace has no lowering for a {probe.kind.value} probe")
        again = f"@{self.reentered_map(lay)}" if self.target.asks_reentry(probe) else ""
        actions = [line for a in probe.actions for line in self.action(program, lay, a, again)]
        scratch = f"@{lay.scratch}[tid]"
        width = lay.scratch_width
        if probe.at_return:
            saved = [self.expr(ir.Field(probe.fields[i]) if probe.kind == ir.ProbeKind.SYSCALL else ir.Arg(i))
                     for i in probe.saved_args] + ["0"] * (width - len(probe.saved_args))
            if probe.kind == ir.ProbeKind.SYSCALL:      # system calls do not nest: no stack pointer to compare
                fields = ", ".join(self.u64_text(x) for x in [str(probe.id), "0", *saved])
                entry_body = [f"{scratch} = ({fields});"]
            else:
                fields = ", ".join(self.u64_text(x) for x in [str(probe.id), 'reg("sp")', *saved])
                entry_body = [f"$s = {scratch};",
                              '// skip calls made inside another call of this resource (realloc -> malloc)',
                              'if ($s.0 == 0 || $s.1 <= reg("sp")) {', f"  {scratch} = ({fields});", "}"]
            if probe.entry_guard is not None:
                entry_body = [f"if ({self.expr(probe.entry_guard)}) {{", *["  " + s for s in entry_body], "}"]
            return_body = [f"$s = {scratch};", f"if ($s.0 == {probe.id}) {{",
                           "  " + self.delete(f"@{lay.scratch}", ["tid"]),
                           *["  " + line for line in actions], "}"]
        else:
            entry_body = actions
            if res.scratch_width or any(p.at_return for p in res.probes):
                entry_body = [f"$s = {scratch};", 'if ($s.0 == 0 || $s.1 <= reg("sp")) {',
                              *["  " + line for line in actions], "}"] if probe.kind == ir.ProbeKind.UPROBE else actions
            return_body = []
            if self.target.marks_reentry(res, probe):
                entry_body = entry_body + [f'@{self.reentered_map(lay)}[tid] = reg("sp");  '
                                           "// a tail jump in this call may enter a probed function again"]
        why_not = ("" if self.offset(probe, probe.path) else
                   "bpftrace puts a uretprobe at a function's entry only, and both would trap" if probe.at_return
                   else f"bpftrace {self.target.range_text()} attaches at entries only")
        placed = self.placed(probe, probe.path, why_not) if probe.kind == ir.ProbeKind.UPROBE else ""
        return {"placed": placed, "label": self.comment(probe.label), "line": probe.span.line, "column": probe.span.column,
                "filter": self.filter(program.scope, probe.kind not in ("uprobe", "usdt")) if probe.filtered else "", "entry": entry, "entry_body": entry_body, "ret": ret if probe.at_return else "",
                "return_body": return_body}

    @staticmethod
    def reentered_map(lay: ResourceLayout) -> str:
        return f"{lay.name}_reentered"

    def reentry_views(self, program: ir.Program, lay: ResourceLayout, probe: ir.Probe) -> List[dict]:
        """A probe on each branch that enters the probe again: the thread's stack pointer, which
        the second hit compares (a tail jump leaves it as at the call's entry)."""
        return [{"placed": "", "label": self.comment(f"{s.origin} enters {probe.label} again at 0x{s.address:x} "
                                                        f"(a tail jump: the same call)"),
                 "line": probe.span.line, "column": probe.span.column, "filter": self.filter(program.scope),
                 "entry": f"uprobe:{probe_path(s.path)}:0x{s.address:x}",
                 "entry_body": [f'@{self.reentered_map(lay)}[tid] = reg("sp");'], "ret": "", "return_body": []}
                for s in self.target.reentry_branches(probe)]

    def offset(self, probe: ir.Probe, path: str) -> str:
        """"+N" where the probe sits inside the function (placement), else "" (the entry)."""
        offset = self.target.attaches_at(probe, path)
        return f"+{int(offset)}" if offset else ""

    def count_script(self, program: ir.Program) -> str:
        """--estimate: entries of every probed function counted in @calls[probe], filtered like the program."""
        filt = self.filter(program.scope)
        lines = [f"uprobe:{probe_path(path)}:{p.function} {filt} {{ @calls[probe] = count(); }}"
                 for res in program.resources for p in res.probes if p.kind == ir.ProbeKind.UPROBE for path in p.attached_files]
        return "\n".join(dict.fromkeys(lines)) + "\n"

    def generate(self, program: ir.Program, ready_pid: int = 0, pidns_ino: int = 0) -> Generated:
        """ready_pid: probedsl's own pid, for the probes it uses to learn that everything is
        attached (getppid) and to ask for snapshots (getpgid); 0 for a standalone script.
        pidns_ino: the PID namespace probedsl runs in, 0 for the host's (process/pidns.py)."""
        self.pidns_ino = int(pidns_ino)
        if pidns_ino and not self.target.namespaced_pids:
            raise ProbedslError(f"{self.target.name} compares the host's pids, and probedsl runs in a PID "
                                "namespace (a container): use --backend bcc, bpftrace 0.24 or later, or run "
                                "probedsl on the host")
        resources = []
        for res in program.resources:
            if res.max_live >= 1 << TALLY_SHIFT:
                raise ProbedslError(f"bpftrace: --max-live must be below {1 << TALLY_SHIFT} (tallies pack the "
                                    f"count in {TALLY_SHIFT} bits); use --backend bcc for more")
            lay = layout.of(program, res)
            scratch = f"@{lay.scratch}" if any(p.at_return for p in res.probes) else ""
            maps = [f"@{lay.live}"] if program.read_live else []
            maps += [f"@{lay.counter_map(c)}" for c in counted(program, lay)]
            for t in lay.tallies:
                maps += [f"@{t.map}", f"@{t.seen_map}"]
            if lay.lifetime:
                maps.append(f"@{lay.lifetime.map}")
            resources.append({
                "name": res.name, "key_names": ", ".join(res.key_names), "fields": ", ".join(lay.fields),
                "live": f"@{lay.live}", "declared": self.declarations(res, lay) if self.target.map_declarations else [],
                "typing": self.typing_writes(res, lay) if self.target.type_maps_first else [],
                "probes": [view for p in self.attach_order(res.probes) if p.attached_files or p.kind != "uprobe"
                           for view in (*self.reentry_views(program, lay, p), self.probe_view(program, res, lay, p))],
                "printed": maps, "scratch": scratch,
                "tallies": [f"@{t.map}[{', '.join(t.keys)}] = sum of (bytes << {TALLY_SHIFT}) + 1 "
                            f"per live entry of the group, kept at acquire and release" for t in lay.tallies],
                # bpftrace prints every map left at exit: clear the large ones nobody asked for
                "cleared": list(dict.fromkeys(maps + [f"@{lay.live}"] + ([scratch] if scratch else [])
                                              + ([f"@{self.reentered_map(lay)}"]
                                                 if any(self.target.asks_reentry(p) for p in res.probes) else []))),
            })
        ending = [r for r, res in zip(resources, program.resources) if layout.of(program, res).ends_with_image]
        if ending:       # the process-image maps, global, declared and printed with the first such resource
            ending[0]["declared"] += ([f"let @probedsl_images = hash({layout.THREADS});",
                                       f"let @probedsl_ended = hash({layout.ENDED_IMAGES});"]
                                      if self.target.map_declarations else [])
            ending[0]["typing"][:0] = (["@probedsl_images[(uint64)0] = (uint64)0;",
                                        "@probedsl_ended[pid, (uint64)0] = (uint64)0;"]
                                       if self.target.type_maps_first else [])
            ending[0]["printed"] += ["@probedsl_ended", "@probedsl_image_lost"]
            ending[0]["cleared"] += ["@probedsl_ended", "@probedsl_image_lost", "@probedsl_images"]
        scope = program.scope
        return self.render_template(
            program=program, dialect=self.target.name, images=bool(ending),
            forget_image=self.delete("@probedsl_images", ["(uint64)pid"]),
            untrack=lambda key: self.delete("@probedsl_traced", [key]), description=self.comment(program.description),
            declare_traced=f"let @probedsl_traced = hash({layout.THREADS});" if self.target.map_declarations else "",
            filename=self.comment(program.filename.rsplit("/", 1)[-1]), resources=resources,
            filter=self.filter(scope), scope=scope, pidns_ino=int(pidns_ino), ours=self.ours(),
            snapshot_mark=SNAPSHOT_MARK, ready_pid=int(ready_pid), ready_mark=READY_MARK)
