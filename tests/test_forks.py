"""Forked children: traced with their own blocks, or left out with --no-follow-forks."""

from __future__ import annotations


import pytest

from conftest import BACKENDS, MEMLEAK, by_site, probedsl, report_json

pytestmark = pytest.mark.usefixtures("root_required")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_forked_child_is_traced_with_its_own_blocks(backend, build):
    result = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--", build("forker"))
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    sites = by_site(report)
    assert sites.get("child_leak") == (120, 3) and sites.get("parent_leak") == (48, 2), sites
    pids = {e["pids"][0] for e in report["reports"][0]["entries"] if e["stack"]}
    assert len(pids) == 2  # parent and child apart


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_follow_forks_traces_only_the_command(backend, build):
    result = probedsl(
        "run", MEMLEAK, "--backend", backend, "--format", "json", "--no-follow-forks", "--", build("forker")
    )
    sites = by_site(report_json(result.stdout))
    assert "child_leak" not in sites and sites.get("parent_leak") == (48, 2), sites
