"""BCC's compile of the generated C (clang, then LLVM: most of a BCC run's start), begun on a
thread as soon as the text exists, so that what probedsl does meanwhile (the mapping tracker,
the probes' placement checks, the unwinder's rows) is not added to it; libbcc releases the GIL
while it compiles, so the two overlap on another core. A text compiled before reuses that
compile's programs (probedsl.drivers.bcc_kept)."""

from __future__ import annotations

import os
import re
import threading
from typing import List, Optional

from probedsl.drivers import bcc_kept, bcc_ksyms, bcc_tracepoints
from probedsl.errors import ProbedslError, one_line
from probedsl.notices import note
from probedsl.process import btf, pidns, procfs


def check_headers() -> None:
    headers = f"/lib/modules/{os.uname().release}/build"
    if not os.path.exists(os.path.join(headers, "include")):
        raise ProbedslError(
            f"BCC needs kernel headers at {headers}: run scripts/setup.sh (it links "
            "Debian's linux-headers there), or use --backend bpftrace"
        )


def per_run(c_text: str, pid: int) -> List[str]:
    """This run's pids, for a text that filters by them in its code (--all, and a pid or command
    whose forks are not followed); such a text is compiled at every run."""
    flags = [f"-DPROBEDSL_PID={int(pid)}"] if re.search(r"\bPROBEDSL_PID\b", c_text) else []
    return flags + ([f"-DPROBEDSL_SELF={os.getpid()}"] if re.search(r"\bPROBEDSL_SELF\b", c_text) else [])


def cflags(c_text: str, pid: int) -> List[str]:
    """Every flag a compile of c_text takes."""
    return machine_flags(c_text) + per_run(c_text, pid)


# BCC compiles with -g for the programs' BTF: its lines and types show only in a verifier's log
# and bpftool, and only a task storage map needs it (the kernel refuses one without its types);
# -g0 after it is 12% of memleak's compile (0.12 s of 0.95, fp stacks, this VM)
FIXED_FLAGS = ["-g0"]
TASK_STORAGE = ["-DPROBEDSL_TASK_STORAGE"]  # (and BTF: no -g0)


def task_storage(c_text: str) -> bool:
    """A thread's scratch is kept in its task storage (bcc.c.j2): Linux 6.2+ with BTF (before,
    a get from a uprobe's program failed whenever another held the CPU's storage lock), not
    with the dwarf unwinder (its -g was 0.1 s more of a cold start, 0.88 -> 1.02 s to exec, for
    ~15-75 ns per call), and PROBEDSL_TASK_STORAGE is not 0 (a hash by thread then)."""
    if os.environ.get("PROBEDSL_TASK_STORAGE", "1") == "0" or procfs.kernel_release() < (6, 2):
        return False
    if "PROBEDSL_UNW_MAPS" in c_text:
        return False
    return btf.has_function("bpf_task_storage_get") and btf.has_function("bpf_get_current_task_btf")


def machine_flags(c_text: str) -> List[str]:
    """The flags the same at every run of c_text on this machine: FIXED_FLAGS (or
    TASK_STORAGE), and what the C text takes from the machine."""
    flags = list(TASK_STORAGE if task_storage(c_text) else FIXED_FLAGS)
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
    # a thread's pending uretprobes: bcc.c.j2's frame-pointer walk leaves its stacks to the kernel,
    # which puts back the return addresses they replaced since 6.12 (and takes the running one
    # off the list first); without these every stack is the kernel's walk
    try:
        if procfs.kernel_release() >= (6, 12):
            layout["OFF_TASK_UTASK"] = btf.offset("task_struct", "utask")
            layout["OFF_UTASK_RETURNS"] = btf.offset("uprobe_task", "return_instances")
    except (OSError, KeyError, ValueError):
        layout.pop("OFF_TASK_UTASK", None)
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
    """bcc.BPF(text=...) running on its own thread, its programs unattached (bcc_tracepoints);
    result() waits for it. kept
    (probedsl.trust.cachedir.Kept): where compiled programs are kept between runs
    (probedsl.drivers.bcc_kept); with it, a text compiled before builds only its tables."""

    def __init__(self, bcc, c_text: str, pid: int, kept=None):
        check_headers()
        self._bpf = None
        self._error: Optional[Exception] = None
        self._unkept: Optional[tuple] = None  # (kept, name, bcc): a fresh compile to keep
        # the flags and a kept compile are found here, before the thread starts: there, this
        # Python work would wait for the GIL behind the session's, and the compile start late
        earlier, flags = None, []
        try:  # the kernel's BTF, a PID namespace's layout
            flags, own = machine_flags(c_text), per_run(c_text, pid)
        except ProbedslError as exc:
            self._error = exc
        else:
            if kept is not None and not own:  # (a text with this run's pids is never kept)
                earlier = self._kept(bcc, c_text, flags, kept)
            flags += own
        self._thread = threading.Thread(
            target=self._compile, args=(bcc, c_text, flags, earlier), name="probedsl-bcc-compile", daemon=True
        )
        if self._error is None:
            self._thread.start()

    def _kept(self, bcc, c_text: str, flags: List[str], kept) -> Optional[bytes]:
        """An earlier compile of this text, if one was kept (and this one to keep, if not)."""
        try:
            key = bcc_kept.name(bcc, c_text, flags)
            earlier = kept.load(key)
        except OSError:
            return None
        except Exception as exc:  # it only saves time: the run goes on, as said
            note(f"compiles kept from earlier runs not used: {one_line(exc)}")
            return None
        self._unkept = (kept, key, bcc)
        return earlier

    def _compile(self, bcc, c_text: str, flags: List[str], earlier: Optional[bytes]) -> None:
        bcc_ksyms.narrow_for_this_thread()  # (its kernel symbols: BCC's compile asks for two)
        try:
            if earlier is None or not self._reuse(bcc, c_text, flags, earlier):
                bpf = bcc_tracepoints.unattached(bcc)(text=c_text, cflags=flags)
                try:
                    bcc_tracepoints.load(bcc, bpf)  # (attached by the loader)
                except BaseException:
                    bpf.cleanup()
                    raise
                self._bpf = bpf
        except ProbedslError as exc:
            self._error = exc
        except Exception as exc:  # BCC raises bare Exception on compile/load errors
            self._error = ProbedslError(f"BCC could not compile the program: {exc}")

    def _reuse(self, bcc, c_text: str, flags: List[str], earlier: bytes) -> bool:
        """The programs of the kept compile, if it fits (else False: the text is compiled)."""
        kept, key, _ = self._unkept
        try:
            self._bpf = bcc_kept.loaded(bcc, c_text, flags, earlier, lambda: kept.forget(key))
        except bcc_kept.Unusable:  # damaged, or made for other tables
            return False
        except Exception as exc:  # this BCC or kernel refuses it: compiled afresh, as said
            note(f"a compile kept from an earlier run was not used ({one_line(exc)}): compiled afresh")
            return False
        self._unkept = None
        kept.used(key)
        return True

    def keep(self) -> None:
        """Keep a fresh compile for the next run once the loader has started (the programs it
        loads at once passed the verifier): a text the verifier refuses there is not kept."""
        if self._unkept is not None:
            (kept, key, bcc), self._unkept = self._unkept, None
            try:
                kept.keep(key, bcc_kept.dump(bcc, self._bpf), most=bcc_kept.MOST)
            except Exception as exc:  # it only saves the next run's time
                note(f"the compile could not be kept for the next run: {one_line(exc)}")

    def result(self):
        """The BPF object; a ProbedslError if BCC could not compile the program."""
        if self._thread.ident is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._bpf
