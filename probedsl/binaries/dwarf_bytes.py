"""DWARF's encodings of numbers in a section's bytes: LEB128, and .eh_frame's DW_EH_PE pointers."""

from __future__ import annotations

import struct

_POINTERS = {0x00: "<Q", 0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q"}  # DW_EH_PE_*


class Reader:
    """Bytes read in order from pos: data is a section's, loaded at base (ELF view)."""

    def __init__(self, data: bytes, base: int):
        self.data, self.base, self.pos = data, base, 0

    def u8(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def fixed(self, fmt: str) -> int:
        v, self.pos = struct.unpack_from(fmt, self.data, self.pos)[0], self.pos + struct.calcsize(fmt)
        return v

    def uleb(self) -> int:
        b = self.data[self.pos]
        if b < 0x80:  # (one byte: most of them)
            self.pos += 1
            return b
        return self._leb(signed=False)

    def sleb(self) -> int:
        return self._leb(signed=True)

    def _leb(self, signed: bool) -> int:
        """A LEB128 number: 7 bits a byte, low first; signed ones extend the last byte's 0x40.
        At most 10 bytes (64 bits): a longer run would build an ever larger integer."""
        result = shift = 0
        while True:
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise ValueError("LEB128 number over 64 bits")
            if b < 0x80:
                return result - (1 << shift) if signed and b & 0x40 else result

    def skip_block(self) -> None:
        """A ULEB128 length, then that many bytes."""
        length = self.uleb()
        self.pos += length

    def cstring(self) -> bytes:
        end = self.data.index(b"\0", self.pos)
        s, self.pos = self.data[self.pos : end], end + 1
        return s

    def pointer(self, encoding: int) -> int:
        """A DW_EH_PE-encoded pointer; pc-relative ones are resolved against the section's address."""
        if encoding == 0xFF:
            return 0
        at = self.base + self.pos
        fmt = encoding & 0x0F
        value = self.uleb() if fmt == 0x01 else self.sleb() if fmt == 0x09 else self.fixed(_POINTERS[fmt])
        if encoding & 0x70 == 0x10:
            value += at
        return value & 0xFFFFFFFFFFFFFFFF
