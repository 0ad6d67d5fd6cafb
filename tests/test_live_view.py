"""`probedsl run --live` in a real terminal (tmux): the screen refreshes with the leak growing,
s sorts by the next column, enter expands a stack, q ends the run with the final report; without
a terminal the plain reports come instead."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time

import pytest

from probedsl.outputs import live
from probedsl.report import Entry, Report, Section
from probedsl.stacks.symbolizer import Frame

from conftest import MEMLEAK, probedsl

ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+([+-]\d+)\s+([+-]\d+)\s+(\S.*?)(  GROWING)?$")


def report_of(values) -> Report:
    """A report with one entry per (name, bytes, blocks)."""
    entries = [
        Entry(
            values={"bytes": b, "blocks": n},
            oldest_age_s=None,
            pids=[1],
            stack=[Frame(0x1000 + i, name, 0, "/bin/app", "app.c", 1)],
        )
        for i, (name, b, n) in enumerate(values)
    ]
    return Report(
        "memleak",
        "bcc",
        "t",
        1.0,
        False,
        {"heap": {"live_bytes": 0, "live_blocks": 0, "acquired": 0, "released": 0, "unknown_releases": 0}},
        [
            Section(
                "outstanding", "heap", ["ustack"], ["bytes", "blocks"], 10, entries=entries, total_entries=len(entries)
            )
        ],
    )


def test_growth_is_counted_from_the_first_refresh_and_the_last():
    growth = live.Growth()
    growth.rows(report_of([("cache", 640, 10), ("leak", 100, 1)]))
    rows = {r.frames[0].split("+")[0]: r for r in growth.rows(report_of([("cache", 640, 10), ("leak", 300, 3)]))}
    assert (rows["leak"].since_start, rows["leak"].since_last) == (200, 200)
    rows = {
        r.frames[0].split("+")[0]: r
        for r in growth.rows(report_of([("cache", 640, 10), ("leak", 500, 5), ("new", 8, 1)]))
    }
    assert (rows["leak"].since_start, rows["leak"].since_last) == (400, 200)
    assert (rows["cache"].since_start, rows["new"].since_start) == (0, 8)
    by_blocks = live.sort_rows(list(rows.values()), "blocks")
    assert [r.values[1] for r in by_blocks] == [10, 5, 1]


def test_without_a_terminal_live_prints_the_plain_reports(build, root_required):
    result = probedsl("run", MEMLEAK, "--live", "--", build("drip"), "3")
    assert result.returncode == 0, result.stderr
    assert "--live needs a terminal" in result.stderr
    # a report each second (--live refreshes every second without --interval), then the final one
    assert re.search(r"report \(interval 1\)", result.stdout) and "report (final)" in result.stdout
    assert "\033[" not in result.stdout  # no screen drawing on a pipe


class Terminal:
    """A tmux server of our own (its own socket) with one 160x48 window running a shell."""

    def __init__(self):
        assert shutil.which("tmux"), "the --live test drives tmux: apt-get install tmux (scripts/setup.sh does)"
        # tmux's server detaches onto /dev/null: a regular file there (something replaced it) stops it
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode), "/dev/null is not a device: tmux cannot start"
        self.socket = f"probedsl-test-{os.getpid()}"
        self.tmux("new-session", "-d", "-s", "live", "-x", "160", "-y", "48", "bash --norc --noprofile")

    def tmux(self, *args) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True).stdout

    def type(self, *keys) -> None:
        self.tmux("send-keys", "-t", "live", *keys)

    def screen(self, history: bool = False) -> str:
        return self.tmux("capture-pane", "-p", "-t", "live", *(["-S", "-300"] if history else []))

    def wait(self, ready, what: str, history: bool = False, limit_s: float = 90):
        """The screen once ready(screen) is true (the view refreshes on its own)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            text = self.screen(history)
            found = ready(text)
            if found:
                return found
            time.sleep(0.1)
        pytest.fail(f"the terminal never showed {what}:\n{self.screen(history)}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def refresh(screen: str):
    m = re.search(r"refresh (\d+) \(every", screen)
    return int(m.group(1)) if m else None


def rows(screen: str):
    """(bytes, blocks, +start, +last, stack, growing) of the stack lines on the screen."""
    out = []
    for line in screen.splitlines():
        m = ROW.match(line)
        if m:
            out.append(
                (int(m.group(1)), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5), bool(m.group(6)))
            )
    return out


def drip_row(screen: str):
    return next((r for r in rows(screen) if r[4].startswith("drip")), None)


@pytest.mark.usefixtures("root_required")
def test_the_live_view_shows_the_leak_growing_sorts_expands_and_quits_to_the_final_report(build):
    term = Terminal()
    try:
        command = [sys.executable, "-m", "probedsl", "run", MEMLEAK, "--live", "--", build("drip"), "120"]
        term.type(f"cd {shlex.quote(os.getcwd())}; {shlex.join(command)}; echo probedsl-ended-$?", "Enter")
        first = term.wait(lambda s: drip_row(s) and refresh(s) and (refresh(s), drip_row(s)), "the drip stack")
        later = term.wait(
            lambda s: refresh(s) and refresh(s) >= first[0] + 2 and drip_row(s) and (refresh(s), drip_row(s)),
            "two more refreshes",
        )
        assert later[1][0] > first[1][0] and later[1][1] > first[1][1]  # more bytes and blocks
        assert later[1][2] > 0 and later[1][3] > 0  # grew since the start and the last refresh
        assert "sorted by bytes" in term.screen()
        term.type("s")
        by_blocks = term.wait(lambda s: "sorted by blocks" in s and len(rows(s)) >= 2 and rows(s), "the blocks sort")
        assert [r[1] for r in by_blocks] == sorted((r[1] for r in by_blocks), reverse=True)
        term.type("s")
        by_start = term.wait(lambda s: "sorted by since start" in s and len(rows(s)) >= 2 and rows(s), "the next sort")
        assert by_start[0][4].startswith("drip")  # the only stack that grew since the first refresh
        term.type("Enter")
        term.wait(lambda s: re.search(r"^ {14}drip\+\d+ \[drip\]", s, re.M), "the expanded stack's frames")
        term.type("q")
        # the echo's output at a line's start: the typed command line holds "probedsl-ended-$?" too
        final = term.wait(
            lambda s: re.search(r"^probedsl-ended-\d+$", s, re.M) and s, "the end of the run", history=True
        )
        assert re.search(r"probedsl memleak report \(final\)", final)
        assert re.search(r"^\s+drip\+\d+ \[drip\]", final, re.M)  # the normal text report's frames
    finally:
        term.close()
