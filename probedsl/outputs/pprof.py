"""A report as a pprof profile (profile.proto, gzipped): what go tool pprof, Pyroscope, Parca
and Polar Signals read.

Encoded by hand: the schema is small and stable (six messages of varints and strings), and
a hundred lines spare users the protobuf package and a generated module for one format.
"""

from __future__ import annotations

import gzip
from typing import Dict, List, Tuple

from probedsl.trust.escape import for_utf8
from probedsl.report import Report
from probedsl.stacks.symbolizer import Frame

# a recipe's column -> pprof's (type, unit); others are counts of their own name
SAMPLE_TYPES = {"bytes": ("inuse_space", "bytes"), "blocks": ("inuse_objects", "count")}


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields take two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One field: an int (varint), bytes (length-delimited), or a list of ints (packed)."""
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    if isinstance(value, list):
        value = b"".join(_varint(v) for v in value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _message(*fields: Tuple[int, object]) -> bytes:
    """Fields in order; zero ints and empty lists are left out, as proto3 does."""
    return b"".join(_field(n, v) for n, v in fields if v not in (0, [], b""))


class _Strings:
    def __init__(self):
        self.table: List[str] = [""]
        self.index: Dict[str, int] = {"": 0}

    def __call__(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.table)
            self.table.append(text)
        return self.index[text]


def to_pprof(report: Report, color: bool = False) -> bytes:
    strings = _Strings()
    sections = [s for s in report.sections if s.kind == "outstanding" and s.columns]
    columns: List[str] = []
    for s in sections:
        columns += [c for c in s.columns if c not in columns]
    types = [SAMPLE_TYPES.get(c, (c, "count")) for c in columns]
    mappings: Dict[str, dict] = {}
    functions: Dict[Tuple[str, str], int] = {}
    locations: Dict[Tuple, int] = {}
    function_msgs, location_msgs, sample_msgs = [], [], []

    def function_id(f: Frame) -> int:
        name = f.name
        key = (name, f.file or "")
        if key not in functions:
            functions[key] = len(functions) + 1
            function_msgs.append(
                _message((1, functions[key]), (2, strings(name)), (3, strings(name)), (4, strings(f.file or "")))
            )
        return functions[key]

    def location_id(group: List[Frame]) -> int:
        """One location per address: its inlined frames, innermost first, then the real one."""
        real = group[-1]
        key = (real.address, real.module, tuple((f.name, f.line) for f in group))
        if key not in locations:
            locations[key] = len(locations) + 1
            mapping = _mapping(mappings, real) if real.module and not real.module.startswith("[") else 0
            lines = [_message((1, function_id(f)), (2, f.line or 0)) for f in group]
            location_msgs.append(
                _message((1, locations[key]), (2, mapping), (3, real.address), *((4, line) for line in lines))
            )
        return locations[key]

    # pprof takes the first mapping for the program: the module of the outermost frames (_start)
    for s in sections:
        for e in s.entries:
            root = next((f for f in reversed(e.stack) if f.module and not f.truncated), None)
            if root is not None and not root.module.startswith("["):
                _mapping(mappings, root)
    for s in sections:
        for e in s.entries:
            ids = [location_id(group) for group in _by_address(e.kernel_stack + e.stack)]  # leaf first
            labels = [_message((1, strings("resource")), (2, strings(s.resource)))]
            if e.pid is not None:
                labels.append(_message((1, strings("pid")), (3, e.pid)))
            if e.comm is not None:
                labels.append(_message((1, strings("comm")), (2, strings(e.comm))))
            sample_msgs.append(
                _message((1, ids), (2, [e.values.get(c, 0) for c in columns]), *((3, label) for label in labels))
            )
    mapping_msgs = [
        _message(
            (1, m["id"]),
            (2, m["start"]),
            (3, m["limit"]),
            (5, strings(path)),
            (6, strings(m["build_id"])),
            (7, 1),
            (8, 1),
            (9, 1),
            (10, 1),
        )
        for path, m in mappings.items()
    ]
    sample_types = [_message((1, strings(t)), (2, strings(u))) for t, u in types]
    comments = [
        strings(
            f"probedsl {report.recipe} on {report.target} ({report.backend} {report.backend_version})".replace(
                " )", ")"
            )
        )
    ]
    body = _message(
        *((1, t) for t in sample_types),
        *((2, m) for m in sample_msgs),
        *((3, m) for m in mapping_msgs),
        *((4, m) for m in location_msgs),
        *((5, m) for m in function_msgs),
        (10, int(report.duration_s * 1e9)),
        (13, comments),
    )
    # every string, "" first as profile.proto requires (written even though empty)
    body += b"".join(_field(6, for_utf8(text)) for text in strings.table)
    return gzip.compress(body, mtime=0)


def _by_address(frames: List[Frame]) -> List[List[Frame]]:
    """Frames grouped per address: inlined ones go with the real frame after them."""
    groups, pending = [], []
    for f in frames:
        pending.append(f)
        if not f.inlined:
            groups.append(pending)
            pending = []
    if pending:
        groups.append(pending)
    return groups


def _mapping(mappings: Dict[Tuple[str, str], dict], f: Frame) -> int:
    # one mapping per file and build: hosts merged may run other builds at one path
    m = mappings.get((f.module, f.build_id))
    if m is None:
        m = mappings[(f.module, f.build_id)] = {
            "id": len(mappings) + 1,
            "start": f.address,
            "limit": f.address + 1,
            "build_id": f.build_id,
        }
    m["start"], m["limit"] = min(m["start"], f.address), max(m["limit"], f.address + 1)
    return m["id"]
