"""A launched command is probed through private copies of its libraries (bystanders pay no
uprobe trap); without them the bystanders' cost is announced."""

from __future__ import annotations

import os

import pytest

from conftest import BACKENDS, MEMLEAK, by_site, probedsl, report_json

pytestmark = pytest.mark.usefixtures("root_required")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_launched_command_is_probed_through_private_library_copies(backend, build):
    """Where uprobes cannot be scoped to the command's processes (bpftrace 0.17); BCC scopes
    them, following forks by holding each child (tests/test_fork_following.py)."""
    from probedsl import ir, targets

    scoped = targets.detect(backend).scopes_uprobes(ir.Scope("cmd", pid=1))
    result = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--", build("leak"), input="\n")
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    modules = {f["module"] for e in report["reports"][0]["entries"] for f in e["stack"]}
    copies = [m for m in modules if "/probedsl-libs-" in (m or "")]
    if scoped:
        assert not copies, modules
    else:
        assert copies and all(m.endswith("/libc.so.6") for m in copies), modules
        assert not os.path.exists(os.path.dirname(copies[0]))  # removed after the run
    assert "pays a uprobe trap" not in result.stderr
    assert by_site(report).get("wrapper1") == (40, 5)


def test_without_private_copies_the_bystander_cost_is_announced(build):
    result = probedsl("run", MEMLEAK, "--no-private-libs", "--", build("leak"), input="\n")
    assert result.returncode == 0
    assert "every process using libc.so.6 pays a uprobe trap" in result.stderr
