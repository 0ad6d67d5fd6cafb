"""The installed package carries its grammar, templates and recipes (no source tree needed)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, by_site, report_json


def test_wheel_works_outside_the_source_tree(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("probedsl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License: Apache-2.0" in metadata and "Classifier: License :: OSI Approved" in metadata
    assert "# probedsl" in metadata  # the README is the long description
    assert any(n.endswith("LICENSE") for n in names)
    for needed in (
        "probedsl/grammar/recipe.lark",
        "probedsl/recipes/memleak.probe",
        "probedsl/recipes/allocators/jemalloc.probe",
        "probedsl/backends/templates/bpftrace.bt.j2",
        "probedsl/backends/templates/bcc.c.j2",
    ):
        assert needed in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import probedsl, sys; print(probedsl.__file__); sys.argv = ['probedsl', 'compile', 'memleak']; "
        "from probedsl.cli import main; main()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(site))
    assert "uprobe:" in result.stdout and ":malloc" in result.stdout


@pytest.mark.usefixtures("root_required")
def test_doctor_lists_what_is_here_and_exits_1_when_no_backend_can_run():
    result = subprocess.run([sys.executable, "-m", "probedsl", "doctor"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(l.startswith("ok   bpftrace     0.") and "dialect" in l for l in lines), result.stdout
    assert any(l.startswith("ok   bcc          0.") for l in lines) and "can run: bpftrace, bcc" in result.stdout
    # kprobes do not work on these machines; nothing needs them, so it is a warning, not a miss
    assert any(l.startswith(("warn kprobes", "ok   kprobes")) for l in lines)
    # the same as an unprivileged user: no rights, no backend, exit 1, the fix named
    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "probedsl", "doctor"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
    )
    assert nobody.returncode == 1, nobody.stdout + nobody.stderr
    assert "MISS rights" in nobody.stdout and "fix: run as root" in nobody.stdout
    assert "no backend can run here" in nobody.stdout and "Traceback" not in nobody.stderr


def test_show_prints_a_bundled_recipe_and_dash_reads_one_from_standard_input():
    shown = subprocess.run([sys.executable, "-m", "probedsl", "show", "memleak"], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout == (ROOT / "recipes" / "memleak.probe").read_text()
    checked = subprocess.run(
        [sys.executable, "-m", "probedsl", "check", "-"], input=shown.stdout, capture_output=True, text=True
    )
    assert checked.returncode == 0 and checked.stdout.startswith("-: ok (1 resource(s)"), checked.stderr
    compiled = subprocess.run(
        [sys.executable, "-m", "probedsl", "compile", "-", "--target", "bpftrace"],
        input=shown.stdout,
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0 and ":malloc" in compiled.stdout
    broken = subprocess.run(
        [sys.executable, "-m", "probedsl", "check", "-"],
        input=shown.stdout.replace("keyed by (pid, address)", "keyed by (pid address)"),
        capture_output=True,
        text=True,
    )
    assert broken.returncode == 1 and broken.stderr.startswith("<stdin>:8:"), broken.stderr
    version = subprocess.run([sys.executable, "-m", "probedsl", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("probedsl, version 0.")


def test_pipx_install_gives_a_working_tool(tmp_path, build, root_required):
    """docs/usage.md's install: pipx with the system's site-packages (where Debian's python3-bpfcc
    puts bcc), then a real trace of the seed leak with each backend from the installed command."""
    env = {
        **os.environ,
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
        "PIPX_DEFAULT_PYTHON": "/usr/bin/python3",
    }
    installed = subprocess.run(
        ["pipx", "install", "--system-site-packages", str(ROOT)], env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    tool = str(tmp_path / "bin" / "probedsl")
    assert subprocess.run([tool, "--version"], capture_output=True, text=True).stdout == "probedsl, version 0.1.0\n"
    for backend in ("bcc", "bpftrace"):
        result = subprocess.run(
            [tool, "run", "memleak", "--backend", backend, "--format", "json", "--", build("leak")],
            input="\n",
            capture_output=True,
            text=True,
            cwd="/",
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert by_site(report_json(result.stdout)).get("wrapper1") == (40, 5), backend


def test_shell_completion_offers_bundled_recipes_and_files(tmp_path):
    """docs/usage.md's bash completion line, sourced in a real bash: RECIPE completes to bundled
    names; the file item comes first, so bash falls back to file names where none matches."""
    exe = os.path.dirname(sys.executable)
    script = (
        'eval "$(_PROBEDSL_COMPLETE=bash_source probedsl)"; COMP_WORDS=(probedsl run mem); COMP_CWORD=2; '
        '_probedsl_completion probedsl 2>/dev/null; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{exe}:{os.environ['PATH']}"},
    )
    assert result.stdout.split() == ["memleak"], result.stderr
    raw = subprocess.run(
        [os.path.join(exe, "probedsl")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "COMP_WORDS": "probedsl show ./rec",
            "COMP_CWORD": "2",
            "_PROBEDSL_COMPLETE": "bash_complete",
        },
    )
    assert raw.stdout.splitlines() == ["file,./rec"]


def test_doctor_reads_the_lockdown_mode(tmp_path, monkeypatch):
    """This kernel has no lockdown LSM; a Secure Boot kernel's file marks the mode in force."""
    from probedsl.run import doctor

    state = tmp_path / "lockdown"
    state.write_text("none integrity [confidentiality]\n")
    monkeypatch.setattr(doctor, "LOCKDOWN", str(state))
    check = next(c for c in doctor.checks() if c.name == "lockdown")
    assert (check.ok, check.found) == (False, "confidentiality") and "lockdown=integrity" in check.line()
    state.write_text("[none] integrity confidentiality\n")
    assert next(c for c in doctor.checks() if c.name == "lockdown").ok
