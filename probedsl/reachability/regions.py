"""A paused process's memory as the scan sees it: its mappings read once, bounded, as regions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


from probedsl.process import procfs


@dataclass
class Region:
    start: int
    end: int
    perms: str
    offset: int
    path: str


def read_maps(pid: int) -> Tuple[List[Region], bool]:
    """(the process's mappings, whether /proc's text was cut: procfs's bounds)."""
    regions = []
    lines, cut = procfs.read_lines(f"/proc/{pid}/maps")
    for line in lines:
        parts = line.split(None, 5)
        try:
            lo, hi = parts[0].split("-")
            regions.append(
                Region(
                    int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16), parts[5].strip() if len(parts) > 5 else ""
                )
            )
        except (ValueError, IndexError):
            continue
    return regions, cut
