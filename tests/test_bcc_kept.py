"""BCC's compiled programs kept between runs (probedsl.drivers.bcc_kept): a second run of the
same text compiles the tables alone and loads the kept programs, and traces what the first
traced; a kept file that is not trusted, damaged, or made for other tables is compiled again.
The install's compiles (probedsl.run.prebuilt) serve a first run the same way."""

from __future__ import annotations

import base64
import json
import os
import struct
import sys

import pytest

from probedsl.drivers import bcc_kept
from probedsl.run import prebuilt
from probedsl.trust import cachedir

from conftest import MEMLEAK, by_site, probedsl, report_json


def insn(code: int, src: int, imm: int) -> bytes:
    return struct.pack("<BBhi", code, src << 4 | 1, 0, imm)


def test_only_the_table_descriptors_are_moved():
    """An ld_imm64 naming a table (src 1) takes the new descriptor; a constant ld_imm64, its
    second half and any other instruction keep their immediates."""
    program = (
        insn(0x18, bcc_kept.PSEUDO_MAP_FD, 5)
        + insn(0, 0, 0)  # r1 = the table behind fd 5
        + insn(0x18, 0, 5)
        + insn(0, 0, 0)  # r1 = 5, a constant
        + insn(0xB7, 0, 5)  # r1 = 5 (mov)
        + insn(0x95, 0, 0)  # exit
    )
    moved = bcc_kept.retarget(program, {5: 9})
    imms = [struct.unpack_from("<i", moved, i + 4)[0] for i in range(0, len(moved), 8)]
    assert imms == [9, 0, 5, 0, 5, 0]
    with pytest.raises(bcc_kept.Unusable):
        bcc_kept.retarget(program, {6: 9})  # fd 5 is no kept table's
    with pytest.raises(bcc_kept.Unusable):
        bcc_kept.retarget(program[:-3], {5: 9})


def test_a_kind_keeps_at_most_its_bound_the_oldest_going_first(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    kept = cachedir.Kept("bcc-programs")
    for i in range(4):
        assert kept.keep(f"{i}.json", b"x", most=3)
        os.utime(tmp_path / "probedsl" / "bcc-programs" / f"{i}.json", ns=(i * 10**9, i * 10**9))
    assert kept.keep("4.json", b"x", most=3)  # now: the newest
    assert sorted(p.name for p in (tmp_path / "probedsl" / "bcc-programs").iterdir()) == ["2.json", "3.json", "4.json"]
    assert kept.load("4.json") == b"x" and kept.load("0.json") is None


def memleak(cache, leak, *options, install: bool = False) -> dict:
    """install: also use the compiles the install built (scripts/setup.sh); else the user's cache alone."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PROBEDSL_INSTALL_CACHE": "1" if install else "0"}
    argv = ["run", MEMLEAK, "--backend", "bcc", "--stacks", "dwarf", "--format", "json", *options, "--", leak]
    result = probedsl(*argv, input="\n", env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr  # (clang's, of a tables-only compile too)
    return report_json(result.stdout)


def traced(report: dict):
    return report["resources"], by_site(report)


def kept_files(cache):
    return list((cache / "probedsl" / "bcc-programs").glob("*.json"))


@pytest.mark.debian13
@pytest.mark.usefixtures("root_required")
def test_a_kept_compile_is_reused_and_traces_the_same(build, tmp_path):
    cache, leak = tmp_path / "cache", build("leak")
    first = memleak(cache, leak)
    (kept,) = kept_files(cache)
    assert kept.stat().st_mode & 0o777 == 0o600
    before = kept.stat().st_ino
    second = memleak(cache, leak)
    assert kept.stat().st_ino == before  # loaded, not compiled and kept again
    assert traced(second) == traced(first)
    assert by_site(first).get("wrapper1") == (40, 5)  # the seed's leak: 5 blocks of 8 bytes
    # a text with this run's pid in its code (forks not followed) is compiled each time, never kept
    memleak(cache, leak, "--no-follow-forks")
    assert kept_files(cache) == [kept]


def forged(kept, change) -> None:
    saved = json.loads(kept.read_bytes())
    change(saved)
    kept.write_text(json.dumps(saved))


def shape_changed(saved: dict) -> None:
    """Another table's size, the digest made again: the file is whole, made for other tables."""
    table = next(iter(saved["tables"].values()))
    table["shape"][3] += 1
    saved["sha256"] = bcc_kept._digest({"tables": saved["tables"], "programs": saved["programs"]})


def program_changed(saved: dict) -> None:
    """One program's first instruction replaced by an exit, the digest left: damage."""
    name = next(iter(saved["programs"]))
    code = base64.b64decode(saved["programs"][name])
    saved["programs"][name] = base64.b64encode(struct.pack("<BBhi", 0x95, 0, 0, 0) + code[8:]).decode()


def refused(saved: dict) -> None:
    """The malloc entry program made one the verifier refuses (r0 read before it is set), the
    digest made again: a whole file, a program this kernel does not load."""
    name = next(n for n in saved["programs"] if "malloc" in n and n.endswith("_entry"))
    saved["programs"][name] = base64.b64encode(struct.pack("<BBhi", 0x95, 0, 0, 0)).decode()
    saved["sha256"] = bcc_kept._digest({"tables": saved["tables"], "programs": saved["programs"]})


@pytest.mark.usefixtures("root_required")
def test_a_kept_program_the_kernel_refuses_is_forgotten(build, tmp_path):
    """The run that meets it fails with a one-line error that says so; the next compiles afresh."""
    cache, leak = tmp_path / "cache", build("leak")
    first = memleak(cache, leak)
    (kept,) = kept_files(cache)
    forged(kept, refused)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "PROBEDSL_INSTALL_CACHE": "0"}
    result = probedsl("run", MEMLEAK, "--backend", "bcc", "--stacks", "dwarf", "--", leak, input="\n", env=env)
    assert result.returncode == 1, result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("probedsl: error: ") and "compiles the program afresh" in error, result.stderr
    assert "Traceback" not in result.stderr
    assert [p.stat().st_size for p in kept_files(cache)] == [0]  # set aside: an empty file in its place
    assert traced(memleak(cache, leak)) == traced(first)
    assert len(kept_files(cache)) == 1 and kept_files(cache)[0].stat().st_size > 0


