"""Root trusts only itself: names from the traced program reach root's terminal escaped, a cache
another user owns is ignored, a debug file that is not the one asked for is refused, and a
download is kept whole or not at all. The `security` layer: pytest -m security."""

from __future__ import annotations

import http.server
import json
import os
import pwd
import signal
import re
import shutil
import struct
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from probedsl.binaries import debuginfo, elf
from probedsl.trust import escape
from probedsl import notices
from probedsl.ir import stackformat
from probedsl.stacks import unwind_tables
from probedsl.binaries.sourcelines import SourceLines

from conftest import BACKENDS, start_run, MEMLEAK, probedsl, report_json

pytestmark = pytest.mark.security

# ends with the four characters \x1b: shown, it must not read like the ESC before it
EVIL = "evil\033[31mRED\033]0;pwned\007" + r"\x1b"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # any but \t and \n

LEAK_ONE = """#include <stdio.h>
#include <stdlib.h>
void *leak_one(void) { return malloc(40); }
int main(void) { volatile void *p = leak_one(); getchar(); return p == 0; }
"""


def gcc(source: Path, exe: Path, *flags: str) -> str:
    subprocess.run(["gcc", "-O0", "-g", *flags, "-o", str(exe), str(source)], check=True, cwd=source.parent)
    return str(exe)


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """(program, its source file): both named with terminal escapes, leaking one 40-byte block."""
    out = tmp_path_factory.mktemp("evil")
    source = out / f"{EVIL}.c"
    source.write_text(LEAK_ONE)
    (out / "bin").mkdir()
    return gcc(source, out / "bin" / EVIL), str(source)


def assert_no_raw_control(*texts: str) -> None:
    for text in texts:
        found = RAW_CONTROL.search(text)
        assert found is None, f"raw {found.group()!r} in {text[max(0, found.start() - 80) : found.end() + 80]!r}"


def test_escape_rules():
    assert escape.for_terminal(EVIL) == r"evil\x1b[31mRED\x1b]0;pwned\x07\\x1b"
    # a backslash is shown doubled everywhere a name is escaped: ESC and the text `\x1b` differ
    assert escape.for_terminal("\x1b") != escape.for_terminal(r"\x1b") == r"\\x1b"
    assert escape.for_folded(r"a\;b") == r"a\\:b" and escape.for_xml(r"<\n>") == r"&lt;\\n&gt;"
    assert escape.message("a\\b\nc\x1b") == "a\\\\b\nc\\x1b"
    assert escape.for_terminal("a\nb\udcff\u202e") == "a\\nb\\xff\\u202e"
    long = escape.for_terminal("x" * 10000)
    assert long.endswith(escape.MARK) and len(long) == escape.MAX_NAME + len(escape.MARK)
    assert escape.for_folded("a;b\nc") == "a:b\\nc"
    assert escape.for_xml("<a\x1b>") == "&lt;a\\x1b&gt;"
    assert escape.for_utf8("caf\u00e9\udcff") == "caf\u00e9\ufffd".encode()


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", ["bpftrace", "bcc"])
def test_escape_program_in_text_json_svg(backend, evil, tmp_path):
    exe, source = evil
    text = probedsl("run", MEMLEAK, "--backend", backend, "--", exe, input="\n")
    assert text.returncode == 0, text.stderr
    assert_no_raw_control(text.stdout, text.stderr)
    shown = escape.for_terminal(EVIL)
    assert f"{shown}.c:3" in text.stdout and f"[{shown}]" in text.stdout, text.stdout

    saved = probedsl("run", MEMLEAK, "--backend", backend, "--format", "json", "--", exe, input="\n")
    assert saved.returncode == 0, saved.stderr
    frames = [
        f
        for rep in report_json(saved.stdout)["reports"]
        if rep["kind"] == "outstanding"
        for e in rep["entries"]
        if e["bytes"] == 40
        for f in e["stack"]
    ]
    leaf = next(f for f in frames if f["function"] == "leak_one")
    assert leaf["file"] == source and leaf["module"] == exe, leaf  # the exact names, round-tripped

    svg = tmp_path / "out.svg"
    stripped = tmp_path / EVIL  # unnamed frames are named after the module
    subprocess.run(["strip", "-o", str(stripped), exe], check=True)
    drawn = probedsl(
        "run", MEMLEAK, "--backend", backend, "--format", "svg", "--output", str(svg), "--", str(stripped), input="\n"
    )
    assert drawn.returncode == 0, drawn.stderr
    titles = [t.text for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}title")]
    assert any(t.startswith(f"{shown}+0x") for t in titles), titles
    assert_no_raw_control(svg.read_text())

    # a saved report re-rendered for a person escapes the same way; an error quoting a path too
    saved_path = tmp_path / "saved.json"
    saved_path.write_text(saved.stdout)
    again = probedsl("report", str(saved_path))
    assert again.returncode == 0 and f"{shown}.c:3" in again.stdout, again.stderr
    assert_no_raw_control(again.stdout)
    page = probedsl("report", str(saved_path), "--format", "html")
    assert page.returncode == 0, page.stderr
    assert_no_raw_control(page.stdout)
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page.stdout, re.S).group(1)
    assert any(f[2].endswith(f"/{shown}.c:3") for f in json.loads(data)["frames"]), data[:2000]
    bogus = tmp_path / f"{EVIL}.json"
    bogus.write_text("not a report\n")
    error = probedsl("report", str(bogus))
    assert error.returncode != 0 and f"{shown}.json: no probedsl JSON report" in error.stderr, error.stderr
    assert_no_raw_control(error.stderr)
    assert "Traceback" not in error.stderr


