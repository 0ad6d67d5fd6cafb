"""Report model and formats: goldens from a fixed normalized run, round trips, growth, diff."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from probedsl import compiler, report
from probedsl.report import history
from probedsl.report import assemble
from probedsl.outputs import formats
from probedsl.drivers import images
from probedsl.ir import layout, stackformat
from probedsl.drivers.rundata import Live, Snapshot, Totals
from probedsl.stacks.symbolizer import Frame

from conftest import MEMLEAK, ROOT, probedsl

GOLDEN = ROOT / "tests" / "golden"


class FixedSymbolizer:
    """Names addresses from a table: goldens must not depend on this machine's binaries."""

    NAMES = {
        0x1000: ("wrapper1", 14, "/srv/app/leak", "leak.c", 5),
        0x1100: ("wrapper2", 18, "/srv/app/leak", "leak.c", 11),
        0x1200: ("main", 35, "/srv/app/leak", "leak.c", 18),
        0x2000: ("_IO_file_doallocate", 140, "/lib/libc.so.6", "", 0),
    }

    def refresh(self):
        pass

    def trusted(self, pid, addresses, when=None):
        return tuple(addresses)

    def user_stacks(self, stacks, leaf_returns=True):
        out = []
        for _pid, addresses, *_ in stacks:
            frames = []
            for a in addresses:
                fn, off, mod, file, line = self.NAMES.get(a, ("", 0, "", "", 0))
                if a == 0x1000:
                    frames.append(Frame(a, "checked_alloc", 0, mod, "alloc.h", 3, inlined=True))
                frames.append(Frame(a, fn, off, mod, file, line))
            out.append(frames)
        return out

    def kernel_stack(self, addresses):
        return []


def fixed_snapshot(extra_blocks=0) -> Snapshot:
    now = 10_000_000_000
    live = [
        Live("heap", (0x5000 + i * 32,), now - 2_000_000_000, 8, 42, 42, (0x1000, 0x1100, 0x1200))
        for i in range(5 + extra_blocks)
    ]
    live.append(Live("heap", (0x9000,), now - 2_500_000_000, 4096, 42, 42, (0x2000,)))
    live += [Live("heap", (0xA000 + i,), now - 1_000_000, 1, 42, 42, (0x3000 + i,)) for i in range(3)]
    totals = {
        "heap": Totals(
            acquired=19 + extra_blocks,
            released=10,
            unknown_releases=1,
            lifetime={(): [(1024, 2047, 6), (2048, 4095, 4)]},
        )
    }
    return Snapshot(now, live, totals, final=True)


def fixed_report(top=2, extra_blocks=0) -> report.Report:
    program = compiler.build(compiler.load(MEMLEAK))
    return assemble.build(
        program,
        fixed_snapshot(extra_blocks),
        FixedSymbolizer(),
        backend="bpftrace",
        target="command ./leak (pid 42)",
        duration_s=2.5,
        top=top,
        exit_status=0,
    )


def test_refused_image_records_are_counted_and_said():
    """Image records a full kernel table refused (probedsl.drivers.images) reach the JSON and a note:
    the entries of an image an exec ended may then read as leaks."""
    program = compiler.build(compiler.load(MEMLEAK))
    snap = images.settle([layout.of(program, r) for r in program.resources], fixed_snapshot(), [(7, 1), (8, 2)], lost=3)
    doc = json.loads(
        formats.render(
            assemble.build(program, snap, FixedSymbolizer(), backend="bcc", target="all", duration_s=1.0), "json"
        )
    )
    assert (doc["resources"]["heap"]["images_ended"], doc["resources"]["heap"]["image_lost"]) == (2, 3)
    assert any(n.startswith("3 process-image records lost") for n in doc["notes"]), doc["notes"]
    assert doc["resources"]["heap"]["live_blocks"] == 9  # none of the fixed entries' images ended


@pytest.mark.parametrize(
    "fmt,suffix", [("text", "txt"), ("json", "json"), ("folded", "folded"), ("speedscope", "speedscope.json")]
)
def test_format_matches_golden(fmt, suffix, update_golden):
    text = formats.render(fixed_report(), fmt)
    golden = GOLDEN / f"report.{suffix}"
    if update_golden or not golden.exists():
        golden.write_text(text)
    assert text == golden.read_text(), f"regenerate with pytest --update-golden and review {golden}"


