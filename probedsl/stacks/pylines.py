"""CPython 3.11+ location tables (co_linetable): the line of an instruction, decoded as
CPython's Objects/locations.md specifies."""

from __future__ import annotations

from typing import Tuple


def _varint(table: bytes, i: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        b = table[i]
        i += 1
        value |= (b & 63) << shift
        shift += 6
        if not b & 64:
            return value, i


def line_of(table: bytes, firstlineno: int, units: int) -> int:
    """The line of the instruction at code unit `units`, from a 3.11+ location table
    (CPython's Objects/locations.md); a frame not started yet (-1) is at its first line;
    0: no location."""
    if units < 0:
        return firstlineno
    line, at, i = firstlineno, 0, 0
    try:
        while i < len(table):
            head = table[i]
            i += 1
            code, length = (head >> 3) & 15, (head & 7) + 1
            this = line
            if code == 15:  # no location
                this = None
            elif code == 14:  # long form: line delta, end line, columns
                delta, i = _varint(table, i)
                line += -(delta >> 1) if delta & 1 else delta >> 1
                this = line
                for _ in range(3):
                    _, i = _varint(table, i)
            elif code == 13:  # no columns
                delta, i = _varint(table, i)
                line += -(delta >> 1) if delta & 1 else delta >> 1
                this = line
            elif code >= 10:  # one-line form: line delta in the code
                line += code - 10
                this = line
                i += 2
            else:  # short form: same line, one column byte
                i += 1
            if at <= units < at + length:
                return this or 0
            at += length
    except IndexError:
        return 0
    return 0
