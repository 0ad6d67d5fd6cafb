"""BCC keeps live entries in an array (the front, probedsl/ir/layout.py has_front) and the rest
in a hash: the totals are exact whichever holds an entry, and a release finds it in either."""

from __future__ import annotations

import pytest

from conftest import probedsl, report_json

pytestmark = pytest.mark.usefixtures("root_required")

N = 150_000  # more than the front's 65,536 places: most of the first half goes past it


@pytest.mark.debian13
@pytest.mark.parametrize("stacks,ages", [("fp", False), ("dwarf", False), ("fp", True)])
def test_entries_in_the_front_and_past_it_are_counted_and_released_exactly(stacks, ages, build):
    """With --ages the report reads every live entry too (the front through its mapping): the
    oldest group's age is then shown."""
    result = probedsl(
        "run",
        "memleak",
        "--backend",
        "bcc",
        "--stacks",
        stacks,
        "--format",
        "json",
        "--top",
        "100",
        *(["--ages"] if ages else []),
        "--",
        build("front_churn"),
        str(N),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = report_json(result.stdout)
    heap = report["resources"]["heap"]
    kept = range(1, N, 2)  # the odd i: malloc(1 + i % 64)
    calloc_block = N * 8
    assert heap["untracked"] == 0 and heap["unknown_releases"] == 0, heap
    assert heap["live_blocks"] == len(kept) + 1, heap
    assert heap["live_bytes"] == sum(1 + i % 64 for i in kept) + calloc_block, heap
    assert heap["released"] >= N // 2 + 2 * N, heap
    if ages:  # every live entry read, the front's and the hash's: each of keep()'s keys is shown
        (group,) = [
            e
            for r in report["reports"]
            if r["kind"] == "outstanding"
            for e in r["entries"]
            if e["stack"] and e["stack"][0]["function"] == "keep"
        ]
        assert len(group["keys"]) == group["blocks"] == len(kept), group["blocks"]
