"""bpftrace dialects: one class per range of versions whose language and runtime agree.

Each names what its versions need or offer; the generator (probedsl.backends.bpftrace) and
the driver (probedsl.drivers.bpftrace) read these flags and nothing else about the version.
"""

from __future__ import annotations

import os
import re
from typing import ClassVar, Dict, List, Tuple

from probedsl import ir
from probedsl.ir.layout import TALLY_SHIFT
from probedsl.process import tracefs

from .base import Target

# the lines bpftrace prints that the driver waits for: the program's probes are attached, and
# a snapshot's maps follow
READY_MARK = "probedsl:ready"
SNAPSHOT_MARK = "probedsl:snapshot"


class Bpftrace(Target):
    backend = "bpftrace"
    # without map declarations every keyed map (scratch, tallies, histograms) is sized at the
    # live table's size and preallocated: 1M costs ~2 s more start-up and ~650 MB of kernel
    # memory on 0.17 (262,144: +0.5 s, ~220 MB). Past the size, acquisitions are untracked.
    default_max_live = 262_144
    max_live_limit = (1 << TALLY_SHIFT) - 1
    # environment variables that size maps (bpftrace reads one name or the other)
    map_keys_env: ClassVar[Tuple[str, ...]] = ()
    # the type checker types a map at its first use in the text: a map read into a variable
    # before any write there gets no key type ("map expects no arguments", 0.23.2). A write
    # that never runs, in BEGIN, types each such map first.
    type_maps_first: ClassVar[bool] = False
    # `pid` and `tid` are bpftrace's own PID namespace's (0.24; `pid(init)` the kernel's):
    # before, a bpftrace in a container compares the host's pids with the container's
    namespaced_pids: ClassVar[bool] = False
    # delete(@m, k) (0.22+; delete(@m[k]) deprecated) instead of delete(@m[k])
    delete_with_key_argument: ClassVar[bool] = False
    # bpftrace attaches a script's probes last to first (so that they fire in text order)
    attaches_in_reverse: ClassVar[bool] = True
    # `$deleted = delete(...)`: delete returns whether the key was there (0.24), and a discarded
    # result warns at compile time (0.25 "warn on all discarded expressions")
    delete_result_used: ClassVar[bool] = False
    traceable_functions_option: ClassVar[bool] = False  # (raw_tracepoint_options)
    # subtraction is signed (0.26): `nsecs - $t` warns that both uint64 operands are cast to
    # int64 unless the casts are written
    signed_subtraction: ClassVar[bool] = False
    # a cast to the type a value already has warns (0.27: `(uint64)arg0`, `(uint64)nsecs`)
    warns_same_type_cast: ClassVar[bool] = False
    # each cast in a uprobe's body searches the probed file's debug info for a struct of that
    # name, all of it (0.17-0.19, where it is installed, e.g. libc6-dbg: ~20 ms a cast, memleak's
    # 79 were 1.6 s of 0.17's start): casts to the type a value has are left out (pid and tid
    # are uint64 there), and the sign of an equality between unsigned values
    costly_casts: ClassVar[bool] = False
    # how stacks print: perf ("ADDR SYMBOL (MODULE)", symbols off by BPFTRACE_NO_USER_SYMBOLS)
    # or raw (addresses only, 0.18+)
    stack_mode: ClassVar[str] = "perf"

    def with_build(self, build: Dict[str, bool]) -> "Bpftrace":
        """The installed binary's features (`bpftrace --info`): without bfd it refuses a uprobe
        inside a function ("compiled without (k|u)probe offset support", Debian 12's 0.17)."""
        self.build = build
        if build.get("bfd") is False:
            self.probe_offsets = False
        return self

    def build_text(self) -> str:
        """What `doctor` says of the build ("" before with_build)."""
        build = getattr(self, "build", None)
        if not build:
            return ""
        return ", ".join(f"{name} {'yes' if ok else 'no'}" for name, ok in build.items())

    def environment(self, max_live: int) -> dict:
        env = {"BPFTRACE_NO_USER_SYMBOLS": "1"}  # raw addresses: probedsl symbolizes itself
        env.update({name: str(max_live) for name in self.map_keys_env})
        return env

    def check_options(self, output: str) -> List[str]:
        """Options that compile and load a script without running it (tests, `check`)."""
        return ["--emit-elf", output]

    def options(self, scope: ir.Scope) -> List[str]:
        """Command-line options for a program traced in this scope."""
        return ["-p", str(int(scope.pid))] if self.scopes_uprobes(scope) else []

    def raw_tracepoint_options(self, script: str, directory: str) -> List[str]:
        """0.25+ finds raw tracepoints among the kernel's traceable functions (__probestub_NAME);
        where it cannot read those (a locked-down kernel refuses available_filter_functions), it
        finds none, and leaves the script's rawtracepoint probes out (missing_probes=warn): the
        fork probe that follows children in a PID namespace. The ones the script uses are then
        named in a file of their own (--traceable-functions, 0.25+)."""
        names = re.findall(r"^rawtracepoint:vmlinux:(\w+)", script, re.M)
        if not names or not self.traceable_functions_option or _readable(TRACEABLE_FUNCTIONS):
            return []
        path = os.path.join(directory, "traceable-functions")
        with open(path, "w") as f:
            f.write("".join(f"__probestub_{name}\n" for name in dict.fromkeys(names)))
        return ["--traceable-functions", path]

    def attaches_at(self, probe: ir.Probe, path: str) -> int:
        """A probe with a uretprobe stays at the entry: bpftrace puts a uretprobe there only,
        and two places would be two traps."""
        return 0 if probe.at_return else super().attaches_at(probe, path)

    @staticmethod
    def positional(scope: ir.Scope) -> List[str]:
        """The script's $1: the traced name (--comm: data, never code), or probedsl's own pid
        (--all leaves out the process reading the maps)."""
        return {"comm": [scope.comm], "all": [str(os.getpid())]}.get(scope.mode, [])


