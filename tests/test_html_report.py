"""--format html and the time series behind it: the series' bounded memory, names and merge;
then real traces rendered in Debian's headless Chromium without network: the seed leak's
chart (one point per sample, drawn), and a leak that starts late (tests/fixtures/late_leak.c)
flagged as growing and alone in the window picked after it started."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from probedsl import compiler, report
from probedsl.report import history
from probedsl.report import assemble
from probedsl.trust import escape
from probedsl.outputs import formats, html_report
from probedsl.report import timeseries
from probedsl.drivers.rundata import Live, Snapshot, Totals

from conftest import MEMLEAK, probedsl, start_run
from test_flamegraph import png_pixels
from test_reports import FixedSymbolizer, fixed_snapshot

CHART_BLUE = (26, 79, 160)  # the total line and its sample points (#1a4fa0)


def program():
    return compiler.build(compiler.load(MEMLEAK))


def snapshot_at(second: int, leak_blocks: int) -> Snapshot:
    """A cache of one 4096-byte block from the start and `leak_blocks` 8-byte blocks."""
    now = second * 1_000_000_000
    live = [Live("heap", (0x9000,), 0, 4096, 42, 42, (0x2000,))]
    live += [Live("heap", (0x5000 + 32 * i,), now, 8, 42, 42, (0x1000, 0x1100, 0x1200)) for i in range(leak_blocks)]
    return Snapshot(now, live, {"heap": Totals(acquired=len(live))}, tallies={})


def test_the_series_stays_bounded_and_exact_where_it_keeps_points():
    series = timeseries.Series(program().reading_live(True), max_points=16)
    for second in range(100):
        series.add(float(second), snapshot_at(second, second))
    assert len(series.t) <= 16 and series.thinned > 0
    assert list(series.t[-4:]) == [96.0, 97.0, 98.0, 99.0]  # recent points stay one a period
    blocks = series.totals["heap"][1]
    assert all(blocks[i] == 1 + int(t) for i, t in enumerate(series.t))  # values at kept times exact
    assert list(series.t) == sorted(series.t) and series.t[0] > 0  # the oldest were thinned


def test_the_series_names_stacks_as_report_entries_and_survives_json_and_merge(tmp_path):
    prog = program().reading_live(True)
    series = timeseries.Series(prog)
    for second in range(5):
        series.add(float(second), snapshot_at(second, 2 * second))
    sym = FixedSymbolizer()
    rep = assemble.build(prog, fixed_snapshot(), sym, backend="bcc", target="t", duration_s=5, complete=True)
    rep.series = series.to_dict(timeseries.signer(prog, sym), snapshot_at(4, 8), started_ns=0)
    entries = {e.signature(): e for e in rep.sections[0].entries}
    named = {s["signature"]: s for s in rep.series["groups"]}
    leak = next(sig for sig in named if "wrapper1" in sig)
    assert leak in entries  # the same identity as the entry's
    assert named[leak]["bytes"] == [0, 16, 32, 48, 64]
    assert timeseries.growing_since(rep.series["t"], named[leak]["bytes"], 3, 1.0) == 0.0
    cache = next(sig for sig in named if sig != leak)
    assert timeseries.growing_since(rep.series["t"], named[cache]["bytes"], 3, 1.0) is None
    # every block's acquisition second, per stack, from the entries read
    times = {a["signature"]: a["times"] for a in rep.series["acquired"]}
    assert times[leak] == [[4.0, 64, 8]]
    saved = tmp_path / "run.json"
    saved.write_text(formats.to_json(rep))
    again = report.Report.from_dict(json.loads(saved.read_text()))
    assert again.series == json.loads(json.dumps(rep.series))
    merged = history.merge([again, again])
    both = next(s for s in merged.series["groups"] if s["signature"] == leak)
    assert both["bytes"] == [0, 32, 64, 96, 128] and merged.series["resources"]["heap"]["blocks"][-1] == 18
    result = probedsl("report", str(saved), "--format", "html")
    assert result.returncode == 0 and "wrapper1" in result.stdout, result.stderr


def test_growth_needs_each_of_the_last_steps_and_joins_a_short_final_one():
    t = [0.0, 1.0, 2.0, 3.0, 4.0, 4.2]
    assert timeseries.growing_since(t, [0, 0, 10, 20, 30, 30], 3, 1.0) == 1.0  # 4.0 -> 4.2 joined to 3 -> 4.2
    assert timeseries.growing_since(t, [0, 10, 10, 20, 30, 30], 3, 1.0) is None
    assert timeseries.growing_since(t, [None, None, 10, 20, 30, 40], 2, 1.0) == 2.0  # untracked before 2 s


def test_names_from_the_traced_program_cannot_end_the_script_or_the_markup():
    prog = program()
    sym = FixedSymbolizer()
    hostile = "</script><script>alert(1)</script>\u2028<!--"
    sym.NAMES = {**sym.NAMES, 0x1000: (hostile, 1, "/srv/<b>app", "x.c", 1)}
    rep = assemble.build(
        prog,
        fixed_snapshot(),
        sym,
        backend="bcc",
        target="<i>target</i>",
        duration_s=1,
        complete=True,
        notes=["<img src=x onerror=alert(2)>"],
    )
    page = html_report.to_html(rep)
    assert "<script>alert" not in page and "<img src" not in page and "<i>target" not in page
    assert "\u2028" not in page and "<!--" not in page
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1)
    # the name as data, its invisible characters shown (escape.for_terminal: what a person reads)
    assert any(f[0] == escape.for_terminal(hostile) for f in json.loads(data)["frames"])


# --- real traces in a browser ---


def page_data(path) -> dict:
    text = open(path).read()
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1))


def wait_for(path, ready, tracer, what: str) -> dict:
    """The page's data once ready(data) holds: interval reports replace the file each second."""
    while True:
        if tracer.poll() is not None:
            out, err = tracer.communicate()
            pytest.fail(f"probedsl ended before {what}: {err}")
        try:
            data = page_data(path)
            if ready(data):
                return data
        except (OSError, AttributeError, ValueError):  # not written yet
            pass
        time.sleep(0.1)