def test_top_n_summarizes_the_rest_in_one_line():
    text = formats.to_text(fixed_report(top=2))
    assert "2 of 5 entries" in text
    assert "... and 3 more entries: 3 bytes, 3 blocks" in text


def test_inlined_frames_come_before_their_caller_with_file_and_line():
    stack = fixed_report().sections[0].entries[1].stack
    assert [str(f) for f in stack[:2]] == ["checked_alloc (inlined) [leak] alloc.h:3", "wrapper1+14 [leak] leak.c:5"]


def test_json_round_trips_to_the_same_rendering():
    rep = fixed_report()
    again = report.Report.from_dict(json.loads(formats.to_json(rep)))
    for fmt in formats.FORMATS:
        assert formats.render(again, fmt) == formats.render(rep, fmt)


def test_json_has_schema_and_version():
    doc = json.loads(formats.to_json(fixed_report()))
    assert doc["schema"] == "probedsl.report" and doc["version"] == 3


def test_folded_is_root_first_with_weights():
    lines = formats.to_folded(fixed_report()).splitlines()
    assert "heap;main;wrapper2;wrapper1;checked_alloc_[i] 40" in lines


def test_machine_formats_hold_every_entry_and_the_text_view_the_top():
    program = compiler.build(compiler.load(MEMLEAK))
    rep = assemble.build(
        program, fixed_snapshot(), FixedSymbolizer(), backend="bpftrace", target="t", duration_s=1, top=2, complete=True
    )
    live = rep.resources["heap"]["live_bytes"]
    folded = formats.to_folded(rep).splitlines()
    assert len(folded) == 5 and sum(int(l.rsplit(" ", 1)[1]) for l in folded) == live
    doc = json.loads(formats.to_json(rep))
    (section,) = [r for r in doc["reports"] if r["kind"] == "outstanding"]
    assert len(section["entries"]) == section["total_entries"] == 5 and section["omitted"]["entries"] == 0
    assert sum(json.loads(formats.to_speedscope(rep))["profiles"][0]["weights"]) == live
    text = formats.to_text(rep)  # the text view still shows the top 2
    assert "2 of 5 entries" in text and "... and 3 more entries: 3 bytes, 3 blocks" in text
    again = report.Report.from_dict(doc)  # and so does a saved run re-rendered
    assert formats.to_text(again) == text


def test_folded_names_keep_spaces_mark_kernel_and_inlined_frames_and_name_stripped_ones_by_module():
    frames = [
        Frame(0x10, "operator new(unsigned long)", 4, "/usr/lib/libstdc++.so.6", "", 0),
        Frame(0x20, "", 0, "/srv/app/server", "", 0, vaddr=0x1234),
        Frame(0x30, "helper", 0, "/srv/app/server", "a.c", 3, inlined=True),
        Frame(0x30, "a;b", 0, "/srv/app/server", "", 0),
    ]
    entry = report.Entry(
        values={"bytes": 7},
        oldest_age_s=None,
        pids=[1],
        stack=frames,
        kernel_stack=[Frame(0xFFFF, "kmalloc_trace", 9, "[kernel]", "", 0)],
    )
    rep = report.Report(
        "memleak",
        "bcc",
        "t",
        1,
        True,
        {},
        [report.Section("outstanding", "heap", ["ustack"], ["bytes"], 10, 0, [entry], 1)],
    )
    assert formats.to_folded(rep) == (
        "heap;a:b;helper_[i];server+0x1234;operator new(unsigned long);kmalloc_trace_[k] 7\n"
    )


def test_diff_calls_a_stack_missing_from_a_cut_run_unknown_not_gone():
    program = compiler.build(compiler.load(MEMLEAK))
    build = lambda complete: assemble.build(
        program,
        fixed_snapshot(),
        FixedSymbolizer(),
        backend="bpftrace",
        target="t",
        duration_s=1,
        top=2,
        complete=complete,
    )
    rows = history.diff(build(True), build(True))
    assert {r["status"] for r in rows} == {"both"} and len(rows) == 5
    rows = history.diff(build(True), build(False))  # the new run kept only its top 2
    assert sorted(r["status"] for r in rows) == ["both"] * 2 + ["not in the other run's top entries"] * 3


