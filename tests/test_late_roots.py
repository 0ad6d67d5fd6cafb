"""Late roots (probedsl.run.late_roots) without tracing: what a late root's bpftrace probes (only
files no bpftrace of the run probes yet, compared as real files), and the orchestration with a
fake bpftrace and fake holds: who is named untraced, the run's end, holds let go, merging."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest

from probedsl import compiler
from probedsl.drivers import merged as merged_module
from probedsl.drivers.rundata import Snapshot
from probedsl.errors import ProbedslError
from probedsl.passes import resolve
from probedsl.process import roots
from probedsl.process.realfile import real_key
from probedsl.process.unprobed import UnprobedRoots
from probedsl.run import late_roots
from probedsl.run.late_roots import LateRoots

from conftest import MEMLEAK, ROOT


def on_file(program, path):
    return dataclasses.replace(
        program,
        resources=tuple(
            dataclasses.replace(r, probes=tuple(dataclasses.replace(p, path=path) for p in r.probes))
            for r in program.resources
        ),
    )


def test_a_late_root_gets_probes_only_on_files_not_probed_yet(tmp_path):
    program = compiler.build(compiler.load(MEMLEAK))
    late = LateRoots(SimpleNamespace(program=program), None, print)
    same = late._new_files_only(program)  # the root's libc is our file (a bind mount)
    assert same.resources == () and same.reports == ()
    copy = str(tmp_path / "libc.so.6")  # the root's own copy: every probe moves there
    shutil.copy2(program.resources[0].probes[0].path, copy)
    kept = late._new_files_only(on_file(program, copy))
    assert [p.id for p in kept.resources[0].probes] == [p.id for p in program.resources[0].probes]
    assert {p.path for p in kept.resources[0].probes} == {copy} and len(kept.reports) == len(program.reports)


def test_a_recipe_of_system_calls_traces_a_late_root_as_it_is():
    program = compiler.build(compiler.load(str(ROOT / "recipes" / "fdleak.probe")))
    late = LateRoots(SimpleNamespace(program=program), None, print)
    assert late._new_files_only(program).resources == ()
    assert late.adopt(os.getpid(), (0, 0), "x", "/") is True  # traced by the first bpftrace: no hold


# --- the orchestration, with a fake bpftrace and fake holds ---------------------------------
KEY = (1, 2)


class Hold:
    """A tether's stand-in: whether the process was let go."""

    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class Bpftrace:
    """A late root's bpftrace that starts (or raises fails) without tracing."""

    def __init__(self, fails=None, during=None):
        self.fails, self.during, self.killed, self.env = fails, during, False, {}

    def start(self, cancelled=None):
        if self.during:
            self.during()
        if self.fails:
            raise self.fails

    def discard(self):
        self.killed = True

    def map_memory(self):
        return 0

    def expect(self):
        pass

    def stop(self, timeout, asked=False):
        return Snapshot(1, [], {}, final=True)


def late_run(monkeypatch, started, stopping=lambda: False):
    """A LateRoots whose root bpftraces are started (the list gets each) without tracing."""
    program = compiler.build(compiler.load(MEMLEAK))
    main = SimpleNamespace(program=program, target=None, notes=lambda: [], expect=lambda: None)
    main.stop = lambda timeout, asked=False: Snapshot(1, [], {}, final=True)
    main.kill = lambda: None

    def for_target(target, prog, generated):
        return started.pop(0)

    monkeypatch.setattr(late_roots.drivers, "for_target", for_target)
    monkeypatch.setattr(late_roots.LibraryCopies, "env", lambda self: {})
    late = LateRoots(main, lambda resolver, keep: (program, None), print, stopping=stopping)
    late.watch(UnprobedRoots(None, [], lambda said: None))
    return late


def queue(late, pid, key=KEY):
    hold = Hold()
    late._pending.setdefault(key, []).append(late_roots.Arrival(pid, "app", "/r", hold))
    return hold


def untraced(late):
    return sorted(p["pid"] for p in late.unprobed.processes())


def test_processes_queued_while_a_root_bpftrace_fails_are_named_untraced(monkeypatch):
    late = late_run(monkeypatch, [])
    later = []
    late_run_driver = Bpftrace(fails=ProbedslError("no"), during=lambda: later.append(queue(late, os.getppid())))
    monkeypatch.setattr(late_roots.drivers, "for_target", lambda *a: late_run_driver)
    first = queue(late, os.getpid())
    late._waiting[4242] = ("app", "/r", KEY)  # still waiting for its libraries there
    late.start_pending()
    assert untraced(late) == [os.getpid()] and first.closed and late_run_driver.killed
    late.start_pending()  # the next turn: the process queued meanwhile
    assert untraced(late) == sorted([os.getpid(), os.getppid()]) and later[0].closed
    late.stop()
    assert 4242 in untraced(late)
    assert [n for n in late.notes() if n.startswith("bpftrace #")] == [
        f"bpftrace #2 for root /r (pid {os.getpid()}) did not start: no"
    ]  # only a failure: no note about bpftrace #1's roots


def test_processes_of_a_root_whose_bpftrace_started_are_not_named_untraced(monkeypatch):
    late = late_run(monkeypatch, [Bpftrace()])
    first = queue(late, os.getpid())
    late._waiting[4242] = ("app", "/r", KEY)
    late._waiting[4343] = ("app", "/other", (3, 4))
    late.start_pending()
    assert first.closed and [c.number for c in late.children] == [2]
    again = queue(late, os.getppid())  # held while the start went on: let go at the end
    late.stop()
    assert again.closed and untraced(late) == [4343]


