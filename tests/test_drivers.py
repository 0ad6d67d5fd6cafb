"""Driver decoding without root: the text each tracer version prints -> addresses and tallies."""

from __future__ import annotations

import json
import os
import re

from probedsl import backends
from probedsl.drivers import bcc_uprobes
from probedsl.process import btf
from probedsl.drivers.bpftrace import parse_stack


def test_stacks_as_each_bpftrace_version_prints_them():
    frames = (0x7F6A37500CB0, 0x55D0C1A3B1C7)
    printed = {
        "0.17 value": "\n\t7f6a37500cb0 0x7f6a37500cb0 ([unknown])\n\t55d0c1a3b1c7 0x55d0c1a3b1c7 ([unknown])\n",
        # 0.23 escapes a stack that is a map key once more: a literal backslash-n
        "0.23 key": "\\n\\t7f6a37500cb0 0x7f6a37500cb0 ([unknown])\\n\\t55d0c1a3b1c7 0x55d0c1a3b1c7 ([unknown])\\n",
        # 0.27 also removes every space from it
        "0.27 key": "\n\t7f6a37500cb00x7f6a37500cb0([unknown])\n\t55d0c1a3b1c70x55d0c1a3b1c7([unknown])\n",
        # ustack(raw), the 0.24+ dialects' mode
        "0.27 raw": "\n7f6a37500cb0\n55d0c1a3b1c7\n",
    }
    for version, text in printed.items():
        assert parse_stack(text) == frames, version


def test_kernel_frames_keep_their_addresses():
    assert parse_stack("\n\tffffffff8123a0c0 kmem_cache_alloc+12 ([kernel.kallsyms])\n") == (0xFFFFFFFF8123A0C0,)
    # 0.27.1, a kstack(perf) in a map key: no spaces, no module, a symbol that may start with a hex letter
    printed = (
        "\n\tffffffff81652e9f__kmalloc_cache_noprof+575\n\tffffffff817c39ffext4_dir_open+31\n"
        "\tffffffff816d47d6do_dentry_open+422\n"
    )
    assert parse_stack(printed) == (0xFFFFFFFF81652E9F, 0xFFFFFFFF817C39FF, 0xFFFFFFFF816D47D6)


# --- what bpftrace 0.27 prints (measured on 0.27.0 and 0.27.1 in the Debian sid root) -------
def memleak_driver():
    import types
    from probedsl import ir, targets
    from probedsl.drivers.bpftrace import BpftraceDriver
    from test_backends import memleak_program

    program = memleak_program(ir.Scope("pid", pid=4242))
    target = targets.for_version("bpftrace", (0, 27, 1))
    driver = BpftraceDriver(program, backends.for_target(target).generate(program, ready_pid=1), target)
    return driver, program, types.SimpleNamespace


def read_printed(lines):
    """The snapshots the driver reads from these stdout lines."""
    driver, program, namespace = memleak_driver()
    driver.proc = namespace(stdout=iter(line + "\n" for line in lines))
    driver._read_stdout()
    return [driver.snapshots.get_nowait() for _ in range(driver.snapshots.qsize())], program


def test_empty_scalar_maps_printed_as_zero_read_as_absent_ones():
    """0.27.0 prints an empty count() map as 0 (`{"@x": 0}`); earlier versions print nothing."""
    from probedsl.ir import layout
    from probedsl.ir.layout import counted
    from probedsl.ir.layout import Counter

    _, program = read_printed([])
    lay = layout.of(program, program.resources[0])
    name = f"@{lay.counter_map(Counter.UNKNOWN_RELEASES)}"
    zeros = [json.dumps({"type": "map", "data": {f"@{lay.counter_map(c)}": 0}}) for c in counted(program, lay)]
    mark = json.dumps({"type": "printf", "data": "probedsl:snapshot\n"})
    (with_zeros,), _ = read_printed(zeros + [mark])
    (without,), _ = read_printed([mark])
    assert with_zeros.totals == without.totals
    (three,), _ = read_printed(zeros + [json.dumps({"type": "map", "data": {name: 3}}), mark])
    assert three.totals["heap"].unknown_releases == 3


