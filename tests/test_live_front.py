"""BCC keeps live entries in an array (the front, probedsl/ir/layout.py has_front) and the rest
in a hash: the totals are exact whichever holds an entry, and a release finds it in either."""

from __future__ import annotations

import pytest

from conftest import probedsl, report_json

pytestmark = pytest.mark.usefixtures("root_required")

N = 150_000  # more than the front's 65,536 places: most of the first half goes past it


@pytest.mark.parametrize("stacks", ["fp", "dwarf"])
def test_entries_in_the_front_and_past_it_are_counted_and_released_exactly(stacks, build):
    result = probedsl(
        "run",
        "memleak",
        "--backend",
        "bcc",
        "--stacks",
        stacks,
        "--format",
        "json",
        "--",
        build("front_churn"),
        str(N),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    heap = report_json(result.stdout)["resources"]["heap"]
    kept = range(1, N, 2)  # the odd i: malloc(1 + i % 64)
    calloc_block = N * 8
    assert heap["untracked"] == 0 and heap["unknown_releases"] == 0, heap
    assert heap["live_blocks"] == len(kept) + 1, heap
    assert heap["live_bytes"] == sum(1 + i % 64 for i in kept) + calloc_block, heap
    assert heap["released"] >= N // 2 + 2 * N, heap
