"""The unwinder's rows: encoded from the decoder's, kept on disk by build id."""

from __future__ import annotations

import os
import subprocess

import pytest

from probedsl.binaries import cfi
from probedsl.ir import stackformat
from probedsl.stacks import unwind_tables
from probedsl.trust import cachedir

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"


def build_id(path: str) -> str:
    out = subprocess.run(["readelf", "-n", path], capture_output=True, text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID:" in line)


def test_rows_are_cached_on_disk_by_build_id(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    decoded = unwind_tables.encode(cfi.table(LIBC))
    assert unwind_tables.rows_of(LIBC) == decoded
    cached = tmp_path / "probedsl" / "unwind-rows" / f"{build_id(LIBC)}.v3"
    assert cached.stat().st_size == 12 * len(decoded)
    # the second run reads the file, not .eh_frame: a file holding other rows of the right
    # shape (ending where code ends) is believed
    end = next(i for i, row in enumerate(decoded) if i >= 2 and row[1] == stackformat.INVALID) + 1
    cached.write_bytes(cached.read_bytes()[: 12 * end])
    assert unwind_tables.rows_of(LIBC) == decoded[:end]


def test_rows_read_ahead_are_taken_once_and_only_for_the_same_file(tmp_path, monkeypatch, build):
    """read_ahead finds the rows on its own thread (while the backend compiles); rows_of takes
    them, waiting if they are still being found, but not for a file replaced meanwhile."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    exe = str(tmp_path / "leak")
    subprocess.run(["cp", build("leak"), exe], check=True)
    decoded = {p: unwind_tables.encode(cfi.table(p)) for p in (LIBC, exe, "/bin/true")}
    found = []
    real = unwind_tables._rows_of
    monkeypatch.setattr(unwind_tables, "_rows_of", lambda path: found.append(path) or real(path))
    unwind_tables.read_ahead([exe, LIBC, exe, str(tmp_path / "absent")])
    assert unwind_tables.rows_of(LIBC) == decoded[LIBC]  # (found after exe's)
    subprocess.run(["cp", "/bin/true", exe + ".new"], check=True)
    os.replace(exe + ".new", exe)
    assert unwind_tables.rows_of(exe) == decoded["/bin/true"]  # replaced: found again
    assert unwind_tables.rows_of(LIBC) == decoded[LIBC]
    assert found.count(LIBC) == 2 and found.count(exe) == 2, found  # ahead once, then asked again
    assert unwind_tables._ahead == {}


def test_a_file_without_build_id_is_decoded_every_time(tmp_path, monkeypatch, build):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    exe = str(tmp_path / "no-id")
    subprocess.run(["cp", build("leak"), exe], check=True)
    subprocess.run(["objcopy", "--remove-section=.note.gnu.build-id", exe], check=True)
    assert unwind_tables.rows_of(exe) == unwind_tables.encode(cfi.table(exe))
    assert not os.path.exists(tmp_path / "probedsl")


def test_a_cfa_offset_the_kernel_row_cannot_hold_is_no_unwind_information():
    """A damaged file's call-frame program can give any offset (a ULEB): one outside the kernel
    row's s32 makes the row INVALID (the walk ends there, said), and the rows still pack."""
    rows = [
        cfi.Row(0x1000, cfi.RSP, 16, None, ("offset", -8)),
        cfi.Row(0x1010, cfi.RSP, 1 << 31, None, ("offset", -8)),
        cfi.Row(0x1020, cfi.RBP, -(1 << 31) - 8, ("offset", -16), ("offset", -8)),
    ]
    rules = [unwind_tables._rule(r) for r in rows]
    assert rules[0] == (stackformat.CFA_RSP, 16, stackformat.RBP_SAME, 0)
    assert [r[0] for r in rules[1:]] == [stackformat.INVALID, stackformat.INVALID]
    for kind, cfa_off, rbp_kind, rbp_off in rules:
        unwind_tables._KERNEL_ROW.pack(0, kind, rbp_kind, rbp_off, cfa_off, 0)


def test_rows_not_read_ahead_are_found_when_asked(tmp_path, monkeypatch):
    """No thread to read them ahead (or one that ended early): rows_of finds them itself, never waits."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def refused(name, target):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(unwind_tables.threads, "start", refused)
    unwind_tables.read_ahead([LIBC])
    assert unwind_tables.rows_of(LIBC) == unwind_tables.encode(cfi.table(LIBC))
    assert unwind_tables._ahead == {}


def test_rows_the_install_decoded_are_read_when_the_users_cache_has_none(tmp_path, monkeypatch):
    """probedsl.run.prebuilt keeps libc's rows in the install's share/probedsl: a first run reads
    them there (no decoding, nothing written to its own cache), under the cache's trust checks."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "built"))
    decoded = unwind_tables.rows_of(LIBC)
    shipped = tmp_path / "shipped"
    (shipped / "unwind-rows").mkdir(parents=True, mode=0o755)
    name = f"{build_id(LIBC)}.v3"
    os.replace(tmp_path / "built" / "probedsl" / "unwind-rows" / name, shipped / "unwind-rows" / name)
    os.chmod(shipped / "unwind-rows" / name, 0o644)
    monkeypatch.setattr(cachedir, "shipped_root", lambda: str(shipped))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "first"))
    real_table = cfi.table
    monkeypatch.setattr(cfi, "table", lambda path: pytest.fail(f"{path} decoded"))
    assert unwind_tables.rows_of(LIBC) == decoded
    assert not (tmp_path / "first" / "probedsl" / "unwind-rows" / name).exists()
    os.chmod(shipped / "unwind-rows" / name, 0o666)  # another user could have written it
    decodes = []
    monkeypatch.setattr(cfi, "table", lambda path: decodes.append(path) or real_table(path))
    assert unwind_tables.rows_of(LIBC) == decoded  # decoded again, and kept in the user's cache
    assert decodes == [LIBC] and (tmp_path / "first" / "probedsl" / "unwind-rows" / name).exists()
