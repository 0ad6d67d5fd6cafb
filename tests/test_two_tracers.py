"""Two tracers on one process: while one holds a uretprobe on a function, the other's stacks
through that function reach the kernel's return trampoline: the unwinder (dwarf) names it; a
frame-pointer walk is then the kernel's, which puts back the return address it replaced. Both
BCC runs."""

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


def through_hand_out(tmp_path, build, *stacks) -> list:
    """memleak's entries whose stacks pass hand_out while another run holds a uretprobe on it."""
    exe = build("handout")
    recipe = tmp_path / "handout.probe"
    recipe.write_text(RECIPE % exe)
    target = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    first = second = None
    try:
        # the first holds a uretprobe on hand_out; the second, started once the first traces,
        # walks malloc's callers through hand_out, whose return address is the trampoline
        first = start_run(str(recipe), "--backend", "bcc", "--format", "json", "--pid", str(target.pid))
        second = start_run(
            MEMLEAK, "--backend", "bcc", *stacks, "--format", "json", "--top", "50", "--pid", str(target.pid)
        )
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
    assert by_site(mem).get("hand_out") == (200, 5)
    return through


def callers_of_hand_out(entry: dict) -> list:
    texts = [f["text"] for f in entry["stack"]]
    return texts[[f["function"] for f in entry["stack"]].index("hand_out") + 1 :]


def test_a_stack_through_another_tracers_uretprobe_names_the_trampoline(tmp_path, build):
    for e in through_hand_out(tmp_path, build):  # dwarf stacks, BCC's default
        after = callers_of_hand_out(e)
        assert after and after[0] == "[uretprobe trampoline: caller hidden by another tracer]", e["stack"]
        assert e["truncated"] and "[no mapping]" not in " ".join(f["text"] for f in e["stack"]), e["stack"]


def test_a_frame_pointer_walk_takes_the_return_address_another_tracers_uretprobe_replaced(tmp_path, build):
    """The program's own walk leaves such a stack to the kernel's, which reads the address from
    its record of pending uretprobes: main follows hand_out, with its line."""
    for e in through_hand_out(tmp_path, build, "--stacks", "fp"):
        after = callers_of_hand_out(e)
        assert after and after[0].startswith("main+") and "handout.c:" in after[0], e["stack"]
        assert "trampoline" not in " ".join(after), e["stack"]
