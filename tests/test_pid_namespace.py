"""PID namespaces (a container, `kubectl debug`): --pid N, the report's pids and the /proc reads
behind its stacks name the same processes whether probedsl runs on the host or inside the
namespace (process/pidns.py). Inside, BCC asks the kernel for the namespace's pids; bpftrace
>= 0.24 gives them itself and older dialects are refused. fork_tree's five processes are
followed from their first call, so a child numbered in the wrong namespace loses its blocks."""

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

# run inside the namespace: the traced tree, probedsl --pid, and the last pid handed out there
INSIDE = """
import json, subprocess, sys
exe, backend = sys.argv[1], sys.argv[2]
tree = subprocess.Popen([exe, "wait"], stdin=subprocess.PIPE)
run = subprocess.Popen([sys.executable, "-m", "probedsl", "run", sys.argv[3], "--backend", backend,
                        "--format", "json", "--stacks", "fp", "--pid", str(tree.pid)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
said = ""
while not said.startswith(("probedsl: tracing ", "probedsl: error")) and said is not None:
    said = run.stderr.readline() or None
tree.stdin.write(b"go\\n")
tree.stdin.close()
out, err = run.communicate(timeout=300)
tree.wait()
last = subprocess.run(["/bin/sh", "-c", "echo $$"], capture_output=True, text=True).stdout
print(json.dumps({"tree": tree.pid, "last": int(last), "rc": run.returncode, "err": (said or "") + err, "out": out}))
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


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_inside_a_pid_namespace_the_pids_are_the_namespace_s(backend, build):
    exe = build("fork_tree")
    ran = subprocess.run(
        [*NAMESPACE, sys.executable, "-c", INSIDE, exe, backend, MEMLEAK],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert ran.returncode == 0, ran.stderr
    got = json.loads(ran.stdout.splitlines()[-1])
    if backend == "bpftrace" and not targets.detect("bpftrace").namespaced_pids:
        # its `pid` is the host's: refused, in one line
        assert got["rc"] != 0 and got["err"].startswith("probedsl: error: ") and "PID namespace" in got["err"], got
        return
    assert got["rc"] == 0, got["err"]
    report = report_json(got["out"])
    assert by_keeper(report) == TREE
    pids = pids_by_keeper(report)
    assert pids["parent_keep"] == got["tree"], pids
    # each child's pid is one the namespace handed out, after the tree's and before the last
    assert all(got["tree"] < p < got["last"] for k, p in pids.items() if k != "parent_keep"), (pids, got["last"])
    assert len(set(pids.values())) == len(TREE), pids


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
