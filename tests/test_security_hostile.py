"""One hostile program, everything the security layer refuses at once, under --reachability:
it is named with terminal escapes (program and source file, ending in a literal `\\x1b`), a
thread renames itself with escapes and allocates, and it calls into a library whose
.gnu_debuglink names another library's debug file (a CRC that matches, a build id that does
not). addr2line must not read that file either (probedsl.binaries.sourcelines)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from probedsl.binaries import elf
from probedsl.trust import escape
from probedsl import notices
from probedsl.binaries.sourcelines import SourceLines

from conftest import probedsl, report_json
from test_security import EVIL, THREAD_NAME, assert_no_raw_control

pytestmark = pytest.mark.security

LIB = "void *%s(void) { void *malloc(unsigned long); return malloc(32); }\n"
PROGRAM = r"""#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <unistd.h>
void *hostile_alloc(void);
void *kept;
static void *named(void *arg) {
    prctl(PR_SET_NAME, "t\033]0;pw\007\033[31m");
    kept = malloc(24);
    return arg;
}
void *leak_one(void) { return malloc(40); }
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    fprintf(f, "%d\n", getpid());
    fclose(f);
    pthread_t t;
    pthread_create(&t, NULL, named, NULL);
    pthread_join(t, NULL);
    volatile void *p = leak_one();
    volatile void *q = hostile_alloc();
    return (p == 0) + (q == 0);
}
"""
RECIPE = """recipe hostile "heap by stack and by thread name"
resource heap keyed by (pid, address) {
  acquire libc:malloc(size) -> (pid, ret) when ret != 0 size = size
  release libc:free(ptr) -> (pid, ptr) when ptr != 0
  record size, ustack, comm, pid
}
report outstanding heap by ustack: sum(size) as bytes, count() as blocks, top 100
report outstanding heap by comm: sum(size) as bytes, count() as blocks
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """(program, its source, the library with the forged debuglink, the foreign debug file)."""
    out = tmp_path_factory.mktemp("hostile")
    for name in ("hostile", "impostor"):  # the same code, so the same addresses
        (out / f"{name}.c").write_text(LIB % f"{name}_alloc")
        subprocess.run(
            ["gcc", "-O0", "-g", "-shared", "-fPIC", "-o", str(out / f"lib{name}.so"), f"{name}.c"], check=True, cwd=out
        )
    foreign = out / "libhostile.so.debug"
    subprocess.run(["objcopy", "--only-keep-debug", "libimpostor.so", foreign.name], check=True, cwd=out)
    subprocess.run(
        ["objcopy", "--strip-debug", f"--add-gnu-debuglink={foreign.name}", "libhostile.so"], check=True, cwd=out
    )
    source = out / f"{EVIL}.c"
    source.write_text(PROGRAM)
    exe = out / EVIL
    subprocess.run(
        ["gcc", "-O0", "-g", "-pthread", "-o", str(exe), str(source), f"-L{out}", "-lhostile", f"-Wl,-rpath,{out}"],
        check=True,
        cwd=out,
    )
    return str(exe), str(source), str(out / "libhostile.so"), str(foreign)


def test_addr2line_reads_only_debug_files_probedsl_accepted(hostile, tmp_path):
    exe, source, lib, foreign = hostile
    at = elf.symbols(lib).address_of("hostile_alloc")
    # the forgery works on addr2line left to itself: it follows the debuglink (CRC only)
    alone = subprocess.run(["addr2line", "-f", "-e", lib, f"{at:#x}"], capture_output=True, text=True).stdout
    assert "impostor" in alone, alone
    notices.clear()
    elf._load.cache_clear()
    syms = elf.symbols(lib)
    assert syms.debug_file == "" and [n for n in notices.all_notes() if foreign in n], notices.all_notes()
    assert SourceLines().lookup(syms.dwarf_file, [at]) == {at: ()}
    # a file with DWARF of its own is read as before
    leak_one = elf.symbols(exe).address_of("leak_one")
    assert [(f.function, f.file) for f in SourceLines().lookup(exe, [leak_one])[leak_one]] == [("leak_one", source)]

    # a dwz link (.gnu_debugaltlink) is followed only to a file with the build id it names
    def linked(target: str, ident: bytes) -> str:
        section = tmp_path / "alt"
        section.write_bytes(target.encode() + b"\0" + ident)
        out = tmp_path / f"alt-{len(list(tmp_path.iterdir()))}"
        subprocess.run(["objcopy", f"--add-section=.gnu_debugaltlink={section}", exe, str(out)], check=True)
        return str(out)

    wrong = linked(foreign, bytes(20))
    assert SourceLines().lookup(wrong, [leak_one]) == {leak_one: ()}
    assert [n for n in notices.all_notes() if wrong in n and "gnu_debugaltlink" in n], notices.all_notes()
    right = linked(foreign, bytes.fromhex(elf.debuginfo.build_id_of(foreign)))
    assert SourceLines().lookup(right, [leak_one])[leak_one][0].function == "leak_one"


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", ["bpftrace", "bcc"])
def test_the_hostile_program_under_reachability(backend, hostile, tmp_path):
    exe, source, lib, _ = hostile
    recipe = tmp_path / "hostile.probe"
    recipe.write_text(RECIPE)
    pid_file = tmp_path / "pid"
    result = probedsl(
        "run",
        str(recipe),
        "--backend",
        backend,
        "--reachability",
        "--format",
        "json",
        "--",
        exe,
        str(pid_file),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert_no_raw_control(result.stderr)
    report = report_json(result.stdout)
    assert report["reachability_scan"]["at"] == "exit", report["notes"]
    kinds = report["resources"]["heap"]["reachability"]
    assert sum(k["blocks"] for k in kinds.values()) >= 3, kinds  # 40 + 32 + 24 bytes, at least
    assert "impostor" not in json.dumps(report), "a name or file from the refused debug file"
    frames = [f for rep in report["reports"] for e in rep["entries"] for f in e.get("stack", [])]
    ours = [f for f in frames if f["module"] == lib]
    assert ours and all(f["function"] == "hostile_alloc" and not f["file"] for f in ours), ours
    assert [f for f in frames if f["function"] == "leak_one" and f["file"] == source and f["module"] == exe]
    comms = [e.get("comm") for rep in report["reports"] for e in rep["entries"]]
    assert THREAD_NAME in comms, comms  # the exact name, in JSON

    # the same report for a person: every name escaped, the literal \x1b told from ESC
    saved = tmp_path / "saved.json"
    saved.write_text(result.stdout)
    text = probedsl("report", str(saved))
    assert text.returncode == 0, text.stderr
    assert_no_raw_control(text.stdout, text.stderr)
    shown = escape.for_terminal(EVIL)
    assert f"{shown}.c:" in text.stdout and f"comm {escape.for_terminal(THREAD_NAME)}" in text.stdout, text.stdout
    assert "definitely lost" in text.stdout or "definitely_lost" in text.stdout, text.stdout

    # the target was let go: it ran to its end and is gone, not held stopped
    pid = int(pid_file.read_text())
    try:
        alive = os.readlink(f"/proc/{pid}/exe") == exe
    except OSError:
        alive = False
    assert not alive, f"the target {pid} is still there"
