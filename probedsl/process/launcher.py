"""`-- CMD`: start the command held before exec, let it go once the probes are attached."""

from __future__ import annotations

import os
import shutil
import signal
from typing import Callable, List, Optional

from probedsl.process import ptrace
from probedsl.errors import ProbedslError


class HeldCommand:
    """A forked child that blocks on a pipe, then execs argv (never through a shell)."""

    def __init__(self, argv: List[str]):
        if not argv:
            raise ProbedslError("no command given after --")
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0])
        if not exe or not os.path.isfile(exe) or not os.access(exe, os.X_OK):
            raise ProbedslError(f"command not found or not executable: {argv[0]}")
        self.exe = os.path.realpath(exe)
        read_end, self._go = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: wait for the go byte, then exec
            try:
                os.close(self._go)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                message = b""
                while chunk := os.read(read_end, 4096):
                    message += chunk
                if message[:1] in (b"g", b"s"):
                    os.close(read_end)
                    if message.startswith(b"s"):  # stop right after exec (see release)
                        ptrace.request(ptrace.TRACEME, 0)
                    env = dict(os.environb)
                    # "g" then NAME=VALUE\0 pairs: variables set at release (LD_LIBRARY_PATH)
                    for pair in filter(None, message[1:].split(b"\0")):
                        name, _, value = pair.partition(b"=")
                        env[name] = value
                    os.execve(exe, argv, env)
            finally:
                os._exit(127)
        os.close(read_end)
        self.pid = pid
        self.status: Optional[int] = None
        self.tether = None  # a probedsl.process.tether.Tether that follows it: it reaps the command

    def release(
        self,
        env: Optional[dict] = None,
        at_exec: Optional[Callable[[], None]] = None,
        tether=None,
    ) -> None:
        """Let the command exec, with `env` added to its environment. With at_exec, the command
        is held (traced) at its exec while at_exec() runs, then let go, whatever at_exec does.
        With a tether (started, given the same at_exec), the tether holds it so, and stays."""
        extra = b"".join(f"{k}={v}".encode() + b"\0" for k, v in (env or {}).items())
        if tether is not None:
            self.tether = tether
        try:
            os.write(self._go, (b"s" if at_exec and not tether else b"g") + extra)
        except BrokenPipeError:  # it died while held (a Ctrl-C reached it)
            os.close(self._go)
            self._go = -1
            self.wait()
            return
        os.close(self._go)
        self._go = -1
        if tether is not None:
            if at_exec is not None:
                tether.exec_done.wait()
            return
        if at_exec is None:
            return
        _, status = os.waitpid(self.pid, 0)  # the stop after exec (a SIGTRAP)
        while os.WIFSTOPPED(status) and os.WSTOPSIG(status) != signal.SIGTRAP:
            try:  # a signal that came before the exec (Ctrl-C): delivered, then the exec's stop
                ptrace.request(ptrace.CONT, self.pid, 0, os.WSTOPSIG(status))
            except ProcessLookupError:  # killed meanwhile: its exit is the next wait's
                pass
            _, status = os.waitpid(self.pid, 0)
        if not os.WIFSTOPPED(status):  # the exec failed, or it ended: exited
            self.status = shell_status(status)
            return
        try:
            at_exec()
        finally:
            if self.status is None:
                sig = os.WSTOPSIG(status) if os.WIFSTOPPED(status) else 0
                try:
                    ptrace.request(ptrace.DETACH, self.pid, 0, 0 if sig == signal.SIGTRAP else sig)
                except ProcessLookupError:  # killed while held: poll() reaps it
                    pass

    def abandon(self) -> None:
        """Probes failed: the child exits without running the command (nothing once released)."""
        if self._go < 0:
            return
        os.close(self._go)
        self._go = -1
        self.wait()

    def poll(self) -> Optional[int]:
        if (
            self.status is None
            and self.tether is not None
            and not self.tether.ended.is_set()
            and self.tether.exit_status is None
        ):
            return None  # the tether waits for it (a wait here would take its stops)
        if self.status is None and self.tether is not None and self.tether.exit_status is not None:
            self.status = self.tether.exit_status
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = shell_status(status)
        return self.status

    def wait(self) -> int:
        while self.poll() is None:
            if self.tether is not None and not self.tether.ended.is_set():
                self.tether.ended.wait(0.05)  # it reaps the command: its status is the tether's
            elif self.poll() is None:  # (the tether may have reaped it as it ended)
                _, status = os.waitpid(self.pid, 0)
                self.status = shell_status(status)
        return self.status


def shell_status(wait_status: int) -> int:
    """Exit code as a shell reports it: 128+N for a command killed by signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code