def test_a_forgotten_file_the_install_built_is_set_aside_for_the_user(tmp_path, monkeypatch):
    """forget() on a file read from the install (which the run cannot change) leaves an empty
    file of that name in the user's cache: the next load finds that one first, reads it as
    damaged, and builds afresh (bcc_kept: Unusable), then keeps the new one over it."""
    shipped = tmp_path / "shipped" / "bcc-programs"
    shipped.mkdir(parents=True, mode=0o755)
    (shipped / "x.json").write_bytes(b"{}")
    os.chmod(shipped / "x.json", 0o644)
    monkeypatch.setattr(cachedir, "shipped_root", lambda: str(tmp_path / "shipped"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kept = cachedir.Kept("bcc-programs")
    assert kept.load("x.json") == b"{}"
    kept.forget("x.json")
    assert kept.load("x.json") == b"" and (shipped / "x.json").read_bytes() == b"{}"
    kept.keep("x.json", b"new")
    assert kept.load("x.json") == b"new"


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("why", ["writable by others", "damaged", "other tables"])
def test_a_kept_compile_not_trusted_or_not_fitting_is_compiled_again(build, tmp_path, why):
    """Each such file is left: the run compiles afresh (and keeps that compile in its place)
    and traces what a first run traces."""
    cache, leak = tmp_path / "cache", build("leak")
    first = memleak(cache, leak)
    (kept,) = kept_files(cache)
    if why == "writable by others":
        os.chmod(kept, 0o666)
    else:
        forged(kept, program_changed if why == "damaged" else shape_changed)
    before = kept.stat().st_ino
    again = memleak(cache, leak)
    assert kept.stat().st_ino != before  # compiled afresh and kept anew
    assert kept.stat().st_mode & 0o777 == 0o600
    assert traced(again) == traced(first)
    said = [n for n in again["notes"] if "bcc-programs" in n]
    if why == "writable by others":  # a refusal is said (someone may have tried)
        assert len(said) == 1 and "writable by others" in said[0], again["notes"]
    else:
        assert not said, again["notes"]


@pytest.mark.usefixtures("root_required")
def test_the_install_builds_the_compiles_a_first_run_uses(build, tmp_path, monkeypatch):
    """prebuilt.build keeps, in what the install built, the compile each of its runs made: the
    one a first run of memleak on a command makes too. A first run with the install's (the
    checkout's own, scripts/setup.sh) keeps none of its own and traces what a compile traces."""
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(cachedir, "shipped_root", lambda: str(shipped))
    said = prebuilt.build()
    built = {p.name for p in (shipped / "bcc-programs").glob("*.json")}
    rows = list((shipped / "unwind-rows").glob("*.v3"))  # the command's and its libraries' (dwarf)
    assert len(built) >= 2 and f"({len(built)} texts, {len(rows)} files' rows)" in said  # dwarf and fp
    assert len(rows) >= 2  # the command's, libc's, ld.so's...
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in [*(shipped / "bcc-programs").iterdir(), *rows])
    assert "already built" in prebuilt.build()  # built from the same code, kernel, BCC...: not again
    leak = build("leak")
    compiled = memleak(tmp_path / "own", leak)
    (fresh,) = kept_files(tmp_path / "own")
    assert fresh.name in built  # a first run's text, flags and compiler: a name the install kept
    installed = os.path.join(os.path.realpath(sys.prefix), "share", "probedsl", "bcc-programs", fresh.name)
    assert os.path.isfile(installed), "scripts/setup.sh builds the install's compiles (probedsl.run.prebuilt)"
    first = memleak(tmp_path / "first", leak, install=True)
    assert kept_files(tmp_path / "first") == []  # the install's compile was loaded, none made
    assert traced(first) == traced(compiled)
    assert by_site(first).get("wrapper1") == (40, 5)
