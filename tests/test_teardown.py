"""The end of a run: the report comes and control returns while the kernel removes the probes
(probedsl.drivers.teardown); nothing is left behind, and a run started right after is clean."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time

import pytest

from conftest import MEMLEAK, by_site, probedsl, report_json, start_run
from probedsl.drivers.bcc_uprobes import links_available

pytestmark = pytest.mark.usefixtures("root_required")

SYS_BPF = 321  # x86_64
GET_FD_BY_ID = {"prog_id": 13, "link_id": 30}  # BPF_PROG_GET_FD_BY_ID, BPF_LINK_GET_FD_BY_ID
UPROBE_EVENTS = "/sys/kernel/tracing/uprobe_events"
_libc = ctypes.CDLL(None, use_errno=True)


def kernel_objects(pid: int) -> set:
    """(kind, id) of every BPF program and link the process holds a descriptor of."""
    found = set()
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            with open(os.path.join(fdinfo, fd)) as f:
                for line in f:
                    kind, _, value = line.partition(":")
                    if kind in GET_FD_BY_ID:
                        found.add((kind, int(value)))
        except OSError:  # closed meanwhile
            pass
    return found


def uprobe_links(pid: int) -> int:
    """The uprobe_multi links the process holds."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                count += "link_type:\tuprobe_multi" in f.read()
        except OSError:  # closed meanwhile
            pass
    return count


def exists(kind: str, ident: int) -> bool:
    """Whether the kernel still has that program or link (anyone may hold it)."""
    attr = (ctypes.c_uint32 * 4)(ident, 0, 0, 0)
    fd = _libc.syscall(SYS_BPF, GET_FD_BY_ID[kind], ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True
    assert ctypes.get_errno() == errno.ENOENT, os.strerror(ctypes.get_errno())
    return False


def tracer_pid(tracer, backend: str) -> int:
    """The process that holds the probes: probedsl itself (BCC), or its bpftrace."""
    if backend == "bcc":
        return tracer.pid
    with open(f"/proc/{tracer.pid}/task/{tracer.pid}/children") as f:
        (child,) = [int(p) for p in f.read().split() if open(f"/proc/{p}/comm").read().strip() == "bpftrace"]
    return child


def leftover_events(*pids: int) -> list:
    """tracefs uprobe events named for those processes (libbcc's fallback names end _bcc_PID)."""
    with open(UPROBE_EVENTS) as f:
        return [line for line in f if any(line.split()[0].endswith(f"_{pid}") for pid in pids)]


@pytest.mark.parametrize(
    "backend, links",
    [
        ("bpftrace", False),
        pytest.param("bcc", True, marks=pytest.mark.skipif(not links_available(), reason="Linux < 6.12: no links")),
        ("bcc", False),
    ],
)
def test_teardown_leaves_nothing_and_a_run_right_after_is_clean(backend, links, build):
    """BCC with uprobe links (bcc_uprobes, the default where the kernel has them) and with
    its perf events (PROBEDSL_UPROBE_LINKS=0)."""
    leak = build("leak")
    env = dict(os.environ, PROBEDSL_UPROBE_LINKS="1" if links else "0")
    args = ("--backend", backend, "--format", "json", "--top", "50", "--", leak)
    first = start_run(MEMLEAK, *args, stdin=subprocess.PIPE, env=env)
    holder = tracer_pid(first, backend)
    held = kernel_objects(holder)
    assert any(kind == "prog_id" for kind, _ in held), held
    if backend == "bcc":
        assert (uprobe_links(holder) > 0) == links, held
    out, err = first.communicate(input="\n", timeout=120)
    assert first.returncode == 0, err
    assert by_site(report_json(out)).get("wrapper1") == (40, 5)

    # at once, while the kernel may still be removing the first run's probes
    second = probedsl("run", MEMLEAK, *args, input="\n", env=env)
    assert second.returncode == 0, second.stderr
    assert by_site(report_json(second.stdout)).get("wrapper1") == (40, 5)
    assert "Traceback" not in second.stderr and "warning" not in second.stderr, second.stderr

    # the first run's programs go once the kernel is done (a condition, bounded for a busy machine)
    deadline = time.monotonic() + 120
    while any(exists(kind, ident) for kind, ident in held) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [obj for obj in held if exists(*obj)] == []
    assert leftover_events(first.pid, holder) == []
