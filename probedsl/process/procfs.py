"""What /proc says about processes: alive, named, a thread group leader, has memory, BPF map memory.

A traced process decides how long its /proc text is (a mapping per file it maps, paths up to
PATH_MAX, names it chose): every read here is bounded in bytes and lines, and a cut is
counted in one note (probedsl.notices).
"""

from __future__ import annotations

import functools
import os
import re
import select
import time
from typing import Iterable, List, Optional, Tuple

from probedsl import notices
from probedsl.errors import ProbedslError

TASK_COMM_LEN = 16  # the kernel keeps a process name in 16 bytes, its NUL included

MAX_BYTES = 32 << 20  # bytes of one /proc file read (65,530 mappings of 100-byte lines: 6.5 MB)
MAX_LINES = 1 << 18  # lines of one (the default vm.max_map_count is 65,530)
MAX_LINE = 4 * 4096 + 256  # bytes of one line: a PATH_MAX path, every byte escaped (\012), and the fields
MAX_SMALL = 4096  # bytes of a file that holds one short value (comm, stat)


def read_lines(path: str) -> Tuple[List[str], bool]:
    """(lines of a /proc text file, whether it was cut): at most MAX_BYTES bytes and MAX_LINES
    lines, a line longer than MAX_LINE left out; undecodable bytes kept as surrogates. Raises
    OSError when unreadable."""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    cut = len(data) > MAX_BYTES
    if cut:
        data = data[: data.rfind(b"\n", 0, MAX_BYTES) + 1]  # whole lines only
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    if len(raw) > MAX_LINES:
        cut, raw = True, raw[:MAX_LINES]
    if cut:
        notices.count(
            f"{path}: over {MAX_LINES} lines or {MAX_BYTES >> 20} MB, read cut there (what follows is unknown)"
        )
    long = sum(len(line) > MAX_LINE for line in raw)
    if long:
        notices.count(f"{path}: lines over {MAX_LINE} bytes left out", long)
        raw = [line for line in raw if len(line) <= MAX_LINE]
    return [line.decode("utf-8", "surrogateescape") for line in raw], cut


def read_small(path: str) -> str:
    """A /proc file that holds a short value: at most MAX_SMALL bytes. Raises OSError."""
    with open(path, "rb") as f:
        return f.read(MAX_SMALL).decode("utf-8", "surrogateescape")


def status_field(pid: int, name: str) -> Optional[str]:
    """The value of one /proc/PID/status field (the kernel escapes the Name field's newlines,
    so no line is forged), None when absent or the process is gone."""
    try:
        lines, _ = read_lines(f"/proc/{pid}/status")
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(name + ":")), None)


def process_alive(pid: int) -> bool:
    """Whether the process runs: its leader, or another of its threads once the leader ended
    alone (pthread_exit: a zombie until the last of them ends)."""
    state = _state(f"/proc/{pid}/stat")
    if state != "Z":
        return state is not None
    try:
        tasks = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
    except OSError:
        return False
    return any(_state(f"/proc/{pid}/task/{t}/stat") not in (None, "Z") for t in tasks)


class Ending:
    """A traced process's end, to wake the run's loop as it comes (its report then follows at
    once, not up to a pause later). turn(pause) gives the loop's pause and the descriptor to
    wake on (a pidfd: readable once the process has ended); just after the end, while whoever
    reaps it has not yet, short pauses for a moment; without pidfds (Linux < 5.3), the pause."""

    QUICK_S, QUICK_FOR_S = 0.002, 0.5

    def __init__(self, pid: int):
        try:
            self._fd = os.pidfd_open(pid) if pid else -1
        except (OSError, AttributeError):  # (a Python built without it)
            self._fd = -1
        self._ended = 0.0

    def turn(self, pause: float) -> Tuple[float, Optional[int]]:
        if self._fd >= 0 and _readable(self._fd, 0):
            self.close()
            self._ended = time.monotonic()
        if self._fd >= 0:
            return pause, self._fd
        quick = self._ended and time.monotonic() - self._ended < self.QUICK_FOR_S
        return (self.QUICK_S if quick else pause), None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def pause(seconds: float, wake: Optional[int] = None) -> None:
    """Sleep, or less if wake (a descriptor) becomes readable."""
    if wake is None:
        time.sleep(seconds)
    else:
        _readable(wake, seconds)


