"""`probedsl run --live`: a full-screen view refreshed at every report, like top: the totals,
then the top stacks with bytes, blocks and their growth since the first refresh and since the
last one. Keys: s sorts by the next column, up/down select, enter expands the selected stack,
p pauses the screen (tracing goes on), q quits (the run then ends with its normal final report).

Only drawing and keys live here; the session decides when to refresh (probedsl.run.session).
"""

from __future__ import annotations

import contextlib
import curses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from probedsl.trust import escape
from probedsl.report import Report

SORTS = ("bytes", "blocks", "since start", "since last")


def usable(out, stdin=None) -> bool:
    """A full screen needs a terminal on both ends and a known terminal type."""
    import sys

    stdin = stdin or sys.stdin
    return (
        hasattr(out, "isatty")
        and out.isatty()
        and hasattr(stdin, "isatty")
        and stdin.isatty()
        and os.environ.get("TERM", "dumb") != "dumb"
    )


def start(out, period: float, say) -> Optional["LiveView"]:
    """The view on this terminal, or None (said) where plain reports must do."""
    if not usable(out):
        say("note: --live needs a terminal on stdin and stdout: plain reports follow")
        return None
    try:
        return LiveView(period)
    except curses.error as exc:  # a terminal type terminfo does not know
        with contextlib.suppress(curses.error):
            curses.endwin()
        say(f"note: --live: this terminal cannot show it ({exc}): plain reports follow")
        return None


@dataclass
class Row:
    key: Tuple[str, str]  # (resource, signature): as diff and merge match entries
    resource: str
    values: Tuple[int, int]  # first two columns (bytes, blocks)
    since_start: int  # first column's change since the first refresh
    since_last: int  # ... since the previous refresh
    growing: bool
    frames: List[str]  # innermost first


class Growth:
    """Per stack: its first column at the first refresh and at the previous one."""

    def __init__(self):
        self.first: Optional[Dict[Tuple[str, str], int]] = None
        self.last: Dict[Tuple[str, str], int] = {}

    def rows(self, report: Report) -> List[Row]:
        out, now = [], {}
        for s in report.sections:
            if s.kind != "outstanding" or not s.columns:
                continue
            first, second = s.columns[0], (s.columns[1] if len(s.columns) > 1 else s.columns[0])
            for e in s.entries:
                key = (s.resource, e.signature())
                v = e.values.get(first, 0)
                now[key] = now.get(key, 0) + v
                frames = [escape.for_terminal(str(f)) for f in e.stack + e.kernel_stack]
                out.append(Row(key, s.resource, (v, e.values.get(second, 0)), 0, 0, e.growing, frames))
        if self.first is None:
            self.first = dict(now)
        for r in out:
            r.since_start = now[r.key] - self.first.get(r.key, 0)
            r.since_last = now[r.key] - self.last.get(r.key, 0)
        self.last = now
        return out


def sort_rows(rows: List[Row], by: str) -> List[Row]:
    key = {
        "bytes": lambda r: r.values[0],
        "blocks": lambda r: r.values[1],
        "since start": lambda r: r.since_start,
        "since last": lambda r: r.since_last,
    }[by]
    return sorted(rows, key=lambda r: (-key(r), -r.values[0]))


def header(report: Report, refreshes: int, period: float) -> List[str]:
    lines = [
        escape.for_terminal(
            f"probedsl {report.recipe} live: {report.target}, {report.backend} {report.backend_version}".rstrip()
            + f", {report.duration_s:.0f} s traced, "
            f"refresh {refreshes} (every {period:g} s)",
            escape.MAX_MESSAGE,
        )
    ]
    for name, r in report.resources.items():
        size = f"{r['live_bytes']} bytes in " if "live_bytes" in r else ""
        lines.append(
            escape.for_terminal(
                f"{name}: {size}{r['live_blocks']} live; {r['acquired']} acquired, "
                f"{r['released']} released, {r['unknown_releases']} releases of unknown keys"
            )
        )
    return lines


