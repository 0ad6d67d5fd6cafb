"""/proc text a traced process controls is read bounded: its length (a mapping per page it
splits), its paths (long, holding newlines) and its names (a newline, an escape) cannot make
probedsl read without end, forge a line, or misname it; a cut is counted in one note."""

from __future__ import annotations

import os
import subprocess

import pytest

from probedsl.reachability import heapscan
from probedsl.process import mappings, procfs
from probedsl import notices

pytestmark = pytest.mark.security

NAME = "\nPPid:\t1\033"  # a thread name forging a status line (15 bytes at most)
FORGED = "7f0000000000-7f0000001000 r-xp 00000000 00:00 0 "  # and then "/forged"
PAGES = 3000

HOSTILE = r"""#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>
int main(int argc, char **argv) {
    prctl(PR_SET_NAME, "\nPPid:\t1\033");
    long page = sysconf(_SC_PAGESIZE), n = atol(argv[2]);
    char *many = mmap(0, n * page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (long i = 0; i < n; i += 2)              /* every other page: one mapping per page */
        mprotect(many + i * page, page, PROT_NONE);
    int fd = open(argv[1], O_RDONLY);
    if (many == MAP_FAILED || fd < 0 || mmap(0, page, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED)
        return 1;
    printf("ready\n");
    fflush(stdout);
    getchar();
    return 0;
}
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A running process with PAGES mappings, a mapped file whose path is ~3,000 bytes and holds
    newlines and a forged maps line, and a name that holds a newline."""
    out = tmp_path_factory.mktemp("proc")
    source = out / "hostile.c"
    source.write_text(HOSTILE)
    exe = out / "hostile"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(source)], check=True)
    where = out
    for i in range(11):  # 11 x 256 bytes of directory names
        where = where / (f"{i:02d}\n{FORGED}"[:40] + "d" * 215)
    where = where / f"x\n{FORGED}"
    where.mkdir(parents=True)
    mapped = where / "forged"  # the path holds "\n7f...-7f... r-xp ... /forged"
    mapped.write_bytes(b"\0" * 4096)
    proc = subprocess.Popen([str(exe), str(mapped), str(PAGES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    yield proc.pid, str(mapped)
    proc.communicate(b"\n", timeout=60)
    assert proc.returncode == 0


def test_proc_text_of_a_hostile_process_is_whole_within_the_bounds(hostile):
    pid, mapped = hostile
    notices.clear()
    lines, cut = procfs.read_lines(f"/proc/{pid}/maps")
    assert not cut and len(lines) > PAGES
    paths = [m.path for m in mappings.read_proc_maps(pid)]
    # the kernel shows a newline in a path as \012: no line (so no mapping) is forged
    assert mapped.replace("\n", "\\012") in paths and "/forged" not in paths, paths
    assert procfs.comm(pid) == NAME  # exactly, only the kernel's closing newline removed
    assert procfs.named(pid, NAME) and not procfs.named(pid, NAME.strip())
    assert procfs.parent(pid) == os.getpid()  # the name's "PPid:" line is escaped by the kernel
    assert procfs.is_process(pid)
    assert notices.all_notes() == []


def test_proc_text_past_a_bound_is_cut_and_counted(hostile, monkeypatch):
    pid, mapped = hostile
    notices.clear()
    monkeypatch.setattr(procfs, "MAX_LINES", 1000)
    lines, cut = procfs.read_lines(f"/proc/{pid}/maps")
    assert cut and len(lines) == 1000
    regions, cut = heapscan.read_maps(pid)
    assert cut and len(regions) == 1000
    said = [n for n in notices.all_notes() if f"/proc/{pid}/maps: over 1000 lines" in n]
    assert len(said) == 1 and said[0].endswith("(2 times)"), notices.all_notes()

    monkeypatch.setattr(procfs, "MAX_LINES", 1 << 18)
    monkeypatch.setattr(procfs, "MAX_BYTES", 64 << 10)
    lines, cut = procfs.read_lines(f"/proc/{pid}/maps")
    assert cut and sum(len(line) + 1 for line in lines) <= 64 << 10
    assert all(len(line.split(None, 5)[0].split("-")) == 2 for line in lines)  # whole lines only

    monkeypatch.setattr(procfs, "MAX_BYTES", 32 << 20)
    monkeypatch.setattr(procfs, "MAX_LINE", 1000)  # the mapped file's line is ~3,100 bytes
    paths = [m.path for m in mappings.read_proc_maps(pid)]
    assert paths and not [p for p in paths if "dddd" in p]
    assert [n for n in notices.all_notes() if n == f"/proc/{pid}/maps: lines over 1000 bytes left out (1 time)"], (
        notices.all_notes()
    )