def await_end(pid: int, seconds: float) -> None:
    """Return as the child pid ends (not yet reaped: its pidfd turns readable), or after seconds;
    at once without pidfds. subprocess's timed wait polls, waking up to 50 ms after the end."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return
    try:
        _readable(fd, seconds)
    finally:
        os.close(fd)


def _readable(fd: int, seconds: float) -> bool:
    poller = select.poll()  # (not select(): a run holds many descriptors, this one may be over 1023)
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def live_threads(pid: int, tids: Iterable[int] = ()) -> List[int]:
    """Which of the process's threads (tids; all when empty) run: not ended, not zombies."""
    try:
        tids = list(tids) or sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []
    return [t for t in tids if _state(f"/proc/{pid}/task/{t}/stat") not in (None, "Z", "X")]


def live_task(pid: int) -> int:
    """The process's leader, or once it ended alone (pthread_exit: a zombie, its memory, root and
    exe gone from /proc/PID and no uprobe matching through it) a thread of it that runs."""
    if _state(f"/proc/{pid}/stat") != "Z":
        return pid
    return next(iter(live_threads(pid)), pid)


def proc_dir(pid: int) -> str:
    """Where /proc shows the process's memory, root and exe: /proc/PID, or the directory of a
    thread that runs once the leader is a zombie (live_task)."""
    tid = live_task(pid)
    return f"/proc/{pid}" if tid == pid else f"/proc/{pid}/task/{tid}"


def read_maps(pid: int) -> Tuple[List[str], bool]:
    """read_lines of the process's maps; a live thread's once the leader ended alone, whose own
    are empty then (proc_dir). Raises OSError."""
    lines, cut = read_lines(f"/proc/{pid}/maps")
    tid = pid if lines else live_task(pid)
    return (lines, cut) if tid == pid else read_lines(f"/proc/{pid}/task/{tid}/maps")


def _state(path: str) -> Optional[str]:
    try:
        return read_small(path).rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_process(pid: int) -> bool:
    """A live process (thread group leader), not one of its threads (/proc/TID exists too)."""
    return status_field(pid, "Tgid") == str(pid) and process_alive(pid)


def has_memory(pid: int) -> bool:
    """A process with a user address space: not a kernel thread, not one exiting past exit_mm."""
    try:
        os.readlink(f"{proc_dir(pid)}/exe")
        return True
    except OSError:
        return False


def _comm_file(path: str) -> Optional[str]:
    # the name as the thread set it (it may hold a newline itself): only the kernel's
    # closing newline removed
    try:
        text = read_small(path)
    except OSError:
        return None
    return text[:-1] if text.endswith("\n") else text


def comm(pid: int) -> Optional[str]:
    """The process's name, None once it is gone."""
    return _comm_file(f"/proc/{pid}/comm")


def parent(pid: int) -> int:
    """The pid of the process's parent (0 when unknown or gone)."""
    value = status_field(pid, "PPid")
    return int(value) if value and value.isdigit() else 0


def named(pid: int, name: str) -> bool:
    """Whether one of the process's threads has the name (the kernel compares each thread's)."""
    if comm(pid) == name:
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any(_comm_file(f"/proc/{pid}/task/{tid}/comm") == name for tid in tasks)


def everyone() -> List[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


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
            info = read_small(f"/proc/{pid}/fdinfo/{fd}")
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
        raise ProbedslError(
            f"--comm {comm!r}: a process name is 1 to {TASK_COMM_LEN - 1} bytes (the kernel keeps only the first 15)"
        )
    if re.search(r"[\x00-\x1f\x7f]", comm):
        raise ProbedslError(f"--comm {comm!r}: control characters cannot appear in a process name")
    return comm
