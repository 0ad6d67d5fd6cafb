"""What tracing costs, said and bounded: sampling scales the report and says so, --estimate
counts calls before tracing, the scale harness (bench/scale.py) reports every block.
Speed targets are measured in bench/, not here; these assert behaviour with wide margins."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import BACKENDS, MEMLEAK, ROOT, by_site, probedsl, report_json


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_scales_the_estimate_and_says_so(backend, build):
    result = probedsl(
        "run", MEMLEAK, "--backend", backend, "--sample", "4", "--format", "json", "--", build("many_live"), "8000"
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert report["sample"] == 4
    blocks = by_site(report).get("hold", (0, 0))[1]
    # one in four of 8000 recorded, at random: 2000 +- 39 (one sd), scaled by 4
    assert 8000 * 0.8 < blocks < 8000 * 1.2 and blocks % 4 == 0, blocks
    assert report["resources"]["heap"]["acquired"] >= 8001  # every acquisition is counted
    assert any("sampled: 1 in 4" in n for n in report["notes"])


def test_estimate_counts_calls_before_tracing(mallocfree, root_required):
    target = subprocess.Popen([mallocfree, "1", "2000000000", "0"], stdout=subprocess.DEVNULL)
    try:
        result = probedsl("run", MEMLEAK, "--estimate", "--pid", str(target.pid), "--duration", "1")
    finally:
        target.kill()
        target.wait()
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stderr.splitlines() if "estimate: in" in l)
    assert "malloc" in line and "free" in line and "/s" in line
    costs = next(l for l in result.stderr.splitlines() if "tracing adds per call" in l)
    assert re.search(r"free \d+\.\d us", costs) and re.search(r"malloc \d+\.\d us", costs), costs
    assert "ms of CPU per second" in result.stderr


def test_estimate_with_a_command_says_when_it_was_let_go(root_required):
    result = probedsl("run", MEMLEAK, "--backend", "bcc", "--stacks", "fp", "--estimate", "--", "/bin/true")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stderr.splitlines() if "estimate: the command was let go" in l)
    total, *parts = [float(x) for x in re.findall(r"(\d+\.\d+) s", line)]
    assert len(parts) == 3 and all(p >= 0 for p in parts) and parts[1] > 0, line
    assert abs(total - sum(parts)) <= 0.02, line  # the parts are the whole, rounded
    assert "estimate: in" not in result.stderr  # no calls to count before it runs


def test_the_scale_harness_reports_every_block(root_required):
    result = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--blocks", "20000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = [l for l in result.stdout.splitlines() if l.startswith("| bpftrace") or l.startswith("| bcc")]
    assert len(rows) == 2, result.stdout
