"""Raw stack addresses -> frames (function+offset, module), for user and kernel stacks."""
from __future__ import annotations

import bisect
import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import elf
from .mappings import MappingTracker, find


@dataclass(frozen=True)
class Frame:
    address: int
    function: str          # "" when unknown
    offset: int
    module: str            # file path, "[kernel]", or "" when the address is in no known mapping

    def __str__(self) -> str:
        module = self.module if self.module.startswith("[") else f"[{os.path.basename(self.module)}]"
        if self.function:
            return f"{self.function}+{self.offset} {module}"
        if self.module:
            return f"{self.address:#x} [no symbols: {module.strip('[]')}]"
        return f"{self.address:#x} [no mapping]"

    def as_dict(self) -> dict:
        return {"address": f"{self.address:#x}", "function": self.function or None,
                "offset": self.offset, "module": self.module or None, "text": str(self)}


@functools.lru_cache(maxsize=1)
def _kallsyms() -> Tuple[List[int], List[str]]:
    addrs, names = [], []
    try:
        with open("/proc/kallsyms") as f:
            for line in f:
                a, kind, name = line.split()[:3]
                if kind in "tTwW" and int(a, 16):
                    addrs.append(int(a, 16))
                    names.append(name)
    except OSError:
        pass
    order = sorted(range(len(addrs)), key=addrs.__getitem__)
    return [addrs[i] for i in order], [names[i] for i in order]


class Symbolizer:
    def __init__(self, tracker: Optional[MappingTracker]):
        self.tracker = tracker
        self._cache: Dict[Tuple[int, int], Frame] = {}

    def user_stack(self, pid: int, addresses: Sequence[int]) -> List[Frame]:
        mappings = self.tracker.mappings(pid) if self.tracker else []
        frames = []
        for depth, address in enumerate(addresses):
            key = (pid, address)
            frame = self._cache.get(key)
            if frame is None:
                # return addresses point after the call; look up the call itself
                frame = self._user_frame(mappings, address, address - 1 if depth else address)
                self._cache[key] = frame
            frames.append(frame)
        return frames

    def _user_frame(self, mappings, address: int, lookup: int) -> Frame:
        m = find(mappings, lookup)
        if m is None:
            return Frame(address, "", 0, "")
        syms = elf.symbols(m.path)
        if syms is None:
            return Frame(address, "", 0, m.path)
        vaddr = syms.file_offset_to_vaddr(lookup - m.start + m.offset)
        hit = syms.function_at(vaddr)
        if hit is None:
            return Frame(address, "", 0, m.path)
        name, offset = hit
        return Frame(address, name, offset + (address - lookup), m.path)

    def kernel_stack(self, addresses: Sequence[int]) -> List[Frame]:
        addrs, names = _kallsyms()
        frames = []
        for address in addresses:
            i = bisect.bisect_right(addrs, address) - 1
            if i >= 0:
                frames.append(Frame(address, names[i], address - addrs[i], "[kernel]"))
            else:
                frames.append(Frame(address, "", 0, "[kernel]"))
        return frames
