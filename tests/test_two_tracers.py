"""Two tracers on one process: while one holds a uretprobe on a function, the other's stacks
through that function reach the kernel's return trampoline. Both BCC runs."""

from __future__ import annotations

import signal
import subprocess

import pytest

from conftest import MEMLEAK, by_site, report_json, start_run

pytestmark = pytest.mark.usefixtures("root_required")

RECIPE = """recipe handout "Blocks handed out by hand_out"
resource block keyed by (pid, address) {
  acquire "%s":hand_out(n) -> (pid, ret)  when ret != 0  size = n
  release libc:free(ptr)   -> (pid, ptr)  when ptr != 0
  record size, ustack, time, pid
}
report outstanding block by ustack: sum(size) as bytes, count() as blocks
"""


def end(tracer) -> dict:
    tracer.send_signal(signal.SIGINT)
    out, err = tracer.communicate(timeout=120)
    assert tracer.returncode == 0 and "Traceback" not in err, err
    report = report_json(out)
    for name, res in report["resources"].items():
        assert res["unaccounted"] == 0, (name, res, report["notes"])
    return report


def test_a_stack_through_another_tracers_uretprobe_names_the_trampoline(tmp_path, build):
    exe = build("handout")
    recipe = tmp_path / "handout.probe"
    recipe.write_text(RECIPE % exe)
    target = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first = second = None
    try:
        # the first holds a uretprobe on hand_out; the second, started once the first traces,
        # unwinds malloc's callers through hand_out, whose return address is the trampoline
        first = start_run(str(recipe), "--backend", "bcc", "--format", "json", "--pid", str(target.pid))
        second = start_run(MEMLEAK, "--backend", "bcc", "--format", "json", "--top", "50", "--pid", str(target.pid))
        target.stdin.write(b"go\n")
        target.stdin.flush()
        assert target.stdout.readline() == b"done\n"
        mem, blocks = end(second), end(first)  # reported while the process lives
    finally:
        for tracer in (first, second):
            if tracer is not None and tracer.poll() is None:
                tracer.kill()
        target.stdin.close()
        target.wait(timeout=60)
    assert blocks["resources"]["block"]["live_blocks"] == 5
    assert blocks["resources"]["block"]["live_bytes"] == 200
    through = [e for e in mem["reports"][0]["entries"] if any(f["function"] == "hand_out" for f in e["stack"])]
    assert sum(e["blocks"] for e in through) == 5 and sum(e["bytes"] for e in through) == 200, through
    for e in through:
        texts = [f["text"] for f in e["stack"]]
        after = texts[[f["function"] for f in e["stack"]].index("hand_out") + 1 :]
        assert after and after[0] == "[uretprobe trampoline: caller hidden by another tracer]", texts
        assert e["truncated"] and "[no mapping]" not in " ".join(texts), texts
    assert by_site(mem).get("hand_out") == (200, 5)