def test_warnings_printed_among_the_json_by_0_27_0_are_skipped():
    """0.27.0 writes compile warnings (the source line and a marker under it) to stdout, before
    the JSON lines; 0.27.1 moved them to stderr."""
    from probedsl.ir import layout
    from probedsl.ir.layout import Counter

    _, program = read_printed([])
    lay = layout.of(program, program.resources[0])
    printed = [
        "/tmp/p.bt:36:3-40: WARNING: Return value discarded.",
        "  delete(@heap_scratch, tid);",
        "  ~~~~~~~~~~~~~~~~~~~~~~~~~~~",
        '{"type": "attached_probes", "count": 2, "data": {"probes": 2}}',
        json.dumps({"type": "map", "data": {f"@{lay.counter_map(Counter.UNKNOWN_RELEASES)}": 2}}),
        "{",
        json.dumps({"type": "printf", "data": "probedsl:snapshot\n"}),
    ]
    (snap,), _ = read_printed(printed)
    assert snap.totals["heap"].unknown_releases == 2


def test_a_failure_is_explained_by_its_errors_not_the_warnings_before_them():
    from probedsl.drivers.bpftrace import errors_first

    printed = [
        "WARNING: Could not read functions from /sys/kernel/debug/tracing/available_filter_functions.",
        "/tmp/p.bt:12:3-9: WARNING: Unnecessary cast: expression is already of type uint64",
        "  $x = (uint64)nsecs;",
        "       ~~~~~~~~",
        "/tmp/p.bt:20:1-5: ERROR: uprobe target file '/lib/x.so' does not exist or is not executable",
        "uprobe:/lib/x.so:f",
        "~~~~~",
    ]
    assert errors_first(printed) == printed[4:]
    assert errors_first(printed[:4]) == printed[:4]  # only warnings: all of them


def test_a_sparse_live_table_is_walked_by_key_and_a_full_one_read_in_batches():
    """--reachability's read of one process's entries (bcc_read._sparse_items): a table with
    few entries for its size is walked key by key (a batch read visits every bucket), a
    fuller one read in batches; an entry released mid-walk is skipped, none is read twice."""
    from probedsl.drivers import bcc_read

    class Table(dict):
        max_entries = 128 * 10
        batches = 0

        def keys(self):
            seen = list(super().keys())
            # the kernel's walk restarts when the key it stood on is deleted: the first keys again
            return iter(seen[:3] + seen)

        def items_lookup_batch(self):
            Table.batches += 1
            return list(self.items())

    few = Table({bytes([i]): i for i in range(5)})
    assert sorted(v for _, v in bcc_read._sparse_items(few, 5)) == list(range(5)) and Table.batches == 0
    assert sorted(v for _, v in bcc_read._sparse_items(few, 11)) == list(range(5)) and Table.batches == 1
    churn = Table({bytes([i]): i for i in range(9)})  # more visits than twice the bound: batches
    churn_keys = churn.keys
    churn.keys = lambda: iter(list(churn_keys()) * 3)
    assert sorted(v for _, v in bcc_read._sparse_items(churn, 9)) == list(range(9)) and Table.batches == 2


def test_uprobe_links_are_taken_where_the_kernel_makes_them(monkeypatch):
    """bcc_uprobes: links on Linux 6.12+ with BTF (every machine here runs 6.18: a wrong
    detection would quietly move every BCC test back to perf events), perf events when told."""
    monkeypatch.delenv("PROBEDSL_UPROBE_LINKS", raising=False)
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", os.uname().release).groups())
    assert bcc_uprobes.links_available() == ((major, minor) >= (6, 12) and os.path.exists(btf.VMLINUX))
    monkeypatch.setenv("PROBEDSL_UPROBE_LINKS", "0")
    assert not bcc_uprobes.links_available()


