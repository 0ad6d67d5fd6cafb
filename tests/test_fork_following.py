"""Following forks with per-process uprobes (BCC): each child is held at its fork until its own
uprobes are on, so every process of the tree is traced from its first call, and a process
outside the tree never traps (no machine-wide uprobe)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import MEMLEAK, ROOT, Held, report_json, start_run

pytestmark = pytest.mark.usefixtures("root_required")

# fork_tree.c: what each process keeps, from its first call after its fork (or its exec)
TREE = {
    "parent_keep": (11, 1),
    "child1_keep": (42, 2),
    "grandchild_keep": (93, 3),
    "child2_keep": (164, 4),
    "leaf_keep": (255, 5),
}


def by_keeper(report: dict) -> dict:
    """{the *_keep function that called keep(): (bytes, blocks)}; other blocks (stdio's buffer)
    left out."""
    sites = {}
    for e in report["reports"][0]["entries"]:
        name = next((f["function"] for f in e["stack"] if (f["function"] or "").endswith("_keep")), None)
        if name is None:
            continue
        b, n = sites.get(name, (0, 0))
        sites[name] = (b + e["bytes"], n + e["blocks"])
    return sites


def uprobes_mapped(pid: int) -> bool:
    """Whether the kernel gave the process its uprobe area: it does at the first uretprobe hit
    (memleak has one on malloc), and never in a process no uprobe applies to."""
    with open(f"/proc/{pid}/maps") as f:
        return "[uprobes]" in f.read()


def bystander_traps() -> bool:
    """A process started while tracing, outside the traced tree, that calls malloc: did it trap?"""
    return _bystander_traps()


def bystanders_always_trap() -> bool:
    """bystander_traps() in each of up to 5 processes, 0.5 s apart: machine-wide uprobes of this
    run make every one trap; another tracer on this machine (a test run beside ours) may
    come and go meanwhile."""
    for _attempt in range(5):
        if not _bystander_traps():
            return False
        time.sleep(0.5)
    return True


def children_maps(pid: int) -> str:
    """The maps of each child of pid (the command probedsl launched, waiting for its input)."""
    maps = ""
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            for child in f.read().split():
                with open(f"/proc/{child}/maps") as m:
                    maps += m.read()
    return maps


def tracers_running() -> str:
    """For a failure's message: tracers on this machine (another test run's may trap everyone)."""
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return "\n".join(l for l in ps.splitlines() if "probedsl run" in l or "bpftrace" in l)


def _bystander_traps() -> bool:
    other = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline() == "ready\n"
        return uprobes_mapped(other.pid)
    finally:
        other.stdin.close()
        other.wait()


@pytest.mark.parametrize("how", ["pid", "cmd"])
def test_every_process_of_a_tree_is_traced_from_its_first_call_and_bystanders_never_trap(how, build):
    exe = build("fork_tree")
    target = Held([exe, "wait"]) if how == "pid" else None
    try:
        args = ["--pid", str(target.pid)] if target else ["--", exe, "wait"]
        tracer = start_run(
            MEMLEAK,
            "--backend",
            "bcc",
            "--format",
            "json",
            "--stacks",
            "fp",
            *args,
            stdin=None if target else subprocess.PIPE,
        )
        assert not bystanders_always_trap(), tracers_running()
        if not target:  # the system's libc, probed by the command's pid (no private copies)
            maps = children_maps(tracer.pid)
            assert "/libc.so" in maps and "probedsl-libs" not in maps, maps
        if target:
            target.go()
        out, err = tracer.communicate(None if target else "go\n", timeout=120)
    finally:
        if target:
            target.end()
    assert tracer.returncode == 0, err
    assert "pays a uprobe trap" not in err, err
    report = report_json(out)
    sites = by_keeper(report)
    assert sites == TREE, sites
    pids = {e["pids"][0] for e in report["reports"][0]["entries"] if e["stack"]}
    assert len(pids) == len(TREE), pids  # five processes, each apart


def test_a_process_another_tracer_holds_is_followed_with_uprobes_on_every_process(build):
    """The fork hold needs ptrace; when a debugger holds the process, children are still
    followed (machine-wide uprobes, the BPF filter), and the cost to others is said."""
    exe = build("fork_tree")
    target = Held([exe, "wait"])
    # a debugger's loop: it holds the process and passes its signals on (SIGCHLD at each child's end)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from probedsl.process import ptrace
ptrace.request(ptrace.SEIZE, {target.pid})
print("attached", flush=True)
while True:
    _, status = os.waitpid({target.pid}, ptrace.WALL)
    if not os.WIFSTOPPED(status):
        break
    ptrace.request(ptrace.CONT, {target.pid}, 0, 0 if status >> 16 else os.WSTOPSIG(status))
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "attached\n"
        tracer = start_run(MEMLEAK, "--backend", "bcc", "--format", "json", "--stacks", "fp", "--pid", str(target.pid))
        assert bystander_traps()
        target.go()
        out, err = tracer.communicate(timeout=120)
    finally:
        holder.kill()
        holder.wait()
        target.end()
    assert tracer.returncode == 0, err
    assert "every process using libc.so.6 pays a uprobe trap" in err, err
    report = report_json(out)
    assert any("following forks: cannot attach" in n for n in report["notes"]), report["notes"]
    sites = by_keeper(report)
    assert sites == TREE, sites
