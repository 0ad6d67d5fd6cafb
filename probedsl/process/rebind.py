"""A process's uprobes moved off a thread that ends alone while its other threads run on.

A uprobe scoped to one process is a perf event opened on one of its threads (the main
thread's, for --pid and -- CMD); the kernel fires it for every thread of that thread's address
space, but matches through that thread's task: once the thread has ended (pthread_exit, the
others running on) its task has no memory and the uprobes fire for no one. So, in the tether's
thread, at the bearer's exit stop (before it lets go of its memory): the process's other
threads are stopped, the hook opens the same uprobes on one of them, the bearer is let go
and waited for until it is a zombie (its memory let go: its own uprobes match nothing more),
and only then do the others go on. No call is missed, none is seen twice (while both sets of
uprobes match, no thread of the process runs).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

# hook(process, thread): the process's uprobes opened on that thread as well
Rebind = Callable[[int, int], None]

STOP_WAIT_S = 2.0  # a thread that does not stop by then (uninterruptible I/O) is not waited for
ZOMBIE_WAIT_S = 2.0  # the bearer's way from its exit stop past letting go of its memory


def switch(tether, tid: int, hook: Rebind) -> bool:
    """The bearer tid of its process is at its exit stop, ending alone: move the uprobes to
    another thread of the process (see above). False: no other thread would stop (the tether
    lets the bearer go as usual)."""
    thread = tether._threads[tid]
    process, before = thread.process, tether.holding
    others, stuck = _stop_others(tether, process, tid)
    if not others:  # the others ended meanwhile, or would not stop (then told: thread 0)
        tether.holding = before
        _go_on(tether, process)
        if stuck:
            _tell(hook, process, 0)
        return False
    survivor = others[0]
    if _tell(hook, process, survivor):
        tether.bearers[process] = survivor
    tether._go(tid, thread)
    thread.state = "gone"
    _wait_zombie(tid)
    tether.holding = before
    _go_on(tether, process)
    return True


def _tell(hook: Rebind, process: int, thread: int) -> bool:
    try:
        hook(process, thread)
        return True
    except Exception as exc:  # a warning; the process runs on, its later calls unseen
        print(f"probedsl: warning: pid {process}: uprobes not moved off its ended thread: {exc}", file=sys.stderr)
        return False


def _stop_others(tether, process: int, bearer: int) -> Tuple[List[int], bool]:
    """Interrupt the process's other threads and wait until each has stopped (held): the
    stopped ones, lowest tid first, and whether any would not stop."""
    tether.holding = process

    def group() -> Dict[int, Any]:
        return {t: th for t, th in tether._threads.items() if th.process == process and t != bearer}

    tether._interrupt(group, STOP_WAIT_S)
    threads = group().values()
    return sorted(t for t, th in group().items() if th.state == "held"), any(
        th.state in ("running", "new") for th in threads
    )


def _go_on(tether, process: int) -> None:
    """The process's held threads go on, unless a pause of the session holds them."""
    if tether._pausing and (process == tether.pid or tether._closing):
        return
    for t, th in list(tether._threads.items()):
        if th.process == process and th.state == "held":
            tether._go(t, th)


def _wait_zombie(tid: int) -> None:
    deadline = time.monotonic() + ZOMBIE_WAIT_S
    while time.monotonic() < deadline and _state(tid) not in (None, "Z", "X"):
        time.sleep(0.0005)


def _state(tid: int) -> Optional[str]:
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None
