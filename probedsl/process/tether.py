"""Hold one process under ptrace for a run: pause every thread on request, hold it at its
exit while its memory still exists, let it go at the end. Following forks, it also holds
each child the process (or a child) forks until on_fork(child) has returned (the tracer's
per-process probes are on before the child runs an instruction), then lets it run on.

PTRACE_SEIZE sends no signal, and a tracer that dies, even by SIGKILL, is detached by the
kernel and the process runs on: nothing probedsl does can leave the target stopped. Every
ptrace request comes from one thread (the kernel ties a tracee to the thread that attached);
the session talks to it through a queue.
"""
from __future__ import annotations

import contextlib
import errno
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

from probedsl.process import procfs, ptrace, rebind
from probedsl.errors import ProbedslError
from probedsl.process.launcher import shell_status

_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}
_SYS_EXIT = 60                 # x86-64: exit(2), one thread; exit_group(2) is 231
POLL_S = 0.005                 # a signal to the target waits at most this long for us
BUSY_POLL_S = 0.0005           # for BUSY_S after a stop: a tree's fork, exec, exit come in bursts
BUSY_S = 0.05
PAUSE_TIMEOUT_S = 2.0          # a thread that does not stop by then (uninterruptible I/O)


@dataclass
class Paused:
    """Every thread stopped (or held at its exit): their registers."""
    registers: Dict[int, Dict[str, int]]
    missing: Tuple[int, ...] = ()          # threads that would not stop in time
    vectors: Dict[int, bytes] = field(default_factory=dict)   # xmm/ymm/zmm (ptrace.vector_words)


@dataclass
class Thread:
    state: str = "running"                 # running | held | exit | new | forked (awaits on_fork) | gone
    signal: int = 0                        # a signal to deliver when it goes on
    listen: bool = False                   # in a group stop (SIGSTOP): stays stopped on resume
    process: int = 0                       # its thread group (the tether's pid, or a child's)
    waits: bool = False                    # a new process: stays stopped until on_fork has run