def browse(path, fragment="", shot=None):
    """(DOM, console messages) of the page in headless Chromium, without network."""
    url = f"file://{path}{fragment}"
    exe_args = ["--window-size=1400,1000", "--enable-logging=stderr", "--v=0"]
    result = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            *exe_args,
            *([f"--screenshot={shot}"] if shot else ["--dump-dom"]),
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return result.stdout, console


@pytest.mark.usefixtures("root_required")
def test_the_seed_leaks_page_charts_every_sample_without_network(build, tmp_path):
    page = tmp_path / "leak.html"
    tracer = start_run(
        MEMLEAK, "--interval", "1", "--format", "html", "-o", str(page), "--", build("leak"), stdin=subprocess.PIPE
    )
    wait_for(page, lambda d: len(d["series"]["t"]) >= 3, tracer, "three samples")
    out, err = tracer.communicate(input="\n", timeout=60)  # the seed's getchar() returns
    assert tracer.returncode == 0, err
    data = page_data(page)
    text = page.read_text()
    assert not re.search(r"\ssrc=|href=|url\(|@import|https?://(?!www\.w3\.org/2000/svg)", text)
    dom, console = browse(page)
    assert console == []
    samples = re.findall(r'<circle class="sample"[^>]*data-t="([\d.]+)"', dom)
    assert len(samples) == len(data["series"]["t"]) >= 3
    assert [float(t) for t in samples] == data["series"]["t"]
    body = re.search(r'<table id="stacks">.*?</table>', dom, re.S).group(0)
    assert "wrapper1" in body and "40 B" in body  # five 8-byte blocks
    assert re.search(r'id="topdown".*wrapper1', dom, re.S) and re.search(r'<svg id="flame".*wrapper1', dom, re.S)
    shot = tmp_path / "shot.png"
    browse(page, shot=shot)
    width, rows = png_pixels(shot)
    blue = [
        (x, y)
        for y, row in enumerate(rows)
        for x, px in enumerate(row)
        if all(abs(a - b) <= 12 for a, b in zip(px, CHART_BLUE))
    ]
    assert len(blue) > 200, "the chart's total line is not drawn"
    assert max(x for x, _ in blue) - min(x for x, _ in blue) > width // 2  # across the time axis


@pytest.mark.usefixtures("root_required")
def test_a_late_leak_is_flagged_and_alone_in_the_window_after_it_began(build, tmp_path):
    page = tmp_path / "late.html"
    tracer = start_run(
        MEMLEAK, "--interval", "1", "--format", "html", "-o", str(page), "--", build("late_leak"), stdin=subprocess.PIPE
    )
    cache = lambda d: any(d["frames"][e[1][-1]][0] == "fill_cache" for e in d["entries"])
    before = wait_for(page, lambda d: cache(d) and len(d["series"]["t"]) >= 2, tracer, "the cache filled")
    went = before["series"]["t"][-1]  # every block so far was acquired before this sample
    tracer.stdin.write("go\n")
    tracer.stdin.flush()
    late = lambda d: next((e for e in d["entries"] if d["frames"][e[1][-1]][0] == "late_leak"), None)
    wait_for(page, lambda d: late(d) is not None and late(d)[5], tracer, "the late leak flagged growing")
    out, err = tracer.communicate(input="", timeout=60)  # stdin ends: so does the leak
    assert tracer.returncode == 0, err
    data = page_data(page)
    entry = late(data)
    assert entry[5] and entry[8] is not None and entry[8] >= went  # growing, since after the go
    cached = next(e for e in data["entries"] if data["frames"][e[1][-1]][0] == "fill_cache")
    assert not cached[5]
    dom, console = browse(page)
    assert console == []
    flagged = re.findall(r'<tr class="row growing" data-entry="(\d+)"><td><span class="flag">GROWING', dom)
    assert [data["entries"][int(i)][1] for i in flagged] == [entry[1]]
    assert re.search(
        r'<g class="growth" data-entry="\d+" data-since="[\d.]+">.*?GROWING since [\d.]+ s: late_leak', dom, re.S
    )
    # the window from the go to the end: only the late leak's stack, in every view
    end = data["series"]["t"][-1]
    # (the bounds exactly at samples: the page knows what was live at each sample, not in between)
    dom, console = browse(page, f"#window={went}-{end + 1}")
    assert console == []
    body = re.search(r'<table id="stacks">.*?</table>', dom, re.S).group(0)
    assert "late_leak" in body and "fill_cache" not in body
    for view in ("topdown", "bottomup"):
        tree = re.search(rf'<div class="tree" id="{view}">(.*?)</div></div>\s*(?:<div>|</div>)', dom, re.S).group(1)
        assert "late_leak" in tree and "fill_cache" not in tree
    flame = re.search(r'<svg id="flame".*?</svg>', dom, re.S).group(0)
    assert "late_leak" in flame and "fill_cache" not in flame
    assert 'class="window"' in dom
    # and the window before it: the cache alone
    dom, _ = browse(page, f"#window=0-{went}")
    body = re.search(r'<table id="stacks">.*?</table>', dom, re.S).group(0)
    assert "fill_cache" in body and "late_leak" not in body
