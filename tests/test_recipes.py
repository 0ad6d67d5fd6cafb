"""The bundled recipes beyond memleak, each on a leaking fixture, both backends, exact counts."""

from __future__ import annotations

import pytest

from conftest import BACKENDS, probedsl, report_json

pytestmark = pytest.mark.usefixtures("root_required")


def run(recipe, backend, *command, extra=()):
    result = probedsl("run", recipe, "--backend", backend, "--format", "json", "--top", "100", *extra, "--", *command)
    assert "Traceback" not in result.stderr, result.stderr
    return result, report_json(result.stdout)


def sites(section, column):
    """{innermost function of the program itself: summed column} for one report section."""
    out = {}
    for e in section["entries"]:
        frame = next((f for f in e["stack"] if f["module"] and "/lib" not in f["module"]), None)
        name = (frame["function"] or frame["text"]) if frame else "?"
        out[name] = out.get(name, 0) + e[column]
    return out


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_fdleak_counts_each_leaked_descriptor_once(backend, build):
    result, report = run("fdleak", backend, build("fdleak"))
    assert result.returncode == 0, result.stderr
    got = sites(report["reports"][0], "fds")
    whole = {
        "leak_open": 2,
        "leak_openat": 1,
        "leak_socket": 1,
        "leak_pipe": 2,
        "leak_dup": 1,
        "leak_eventfd": 1,
        "leak_epoll": 1,
    }
    # BCC unwinds from the registers the system call saved (--stacks dwarf); a stack taken
    # before the C library's unwind rows were in place (a cold cache), and every bpftrace stack,
    # is the frame-pointer walk, which stops in the C library's wrapper (no frame pointer there)
    assert sum(got.values()) == 9, got
    assert all(n <= whole.get(fn, 0) for fn, n in got.items() if fn != "?") and (
        backend == "bcc" or set(got) == {"?"}
    ), got
    for e in report["reports"][0]["entries"]:
        if not any((f["module"] or "").endswith("/fdleak") for f in e["stack"]):
            assert "libc.so" in e["stack"][0]["module"] and e["stack"][-1].get("truncated", "").startswith(
                "no frame pointer"
            ), e
    (per_pid,) = report["reports"][1]["entries"]
    assert per_pid["fds"] == 9 and per_pid["pid"] == report["reports"][1]["entries"][0]["pids"][0]


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_fileleak_counts_streams_from_each_opener(backend, build):
    _, report = run("fileleak", backend, build("fileleak"))
    got = sites(report["reports"][0], "streams")
    assert got == {"leak_fopen": 2, "leak_fdopen": 1, "leak_tmpfile": 1, "leak_popen": 1, "leak_freopen": 1}, got
    assert report["resources"]["stream"]["unknown_releases"] == 0  # pclose is not a second release


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmapleak_sums_mapping_lengths_and_ignores_failed_maps(backend, build):
    _, report = run("mmapleak", backend, build("mmapleak"))
    section = report["reports"][0]
    assert sites(section, "bytes") == {"leak_small": 3 * 8192, "leak_big": 1 << 20}
    assert sites(section, "mappings") == {"leak_small": 3, "leak_big": 1}


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_lockhold_finds_stuck_locks_and_hold_times_per_site(backend, build):
    _, report = run("lockhold", backend, build("lockhold"))
    held = sites(report["reports"][0], "held")
    assert held == {"stuck": 1, "try_and_keep": 1}, held
    lifetime = report["reports"][1]
    assert lifetime["kind"] == "lifetime" and lifetime["by"] == ["ustack"]
    work = next(e for e in lifetime["entries"] if any(f["function"] == "work_locked" for f in e["stack"]))
    assert work["released"] == 400
    # each hold sleeps 1 ms: every sample lands in buckets at or above 2^20 ns
    assert sum(b["count"] for b in work["histogram_ns"] if b["min"] >= 1 << 19) == 400


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_cxxleak_counts_every_new_form_once(backend, build):
    _, report = run("cxxleak", backend, build("cxxleak"))
    section = report["reports"][0]
    assert sites(section, "bytes") == {
        "leak_new()": 48,
        "leak_array()": 400,
        "leak_nothrow()": 16,
        "leak_aligned()": 64,
    }
    assert sites(section, "objects") == {"leak_new()": 2, "leak_array()": 1, "leak_nothrow()": 1, "leak_aligned()": 1}
    assert report["resources"]["object"]["unknown_releases"] == 0  # delete forms are released once


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_zstream_finds_streams_never_ended(backend, build):
    _, report = run("zstream", backend, build("zstream"))
    assert sites(report["reports"][0], "streams") == {"leak_inflate": 1, "leak_deflate": 1}
    heap = report["resources"]["stream"]
    assert heap["acquired"] == 2 + 3 * 2 and heap["released"] == 3 * 2  # inflateInit_ -> inflateInit2_ once


@pytest.mark.debian13
@pytest.mark.parametrize("backend", BACKENDS)
def test_kmemleak_sees_kernel_objects_made_for_the_process(backend, build):
    # the report is taken while the fixture still holds its 40 eventfds open (for 6 s)
    _, report = run("kmemleak", backend, build("kmem"), "6", extra=("--duration", "2"))
    ctx = [
        e
        for e in report["reports"][0]["entries"]
        if len(e["kernel_stack"]) > 1 and e["kernel_stack"][1]["function"] == "do_eventfd"
    ]
    assert sum(e["objects"] for e in ctx) == 40
    assert sum(e["bytes"] for e in ctx) == 40 * 64  # kmalloc-64 eventfd_ctx
    by_comm = {e["comm"]: e["objects"] for e in report["reports"][1]["entries"]}
    assert by_comm.get("kmem", 0) >= 40


def test_list_shows_bundled_recipes_with_descriptions():
    result = probedsl("list")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == sorted(
        ["cxxleak", "fdleak", "fileleak", "kmemleak", "lockhold", "memleak", "mmapleak", "sampledheap", "zstream"]
    )
    assert "min_age_ms=0" in result.stdout


def test_a_bundled_name_wins_over_a_file_of_the_same_name(tmp_path):
    (tmp_path / "memleak").write_text("not a recipe")
    result = probedsl("check", "memleak", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_tutorial_recipe_finds_the_forgotten_directory_stream(backend, build):
    from conftest import ROOT

    _, report = run(str(ROOT / "tests" / "recipes" / "dirstream.probe"), backend, build("dirleak"))
    assert sites(report["reports"][0], "streams") == {"scan": 1}
    assert report["resources"]["dir"]["acquired"] == 10 and report["resources"]["dir"]["released"] == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_acquired_again_replaces_the_entry_and_its_tally(backend, build, tmp_path):
    exe = build("rekey")
    recipe = tmp_path / "rekey.probe"
    recipe.write_text(f'''recipe rekey "handles by id"
resource handle keyed by (pid, id) {{
  acquire "{exe}":grab(id) -> (pid, ret)
  release "{exe}":drop(id) -> (pid, id)
  record ustack, time, pid
}}
report outstanding handle by ustack: count() as handles
''')
    result, report = run(str(recipe), backend, exe)
    assert result.returncode == 0, result.stderr
    handle = report["resources"]["handle"]
    assert (handle["acquired"], handle["released"], handle["replaced"], handle["live_blocks"]) == (3, 1, 1, 1), handle
    assert sites(report["reports"][0], "handles") == {"second_site": 1}
