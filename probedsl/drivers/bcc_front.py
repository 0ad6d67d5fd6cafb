"""A resource's front (bcc.c.j2): the array its live entries go to before the hash, read through
the array's mapping. Reading its slots by system calls took one call per slot (65,536) or a
batch the size of the array; through the mapping, the states are one slice and only the live
slots are copied."""

from __future__ import annotations

import ctypes
import mmap
from typing import Iterator, List, Tuple

LIVE = 2  # a slot's state: 0 free, 1 being written, 2 live


class Front:
    def __init__(self, table):
        self.leaf = table.Leaf
        self.size = ctypes.sizeof(self.leaf)  # (8-aligned: the state is a u64)
        self.slots = table.max_entries
        length = -(-self.slots * self.size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.map = mmap.mmap(table.map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self.map).cast("Q")

    def _live_slots(self) -> List[int]:
        step = self.size // 8
        states = self.words[0 : self.slots * step : step].tolist()
        return [i for i, state in enumerate(states) if state == LIVE]

    def items(self) -> Iterator[Tuple[int, object]]:
        """(slot, entry) of each live slot: entry.k and entry.v, copied (a program may reuse
        the slot meanwhile: one copied while it was written again is left out)."""
        for i in self._live_slots():
            entry = self.leaf.from_buffer_copy(self.map, i * self.size)
            if entry.state == LIVE and self.words[i * self.size // 8] == LIVE:
                yield i, entry

    def free(self, slot: int, entry) -> bool:
        """The slot given up, if it still holds entry as read (an aligned 8-byte store: a
        program sees it whole)."""
        if bytes(self.leaf.from_buffer_copy(self.map, slot * self.size)) != bytes(entry):
            return False
        self.words[slot * self.size // 8] = 0
        return True

    def close(self) -> None:
        self.words.release()
        self.map.close()
