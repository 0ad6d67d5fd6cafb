"""End to end: what a developer reads in each frame: names, file:line, inlines, C++, dlopen."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import BACKENDS, CXXLEAK, MEMLEAK, by_site, first_user_function, probedsl, report_json
from probedsl.outputs import formats
from probedsl.report import Report

pytestmark = pytest.mark.usefixtures("root_required")


def run_report(backend, *command, extra=(), recipe=MEMLEAK):
    result = probedsl(
        "run", recipe, "--backend", backend, "--format", "json", "--top", "50", *extra, "--", *command, input="\n"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result, report_json(result.stdout)


def symbol_extent(path, name):
    """(address, size) of a function symbol, read with nm."""
    out = subprocess.run(["nm", "-S", path], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3] == name:
            return int(fields[0], 16), int(fields[1], 16)
    raise AssertionError(f"{name} not in {path}")


def entry_with(report, function):
    for e in report["reports"][0]["entries"]:
        if any(f["function"] == function for f in e["stack"]):
            return e
    raise AssertionError(
        f"no entry with {function}: {[first_user_function(e) for e in report['reports'][0]['entries']]}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_carry_file_and_line_from_dwarf(backend, build):
    _, report = run_report(backend, build("leak"))
    stack = entry_with(report, "wrapper1")["stack"]
    where = {f["function"]: (f["file"].rsplit("/", 1)[-1], f["line"]) for f in stack if f["file"]}
    assert where["wrapper1"] == ("leak.c", 7)  # return malloc(8);
    assert where["wrapper2"] == ("leak.c", 12)  # char * p = wrapper1();
    assert where["main"] == ("leak.c", 19)  # p = wrapper2();
    assert all(f["module"] and f["address"].startswith("0x") for f in stack if not f.get("truncated"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cxx_names_are_demangled(backend, build):
    # cxxleak acquires at operator new's return: the stack starts in the program, which keeps
    # frame pointers (libstdc++ keeps none: under memleak, malloc's stacks stop inside it)
    _, report = run_report(backend, build("widgets"), recipe=CXXLEAK)
    entries = [
        e
        for e in report["reports"][0]["entries"]
        if any(f["function"] == "shop::Widget::make(int)" for f in e["stack"])
    ]
    assert sorted((e["bytes"], e["objects"]) for e in entries) == [(72, 3), (120, 3)], entries
    for e in entries:
        frame = next(f for f in e["stack"] if f["function"] == "shop::Widget::make(int)")
        assert frame["file"].endswith("widgets.cpp") and frame["line"] == 8
    parts = next(e for e in entries if e["bytes"] == 120)
    assert "std::vector<int, std::allocator<int> >::resize(unsigned long)" in [f["function"] for f in parts["stack"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inlined_calls_are_expanded_like_addr2line_i(backend, build):
    _, report = run_report(backend, build("inlined"))
    entry = entry_with(report, "outer")
    frames = [(f["function"], f["inlined"], (f["file"] or "").rsplit("/", 1)[-1], f["line"]) for f in entry["stack"]]
    i = next(n for n, f in enumerate(frames) if f[0] == "helper")
    assert frames[i : i + 3] == [
        ("helper", True, "inlined.c", 6),
        ("outer", False, "inlined.c", 8),
        ("main", False, "inlined.c", 11),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stripped_binary_frames_are_module_and_address_never_a_guess(backend, build):
    _, report = run_report(backend, build("leak-stripped"))
    entry = next(e for e in report["reports"][0]["entries"] if e["bytes"] == 40)
    frame = entry["stack"][0]
    # the ELF address of the return address in wrapper1, as objdump shows it
    start, size = symbol_extent(build("leak"), "wrapper1")
    assert frame["function"] is None and start < int(frame["vaddr"], 16) <= start + size, frame
    assert frame["text"] == f"leak-stripped+{frame['vaddr']}", frame
    assert not any("[unknown]" in f["text"] for f in entry["stack"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_leak_inside_a_dlopened_library_is_named_after_dlclose(backend, build):
    _, report = run_report(backend, build("dlopener"), build("libleaky.so"))
    entry = entry_with(report, "leaky_alloc")
    assert (entry["bytes"], entry["blocks"]) == (4 * 48, 4)
    frame = next(f for f in entry["stack"] if f["function"] == "leaky_alloc")
    assert frame["module"].endswith("libleaky.so") and frame["file"].endswith("leaky.c") and frame["line"] == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_interval_reports_flag_a_steady_leak_but_not_a_filled_cache(backend, build):
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--format",
        "json",
        "--interval",
        "1",
        "--growth-intervals",
        "2",
        "--",
        build("drip"),
        "10",  # >= 4 reports however slow one is (a late one skips the times it overran)
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    docs = []
    text = result.stdout
    dec, i = json.JSONDecoder(), 0
    while (i := text.find("{", i)) >= 0:
        doc, i = dec.raw_decode(text, i)
        docs.append(doc)
    interval = [d for d in docs if not d["final"]]
    assert len(interval) >= 4

    def find(doc, fn):
        return next((e for e in doc["reports"][0]["entries"] if first_user_function(e) == fn), None)

    drips = [find(d, "drip") for d in interval[1:]]
    assert all(e and e["delta"]["bytes"] > 0 for e in drips), [e and e.get("delta") for e in drips]
    assert find(interval[-1], "drip")["growing"] is True
    assert find(interval[-1], "fill_cache")["growing"] is False
    assert find(interval[-1], "fill_cache")["delta"]["bytes"] == 0


def test_min_age_hides_young_blocks(build):
    result = probedsl("run", MEMLEAK, "--format", "json", "--min-age", "3", "--", build("drip"), "4", timeout=120)
    report = report_json(result.stdout)
    sites = by_site(report)
    assert "fill_cache" in sites  # 4 s old at the end
    # the first second's drips are 3 s old, more if the final snapshot comes late: not all 20
    assert 0 < sites.get("drip", (0, 0))[1] < 20


def test_output_file_holds_the_final_report_and_report_rerenders_it(build, tmp_path):
    saved = tmp_path / "run.json"
    result = probedsl("run", MEMLEAK, "--format", "json", "--output", str(saved), "--", build("leak"), input="\n")
    assert result.returncode == 0 and result.stdout == ""
    folded = probedsl("report", str(saved), "--format", "folded")
    assert folded.returncode == 0
    assert any(line.endswith(";wrapper2;wrapper1 40") for line in folded.stdout.splitlines()), folded.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_thousands_of_stacks_are_all_saved_and_the_text_view_sums_past_top_n(backend, build):
    result, report = run_report(backend, build("manystacks"), extra=("--top", "3"))
    heap = report["resources"]["heap"]
    assert heap["live_blocks"] == 4096 + 2 + 3 + 4 + 5 - 4 and heap["live_bytes"] == heap["live_blocks"] * 8
    section = report["reports"][0]
    # JSON holds every entry (--top limits the text view): every block is in one
    assert len(section["entries"]) == section["total_entries"] and section["omitted"]["entries"] == 0
    assert sum(e["blocks"] for e in section["entries"]) == heap["live_blocks"]
    text = formats.to_text(Report.from_dict(report))
    assert f"3 of {section['total_entries']} entries" in text
    assert f"... and {section['total_entries'] - 3} more entries: " in text
    distinct = section["total_entries"] - (1 if heap["no_stack"] else 0)
    assert distinct + heap["no_stack"] >= 4096 - 1
    assert heap["no_stack"] == 0 or any("no user stack" in n for n in report["notes"])
    assert [e["blocks"] for e in section["entries"]][:1] == [5] or heap["no_stack"] >= 5
    # 131,072 buckets: ~64 expected; 65,536 buckets of 127 frames lost ~138 on BCC
    assert heap["no_stack"] < 110, heap["no_stack"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deep_stack_keeps_its_innermost_64_frames(backend, build):
    result, report = run_report(backend, build("deepstack"))
    entry = entry_with(report, "dive")
    assert entry["blocks"] == 1 and entry["bytes"] == 32
    assert len(entry["stack"]) == 65, [f["text"] for f in entry["stack"]]
    assert all(f["function"] == "dive" for f in entry["stack"][:64])  # main is past the cut
    assert entry["truncated"] and entry["stack"][64]["text"] == "[truncated: only the innermost 64 frames are kept]"