def test_a_newline_in_a_source_file_name_cannot_shift_frames(tmp_path):
    """addr2line prints a record per address a line per name: a file name holding a newline
    and another function's address line must not put names on that address."""
    program = (
        "int f(int x) { return x + 1; }\nint g(int x) { return x * 2; }\n"
        "int main(int c, char **v) { return f(c) + g(c); }\n"
    )
    plain = tmp_path / "plain.c"
    plain.write_text(program)
    g = elf.symbols(gcc(plain, tmp_path / "plain")).address_of("g")
    # the same code (the same addresses), from a file whose name forges a record for g
    source = tmp_path / f"a.c\n{g:#018x}\nforged\nforged.c:1"
    source.write_text(program)
    exe = gcc(source, tmp_path / "prog", "-x", "c")
    syms = elf.symbols(exe)
    addresses = [syms.address_of(n) for n in ("f", "g", "main")]
    assert addresses[1] == g
    assert all(SourceLines().lookup(str(tmp_path / "plain"), addresses).values())
    found = SourceLines().lookup(exe, addresses)
    for name, address in zip(("f", "g", "main"), addresses):
        # no file:line then (the record is not well-formed), and never another's names
        for frame in found[address]:
            assert frame.function == name and "forged" not in frame.file, (name, found[address])


COMM_RECIPE = """recipe commleak "heap by thread name"
resource heap keyed by (pid, address) {
  acquire libc:malloc(size) -> (pid, ret) when ret != 0 size = size
  release libc:free(ptr) -> (pid, ptr) when ptr != 0
  record size, ustack, comm, pid
}
report outstanding heap by comm: sum(size) as bytes, count() as blocks
"""

THREAD_NAME = "t\033]0;pw\007\033[31m"
RENAMED = r"""#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
static void *named(void *arg) {
    prctl(PR_SET_NAME, "t\033]0;pw\007\033[31m");
    return malloc(24);
}
int main(void) {
    pthread_t t;
    void *kept;
    getchar();                                   /* go: the tracer is attached */
    pthread_create(&t, NULL, named, NULL);
    pthread_join(t, &kept);
    printf("done\n");
    fflush(stdout);
    getchar();
    return kept == 0;
}
"""


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", ["bpftrace", "bcc"])
def test_a_thread_renamed_with_escapes(backend, tmp_path):
    """A thread names itself with escapes (prctl) and allocates. --comm selects threads by
    their own name, which cannot hold control characters (procfs.valid_comm), so the renamed
    thread is reached through its launched process."""
    recipe = tmp_path / "commleak.probe"
    recipe.write_text(COMM_RECIPE)
    source = tmp_path / "renamed.c"
    source.write_text(RENAMED)
    exe = gcc(source, tmp_path / "secthr", "-pthread")
    result = probedsl("run", str(recipe), "--backend", backend, "--", exe, input="go\n\n")
    assert result.returncode == 0, result.stderr
    assert_no_raw_control(result.stdout, result.stderr)
    assert f"comm {escape.for_terminal(THREAD_NAME)}" in result.stdout, result.stdout


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_thread_renamed_with_escapes_under_comm(backend, tmp_path):
    """--comm traces the threads named so: the thread that renames itself with escapes leaves
    the name behind (its blocks are not the process's by name any more), and nothing of its
    name reaches the terminal raw; the main thread's blocks are reported under its name."""
    recipe = tmp_path / "commleak.probe"
    recipe.write_text(COMM_RECIPE)
    source = tmp_path / "renamed.c"
    source.write_text(RENAMED)
    exe = gcc(source, tmp_path / "secthr", "-pthread")
    tracer = start_run(str(recipe), "--backend", backend, "--comm", "secthr")
    target = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    target.stdin.write("go\n")
    target.stdin.flush()
    assert target.stdout.readline() == "done\n"  # the thread allocated and ended
    target.communicate("\n")
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate()
    assert tracer.returncode == 0, err
    assert_no_raw_control(out, err)
    assert "comm secthr" in out, out
    assert escape.for_terminal(THREAD_NAME) not in out


