"""What a run needs: compile and check need no privileges, run without them says what it
needs, and the capabilities the docs name are enough without root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("root_required")


def test_compile_and_check_run_without_privileges(tmp_path):
    unprivileged = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    for recipe in ("memleak", "kmemleak"):
        for argv in (["check", recipe], ["compile", recipe, "--target", "bcc"]):
            result = subprocess.run(
                unprivileged + [sys.executable, "-m", "probedsl", *argv],
                cwd="/",
                capture_output=True,
                text=True,
                env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
            )
            assert result.returncode == 0, (argv, result.stderr)


def test_run_without_privileges_says_what_it_needs():
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--comm",
            "x",
        ],
        cwd="/",
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1
    assert "needs root" in result.stderr and "Traceback" not in result.stderr


def test_run_with_the_capabilities_instead_of_root_traces(build):
    """CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN, as the docs say, are enough: no root needed."""
    home = tempfile.mkdtemp(prefix="probedsl-caps-", dir="/tmp")  # pytest's own tmp is root's only
    os.chmod(home, 0o777)
    leak = os.path.join(home, "leak")
    shutil.copy(build("leak"), leak)
    os.chmod(leak, 0o755)
    caps = "+bpf,+perfmon,+sys_admin,+dac_read_search"
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            f"--inh-caps={caps}",
            f"--ambient-caps={caps}",
            sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            "bcc",
            "--format",
            "json",
            "--",
            str(leak),
        ],
        cwd="/",
        input="\n",
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": home},
    )
    # one capability short: refused in one line before anything is compiled
    short = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=+bpf,+perfmon,+sys_admin",
            "--ambient-caps=+bpf,+perfmon,+sys_admin",
            sys.executable,
            "-m",
            "probedsl",
            "run",
            "memleak",
            "--backend",
            "bcc",
            "--",
            str(leak),
        ],
        cwd="/",
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
    )
    shutil.rmtree(home)
    assert short.returncode == 1 and short.stderr.count("\n") == 1 and "CAP_DAC_READ_SEARCH" in short.stderr
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout[result.stdout.index("{") :])
    wrapper1 = [e for e in report["reports"][0]["entries"] if any(f["function"] == "wrapper1" for f in e["stack"])]
    assert sum(e["bytes"] for e in wrapper1) == 40, report["reports"][0]["entries"]
