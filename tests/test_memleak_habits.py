"""BCC memleak's command lines work as its users type them: -p PID, -c "CMD ARGS", -T N,
--older MS, -s N and the positional [interval [count]] (docs/usage.md sets them side by side)."""

import json

import pytest

from conftest import MEMLEAK, Held, by_site, probedsl, report_json, start_run


@pytest.mark.usefixtures("root_required")
@pytest.mark.parametrize("backend", ["bpftrace", "bcc"])
def test_dash_c_launches_a_command_line_split_as_a_shell_would(backend, build):
    result = probedsl(
        "run",
        MEMLEAK,
        "--backend",
        backend,
        "--format",
        "json",
        "-T",
        "1",
        "-c",
        f"{build('leak_delayed')} 0 '0'",
        input="",
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    entries = report["reports"][0]["entries"]
    assert len(entries) == 1, "-T 1: one stack"
    assert by_site(report).get("wrapper1") == (40, 5)


@pytest.mark.usefixtures("root_required")
def test_interval_and_count_after_the_recipe_print_count_reports_then_stop(build):
    """memleak -p PID 1 3: a report a second, the third one final, the process left running."""
    held = Held([build("leak_delayed"), "wait", "600"])
    try:
        tracer = start_run(MEMLEAK, "--backend", "bcc", "--format", "json", "-p", str(held.pid), "1", "3")
        held.go()
        out, err = tracer.communicate(timeout=60)
        assert tracer.returncode == 0, err
        reports = json_documents(out)
        assert [r["sequence"] for r in reports] == [1, 2, 3] and [r["final"] for r in reports] == [False, False, True]
        assert held.proc.poll() is None, "the traced process runs on"
    finally:
        held.proc.kill()
        held.end()


def json_documents(text: str) -> list:
    decoder, docs, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)
    return docs


@pytest.mark.usefixtures("root_required")
def test_older_hides_blocks_younger_than_its_milliseconds(build):
    result = probedsl("run", MEMLEAK, "--format", "json", "--older", "600000", "--", build("leak"), input="\n")
    report = report_json(result.stdout)
    assert by_site(report) == {}, "every block is younger than ten minutes"
    assert report["resources"]["heap"]["live_blocks"] >= 5, "the blocks are counted, only not listed"


@pytest.mark.parametrize(
    "args, message",
    [
        (["5", "x", "--", "/bin/true"], "unexpected argument 'x' before --"),
        (["-c", "/bin/true", "--", "/bin/true"], "-c gives the command as one string"),
        (["-c", ""], "-c: the command is empty"),
        (["0", "--", "/bin/true"], "interval: must be at least 1 second"),
        (["5", "2", "--duration", "3", "--", "/bin/true"], "COUNT and --duration both say when to stop"),
        (["--older", "5", "--min-age", "1", "--", "/bin/true"], "--older and --min-age both set the age"),
        (["-z", "100", "-Z", "10", "--", "/bin/true"], "--min-size 100 is above --max-size 10"),
    ],
)
def test_habit_errors_are_one_line(args, message):
    result = probedsl("run", MEMLEAK, *args)
    assert result.returncode != 0
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
