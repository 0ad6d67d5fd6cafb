"""PID namespaces (a container, `kubectl debug`): --pid N, the report's pids and the /proc reads
behind its stacks name the same processes whether probedsl runs on the host or inside the
namespace (process/pidns.py). Inside, BCC asks the kernel for the namespace's pids; bpftrace
>= 0.24 gives them itself and older dialects are refused. fork_tree's five processes are
followed from their first call, so a child numbered in the wrong namespace loses its blocks.
Inside, a tree in a nested namespace has its pids in probedsl's too (BCC; bpftrace refuses it),
and a host process of the name --comm asks for is not traced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import BACKENDS, MEMLEAK, ROOT, Held, report_json, start_run
from probedsl import targets
from test_fork_following import TREE, by_keeper

pytestmark = pytest.mark.usefixtures("root_required")

# run inside the namespace: the traced tree, probedsl, and the last pid handed out there. mode
# pid: --pid of the tree; nested: --pid of a tree in a namespace nested in this one; comm: --comm
# of the tree's name while the host runs a tree of that name too (released through the file
# descriptor argv[5]; argv[6] says when it ended)
INSIDE = """
import json, os, signal, subprocess, sys
exe, backend, recipe, mode = sys.argv[1:5]
tree = subprocess.Popen((["unshare", "--pid", "--fork"] if mode == "nested" else []) + [exe, "wait"],
                        stdin=subprocess.PIPE)
target = tree.pid
while mode == "nested":   # unshare's child, the nested namespace's first process, once it is the tree
    with open(f"/proc/{tree.pid}/task/{tree.pid}/children") as f:
        kids = f.read().split()
    if kids and os.path.realpath(f"/proc/{kids[0]}/exe") == os.path.realpath(exe):
        target = int(kids[0])
        break
scope = ["--comm", os.path.basename(exe)[:15]] if mode == "comm" else ["--pid", str(target)]
run = subprocess.Popen([sys.executable, "-m", "probedsl", "run", recipe, "--backend", backend,
                        "--format", "json", "--stacks", "fp", *scope],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
said = ""
while not said.startswith(("probedsl: tracing ", "probedsl: error")) and said is not None:
    said = run.stderr.readline() or None
tree.stdin.write(b"go\\n")
tree.stdin.close()
if mode == "comm":   # the host's tree too; the run ends once both ended
    os.write(int(sys.argv[5]), b"go\\n")
    tree.wait()
    os.read(int(sys.argv[6]), 1)
    run.send_signal(signal.SIGINT)
out, err = run.communicate(timeout=300)
tree.wait()
last = subprocess.run(["/bin/sh", "-c", "echo $$"], capture_output=True, text=True).stdout
print(json.dumps({"tree": target, "last": int(last), "rc": run.returncode, "err": (said or "") + err, "out": out}))
"""


# a new PID namespace with its own /proc (unshare --mount-proc makes / private, which a chroot,
# as in scripts/test-debian-root.sh, refuses: its / is no mount point)
NAMESPACE = [
    "unshare",
    "--pid",
    "--fork",
    "--mount",
    "--propagation",
    "unchanged",
    "sh",
    "-c",
    'mount --make-private /proc && mount -t proc proc /proc && exec "$@"',
    "sh",
]


def pids_by_keeper(report: dict) -> dict:
    return {
        f["function"]: e["pids"][0]
        for e in report["reports"][0]["entries"]
        for f in e["stack"]
        if (f["function"] or "").endswith("_keep")
    }


def run_inside(exe, backend, mode):
    """INSIDE's result; for comm, with a tree of the same name held on the host meanwhile."""
    argv = [*NAMESPACE, sys.executable, "-c", INSIDE, exe, backend, MEMLEAK, mode]
    if mode != "comm":
        ran = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=ROOT)
        assert ran.returncode == 0, ran.stderr
        return json.loads(ran.stdout.splitlines()[-1])
    host, (ended_r, ended_w) = Held([exe, "wait"]), os.pipe()
    go = host.proc.stdin.fileno()
    try:
        inside = subprocess.Popen(
            [*argv, str(go), str(ended_r)],
            pass_fds=(go, ended_r),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        host.proc.stdin.close()  # the run inside holds it: it releases the tree
        host.proc.wait(timeout=400)
        os.write(ended_w, b"x")
        out, err = inside.communicate(timeout=400)
    finally:
        if host.proc.poll() is None:
            host.proc.kill()
        host.proc.wait()
        os.close(ended_r)
        os.close(ended_w)
    assert inside.returncode == 0, err
    return json.loads(out.splitlines()[-1])


@pytest.mark.debian13
@pytest.mark.parametrize(
    "backend,mode",
    # bpftrace's uprobes keep a host process of the name that maps the same files (docs/usage.md)
    [(b, m) for b in BACKENDS for m in ("pid", "nested", "comm") if (b, m) != ("bpftrace", "comm")],
)
def test_inside_a_pid_namespace_the_pids_are_the_namespace_s(backend, mode, build):
    """nested: the kernel's helper knows a task's own namespace only; comm: a host process of the
    name is outside the namespace: none of its blocks is reported."""
    exe = build("fork_tree")
    got = run_inside(exe, backend, mode)
    if backend == "bpftrace" and (mode == "nested" or not targets.detect("bpftrace").namespaced_pids):
        # its `pid` is the host's, or reads nothing in a nested namespace: refused, in one line
        assert got["rc"] != 0 and got["err"].startswith("probedsl: error: ") and "PID namespace" in got["err"], got
        return
    assert got["rc"] == 0, got["err"]
    report = report_json(got["out"])
    # --comm: the leaf's exec (of /proc/self/exe) renames it
    expected = {k: v for k, v in TREE.items() if mode != "comm" or k != "leaf_keep"}
    assert {k: v for k, v in by_keeper(report).items() if k in expected} == expected
    pids = pids_by_keeper(report)
    assert pids["parent_keep"] == got["tree"], pids
    # each child's pid is one the namespace handed out, after the tree's and before the last
    assert all(got["tree"] < p < got["last"] for k, p in pids.items() if k != "parent_keep"), (pids, got["last"])
    assert len(set(pids.values())) == len(pids) >= len(expected), pids
    everyone = {p for e in report["reports"][0]["entries"] for p in e["pids"]}
    assert all(got["tree"] <= p < got["last"] for p in everyone), everyone


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_the_host_a_process_in_a_pid_namespace_has_its_host_pid(backend, build):
    exe = build("fork_tree")
    # the tree is the namespace's pid 1 (sh execs it), unshare's child, whose host pid --pid takes
    inside = Held([*NAMESPACE, exe, "wait"])
    try:
        with open(f"/proc/{inside.pid}/task/{inside.pid}/children") as f:
            while not (children := f.read().split()):
                f.seek(0)
        tree = int(children[0])
        while os.path.realpath(f"/proc/{tree}/exe") != os.path.realpath(exe):  # unshare's exec of it
            pass
        with open(f"/proc/{tree}/status") as f:
            assert [ln.split()[1:] for ln in f if ln.startswith("NSpid:")] == [[str(tree), "1"]]
        tracer = start_run(MEMLEAK, "--backend", backend, "--format", "json", "--stacks", "fp", "--pid", str(tree))
        inside.go()
        out, err = tracer.communicate(timeout=300)
    finally:
        inside.end()
    assert tracer.returncode == 0, err
    report = report_json(out)
    assert by_keeper(report) == TREE
    pids = pids_by_keeper(report)
    assert pids["parent_keep"] == tree, pids
    assert len(set(pids.values())) == len(TREE), pids
