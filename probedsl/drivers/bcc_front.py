"""A resource's front (bcc.c.j2): the array its live entries go to before the hash, read through
the array's mapping. Read by system calls, its places took one call each (65,536) or a batch
the size of the array; through the mapping, their words are one slice and only the live places
are copied."""

from __future__ import annotations

import ctypes
import mmap
from typing import Iterator, List, Tuple

LIVE = 2  # a place's phase, the low 2 bits of its word: 0 free, 1 held by a program, 2 live
COUNT = 4  # the count above the phase: a claim raises it


class Front:
    def __init__(self, table):
        self.leaf = table.Leaf
        self.size = ctypes.sizeof(self.leaf)  # (8-aligned: the word is a u64)
        self.slots = table.max_entries
        length = -(-self.slots * self.size // mmap.PAGESIZE) * mmap.PAGESIZE
        self.map = mmap.mmap(table.map_fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self.map).cast("Q")
        self.step = self.size // 8

    def _live_places(self) -> List[int]:
        words = self.words[0 : self.slots * self.step : self.step].tolist()
        return [i for i, word in enumerate(words) if word & 3 == LIVE]

    def items(self) -> Iterator[Tuple[int, object]]:
        """(place, entry) of each live place: entry.k and entry.v, copied whole (its word the
        same before and after the copy: no program changed it meanwhile; else left out)."""
        for i in self._live_places():
            word = self.words[i * self.step]
            entry = self.leaf.from_buffer_copy(self.map, i * self.size)
            if word & 3 == LIVE and entry.word == word == self.words[i * self.step]:
                yield i, entry

    def free(self, place: int, entry) -> bool:
        """The place freed if it still holds entry as read. (Not atomic: a program that claims
        it between the check and the store loses what it wrote there, as a hash entry looked up
        again before its delete can; the sweep frees only the entries of ended images.)"""
        word = self.words[place * self.step]
        if word != entry.word or bytes(self.leaf.from_buffer_copy(self.map, place * self.size)) != bytes(entry):
            return False
        self.words[place * self.step] = (word & ~3) + COUNT
        return True

    def close(self) -> None:
        self.words.release()
        self.map.close()