def test_the_kernels_layout_read_by_libbpf_is_the_one_parsed_by_hand(monkeypatch):
    """BCC's flags and the PID-namespace reads take struct offsets from the kernel's BTF: libbpf
    reads it (~12 ms at each start), the parse in Python (~0.1 s) where libbpf is missing, and
    the two agree on every member read."""
    from probedsl.drivers import bcc_compile
    from probedsl.process import pidns

    assert btf._libbpf() is not None  # a machine with BCC has libbpf.so.1
    fast = (bcc_compile.machine_flags(""), pidns.layout())
    monkeypatch.setattr(btf, "_libbpf", lambda: None)
    btf._struct.cache_clear()
    try:
        assert (bcc_compile.machine_flags(""), pidns.layout()) == fast
        assert any(flag.startswith("-DPROBEDSL_OFF_TASK_START_TIME=") for flag in fast[0])
        assert btf.size("upid") == 16 and btf.offset("upid", "nr") == 0
    finally:
        btf._struct.cache_clear()


def test_raw_tracepoints_are_named_to_bpftrace_where_the_kernel_hides_its_traceable_functions(tmp_path, monkeypatch):
    """0.25+ finds a raw tracepoint among the kernel's traceable functions; a locked-down kernel
    refuses to list them (EPERM), and the fork probe a PID namespace's run needs was left out."""
    from probedsl.targets import bpftrace as dialects

    script = (
        "BEGIN {}\nrawtracepoint:vmlinux:sched_process_fork /x/\n{\n}\nrawtracepoint:vmlinux:sched_process_fork {}\n"
    )
    monkeypatch.setattr(dialects, "TRACEABLE_FUNCTIONS", (str(tmp_path / "unreadable"),))
    options = dialects.Bpftrace027((0, 27, 1)).raw_tracepoint_options(script, str(tmp_path))
    assert options == ["--traceable-functions", str(tmp_path / "traceable-functions")]
    assert (tmp_path / "traceable-functions").read_text() == "__probestub_sched_process_fork\n"
    assert dialects.Bpftrace020((0, 23, 2)).raw_tracepoint_options(script, str(tmp_path)) == []  # (no such option)
    assert dialects.Bpftrace027((0, 27, 1)).raw_tracepoint_options("BEGIN {}\n", str(tmp_path)) == []
    readable = tmp_path / "listed"
    readable.write_text("__probestub_sched_process_fork\n")
    monkeypatch.setattr(dialects, "TRACEABLE_FUNCTIONS", (str(tmp_path / "unreadable"), str(readable)))
    assert dialects.Bpftrace027((0, 27, 1)).raw_tracepoint_options(script, str(tmp_path)) == []


def test_a_probe_bpftrace_left_out_is_said_in_the_report():
    """With missing_probes=warn bpftrace goes on without a probe it could not attach (its
    warnings here as 0.27.1 printed them on a kernel that hides its traceable functions)."""
    from probedsl.drivers.bpftrace import BpftraceDriver

    driver = BpftraceDriver.__new__(BpftraceDriver)
    driver.stderr = [
        "/tmp/probedsl-x/memleak.bt:30:1-41: WARNING: No matches for rawtracepoint vmlinux:sched_process_fork. Skipping.",
        "rawtracepoint:vmlinux:sched_process_fork /x/",
        "/tmp/probedsl-x/memleak.bt:30:1-41: WARNING: Probe has no valid attach points. It is being removed which "
        "may cause issues with program behavior.",
        "/tmp/probedsl-x/memleak.bt:12:1-9: WARNING: something else",
    ]
    assert driver.notes() == [
        "bpftrace left a probe out: No matches for rawtracepoint vmlinux:sched_process_fork. Skipping."
    ]