def test_a_late_bpftrace_is_not_started_once_the_run_ends(monkeypatch):
    ending = []
    late = late_run(monkeypatch, [], stopping=lambda: bool(ending))
    ending.append(True)
    hold = queue(late, os.getpid())
    late.start_pending()  # for_target would fail: nothing is started
    assert not hold.closed and not late.children
    late.stop()
    assert hold.closed and untraced(late) == [os.getpid()]


def test_a_late_start_cut_short_by_the_run_ending_stays_queued(monkeypatch):
    ending = []
    driver = Bpftrace(fails=ProbedslError("cut"), during=lambda: ending.append(True))
    late = late_run(monkeypatch, [driver], stopping=lambda: bool(ending))
    hold = queue(late, os.getpid())
    late.start_pending()
    assert driver.killed and not hold.closed and KEY not in late._failed and not late.notes()
    late.kill()
    assert hold.closed


def test_held_processes_are_let_go_when_starting_raises(monkeypatch):
    driver = Bpftrace(fails=KeyboardInterrupt())
    late = late_run(monkeypatch, [driver])
    hold = queue(late, os.getpid())
    with pytest.raises(KeyboardInterrupt):
        late.start_pending()
    assert hold.closed and driver.killed


def test_a_late_root_of_files_probed_already_is_not_held(monkeypatch):
    """Our process maps the libc the recipe probes: nothing new, so neither a hold nor a start."""
    late = late_run(monkeypatch, [])
    assert late.adopt(os.getpid(), KEY, "app", "/") is True
    assert not late._pending and KEY in late._done and KEY not in late._failed


def test_merging_leaves_the_first_bpftrace_snapshot_as_it_was(monkeypatch):
    late = late_run(monkeypatch, [])
    late.children.append(late_roots.Child(2, "/r", Bpftrace(), [1], 0.0, ""))
    mine = Snapshot(1, [], {}, incomplete=["its own"])
    for _ in range(2):
        got = late._merge([mine, None])
        assert got.incomplete == ["its own", "bpftrace #2 (root /r) gave no snapshot"]
    assert mine.incomplete == ["its own"]


def test_the_snapshot_wait_is_one_deadline_for_every_bpftrace(monkeypatch):
    late = late_run(monkeypatch, [])
    clock, waits = [100.0], []

    def received(timeout):
        waits.append(timeout)
        clock[0] += timeout  # it waited the whole time
        return None

    monkeypatch.setattr(merged_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(merged_module.os, "getpgid", lambda pid: 0)
    late.main.received = received
    child = Bpftrace()
    child.received = received
    late.children.append(late_roots.Child(2, "/r", child, [1], 0.0, ""))
    late.snapshot(timeout=5)
    assert waits == [5, 0]


def test_same_image_containers_share_their_layer_file(root_required, tmp_path):
    """Two overlays on one lower layer (two containers of one image): os.stat tells their libc
    apart, the kernel's uprobe does not; real_key gives the layer's file for both."""
    lower = tmp_path / "lower"
    lower.mkdir()
    libc = compiler.build(compiler.load(MEMLEAK)).resources[0].probes[0].path
    shutil.copy2(libc, lower / "libc.so.6")
    mounts = []
    try:
        for name in ("a", "b"):
            for sub in ("up", "work", "m"):
                (tmp_path / name / sub).mkdir(parents=True)
            opts = f"lowerdir={lower},upperdir={tmp_path / name / 'up'},workdir={tmp_path / name / 'work'}"
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(tmp_path / name / "m")], check=True)
            mounts.append(tmp_path / name / "m")
        a, b = (str(m / "libc.so.6") for m in mounts)
        assert roots.stat_key(a) != roots.stat_key(b)  # what an os.stat comparison saw
        assert real_key(a) == real_key(b) == real_key(str(lower / "libc.so.6"))
        program = compiler.build(compiler.load(MEMLEAK))
        late = LateRoots(SimpleNamespace(program=on_file(program, a)), None, print)
        assert late._new_files_only(on_file(program, b)).resources == ()
        probe = program.resources[0].probes[0]
        others = SimpleNamespace(elsewhere=lambda library: [b, str(lower / "libc.so.6")])
        assert resolve._other_copies(a, probe, others) == ()
    finally:
        for m in mounts:
            subprocess.run(["umount", str(m)], check=False)


def test_a_resource_with_only_some_probes_on_new_files_is_said_split(tmp_path):
    program = compiler.build(compiler.load(MEMLEAK))
    res = program.resources[0]
    copy = str(tmp_path / "libc.so.6")
    shutil.copy2(res.probes[0].path, copy)
    moved = dataclasses.replace(res, probes=(dataclasses.replace(res.probes[0], path=copy),) + res.probes[1:])
    mixed = dataclasses.replace(program, resources=(moved,) + program.resources[1:])
    late = LateRoots(SimpleNamespace(program=program), None, print)
    kept = late._new_files_only(mixed)
    assert len(res.probes) > 1 and late_roots.split(mixed, kept) == [res.name]
    assert late_roots.split(program, late._new_files_only(on_file(program, copy))) == []
