"""What parsing one file may cost: a hostile file (a traced program's, a downloaded debug
file) is skipped with a note when it goes past these, and every other file is read as usual."""

from __future__ import annotations

import time

FILE_SECONDS = 60.0  # decoding one file's table (libc's CFI: 0.15 s, libLLVM-14's 105 MB: 7 s on a busy VM)
MAX_SECTION = 256 << 20  # bytes of one section read into memory
MAX_NAME_BYTES = 4096  # bytes of one symbol name


class OverBound(Exception):
    """A file went past a bound; the message says which."""


class Deadline:
    def __init__(self, what: str, seconds: float = 0):
        self.what, self.seconds = what, seconds or FILE_SECONDS
        self.end = time.monotonic() + self.seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise OverBound(f"{self.what}: over {self.seconds:g} s to decode")


def section_data(section, what: str) -> bytes:
    """A section's bytes, refused when it claims more than MAX_SECTION."""
    size = section["sh_size"]
    if size > MAX_SECTION:
        raise OverBound(f"{what}: {size} bytes, over {MAX_SECTION >> 20} MB")
    return section.data()