class LiveView:
    """The curses screen. show() after each report; poll() often, for keys; close() at the end."""

    def __init__(self, period: float):
        self.period = period
        self.growth = Growth()
        self.sort = 0
        self.selected = 0
        self.expanded: Optional[Tuple[str, str]] = None
        self.paused = False
        self.refreshes = 0
        self.report: Optional[Report] = None
        self.rows: List[Row] = []
        self.screen = curses.initscr()
        curses.noecho()
        curses.cbreak()
        self.screen.keypad(True)
        self.screen.nodelay(True)
        try:
            curses.curs_set(0)
        except curses.error:  # a terminal that cannot hide its cursor
            pass
        self.closed = False

    def show(self, report: Report) -> None:
        self.refreshes += 1
        rows = self.growth.rows(report)  # growth counts even while the screen is paused
        if self.paused:
            return
        self.report, self.rows = report, rows
        self.draw()

    def poll(self) -> bool:
        """Handle the keys pressed since the last call; True when q was."""
        while True:
            key = self.screen.getch()
            if key == -1:
                return False
            if key in (ord("q"), ord("Q")):
                return True
            if key in (ord("s"), ord("S")):
                self.sort = (self.sort + 1) % len(SORTS)
            elif key in (ord("p"), ord("P"), ord(" ")):
                self.paused = not self.paused
            elif key in (curses.KEY_DOWN, ord("j")):
                self.selected += 1
            elif key in (curses.KEY_UP, ord("k")):
                self.selected = max(0, self.selected - 1)
            elif key in (curses.KEY_ENTER, 10, 13, ord("e")):
                shown = sort_rows(self.rows, SORTS[self.sort])
                if shown:
                    key_ = shown[min(self.selected, len(shown) - 1)].key
                    self.expanded = None if self.expanded == key_ else key_
            self.draw()

    def lines(self, width: int, height: int) -> List[Tuple[str, int]]:
        """(text, curses attribute) per screen line."""
        if self.report is None:
            return [("probedsl live: waiting for the first report...", 0)]
        out = [
            (line, curses.A_BOLD if i == 0 else 0)
            for i, line in enumerate(header(self.report, self.refreshes, self.period))
        ]
        out.append(
            (
                f"sorted by {SORTS[self.sort]}   keys: s sort  up/down select  enter expand  p pause  q quit"
                + ("   [PAUSED]" if self.paused else ""),
                curses.A_DIM,
            )
        )
        cols = (
            "bytes"
            if not self.report.sections or not self.report.sections[0].columns
            else self.report.sections[0].columns[0]
        )
        out.append(
            (f"{cols:>12} {'blocks':>8} {'+start':>10} {'+last':>9}  stack (allocating frame first)", curses.A_REVERSE)
        )
        shown = sort_rows(self.rows, SORTS[self.sort])
        self.selected = min(self.selected, max(0, len(shown) - 1))
        for i, r in enumerate(shown):
            if len(out) >= height - 1:
                break
            where = " <- ".join(f.split(" [")[0] for f in r.frames[:3]) or "(no stack)"
            text = (
                f"{r.values[0]:>12} {r.values[1]:>8} {r.since_start:>+10} {r.since_last:>+9}  "
                f"{where}{'  GROWING' if r.growing else ''}"
            )
            attr = (curses.A_REVERSE if i == self.selected else 0) | (curses.A_BOLD if r.growing else 0)
            out.append((text, attr))
            if r.key == self.expanded:
                out += [("              " + f, 0) for f in r.frames]
        if not shown:
            out.append(("  (nothing live)", 0))
        return [(t[: width - 1], a) for t, a in out[:height]]

    def draw(self) -> None:
        if self.closed:
            return
        height, width = self.screen.getmaxyx()
        self.screen.erase()
        for y, (text, attr) in enumerate(self.lines(width, height)):
            try:
                self.screen.addstr(y, 0, text, attr)
            except curses.error:  # the last cell of a full screen
                pass
        self.screen.refresh()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.screen.keypad(False)
            curses.nocbreak()
            curses.echo()
            curses.endwin()
