"""A stripped program's names and lines come from its debug information wherever users keep
it: by build id (in the traced process's own root too), .gnu_debuglink, MiniDebugInfo, a real
debuginfod server; and a name is never guessed when none holds the address."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from probedsl.binaries import debuginfo, elf

from conftest import MEMLEAK, probedsl, report_json
from test_containers import leak_root  # noqa: F401 (a fixture)
from test_symbols import symbol_extent
from test_tracing import assert_accounted, assert_seed_leak


def run(*argv):
    subprocess.run(argv, check=True, capture_output=True)


def build_id_of(path: str) -> str:
    with open(path, "rb") as f:
        return debuginfo.build_id(elf.ELFFile(f))


@pytest.fixture(scope="module")
def split(build, tmp_path_factory):
    """(stripped program, its debug file): leak.c built -g, split as distributions do."""
    out = tmp_path_factory.mktemp("split")
    full = build("leak")
    debug, stripped = str(out / "leak.debug"), str(out / "leak")
    run("objcopy", "--only-keep-debug", full, debug)
    run("strip", "-o", stripped, full)
    return stripped, debug


def wrapper1_vaddr(build) -> int:
    start, _ = symbol_extent(build("leak"), "wrapper1")
    return start + 4


def names(path: str, root: str = ""):
    elf._load.cache_clear()
    return elf.symbols(path, root)


def test_stripped_without_debug_information_names_nothing(split, build):
    stripped, _ = split
    syms = names(stripped)
    assert syms.debug_file == "" and syms.function_at(wrapper1_vaddr(build)) is None


def test_debug_file_by_build_id_in_the_process_root(split, build, tmp_path):
    stripped, debug = split
    ident = build_id_of(stripped)
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(stripped, root / "bin" / "leak")
    where = root / "usr/lib/debug/.build-id" / ident[:2] / f"{ident[2:]}.debug"
    where.parent.mkdir(parents=True)
    shutil.copy2(debug, where)
    syms = names(str(root / "bin" / "leak"), str(root))
    assert syms.debug_file == str(where)
    assert syms.function_at(wrapper1_vaddr(build)) == ("wrapper1", 4)
    assert names(str(root / "bin" / "leak")).function_at(wrapper1_vaddr(build)) is None, "ours has no such file"


def test_debug_file_through_gnu_debuglink_with_its_crc(split, build, tmp_path):
    stripped, debug = split
    linked = tmp_path / "leak"
    shutil.copy2(debug, tmp_path / "leak.dbg")
    run("objcopy", f"--add-gnu-debuglink={tmp_path / 'leak.dbg'}", stripped, str(linked))
    assert names(str(linked)).function_at(wrapper1_vaddr(build)) == ("wrapper1", 4)
    # another file under the linked name (its CRC differs) is not the debug file
    shutil.copy2(stripped, tmp_path / "leak.dbg")
    assert names(str(linked)).debug_file == ""


def test_minidebuginfo_names_static_functions(split, build, tmp_path):
    """Fedora's recipe: the function symbols .dynsym lacks, in an xz'd ELF in .gnu_debugdata."""
    stripped, debug = split
    mini = tmp_path / "mini"
    run(
        "objcopy",
        "-S",
        "--remove-section",
        ".gdb_index",
        "--remove-section",
        ".comment",
        "--keep-symbol=wrapper1",
        "--keep-symbol=wrapper2",
        "--keep-symbol=main",
        debug,
        str(mini),
    )
    run("xz", "-k", str(mini))
    shipped = tmp_path / "leak"
    run("objcopy", f"--add-section=.gnu_debugdata={mini}.xz", stripped, str(shipped))
    syms = names(str(shipped))
    assert syms.debug_file == ""
    assert syms.function_at(wrapper1_vaddr(build)) == ("wrapper1", 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def debuginfod_server(split, tmp_path):
    """A real debuginfod (Debian's) on loopback, serving a directory with the debug file."""
    exe = shutil.which("debuginfod")
    assert exe, "debuginfod is not installed: scripts/setup.sh installs it"
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy2(split[1], served / "leak.debug")
    port = free_port()
    server = subprocess.Popen(
        [exe, "-p", str(port), "-F", str(served), "-d", str(tmp_path / "index.sqlite")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    ident = build_id_of(split[0])
    try:
        deadline = time.monotonic() + 60
        while True:  # until it has indexed the directory
            try:
                urllib.request.urlopen(f"{url}/buildid/{ident}/debuginfo", timeout=5).close()
                break
            except (urllib.error.URLError, OSError):
                assert server.poll() is None and time.monotonic() < deadline, "debuginfod did not serve the file"
                time.sleep(0.2)
        yield url, server
    finally:
        server.kill()
        server.wait()


@pytest.mark.usefixtures("root_required")
def test_names_and_lines_from_debuginfod_then_its_cache(split, debuginfod_server, tmp_path):
    url, server = debuginfod_server
    env = {**os.environ, "DEBUGINFOD_URLS": url, "DEBUGINFOD_CACHE_PATH": str(tmp_path / "cache")}
    for attempt in ("served", "cached"):
        result = probedsl("run", MEMLEAK, "--format", "json", "--top", "50", "--", split[0], input="\n", env=env)
        assert result.returncode == 0, result.stderr
        report = report_json(result.stdout)
        assert_seed_leak(report)
        assert_accounted(report)
        stack = next(e for e in report["reports"][0]["entries"] if e["bytes"] == 40)["stack"]
        assert (stack[0]["file"] or "").endswith("leak.c") and stack[0]["line"] == 7, (attempt, stack[0])
        server.kill()  # the second run reads the cache
        server.wait()
    assert os.path.isfile(tmp_path / "cache" / build_id_of(split[0]) / "debuginfo")


@pytest.mark.usefixtures("root_required")
def test_a_chrooted_stripped_program_is_named_from_its_roots_debug_file(leak_root, tmp_path):  # noqa: F811
    """The case seen in a Debian 13 chroot: the debug file sits in the chroot's /usr/lib/debug."""
    root = tmp_path / "root"
    shutil.copytree(leak_root, root, symlinks=True)
    exe = root / "leak_delayed"
    debug = tmp_path / "leak_delayed.debug"
    run("objcopy", "--only-keep-debug", str(exe), str(debug))
    run("strip", str(exe))
    ident = build_id_of(str(exe))
    where = root / "usr/lib/debug/.build-id" / ident[:2] / f"{ident[2:]}.debug"
    where.parent.mkdir(parents=True)
    shutil.copy2(debug, where)
    result = probedsl(
        "run", MEMLEAK, "--format", "json", "--top", "50", "--", "chroot", str(root), "/leak_delayed", "0", "0"
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    assert_seed_leak(report)
    stack = next(e for e in report["reports"][0]["entries"] if e["bytes"] == 40)["stack"]
    assert stack[0]["line"] == 9 and stack[0]["file"].endswith("leak_delayed.c"), stack[0]


def nm_extents(module: str) -> dict:
    """{name: [(start, size)]} from binutils' nm over the module and its build-id debug file."""
    files = [module]
    ident = build_id_of(module)
    debug = f"/usr/lib/debug/.build-id/{ident[:2]}/{ident[2:]}.debug" if ident else ""
    if debug and os.path.isfile(debug):
        files.append(debug)
    out = {}
    for path in files:
        for flags in (["-S"], ["-D", "-S"]):
            listed = subprocess.run(["nm", *flags, path], capture_output=True, text=True).stdout
            for line in listed.splitlines():
                fields = line.split()
                if len(fields) == 4:
                    out.setdefault(fields[3].split("@")[0], []).append((int(fields[0], 16), int(fields[1], 16)))
    return out


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", ["bcc", "bpftrace"])
def test_debians_stripped_git_gets_no_guessed_names(backend, tmp_path):
    """Debian's git is stripped: addr2line once named its frames after the nearest exported
    symbol (`error+0 [git]`). Every name shown must be a symbol whose extent holds the call."""
    run("git", "init", "-q", str(tmp_path))
    run(
        "git",
        "-C",
        str(tmp_path),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        "x",
    )
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--format",
        "json",
        "--top",
        "1000",
        "--",
        "git",
        "-C",
        str(tmp_path),
        "log",
        "--oneline",
        "-1",
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    extents, named, unnamed = {}, 0, 0
    for entry in report["reports"][0]["entries"]:
        for depth, f in enumerate(entry["stack"]):
            if not f["module"] or f["inlined"] or f["vaddr"] is None:
                continue
            if f["function"] is None:
                assert f["text"] == f"{os.path.basename(f['module'])}+{f['vaddr']}", f
                unnamed += 1
                continue
            path = f["module"]
            if not os.path.exists(path):  # a launched command's private copy of a system library
                path = os.path.join("/lib/x86_64-linux-gnu", os.path.basename(path))
            module = extents.setdefault(path, nm_extents(path))
            call = int(f["vaddr"], 16) - (1 if depth else 0)
            assert any(s <= call < s + max(n, 1) for s, n in module.get(f["function"], [])), f
            named += 1
    assert named and unnamed, (named, unnamed)