class Tether:
    def __init__(self, pid: int, exec_hold: Optional[Callable[[], None]] = None,
                 forks: bool = False, hold_exit: bool = True, launched: bool = False, purpose: str = "--reachability"):
        """pid: a running process, or a launched command blocked before its exec (launched, or
        given exec_hold); exec_hold() is called while it is held at its exec, then it goes on.
        forks: follow its children (see follow()). hold_exit: hold it at its exit until
        release_exit() (a scan); else it exits at once."""
        self.pid, self.purpose = pid, purpose
        self.forks, self.hold_exit = forks, hold_exit
        self._on_fork: Optional[Callable[[int], None]] = None
        self._next_on_fork: Optional[Callable[[int], None]] = None
        self.on_exec: Optional[Callable[[], None]] = None    # at the process's exec, before it runs
        self.on_bearer_end: Optional[rebind.Rebind] = None  # probedsl.process.rebind
        self.bearers: Dict[int, int] = {}          # process -> the thread its uprobes are opened on
        self.holding = 0                           # a process whose threads stop held (rebind)
        self.children = 0                          # processes followed since the start
        self.exit_status: Optional[int] = None     # the leader reaped (a launched command)
        self.at_exit = threading.Event()           # held at its exit: scan, then release_exit()
        self.ended = threading.Event()             # gone, or let go
        self.exec_done = threading.Event()
        self._exec_hold = exec_hold
        self._execed = exec_hold is None and not launched    # a running process: its exit is the one
        self._threads: Dict[int, Thread] = {}
        self._pausing = self._closing = False
        self._error: Optional[str] = None
        self._ready = threading.Event()
        self._commands: "queue.Queue[str]" = queue.Queue()
        self._replies: "queue.Queue[object]" = queue.Queue()
        self._worker = threading.Thread(target=self._run, name=f"probedsl-tether-{pid}", daemon=True)

    # --- the session's side ----------------------------------------------------------------
    def start(self) -> None:
        """Attach to every thread; ProbedslError (one line) when the system refuses."""
        self._worker.start()
        if self._ready.wait() and self._error:
            raise ProbedslError(self._error)

    @property
    def attached(self) -> bool:
        """Holding the process (not only children left running after it)."""
        return self._ready.is_set() and not self._error and not self.ended.is_set() and self.exit_status is None

    def hold_exec(self, at_exec: Callable[[], None]) -> None:
        """A launched command, before it is released: the exec hold (see __init__)."""
        self._exec_hold = at_exec

    def follow(self, on_fork: Callable[[int], None]) -> None:
        """Each child forked from now on, or waiting since, held until on_fork(its pid) returns (in our thread)."""
        self._next_on_fork = on_fork
        self._ask("follow")

    def pause(self) -> Optional[Paused]:
        """Stop every thread; None when the process is gone. Call resume() after."""
        return self._ask("pause")

    def resume(self) -> None:
        """Let the paused threads go (not those held at their exit)."""
        self._ask("resume")

    def release_exit(self) -> None:
        """Let a process held at its exit finish exiting."""
        self._ask("release")

    def close(self) -> None:
        """Detach from every thread (they run on); safe to call twice."""
        if self._worker.is_alive():
            self._commands.put("close")
            self._worker.join(10)

    def _ask(self, command: str):
        if not self._worker.is_alive():
            return None
        self._commands.put(command)
        while self._worker.is_alive():
            try:
                return self._replies.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    # --- the tracer thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._seize()
        except OSError as exc:
            self._error = f"{self.purpose}: cannot attach: {ptrace.why_refused(self.pid, exc)}"
            self.ended.set()
            self._ready.set()
            return
        self._ready.set()
        try:
            busy_until = 0.0
            while self._threads:
                if self._drain():
                    busy_until = time.monotonic() + BUSY_S
                try:
                    command = self._commands.get(timeout=BUSY_POLL_S if time.monotonic() < busy_until else POLL_S)
                except queue.Empty:
                    continue
                if command == "close":
                    break
                if command == "follow":
                    self._replies.put(self._start_following())
                    continue
                self._replies.put(self._pause() if command == "pause" else self._resume(command == "release"))
        finally:
            self._detach_all()
            self.exec_done.set()
            self.ended.set()

    def _seize(self) -> None:
        options = ptrace.O_TRACECLONE | ptrace.O_TRACEEXIT | ptrace.O_TRACEEXEC
        if self.forks:
            options |= ptrace.O_TRACEFORK | ptrace.O_TRACEVFORK
        # a leader that ended alone (pthread_exit) is a zombie, never seized: its threads run on
        ended = set() if procfs.live_task(self.pid) == self.pid else {self.pid}
        while True:
            try:
                tids = {int(t) for t in os.listdir(f"/proc/{self.pid}/task")} - set(self._threads) - ended
            except FileNotFoundError:
                raise OSError(errno.ESRCH, "no such process") from None
            if not tids:
                break
            for tid in sorted(tids):
                try:
                    ptrace.request(ptrace.SEIZE, tid, 0, options)
                except OSError as exc:
                    if exc.errno == errno.ESRCH and tid != self.pid:
                        continue                   # a thread that just ended
                    if exc.errno == errno.EPERM and ptrace.tracer_of(tid) == os.getpid():
                        pass                       # a thread born after we seized its parent
                    else:
                        raise
                self._threads[tid] = Thread(process=self.pid)

    def _drain(self) -> bool:
        # one system call says whether any child or tracee has news (without taking it): an
        # idle process then costs one call per turn, not one per thread
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT | ptrace.WALL) is None:
                return False
        except ChildProcessError:
            pass
        seen = False                            # (news of an untraced child is not ours)
        for tid in list(self._threads):
            try:
                got, status = os.waitpid(tid, os.WNOHANG | ptrace.WALL)
            except ChildProcessError:
                got, status = tid, 0x9          # gone without a word (reaped elsewhere)
            if got:
                self._event(tid, status)
                seen = True
        return seen

    def _event(self, tid: int, status: int) -> None:
        thread = self._threads.get(tid)
        if thread is None:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            del self._threads[tid]
            if tid == thread.process:              # a leader: after its threads (or killed with them)
                for other in [t for t, th in self._threads.items() if th.process == tid]:
                    del self._threads[other]
            if tid == self.pid:
                self.exit_status = shell_status(status)
            self._exit_complete()
            return
        sig, event = os.WSTOPSIG(status), status >> 16
        if event in (ptrace.EVENT_CLONE, ptrace.EVENT_FORK, ptrace.EVENT_VFORK):
            self._born(ptrace.event_message(tid), thread.process, event)
            self._stopped(tid, 0)
        elif event == ptrace.EVENT_EXEC and thread.process != self.pid:
            for other in [t for t, th in self._threads.items() if th.process == thread.process and t != tid]:
                del self._threads[other]
            self._go(tid, thread)                  # a child's exec: its probes follow its image
        elif event == ptrace.EVENT_EXEC:
            for other in [t for t, th in self._threads.items() if th.process == self.pid and t != tid]:
                del self._threads[other]
            self._execed = True
            if self.on_exec is not None:
                self.on_exec()
            try:  # the exec hold: at_exec() runs while it waits here (later execs: probedsl.process.mapping_hold)
                if self._exec_hold and not self.exec_done.is_set():
                    self._exec_hold()
            finally:
                self.exec_done.set()
                self._stopped(tid, 0)
        elif event == ptrace.EVENT_EXIT:
            self._exit_stop(tid)
        elif event == ptrace.EVENT_STOP:
            if thread.state == "new" and thread.waits:
                thread.state = "forked"            # let go by _start_following
                return
            if thread.state == "new":
                thread.state = "running"
            self._stopped(tid, 0, listen=sig in _STOP_SIGNALS)
        else:
            self._stopped(tid, sig)              # a signal on its way: delivered when it goes on

    def _born(self, new: int, process: int, event: int) -> None:
        """A new thread, or process (fork, vfork, a clone not a thread): held from its start until on_fork ran."""
        if event == ptrace.EVENT_CLONE and procfs.status_field(new, "Tgid") != str(new):  # a thread
            self._threads.setdefault(new, Thread(state="new", process=process))
            return
        self.children += 1
        self._threads[new] = child = Thread(state="new", process=new, waits=True)
        if self._on_fork is not None:
            self._attach_child(new, child)

    def _attach_child(self, pid: int, child: Thread) -> None:
        try:
            self._on_fork(pid)
        except Exception as exc:             # the child runs on, untraced; the tether stays
            print(f"probedsl: warning: pid {pid} is not traced: {exc}", file=sys.stderr)
        finally:
            child.waits = False
            if child.state == "forked":
                child.state = "running"
                self._go(pid, child)

    def _start_following(self) -> bool:
        self._on_fork = self._next_on_fork
        for pid, child in list(self._threads.items()):
            if child.waits:
                self._attach_child(pid, child)
        return True

    def _stopped(self, tid: int, sig: int, listen: bool = False) -> None:
        """A thread stopped: held while pausing (the tether's process), else sent on."""
        thread = self._threads[tid]
        thread.signal, thread.listen = sig, listen
        if (self._pausing and (thread.process == self.pid or self._closing)) or thread.process == self.holding:
            thread.state = "held"
        else:
            self._go(tid, thread)

    def _go(self, tid: int, thread: Thread) -> None:
        try:
            if thread.listen:
                ptrace.request(ptrace.LISTEN, tid)
            else:
                ptrace.request(ptrace.CONT, tid, 0, thread.signal)
        except OSError:
            pass                                  # killed meanwhile: its exit comes next
        thread.state, thread.signal = "running", 0

    def _exit_stop(self, tid: int) -> None:
        """A thread at its exit. One ending alone (exit(2), the others running on) goes on (its uprobes moved
        first: rebind); else the process is ending (exit_group, a fatal signal): each thread held, memory intact."""
        thread = self._threads[tid]
        if self._holds_exit(thread) and not self._ending_alone(tid, thread):
            thread.state, thread.signal, thread.listen = "exit", 0, False
            self._exit_complete()
        elif not (self.on_bearer_end and self.bearers.get(thread.process, thread.process) == tid
                  and self._ending_alone(tid, thread) and rebind.switch(self, tid, self.on_bearer_end)):
            self._go(tid, thread)   # gone: it stops no more (a leader's end is told after its threads')
            thread.state = "gone"

    def _holds_exit(self, thread: Thread) -> bool:
        """Whether the exit of the thread's process is held (a subclass may hold others)."""
        return self._execed and self.hold_exit and thread.process == self.pid

    def _ending_alone(self, tid: int, thread: Thread) -> bool:
        try:
            alone = ptrace.registers(tid).get("orig_rax") == _SYS_EXIT
        except OSError:
            return False
        others = [o for t, o in self._threads.items() if t != tid and o.process == thread.process]
        return alone and any(o.state not in ("exit", "gone") for o in others)

    def _mine(self) -> Dict[int, Thread]:
        """The threads of the tether's process (not of the children it follows)."""
        return {tid: t for tid, t in self._threads.items() if t.process == self.pid}

    def _exit_complete(self) -> None:
        if all_exited(self._mine().values()):
            self.at_exit.set()

    def _pause(self) -> Optional[Paused]:
        if not self._mine():
            return None
        self._stop_all()
        mine = self._mine()
        if not mine:
            self._pausing = False
            return None
        registers, vectors = ptrace.stopped_registers(t for t, thread in mine.items() if thread.state in ("held", "exit"))
        missing = tuple(t for t, thread in mine.items() if t not in registers and thread.state != "gone")
        return Paused(registers, missing, vectors)

    def _resume(self, exits: bool) -> bool:
        self._pausing = False
        for tid, thread in list(self._mine().items()):
            if thread.state == "held" or (exits and thread.state == "exit"):
                self._go(tid, thread)
        if exits:
            self.at_exit.clear()
        return True

    def _stop_all(self, everyone: bool = False) -> None:
        """Interrupt the process's running threads (everyone: the children's too), wait for each (PAUSE_TIMEOUT_S)."""
        self._pausing = True
        self._interrupt((lambda: self._threads) if everyone else self._mine, PAUSE_TIMEOUT_S)

    def _interrupt(self, which: Callable[[], Dict[int, Thread]], timeout_s: float) -> None:
        """Interrupt the running threads which() gives, and take their stops until none runs."""
        for tid, thread in which().items():
            if thread.state == "running":
                with contextlib.suppress(OSError):
                    ptrace.request(ptrace.INTERRUPT, tid)
        deadline = time.monotonic() + timeout_s
        while any(t.state in ("running", "new") for t in which().values()) and time.monotonic() < deadline:
            self._drain()
            time.sleep(0.0002)

    def _detach_all(self) -> None:
        """Only a stopped thread can be detached: stop them all, then let each go."""
        self._closing = True
        self._stop_all(everyone=True)
        for tid, thread in self._threads.items():
            with contextlib.suppress(OSError):
                ptrace.request(ptrace.DETACH, tid, 0, thread.signal)
        self._threads.clear()


def all_exited(threads: Iterable[Thread]) -> bool:
    """Every thread of a process at its exit or past it, one at least held there."""
    states = [t.state for t in threads]
    return "exit" in states and all(s in ("exit", "gone") for s in states)
