"""Process mappings by generation: exec and fork (and so pid reuse) start new address spaces."""

from __future__ import annotations

import os
import struct

from probedsl.process.mappings import MappingTracker, _RECORD_COMM, _RECORD_FORK, _RECORD_MMAP2, _MISC_COMM_EXEC


def mmap2(pid, addr, path, t):
    body = struct.pack("<IIQQQ", pid, pid, addr, 0x1000, 0) + b"\0" * 24 + struct.pack("<II", 5, 2)
    return _RECORD_MMAP2, 0, body + path.encode() + b"\0" * (8 - len(path) % 8) + struct.pack("<Q", t)


def comm_exec(pid, t):
    return _RECORD_COMM, _MISC_COMM_EXEC, struct.pack("<II", pid, pid) + b"prog\0\0\0\0" + struct.pack("<Q", t)


def fork(pid, ppid, t):
    return _RECORD_FORK, 0, struct.pack("<IIIIQ", pid, ppid, pid, ppid, t) + struct.pack("<Q", t)


def tracker(*records):
    tr = MappingTracker()
    for rec in records:
        tr._apply(*rec)
    return tr


def test_exec_starts_a_fresh_address_space_and_old_times_read_the_old_one():
    tr = tracker(mmap2(7, 0x1000, "/bin/old", 10), comm_exec(7, 20), mmap2(7, 0x5000, "/bin/new", 21))
    assert [m.path for m in tr.mappings(7, at_ns=15)] == ["/bin/old"]
    assert [m.path for m in tr.mappings(7, at_ns=30)] == ["/bin/new"]
    assert [m.path for m in tr.mappings(7)] == ["/bin/new"]


def test_a_forked_child_inherits_the_parents_mappings_at_fork_time():
    tr = tracker(
        mmap2(7, 0x1000, "/bin/app", 10),
        fork(8, 7, 20),
        mmap2(8, 0x9000, "/lib/plugin.so", 30),
        mmap2(7, 0x7000, "/lib/late.so", 40),
    )
    assert sorted(m.path for m in tr.mappings(8)) == ["/bin/app", "/lib/plugin.so"]
    assert "/lib/late.so" not in [m.path for m in tr.mappings(8)]


def test_a_reused_pid_does_not_mix_two_processes():
    # pid 9 ran /bin/first, exited; later a fork gave pid 9 to a child of pid 7
    tr = tracker(mmap2(9, 0x1000, "/bin/first", 10), mmap2(7, 0x2000, "/bin/second", 11), fork(9, 7, 50))
    assert [m.path for m in tr.mappings(9, at_ns=20)] == ["/bin/first"]
    assert [m.path for m in tr.mappings(9, at_ns=60)] == ["/bin/second"]


def test_threads_do_not_start_generations():
    tr = tracker(mmap2(7, 0x1000, "/bin/app", 10), fork(7, 7, 20))  # a new thread of pid 7
    assert [m.path for m in tr.mappings(7, at_ns=5)] == ["/bin/app"] == [m.path for m in tr.mappings(7)]


def test_mmaps_that_arrive_before_their_exec_record_move_into_the_new_image():
    # another CPU's ring delivered the exec (t=20) after the new image's mmaps (t=21, 22)
    tr = tracker(
        mmap2(7, 0x1000, "/bin/old", 10),
        mmap2(7, 0x5000, "/bin/new", 21),
        mmap2(7, 0x6000, "/lib/libc.so.6", 22),
        comm_exec(7, 20),
    )
    assert [m.path for m in tr.mappings(7, at_ns=15)] == ["/bin/old"]
    assert [m.path for m in tr.mappings(7, at_ns=30)] == ["/bin/new", "/lib/libc.so.6"]


def test_prune_forgets_ended_processes_nothing_names():
    tracker = MappingTracker()  # not started: no rings needed
    dead, alive = 2**22 + 12345, os.getpid()  # above pid_max's default: never a process
    for pid in (dead, alive, dead + 1):
        tracker._gens[pid] = [(0, [])]
    tracker.prune(keep={dead + 1})
    assert set(tracker._gens) == {alive, dead + 1}
