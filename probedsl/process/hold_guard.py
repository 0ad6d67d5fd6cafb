"""The mapping hold's guard: a small process that continues the processes the BPF program
stopped (marked in probedsl_unw_held or probedsl_py_held) when probedsl dies without doing it (SIGKILL, the OOM killer), so
a traced program is never left stopped.

probedsl keeps the write end of a pipe; the guard blocks reading it. probedsl writes "d"
when its own close has continued every marked process, and the guard exits. End of file
without it means probedsl is gone: the guard turns the switch the BPF program reads off
(no new stop), then continues every marked process, twice (a program may have sent a stop
just before the switch went off and mark it just after)."""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import subprocess
import sys
import time
from typing import List, Tuple

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(platform.machine(), 324)
_UPDATE, _DELETE, _NEXT_KEY = 2, 3, 4  # BPF_MAP_UPDATE_ELEM, _DELETE_ELEM, _GET_NEXT_KEY
_MEMBARRIER_CMD_GLOBAL = 1
AGAIN_S = 0.05  # before the second pass where no grace period can be waited for


def stops_in_flight_done() -> None:
    """Once the switch is off, wait until every BPF program that read it on has ended (its stop
    sent and marked), before the second pass. Each runs inside an RCU read-side section, and
    membarrier(MEMBARRIER_CMD_GLOBAL) waits for an RCU grace period (8-28 ms measured, against
    the 50 ms pause it replaces). The kernel refuses it with nohz_full, and skips the grace
    period with one CPU online (where a preempted program could still be in flight): a pause."""
    if os.sysconf("SC_NPROCESSORS_ONLN") < 2 or _libc.syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        time.sleep(AGAIN_S)


class _Elem(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # the next key's buffer for _NEXT_KEY
        ("flags", ctypes.c_uint64),
    ]


def start(marks_fds: Tuple[int, ...], switch_fd: int) -> int:
    """The guard, running: returns the pipe's write end, which must stay open (and be
    written "d" once every marked process was continued)."""
    read, write = os.pipe()
    subprocess.Popen(
        [sys.executable, "-m", "probedsl.process.hold_guard", str(switch_fd), *map(str, marks_fds)],
        stdin=read,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(*marks_fds, switch_fd),
        start_new_session=True,  # not ended with probedsl's terminal or process group
        cwd="/",  # run as root: nothing importable from wherever probedsl was started
    )
    os.close(read)
    return write


def done(write_fd: int) -> None:
    try:
        os.write(write_fd, b"d")
    except OSError:  # the guard is gone already
        pass
    os.close(write_fd)


def _bpf(cmd: int, elem: _Elem) -> int:
    return _libc.syscall(_SYS_BPF, cmd, ctypes.byref(elem), ctypes.sizeof(elem))


def u32_keys(map_fd: int) -> list:
    """The keys of a BPF map keyed by u32 (at most 65,536); the walk stops at the first error
    (ENOENT at the end: ctypes.get_errno() tells)."""
    keys, key, nxt = [], ctypes.c_uint32(0), ctypes.c_uint32(0)
    first = True
    while len(keys) < 65536:
        elem = _Elem(map_fd, 0, 0 if first else ctypes.addressof(key), ctypes.addressof(nxt), 0)
        if _bpf(_NEXT_KEY, elem) != 0:
            return keys
        keys.append(nxt.value)
        key.value, first = nxt.value, False
    return keys


def _let_go(switch_fd: int, marks_fds: List[int]) -> None:
    zero, off = ctypes.c_uint32(0), ctypes.c_uint32(0)
    _bpf(_UPDATE, _Elem(switch_fd, 0, ctypes.addressof(zero), ctypes.addressof(off), 0))
    for again in (False, True):
        if again:
            stops_in_flight_done()
        for marks_fd, pid in [(fd, pid) for fd in marks_fds for pid in u32_keys(fd)]:
            key = ctypes.c_uint32(pid)
            _bpf(_DELETE, _Elem(marks_fd, 0, ctypes.addressof(key), 0, 0))
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def main(argv: list) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a Ctrl-C or kill of the group ends probedsl, not this
    while True:
        said = os.read(0, 1)
        if said == b"d":
            return 0
        if not said:  # probedsl is gone without its close
            _let_go(int(argv[1]), [int(fd) for fd in argv[2:]])
            return 0


_libc = ctypes.CDLL(None, use_errno=True)

if __name__ == "__main__":
    sys.exit(main(sys.argv))
