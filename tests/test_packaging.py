"""The installed package carries its grammar, templates and recipes (no source tree needed)."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_works_outside_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("probedsl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("probedsl/grammar/recipe.lark", "probedsl/recipes/memleak.probe",
                   "probedsl/backends/templates/bpftrace.bt.j2", "probedsl/backends/templates/bcc.c.j2"):
        assert needed in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import probedsl, sys; print(probedsl.__file__); sys.argv = ['probedsl', 'compile', 'memleak']; " \
           "from probedsl.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(site))
    assert "uprobe:" in result.stdout and ":malloc" in result.stdout
