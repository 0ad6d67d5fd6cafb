"""Driver decoding without root: the text each tracer version prints -> addresses and tallies."""
from __future__ import annotations

from probedsl.drivers.bpftrace import parse_stack


def test_stacks_as_each_bpftrace_version_prints_them():
    frames = (0x7F6A37500CB0, 0x55D0C1A3B1C7)
    printed = {
        "0.17 value": "\n\t7f6a37500cb0 0x7f6a37500cb0 ([unknown])\n\t55d0c1a3b1c7 0x55d0c1a3b1c7 ([unknown])\n",
        # 0.23 escapes a stack that is a map key once more: a literal backslash-n
        "0.23 key": "\\n\\t7f6a37500cb0 0x7f6a37500cb0 ([unknown])\\n\\t55d0c1a3b1c7 0x55d0c1a3b1c7 ([unknown])\\n",
        # 0.27 also removes every space from it
        "0.27 key": "\n\t7f6a37500cb00x7f6a37500cb0([unknown])\n\t55d0c1a3b1c70x55d0c1a3b1c7([unknown])\n",
    }
    for version, text in printed.items():
        assert parse_stack(text) == frames, version


def test_kernel_frames_keep_their_addresses():
    assert parse_stack("\n\tffffffff8123a0c0 kmem_cache_alloc+12 ([kernel.kallsyms])\n") == (0xFFFFFFFF8123A0C0,)