class Bpftrace017(Bpftrace):
    """Debian 12 (0.17), kubectl-trace's runner (0.19.1)."""

    first, last = (0, 17), (0, 19)
    map_keys_env = ("BPFTRACE_MAP_KEYS_MAX",)  # 0.17 ignores the newer name
    costly_casts = True

    def notes(self, program: ir.Program) -> List[str]:
        scope = program.scope
        if scope.mode in ("pid", "cmd") and not scope.tracks_children:
            return [
                f"bpftrace {self.range_text()} cannot scope uprobes to one process (-p does not); "
                "other processes using the probed libraries pay the trap"
            ] + super().notes(program)
        return super().notes(program)


class Bpftrace020(Bpftrace):
    """Ubuntu 24.04 (0.20.2), Debian 13 and Ubuntu 25.10 (0.23), Fedora 42."""

    first, last = (0, 20), (0, 23)
    # a resource whose tallies carry (pid, image) (fdleak's close-on-exec): 0.23's loop over 128
    # keys passed the verifier's 1,000,000 instructions (64: 397,435; 96: 797,740; measured)
    range_keys_with_image = 64
    map_keys_env = ("BPFTRACE_MAX_MAP_KEYS",)  # the old name only warns that it is deprecated
    # half 0.17's: each per-CPU hash (tally sums, histograms) is preallocated entry by entry,
    # ~0.17 s each at 262,144 on 0.23 (measured); 131,072 takes ~0.14 s and ~110 MB of kernel
    # memory less from every start, and more live entries than that are counted untracked
    default_max_live = 131_072
    per_pid_uprobes = True  # -p PID scopes uprobes (0.20 "uprobe pid targeting")
    probe_offsets = True
    type_maps_first = True

    def check_options(self, output: str) -> List[str]:
        # 0.27's --emit-elf writes the object, then attaches and runs the script (measured)
        return ["--dry-run"]


class Bpftrace024(Bpftrace020):
    """Fedora 43 (0.24)."""

    first, last = (0, 24), (0, 24)
    namespaced_pids = True
    delete_with_key_argument = True  # (and 0.24+ reads only BPFTRACE_MAX_MAP_KEYS)
    # -p applies to every probe (0.24 "-p CLI flag now applies to all probes"; measured on
    # 0.27.0 and 0.27.1): the tracepoints probedsl fires itself (ready, snapshot) never reach
    # the script, so uprobes are not scoped to the process
    per_pid_uprobes = False
    # BPFTRACE_NO_USER_SYMBOLS is gone: 0.27.1 named the frames of a live process in perf mode
    # ("557d4a8201b4wrapper2+27(/tmp/ld)" in a map key), where a symbol starting with a hex
    # letter cannot be told from the address
    stack_mode = "raw"

    def environment(self, max_live: int) -> dict:
        # a probe that fails to attach ends bpftrace from 0.24 ("error by default"); 0.20-0.23
        # warned and went on, which --comm needs: a matching process may end (and its
        # /proc/PID/root with it) between resolution and attach (measured on 0.27.1)
        return {**super().environment(max_live), "BPFTRACE_MISSING_PROBES": "warn"}

    def notes(self, program: ir.Program) -> List[str]:
        scope = program.scope
        if scope.mode in ("pid", "cmd") and not scope.tracks_children:
            return [
                f"bpftrace {self.range_text()}'s -p filters every probe, probedsl's own included: uprobes "
                "are not scoped to the process, and other processes using the probed libraries pay the "
                "trap (--backend bcc scopes them)"
            ] + super().notes(program)
        return super().notes(program)


class Bpftrace025(Bpftrace024):
    """Arch (0.25), Alpine 3.24 (0.26)."""

    first, last = (0, 25), (0, 26)
    # `let @m = hash(N)` sizes each map: the live table at --max-live, the others at what they
    # need, so a million live entries no longer preallocate every map a million times
    map_declarations = True
    default_max_live = ir.DEFAULT_MAX_LIVE
    delete_result_used = True
    signed_subtraction = True
    traceable_functions_option = True


class Bpftrace027(Bpftrace025):
    """Debian sid (0.27.1), Debian forky (0.27.0)."""

    first, last = (0, 27), (0, 27)
    # measured on 0.27.0 and 0.27.1: each of these printed a warning for every probe
    warns_same_type_cast = True


DIALECTS = (Bpftrace017, Bpftrace020, Bpftrace024, Bpftrace025, Bpftrace027)


TRACEABLE_FUNCTIONS = tracefs.files("available_filter_functions")


def _readable(paths: Tuple[str, ...]) -> bool:
    """Whether one of the paths can be read (a locked-down kernel refuses even root: EPERM)."""
    for path in paths:
        try:
            with open(path, "rb") as f:
                f.read(1)
            return True
        except OSError:
            continue
    return False
