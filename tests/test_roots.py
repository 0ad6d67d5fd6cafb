"""Paths of other roots' files, without tracing (test_containers.py traces them)."""

from __future__ import annotations

import os
import sys

from probedsl.process import roots


def test_our_own_root_needs_no_prefix():
    assert roots.root_prefix(os.getpid()) == ""
    assert roots.root_prefix(2**22 + 12345) is None  # no such process


def test_a_command_run_through_chroot_is_recognized_with_its_options(tmp_path):
    root = str(tmp_path)
    assert roots.chroot_command(["/usr/sbin/chroot", root, "/bin/ls", "-l"]) == (root, ["/bin/ls", "-l"])
    assert roots.chroot_command(["chroot", "--userspec", "1:1", root, "ls"]) == (root, ["ls"])
    assert roots.chroot_command(["chroot", "--skip-chdir", root, "ls"]) == (root, ["ls"])
    assert roots.chroot_command(["ls", root]) == ("", ["ls", root])


def test_a_file_is_ours_only_when_the_kernel_said_so_or_nothing_said_otherwise():
    files = roots.RootedFiles()
    exe = os.path.realpath(sys.executable)
    st = os.stat(exe)
    identity = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    gone = 2**22 + 12345
    assert files.path(gone, exe, identity) == exe  # the mapped file is this one
    assert files.path(gone, exe, (0, 0, 1)) == ""  # another file: never named as ours
    assert files.path(gone, exe) == exe  # nothing said otherwise
    assert files.path(os.getpid(), exe) == exe
