"""What /proc says about processes: alive, named, a thread group leader, has memory, BPF map memory."""
from __future__ import annotations

import functools
import os
import re
from typing import List, Optional, Tuple

from .errors import ProbedslError

TASK_COMM_LEN = 16            # the kernel keeps a process name in 16 bytes, its NUL included


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def is_process(pid: int) -> bool:
    """A live process (thread group leader), not one of its threads (/proc/TID exists too)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.split() == ["Tgid:", str(pid)] for line in f) and process_alive(pid)
    except OSError:
        return False


def has_memory(pid: int) -> bool:
    """A process with a user address space: not a kernel thread, not one exiting past exit_mm."""
    try:
        os.readlink(f"/proc/{pid}/exe")
        return True
    except OSError:
        return False


def comm(pid: int) -> Optional[str]:
    """The process's name, None once it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def parent(pid: int) -> int:
    """The pid of the process's parent (0 when unknown or gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def named(pid: int, name: str) -> bool:
    """Whether one of the process's threads has the name (the kernel compares each thread's)."""
    if comm(pid) == name:
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if f.read().rstrip("\n") == name:
                    return True
        except OSError:
            pass
    return False


def processes_named(name: str) -> List[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and comm(int(e)) == name]


def map_memory(pid: int) -> int:
    """Bytes of kernel memory charged to the BPF maps that process `pid` holds open."""
    total = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return 0
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                info = f.read()
        except OSError:
            continue
        if "map_type:" in info:
            total += next((int(l.split()[1]) for l in info.splitlines() if l.startswith("memlock:")), 0)
    return total


@functools.lru_cache(maxsize=1)
def kernel_release() -> Tuple[int, int]:
    """(major, minor) of the running kernel; (0, 0) when unreadable."""
    major, minor = (os.uname().release.split("-")[0].split(".") + ["0"])[:2]
    try:
        return int(major), int(minor)
    except ValueError:
        return 0, 0


def valid_comm(comm: str) -> str:
    """comm, if the kernel could name a process so; else a one-line error."""
    raw = comm.encode()
    if not raw or len(raw) >= TASK_COMM_LEN:
        raise ProbedslError(f"--comm {comm!r}: a process name is 1 to {TASK_COMM_LEN - 1} bytes "
                            "(the kernel keeps only the first 15)")
    if re.search(r"[\x00-\x1f\x7f]", comm):
        raise ProbedslError(f"--comm {comm!r}: control characters cannot appear in a process name")
    return comm