def test_speedscope_samples_index_shared_frames():
    doc = json.loads(formats.to_speedscope(fixed_report()))
    (prof,) = doc["profiles"]
    names = [doc["shared"]["frames"][i]["name"] for i in prof["samples"][1]]
    assert names == ["main", "wrapper2", "wrapper1", "checked_alloc"]
    assert prof["weights"] == [4096, 40] and prof["endValue"] == 4136 and prof["unit"] == "bytes"


def test_colour_only_when_asked():
    assert "\033[" not in formats.to_text(fixed_report())
    assert "\033[1m" in formats.to_text(fixed_report(), color=True)


def test_growth_flags_a_steady_leak_and_not_a_filled_cache():
    growth = history.Growth(intervals=3)
    flags = []
    for n in range(5):  # the wrapper1 stack grows by one block each time
        rep = fixed_report(extra_blocks=n)
        growth.annotate(rep)
        entry = next(e for e in rep.sections[0].entries if len(e.stack) > 1 and e.stack[1].function == "wrapper1")
        cache = next(e for e in rep.sections[0].entries if e.stack and e.stack[0].function == "_IO_file_doallocate")
        flags.append((entry.delta.get("bytes"), entry.growing, cache.growing))
    assert flags == [(None, False, False), (8, False, False), (8, False, False), (8, True, False), (8, True, False)]


