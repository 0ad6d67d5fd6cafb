"""Detaching in the background, after the report is out.

The kernel removes a uprobe when the last descriptor of its perf event is closed, and takes
~0.15 s for each (it waits for every CPU to leave the probe): 2.5-4 s for memleak's 17-19.
A descriptor is shared by the processes holding it, so the wait lands on whichever closes
last. hand_over() forks a process that keeps a copy of each BPF and perf descriptor; probedsl
then closes its own copies at once (not the last ones) and returns, and that process, once
told, closes them and pays the wait, with no terminal, pipe or output of the run held open.
Every probe still goes away: closing is what removes it, and a process that ends (killed
too) closes all it holds. BPF links (probedsl.drivers.bcc_uprobes) close in ~47 ms each, and
on several threads at once.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, List, Optional

# what /proc/self/fd names the descriptors the kernel tears down on their last close
KERNEL_OBJECTS = ("anon_inode:bpf-map", "anon_inode:bpf-prog", "anon_inode:bpf_link", "anon_inode:[perf_event]")
NAME = b"probedsl-detach"  # its process name (ps, and tests waiting for it)


class Handover:
    """A process holding copies of this process's BPF and perf descriptors until release()."""

    def __init__(self, after: Optional[Callable[[int], None]] = None):
        """after(pid of the run): called by that process once it has closed everything (it
        may clean what only a closed probe lets go of)."""
        owner = os.getpid()
        told, self._tell = os.pipe()
        middle = os.fork()  # a child of a child: init reaps it, not the run
        if middle == 0:
            try:
                if os.fork() == 0:
                    _hold(told, owner, after)
            finally:
                os._exit(0)
        os.close(told)
        os.waitpid(middle, 0)

    def release(self) -> None:
        """This process's copies are closed: the holder may close its own."""
        if self._tell >= 0:
            os.close(self._tell)
            self._tell = -1


def hand_over(after: Optional[Callable[[int], None]] = None) -> Optional[Handover]:
    """A Handover, or None when no process can be made (then the caller closes, and waits)."""
    try:
        return Handover(after)
    except OSError:
        return None


def _hold(told: int, owner: int, after) -> None:
    """In the holder: keep only the kernel objects, wait for the word, close them; never returns."""
    try:
        os.setsid()  # no terminal: Ctrl-C at the shell is not for it
        _name_self()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        for fd in _open_descriptors():
            if fd > 2 and fd != told and not _kernel_object(fd):
                _close(fd)
        while os.read(told, 1):  # end of file: the run closed its copies (or ended)
            pass
        fds = [fd for fd in _open_descriptors() if fd > 2]  # the slow part, here
        links = [fd for fd in fds if _link(fd)]
        close_on_threads(links)
        for fd in set(fds) - set(links):
            _close(fd)
        if after is not None:
            after(owner)
    finally:
        os._exit(0)


def close_on_threads(fds: List[int], threads: int = 16) -> None:
    """Close descriptors on up to `threads` threads at once: a BPF link's close waits ~47 ms
    for the kernel's grace periods, without a lock, so waits on several threads overlap (~6 ms
    a link on 16). (A perf event's close waits under a lock: threads do not help it.)"""
    work: queue.SimpleQueue = queue.SimpleQueue()
    for fd in fds:
        work.put(fd)

    def closer() -> None:
        while True:
            try:
                fd = work.get_nowait()
            except queue.Empty:
                return
            _close(fd)

    started = [threading.Thread(target=closer, daemon=True) for _ in range(min(threads, len(fds)))]
    for t in started:
        t.start()
    for t in started:
        t.join()


def _link(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:bpf_link"
    except OSError:
        return False


def _open_descriptors() -> list:
    return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))


def _kernel_object(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(KERNEL_OBJECTS)
    except OSError:
        return False


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # the listing's own descriptor, gone already
        pass


def _name_self() -> None:
    try:
        fd = os.open("/proc/self/comm", os.O_WRONLY)
        try:
            os.write(fd, NAME)
        finally:
            os.close(fd)
    except OSError:
        pass
