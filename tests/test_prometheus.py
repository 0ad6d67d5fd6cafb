"""What a fleet gathers: --prometheus scraped by a real Prometheus server (Debian's), and the
gauges' names, labels and stable stack ids."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from probedsl import compiler
from probedsl.report import assemble
from probedsl.outputs import prometheus

from conftest import MEMLEAK, ROOT, probedsl, start_run
from test_reports import FixedSymbolizer, fixed_snapshot


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fixed(extra=0):
    program = compiler.build(compiler.load(MEMLEAK))
    return assemble.build(
        program,
        fixed_snapshot(extra_blocks=extra),
        FixedSymbolizer(),
        backend="bcc",
        target='command "./leak" (pid 42)',
        duration_s=2,
        top=3,
        complete=True,
    )


def test_gauges_name_totals_losses_and_top_stacks_with_stable_ids():
    text = prometheus.metrics(_fixed())
    assert "# TYPE probedsl_live_bytes gauge" in text
    assert 'probedsl_live_bytes{recipe="memleak",target="command \\"./leak\\" (pid 42)",resource="heap"} 4139' in text
    assert "# TYPE probedsl_acquired_total counter" in text and "probedsl_untracked{" in text
    stacks = [l for l in text.splitlines() if l.startswith("probedsl_stack_bytes{")]
    assert len(stacks) == 3  # the report's top entries only
    wrapped = next(l for l in stacks if 'stack="wrapper1;wrapper2;main"' in l)  # inlined calls left out
    assert wrapped.endswith(" 40")
    # the id is the symbolic stack's: the same in another run where addresses and counts differ
    ident = wrapped.split('stack_id="')[1].split('"')[0]
    again = next(
        l
        for l in prometheus.metrics(_fixed(extra=2)).splitlines()
        if l.startswith("probedsl_stack_bytes{") and "wrapper1" in l
    )
    assert f'stack_id="{ident}"' in again and again.endswith(" 56")


def test_a_bad_address_is_one_line():
    result = probedsl("run", MEMLEAK, "--prometheus", "localhost", "--", "true")
    assert result.returncode == 1 and "--prometheus 'localhost': write ADDRESS:PORT" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("root_required")
def test_a_prometheus_server_scrapes_a_live_trace(build, tmp_path):
    exe = shutil.which("prometheus")
    assert exe, "the --prometheus test scrapes with Debian's prometheus: install it (scripts/setup.sh does)"
    ours, theirs = _free_port(), _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: probedsl\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{ours}']\n"
    )
    tracer = start_run(
        MEMLEAK,
        "--prometheus",
        f"127.0.0.1:{ours}",
        "--interval",
        "1",
        "--format",
        "json",
        "--",
        build("leak"),
        stdin=subprocess.PIPE,
    )  # leak waits for a line
    server = subprocess.Popen(
        [
            exe,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{theirs}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = 'probedsl_stack_bytes{stack=~"wrapper1;.*"}'
        url = f"http://127.0.0.1:{theirs}/api/v1/query?" + urllib.parse.urlencode({"query": query})
        deadline, result = time.monotonic() + 90, []
        while not result and time.monotonic() < deadline:  # until a scrape holds the leak
            assert server.poll() is None, "prometheus ended"
            try:
                doc = json.load(urllib.request.urlopen(url, timeout=5))
                result = doc["data"]["result"]
            except OSError:
                pass
            if not result:
                time.sleep(0.2)
        assert result, f"Prometheus never saw {query}"
        (series,) = result
        assert series["value"][1] == "40"  # wrapper1's five 8-byte blocks
        assert series["metric"]["job"] == "probedsl" and len(series["metric"]["stack_id"]) == 16
        up = json.load(
            urllib.request.urlopen(
                f"http://127.0.0.1:{theirs}/api/v1/query?query=probedsl_live%7Bresource%3D%22heap%22%7D"
            )
        )
        assert int(up["data"]["result"][0]["value"][1]) >= 6
    finally:
        server.terminate()
        server.wait()
        out, err = tracer.communicate("\n", timeout=120)  # leak ends: a final report
    assert tracer.returncode == 0, err


def test_the_shipped_systemd_unit_and_alerting_rules_are_valid(tmp_path):
    rules = ROOT / "contrib" / "prometheus" / "probedsl-alerts.yml"
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0 and "SUCCESS: 3 rules found" in result.stdout, result.stdout + result.stderr
    unit = (ROOT / "contrib" / "systemd" / "probedsl@.service").read_text()
    # verified with the installed probedsl in the place the unit names
    local = tmp_path / "probedsl@.service"
    local.write_text(
        unit.replace("/usr/local/bin/probedsl", shutil.which("probedsl") or str(ROOT / ".venv" / "bin" / "probedsl"))
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"{local}"],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