def test_diff_orders_by_growth(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(formats.to_json(fixed_report()))
    b.write_text(formats.to_json(fixed_report(extra_blocks=7)))
    rows = history.diff(
        report.Report.from_dict(json.loads(a.read_text())), report.Report.from_dict(json.loads(b.read_text()))
    )
    assert rows[0]["values"]["bytes"] == (40, 96) and rows[0]["status"] == "both"
    result = probedsl("diff", str(a), str(b))
    assert result.returncode == 0 and "bytes 40 -> 96 (+56)" in result.stdout


def test_report_command_re_renders_a_saved_run(tmp_path):
    saved = tmp_path / "run.json"
    saved.write_text("probedsl: tracing...\n" + formats.to_json(fixed_report()))
    result = probedsl("report", str(saved), "--format", "folded")
    assert result.returncode == 0, result.stderr
    assert result.stdout == formats.to_folded(fixed_report())


def test_report_command_rejects_a_file_without_a_report(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    result = probedsl("report", str(bad))
    assert result.returncode == 1 and "no probedsl JSON report" in result.stderr and "Traceback" not in result.stderr


def tallied_snapshot() -> Snapshot:
    """fixed_snapshot as the kernel's per-group tallies give it: no entries read."""
    snap, groups = fixed_snapshot(), {}
    for l in snap.live:
        nbytes, count, seen = groups.get((l.ustack, l.pid), (0, 0, l.time_ns))
        groups[(l.ustack, l.pid)] = (nbytes + l.size, count + 1, seen)
    return Snapshot(snap.now_ns, None, snap.totals, True, {"heap": {("ustack", "pid"): groups}})


def test_tallied_report_equals_the_report_from_entries():
    program = compiler.build(compiler.load(MEMLEAK))
    args = dict(backend="bpftrace", target="t", duration_s=1.0, top=5)
    walked = assemble.build(program, fixed_snapshot(), FixedSymbolizer(), **args)
    tallied = assemble.build(program, tallied_snapshot(), FixedSymbolizer(), **args)
    assert tallied.resources == walked.resources
    (w, _), (t, _) = walked.sections, tallied.sections
    assert [(e.values, e.stack, e.pids) for e in t.entries] == [(e.values, e.stack, e.pids) for e in w.entries]
    assert t.total_entries == w.total_entries == 5
    assert all(e.oldest_age_s is None for e in t.entries)
    text = formats.to_text(tallied)
    assert "oldest" not in text and "bytes  blocks" in text
    assert report.Report.from_dict(json.loads(formats.to_json(tallied))).sections[0].entries[0].oldest_age_s is None


def test_sampled_report_is_scaled_and_says_it_estimates():
    program = compiler.build(compiler.load(MEMLEAK)).sampled(10)
    rep = assemble.build(program, tallied_snapshot(), FixedSymbolizer(), backend="bcc", target="t", duration_s=1.0)
    assert rep.resources["heap"]["live_blocks"] == 90 and rep.resources["heap"]["live_bytes"] == 10 * (40 + 4096 + 3)
    assert rep.resources["heap"]["acquired"] == 19  # counted before sampling: exact
    assert rep.sections[0].entries[0].values == {"bytes": 40960, "blocks": 10}
    assert rep.sections[1].histogram == [(1024, 2047, 60), (2048, 4095, 40)]
    text = formats.to_text(rep)
    assert "ESTIMATES from 1 in 10 acquisitions" in text and "sampled: 1 in 10" in text
    assert report.Report.from_dict(json.loads(formats.to_json(rep))).sample == 10


def test_bpftrace_tallies_of_one_stack_from_two_threads_add_up():
    """bpftrace prints a map keyed by a stored stack once per capturing thread, same text."""
    from probedsl.drivers.bpftrace import _pairs, _tally

    text = '{"@t": {"\\n\\t401000 0x401000 ([unknown])\\n,42": %d, "\\n\\t401000 0x401000 ([unknown])\\n,42": %d}}'
    raw = json.loads(text % ((16 << 24) + 1, (32 << 24) + 2), object_pairs_hook=_pairs)["@t"]
    assert _tally(raw, {}, ["ustack", "pid"]) == {((0x401000,), 42): (48, 3, 0)}
    assert _tally(5 << 24 | 2, 7, []) == {(): (5, 2, 7)}  # ungrouped: bare numbers


def test_stacks_that_end_early_are_counted_by_why():
    """Every stack of the report, shown or not, is counted when it ends in a marker."""
    snap = tallied_snapshot()
    groups = snap.tallies["heap"][("ustack", "pid")]
    (stack, pid), value = next(iter(groups.items()))
    groups[(stack + (stackformat.NO_FRAME_POINTER,), pid)] = groups.pop((stack, pid))
    groups[((0x1200, stackformat.DEPTH_LIMIT), pid)] = value
    program = compiler.build(compiler.load(MEMLEAK))
    rep = assemble.build(program, snap, FixedSymbolizer(), backend="bpftrace", target="t", duration_s=1.0, top=1)
    assert rep.sections[0].cut_stacks == {"no frame pointer": 1, "depth limit": 1}
    assert any(
        n.startswith("2 of ") and "heap stacks end early (1 depth limit, 1 no frame pointer)" in n for n in rep.notes
    ), rep.notes
    back = report.Report.from_dict(json.loads(formats.to_json(rep)))
    assert back.sections[0].cut_stacks == rep.sections[0].cut_stacks


def test_reachability_kinds_per_resource_and_entry_round_trip_and_print_a_leak_summary():
    program = compiler.build(compiler.load(MEMLEAK))
    now = 10_000_000_000
    stack = (0x1000, 0x1100, 0x1200)
    live = [Live("heap", (42, 0x5000 + i * 32), now - 1, 8, 42, 42, stack) for i in range(4)]
    live.append(Live("heap", (42, 0x9000), now - 1, 4096, 42, 42, (0x2000,)))
    live.append(Live("heap", (43, 0xB000), now - 1, 16, 43, 43, (0x2000,)))  # another process
    snap = Snapshot(now, live, {"heap": Totals(acquired=6)}, final=True)
    kinds = {
        (42, 0x5000): "definitely_lost",
        (42, 0x5020): "indirectly_lost",
        (42, 0x5040): "possibly_lost",
        (42, 0x5060): "still_reachable",
        (42, 0x9000): "still_reachable",
    }
    scan = {"pid": 42, "at": "exit", "blocks": 5, "scanned_bytes": 4096, "scan_s": 0.01, "pause_ms": 3.5}
    for leaks_only in (False, True):
        reach = report.Reachability(kinds, scan, leaks_only)
        rep = assemble.build(
            program, snap, FixedSymbolizer(), backend="bcc", target="pid 42", duration_s=1, top=10, reachability=reach
        )
        totals = rep.resources["heap"]["reachability"]
        assert totals["definitely_lost"] == {"bytes": 8, "blocks": 1}
        assert totals["still_reachable"] == {"bytes": 4104, "blocks": 2}
        assert totals["not_scanned"] == {"bytes": 16, "blocks": 1}
        entries = rep.sections[0].entries
        wrapped = next(e for e in entries if e.stack and e.stack[-1].function == "main")
        assert wrapped.kinds["possibly_lost"] == {"bytes": 8, "blocks": 1}
        assert wrapped.kinds["still_reachable"]["blocks"] == (0 if leaks_only else 1)
        assert wrapped.values == {"bytes": 24 if leaks_only else 32, "blocks": 3 if leaks_only else 4}
        assert all(e.kinds.get("still_reachable", {}).get("blocks", 0) == 0 for e in entries) or not leaks_only
        again = report.Report.from_dict(json.loads(formats.to_json(rep)))
        assert formats.to_text(again) == formats.to_text(rep)
        text = formats.to_text(rep)
        assert "LEAK SUMMARY (heap, pid 42 at its exit: 4096 bytes scanned in 0.01 s, paused 3.5 ms):" in text
        assert "    definitely lost: 8 bytes in 1 blocks" in text
        assert "        not scanned: 16 bytes in 1 blocks" in text


def _go_pprof(*args) -> str:
    go = shutil.which("go")
    assert go, "go tool pprof reads the pprof output: install golang-go (scripts/setup.sh does)"
    result = subprocess.run(
        [go, "tool", "pprof", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": os.environ.get("HOME", "/root"), "PPROF_TMPDIR": "/tmp"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _pprof_samples(path) -> list:
    """[(values, location ids)] as go tool pprof -raw lists them."""
    raw = _go_pprof("-raw", str(path))
    samples = []
    for line in raw.split("Samples:")[1].split("Locations")[0].splitlines():
        m = re.match(r"^\s+([\d\s]+):\s*([\d\s]*)$", line)
        if m:
            samples.append(([int(v) for v in m.group(1).split()], m.group(2).split()))
    return samples


def test_pprof_reads_in_gos_pprof_with_both_sample_types_and_every_entry(tmp_path):
    program = compiler.build(compiler.load(MEMLEAK))
    rep = assemble.build(
        program, fixed_snapshot(), FixedSymbolizer(), backend="bcc", target="t", duration_s=1, top=2, complete=True
    )
    path = tmp_path / "heap.pb.gz"
    path.write_bytes(formats.render(rep, "pprof"))
    raw = _go_pprof("-raw", str(path))
    assert "inuse_space/bytes inuse_objects/count" in raw
    samples = _pprof_samples(path)
    assert len(samples) == 5  # every entry, not the top 2
    assert sum(v[0] for v, _ in samples) == rep.resources["heap"]["live_bytes"]
    assert sum(v[1] for v, _ in samples) == rep.resources["heap"]["live_blocks"]
    # the inlined call and its caller share one location, with file and line
    assert re.search(r"checked_alloc alloc.h:3 s=0\n\s+wrapper1 leak.c:5 s=0", raw), raw
    top = _go_pprof("-top", "-nodefraction=0", "-sample_index=inuse_objects", str(path))
    assert "Type: inuse_objects" in top and " wrapper1" in top
    # -diff_base: the second run has two more 8-byte blocks under wrapper1
    more = assemble.build(
        program,
        fixed_snapshot(extra_blocks=2),
        FixedSymbolizer(),
        backend="bcc",
        target="t",
        duration_s=1,
        top=2,
        complete=True,
    )
    after = tmp_path / "after.pb.gz"
    after.write_bytes(formats.render(more, "pprof"))
    diff = _go_pprof(
        "-top", "-nodefraction=0", "-unit=B", "-sample_index=inuse_space", f"-diff_base={path}", str(after)
    )
    assert re.search(r"accounting for 16B.*\n(.*\n)*\s+16B .*checked_alloc", diff), diff


def test_merge_sums_runs_of_many_hosts_by_symbolic_stack(tmp_path):
    program = compiler.build(compiler.load(MEMLEAK))
    host = lambda extra, target: assemble.build(
        program,
        fixed_snapshot(extra_blocks=extra),
        FixedSymbolizer(),
        backend="bcc",
        target=target,
        duration_s=1,
        top=2,
        complete=True,
    )
    a, b = host(0, "host-a pid 42"), host(3, "host-b pid 42")
    paths = []
    for name, rep in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(formats.to_json(rep))
    result = probedsl("merge", *map(str, paths), "--format", "json")
    assert result.returncode == 0, result.stderr
    merged = json.loads(result.stdout)
    heap = merged["resources"]["heap"]
    assert heap["live_bytes"] == a.resources["heap"]["live_bytes"] + b.resources["heap"]["live_bytes"]
    assert heap["acquired"] == a.resources["heap"]["acquired"] + b.resources["heap"]["acquired"]
    (section,) = [r for r in merged["reports"] if r["kind"] == "outstanding"]
    assert section["total_entries"] == 5 == len(section["entries"])  # the same 5 stacks on both hosts
    wrapped = next(e for e in section["entries"] if e["stack"][0]["function"] == "checked_alloc")
    assert wrapped["bytes"] == 8 * (5 + 8) and wrapped["blocks"] == 13
    (lifetime,) = [r for r in merged["reports"] if r["kind"] == "lifetime"]
    assert sum(b["count"] for b in lifetime["histogram_ns"]) == 20
    assert "merged from 2 runs: host-a pid 42; host-b pid 42" in merged["notes"]
    text = probedsl("merge", *map(str, paths))
    assert text.returncode == 0 and "2 of 5 entries" in text.stdout


def test_pprof_labels_mappings_with_the_build_ids_the_run_read_not_this_hosts_files(tmp_path):
    """A saved run re-rendered elsewhere (report, merge): each mapping's build id is the one the
    symbolizer read when it named the frame, carried in the JSON; no file is opened to render."""
    program = compiler.build(compiler.load(MEMLEAK))
    rep = assemble.build(
        program, fixed_snapshot(), FixedSymbolizer(), backend="bcc", target="t", duration_s=1, top=2, complete=True
    )
    saved = json.loads(formats.to_json(rep))
    for section in saved["reports"]:
        for entry in section.get("entries", []):
            for frame in entry.get("stack") or []:
                if frame.get("address"):
                    frame["module"], frame["build_id"] = "/gone/on/this/host/libx.so", "0123abcd" * 5
    again = report.Report.from_dict(saved)
    path = tmp_path / "heap.pb.gz"
    path.write_bytes(formats.render(again, "pprof"))
    raw = _go_pprof("-raw", str(path))
    assert "/gone/on/this/host/libx.so" in raw and "0123abcd" * 5 in raw, raw


def test_snapshots_of_several_tracers_merge_into_one():
    """A bpftrace per root (probedsl.run.late_roots): counters, lifetime buckets and tallies add
    up, live entries join, and a snapshot without live entries leaves the merge without them."""
    from probedsl.drivers.merged import merged

    def snap(pid, acquired, live=True):
        totals = Totals(acquired=acquired, released=1, lifetime={(): [(1024, 2047, 1)]})
        entries = [Live("heap", (pid, 16), 5, 8, pid)] if live else None
        tally = {("ustack", "pid"): {((0x401000,), pid): (8, 1, 5), ((0x402000,), 7): (4, 1, 3)}}
        return Snapshot(
            10 + pid, entries, {"heap": totals}, final=True, tallies={"heap": tally}, incomplete=[f"why {pid}"]
        )

    one = merged([snap(1, 3), snap(2, 4)])
    heap = one.totals["heap"]
    assert (heap.acquired, heap.released, heap.lifetime) == (7, 2, {(): [(1024, 2047, 2)]})
    tally = one.tallies["heap"][("ustack", "pid")]
    assert tally[((0x401000,), 1)] == (8, 1, 5) and tally[((0x401000,), 2)] == (8, 1, 5)
    assert tally[((0x402000,), 7)] == (8, 2, 3)  # the same group seen by both: summed
    assert [e.pid for e in one.live] == [1, 2] and one.now_ns == 12 and one.incomplete == ["why 1", "why 2"]
    assert merged([snap(1, 3), snap(2, 4, live=False)]).live is None
