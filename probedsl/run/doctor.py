"""`probedsl doctor`: what this machine has for tracing, what is missing, and the command
that fixes it. Nothing here attaches a probe: it reads files, versions and capabilities."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import List

from probedsl import targets
from probedsl.drivers.bcc_uprobes import links_available
from probedsl.errors import ProbedslError
from probedsl.process import tracefs

CAP_DAC_READ_SEARCH, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 2, 21, 38, 39
# what a run needs without root (tested with BCC): BPF programs and uprobes, perf side-band
# records, and reading tracefs (tracepoint formats, root's only)
TRACING_CAPS = (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_DAC_READ_SEARCH)
CAP_NAMES = "CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH"


@dataclass
class Check:
    name: str
    ok: bool
    found: str  # what is there (or not)
    fix: str = ""  # the command or step that fixes it, when not ok
    needed: bool = True  # False: optional (a missing one only weakens reports)

    def line(self) -> str:
        mark = "ok  " if self.ok else ("MISS" if self.needed else "warn")
        return f"{mark} {self.name:<12} {self.found}" + (
            f"\n       fix: {self.fix}" if not self.ok and self.fix else ""
        )


def has_tracing_rights() -> bool:
    """root, or the capabilities that loading BPF programs and attaching uprobes need."""
    caps = _capabilities()
    return os.geteuid() == 0 or all(caps >> c & 1 for c in TRACING_CAPS)


def _capabilities() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return 0


def _tracefs() -> str:
    return next((d for d in tracefs.ROOTS if os.path.isdir(os.path.join(d, "events"))), "")


LOCKDOWN = "/sys/kernel/security/lockdown"


def _lockdown() -> str:
    """The kernel lockdown mode in force (none, integrity, confidentiality), "" without the LSM."""
    try:
        with open(LOCKDOWN) as f:
            text = f.read()
    except OSError:
        return ""
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else ""


def checks() -> List[Check]:
    out = [Check("kernel", True, os.uname().release)]
    rights = has_tracing_rights()
    out.append(
        Check(
            "rights",
            rights,
            "root" if os.geteuid() == 0 else CAP_NAMES if rights else f"uid {os.geteuid()} without {CAP_NAMES}",
            f"run as root (sudo probedsl ...), or grant {CAP_NAMES}",
        )
    )
    for backend in targets.BACKENDS:
        try:
            target = targets.detect(backend)
            placed = (
                "places probes past an entry's first instruction"
                if target.probe_offsets
                else "probes at function entries only"
            )
            out.append(
                Check(
                    backend,
                    True,
                    f"{targets.version_text(target.version)}: the {target.backend}-"
                    f"{target.range_text()} dialect; {placed}"
                    + ("; unwinds -O2 stacks (--stacks dwarf)" if target.dwarf_stacks else "")
                    + (
                        f"; built with: {target.build_text()}"
                        if getattr(target, "build_text", None) and target.build_text()
                        else ""
                    ),
                )
            )
        except ProbedslError as exc:
            fix = {"bpftrace": "apt-get install bpftrace", "bcc": "apt-get install bpfcc-tools python3-bpfcc"}[backend]
            out.append(Check(backend, False, str(exc).split(" (")[0], fix, needed=False))
    tracefs = _tracefs()
    out.append(Check("tracefs", bool(tracefs), tracefs or "not mounted", "mount -t tracefs nodev /sys/kernel/tracing"))
    out.append(
        Check(
            "uprobes",
            os.path.isdir("/sys/bus/event_source/devices/uprobe"),
            "the uprobe PMU is there" if os.path.isdir("/sys/bus/event_source/devices/uprobe") else "no uprobe PMU",
            "a kernel built with CONFIG_UPROBE_EVENTS",
        )
    )
    out.append(
        Check(
            "tracepoints",
            bool(tracefs) and os.path.isdir(os.path.join(tracefs, "events/kmem")),
            "kmem, syscalls..." if tracefs else "no tracefs",
            "mount tracefs (above)",
        )
    )
    btf = os.path.exists("/sys/kernel/btf/vmlinux")
    out.append(
        Check(
            "BTF",
            btf,
            "/sys/kernel/btf/vmlinux" if btf else "none",
            "a kernel built with CONFIG_DEBUG_INFO_BTF (bpftrace 0.17 then needs headers)",
            needed=False,
        )
    )
    links = links_available()
    out.append(
        Check(
            "uprobe links",
            links,
            "BPF uprobe_multi links: BCC's uprobes are a process's (every thread), closed in ~50 ms each, in parallel"
            if links
            else "none (Linux < 6.12, or PROBEDSL_UPROBE_LINKS=0): BCC opens a perf event per uprobe, ~0.1 s each to close",
            "Linux 6.12+ (BCC then attaches by link)",
            needed=False,
        )
    )
    kprobes = os.path.isdir("/sys/bus/event_source/devices/kprobe")
    out.append(
        Check(
            "kprobes",
            kprobes,
            "the kprobe PMU is there"
            if kprobes
            else "no kprobe PMU: recipes use uprobes and tracepoints only, none needs them",
            needed=False,
        )
    )
    lockdown = _lockdown()
    out.append(
        Check(
            "lockdown",
            lockdown != "confidentiality",
            lockdown or "no lockdown LSM",
            "confidentiality mode (Secure Boot kernels) refuses BPF reads of kernel memory: "
            "boot with lockdown=integrity, or without Secure Boot; uprobe recipes are not affected",
            needed=False,
        )
    )
    build = f"/lib/modules/{os.uname().release}/build/include"
    out.append(
        Check(
            "headers",
            os.path.isdir(build),
            build if os.path.isdir(build) else f"no {build}",
            "(BCC compiles with them) apt-get install linux-headers-$(uname -r), or link Debian's "
            "/usr/src/linux-headers-*-amd64 there (scripts/setup.sh does)",
            needed=False,
        )
    )
    for tool, why in (("addr2line", "file:line and inlined frames"), ("c++filt", "C++ names")):
        found = shutil.which(tool)
        out.append(Check(tool, bool(found), found or f"missing: no {why}", "apt-get install binutils", needed=False))
    urls = os.environ.get("DEBUGINFOD_URLS", "")
    out.append(
        Check(
            "debuginfod",
            bool(urls),
            urls or "DEBUGINFOD_URLS not set: stripped programs are named from local debug files only",
            "export DEBUGINFOD_URLS=https://debuginfod.debian.net",
            needed=False,
        )
    )
    return out


def backends_usable(found: List[Check]) -> List[str]:
    """The backends that can run here: installed, with rights, tracefs and uprobes."""
    ok = {c.name: c.ok for c in found}
    if not (ok["rights"] and ok["tracefs"] and ok["uprobes"]):
        return []
    return [b for b in targets.BACKENDS if ok[b] and (b != "bcc" or ok["headers"])]  # BCC compiles with them


def report(found: List[Check]) -> str:
    usable = backends_usable(found)
    lines = [c.line() for c in found]
    lines.append("")
    lines.append(
        f"can run: {', '.join(usable)}"
        if usable
        else "no backend can run here: fix the MISS lines above (scripts/setup.sh does it all on Debian)"
    )
    return "\n".join(lines) + "\n"
