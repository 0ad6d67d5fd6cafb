"""BCC's compile of the generated C (clang, then LLVM: most of a BCC run's start), begun on a
thread as soon as the text exists, so that what probedsl does meanwhile (the mapping tracker,
the probes' placement checks, the unwinder's rows) is not added to it. BCC 0.26 cannot load a
compiled object, so there is nothing to cache between runs; libbcc releases the GIL while it
compiles, so the two overlap on another core."""

from __future__ import annotations

import os
import threading
from typing import List, Optional

from probedsl.errors import ProbedslError
from probedsl.process import btf, pidns


def check_headers() -> None:
    headers = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(os.path.join(headers, "include")):
        raise ProbedslError(
            f"BCC needs kernel headers at {headers}: run scripts/setup.sh (it links "
            "Debian's linux-headers there), or use --backend bpftrace"
        )


def cflags(pid: int) -> List[str]:
    flags = [f"-DPROBEDSL_PID={int(pid)}", f"-DPROBEDSL_SELF={os.getpid()}"]
    layout = {}
    try:  # the running kernel's layout of what the program reads by hand (bcc.c.j2's PROBEDSL_FIELD)
        layout = {
            "OFF_TASK_SIGNAL": btf.offset("task_struct", "signal"),
            "OFF_TASK_LEADER": btf.offset("task_struct", "group_leader"),
            "OFF_TASK_START_TIME": btf.offset("task_struct", "start_time"),
            "OFF_SIGNAL_LIVE": btf.offset("signal_struct", "live"),
            "OFF_SIGNAL_FLAGS": btf.offset("signal_struct", "flags"),
        }
        flags.append("-DPROBEDSL_BTF_LAYOUT")  # all of them: bcc.c.j2 reads by offset
    except (OSError, KeyError, ValueError):  # no BTF: the installed headers' layout
        pass
    ns = pidns.own()
    if ns:  # the program's pids become this namespace's (bcc.c.j2)
        flags += [f"-DPROBEDSL_PIDNS_DEV={ns.dev}ULL", f"-DPROBEDSL_PIDNS_INO={ns.ino}ULL"]
        try:
            layout.update(pidns.layout())
        except (OSError, KeyError, ValueError) as exc:
            raise ProbedslError(
                f"probedsl runs in a PID namespace and cannot read this kernel's layout of "
                f"pids from {btf.VMLINUX}: {exc}"
            ) from None
    return flags + [f"-DPROBEDSL_{name}={value}" for name, value in layout.items()]


class Compilation:
    """bcc.BPF(text=...) running on its own thread; result() waits for it."""

    def __init__(self, bcc, c_text: str, pid: int):
        check_headers()
        self._bpf = None
        self._error: Optional[Exception] = None
        self._thread = threading.Thread(
            target=self._compile, args=(bcc, c_text, pid), name="probedsl-bcc-compile", daemon=True
        )
        self._thread.start()

    def _compile(self, bcc, c_text: str, pid: int) -> None:
        try:  # the flags too (the kernel's BTF, a PID namespace's layout)
            self._bpf = bcc.BPF(text=c_text, cflags=cflags(pid))
        except ProbedslError as exc:
            self._error = exc
        except Exception as exc:  # BCC raises bare Exception on compile/load errors
            self._error = ProbedslError(f"BCC could not compile the program: {exc}")

    def result(self):
        """The BPF object; a ProbedslError if BCC could not compile the program."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._bpf