def nobody_owned(path: Path) -> None:
    who = pwd.getpwnam("nobody")
    for p in [path, *path.rglob("*")]:
        os.chown(p, who.pw_uid, who.pw_gid)


def stacks(report: dict) -> list:
    return sorted(
        tuple(f["text"] for f in e["stack"]) + (e["bytes"], e["blocks"])
        for rep in report["reports"]
        if rep["kind"] == "outstanding"
        for e in rep["entries"]
    )


@pytest.mark.usefixtures("root_required")
def test_a_cache_owned_by_nobody_is_ignored(build, tmp_path):
    """The issue's forgery: one row for libc's build id (pc 0, OUTERMOST) would end every
    stack in libc with no cut mark."""
    ident = debuginfo.build_id_of(LIBC)
    forged = tmp_path / "forged"
    rows = forged / "probedsl" / "unwind-rows"
    rows.mkdir(parents=True)
    (rows / f"{ident}.v3").write_bytes(struct.pack("<IBBhi", 0, stackformat.OUTERMOST, 0, 0, 0))
    nobody_owned(forged)
    clean = tmp_path / "clean"
    clean.mkdir(mode=0o700)
    runs = {}
    for name, cache in (("clean", clean), ("forged", forged)):
        env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
        result = probedsl(
            "run",
            MEMLEAK,
            "--backend",
            "bcc",
            "--stacks",
            "dwarf",
            "--format",
            "json",
            "--top",
            "100",
            "--",
            build("leak"),
            input="\n",
            env=env,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        runs[name] = report_json(result.stdout)
    assert stacks(runs["forged"]) == stacks(runs["clean"])
    said = [n for n in runs["forged"]["notes"] if "not used" in n and str(forged) in n]
    assert len(said) == 1 and "belongs to nobody" in said[0], runs["forged"]["notes"]
    assert not [n for n in runs["clean"]["notes"] if "not used" in n], runs["clean"]["notes"]


def test_cached_rows_of_the_wrong_shape_are_discarded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    notices.clear()
    decoded = unwind_tables.rows_of(LIBC)
    cached = tmp_path / "probedsl" / "unwind-rows" / f"{debuginfo.build_id_of(LIBC)}.v3"
    good = cached.read_bytes()
    for bad in (
        good[:-5],  # not whole rows
        good[12:24] + good[:12] + good[24:],  # pcs out of order
        struct.pack("<IBBhi", 0, 9, 0, 0, 0) + good[12:],  # an unknown kind
        struct.pack("<IBBhi", 0, stackformat.OUTERMOST, 0, 0, 0),
    ):  # the forgery
        cached.write_bytes(bad)
        assert unwind_tables.rows_of(LIBC) == decoded
    assert len([n for n in notices.all_notes() if "discarded" in n]) == 4, notices.all_notes()


@pytest.mark.usefixtures("root_required")
def test_a_read_only_cache_computes_and_says_so_once(tmp_path, monkeypatch):
    """Root writes through file modes, not through a read-only mount: a tmpfs made read-only."""
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(ro)], check=True)
    try:
        (ro / "probedsl" / "unwind-rows").mkdir(parents=True, mode=0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        monkeypatch.setenv("XDG_CACHE_HOME", str(ro))
        notices.clear()
        decoded = unwind_tables.encode(unwind_tables.cfi.table(LIBC))
        assert unwind_tables.rows_of(LIBC) == decoded
        assert unwind_tables.rows_of(LIBC) == decoded
        said = [n for n in notices.all_notes() if "not cached" in n]
        assert len(said) == 1 and str(ro) in said[0], notices.all_notes()
        assert list((ro / "probedsl" / "unwind-rows").iterdir()) == []
    finally:
        subprocess.run(["umount", str(ro)], check=True)


IMPOSTOR = """#include <stdlib.h>
void *impostor_a(void) { return malloc(1); }
void *impostor_b(void) { return impostor_a(); }
int main(void) { return impostor_b() == 0; }
"""


class _Server:
    """A debuginfod look-alike on 127.0.0.1 answering every build id with `body`, claiming
    `length` bytes (more than it sends: a download cut short)."""

    def __init__(self, body: bytes, length: int):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.asked.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.asked = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stripped_and_impostor(build, tmp_path):
    source = tmp_path / "impostor.c"
    source.write_text(IMPOSTOR)
    impostor = gcc(source, tmp_path / "impostor")
    debug = tmp_path / "impostor.debug"
    subprocess.run(["objcopy", "--only-keep-debug", impostor, str(debug)], check=True)
    return build("leak-stripped"), debug.read_bytes()


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", ["bpftrace", "bcc"])
def test_a_debug_server_answering_with_another_programs_file(backend, stripped_and_impostor, tmp_path):
    stripped, impostor = stripped_and_impostor
    server = _Server(impostor, len(impostor))
    try:
        env = {**os.environ, "DEBUGINFOD_URLS": server.url, "DEBUGINFOD_CACHE_PATH": str(tmp_path / "cache")}
        result = probedsl(
            "run", MEMLEAK, "--backend", backend, "--format", "json", "--top", "50", "--", stripped, input="\n", env=env
        )
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    assert server.asked, "the server was never asked"
    report = report_json(result.stdout)
    frames = [
        f for rep in report["reports"] if rep["kind"] == "outstanding" for e in rep["entries"] for f in e["stack"]
    ]
    assert not [f for f in frames if "impostor" in json.dumps(f)], "a foreign name or file"
    ours = [f for f in frames if f["module"] == stripped]
    assert ours and all(f["function"] is None and f["text"].startswith("leak-stripped+0x") for f in ours), ours
    said = [n for n in report["notes"] if server.url in n and "build id" in n]
    assert len(said) == 1, report["notes"]
    assert "fetched" not in result.stderr
    assert not list((tmp_path / "cache").rglob("*debuginfo*")), "the refused file was kept"


def test_a_download_cut_short_leaves_nothing(build, tmp_path, monkeypatch):
    stripped = build("leak-stripped")
    full = Path(build("leak")).read_bytes()
    server = _Server(full[: len(full) // 2], len(full))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("DEBUGINFOD_URLS", server.url)
    monkeypatch.setenv("DEBUGINFOD_CACHE_PATH", str(cache))
    notices.clear()
    debuginfo.fetch.cache_clear()
    try:
        assert debuginfo.fetch(debuginfo.build_id_of(stripped)) == ""
    finally:
        server.close()
    assert server.asked
    assert list(cache.iterdir()) == [], list(cache.rglob("*"))
    assert [n for n in notices.all_notes() if "cut short" in n], notices.all_notes()


def test_a_debug_file_by_build_id_path_must_carry_that_build_id(build, tmp_path, monkeypatch):
    """/usr/lib/debug/.build-id/xx/yyy.debug of another program (here in a process root)."""
    stripped = build("leak-stripped")
    ident = debuginfo.build_id_of(stripped)
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(stripped, root / "bin" / "leak")
    where = root / "usr/lib/debug/.build-id" / ident[:2] / f"{ident[2:]}.debug"
    where.parent.mkdir(parents=True)
    source = tmp_path / "impostor.c"
    source.write_text(IMPOSTOR)
    subprocess.run(["objcopy", "--only-keep-debug", gcc(source, tmp_path / "impostor"), str(where)], check=True)
    monkeypatch.delenv("DEBUGINFOD_URLS", raising=False)
    notices.clear()
    elf._load.cache_clear()
    assert elf.symbols(str(root / "bin" / "leak"), str(root)).debug_file == ""
    assert [n for n in notices.all_notes() if str(where) in n and ident in n], notices.all_notes()


def test_recipe_library_paths_with_quotes_or_spaces_are_rejected(tmp_path):
    odd = tmp_path / 'we"ird dir'
    odd.mkdir()
    lib = odd / "libc.so.6"
    lib.write_bytes(open("/lib/x86_64-linux-gnu/libc.so.6", "rb").read())
    recipe = tmp_path / "r.probe"
    recipe.write_text(
        'recipe r\nresource h keyed by a {\n  acquire "%s":malloc(n) -> ret\n}\n' % str(lib).replace('"', "")
    )
    # the grammar cannot even spell a quote inside a path...
    assert probedsl("check", str(recipe)).returncode == 1
    # ...and a path it can spell but that holds a space never reaches generated code
    spaced = tmp_path / "with space"
    spaced.mkdir()
    (spaced / "libc.so.6").write_bytes(lib.read_bytes())
    recipe.write_text('recipe r\nresource h keyed by a {\n  acquire "%s/libc.so.6":malloc(n) -> ret\n}\n' % spaced)
    result = probedsl("compile", str(recipe))
    assert result.returncode == 1 and "has characters probedsl does not put in a probe" in result.stderr
