"""How a string from an untrusted party (the traced program, a file it maps, a server) is shown.

One rule per kind of output, applied once where a report is rendered:
- for a person (text, notes, errors): control characters, invisible format characters
  (bidi overrides) and undecodable bytes shown as escapes (`\\x1b`, `\\u202e`), the way
  strace does, a backslash itself as `\\\\` (so a name holding the four characters `\\x1b`
  never reads like one holding ESC), and the length capped with a mark;
- XML/HTML (SVG): the same, then `<`, `>`, `&` and quotes as entities (XML 1.0 cannot hold
  most control characters even as character references);
- folded stacks: the same, and `;` (the frame separator) shown as `:`;
- JSON keeps the exact string (json.dumps escapes it); pprof encodes it as UTF-8, with
  undecodable bytes replaced (protobuf strings must be valid UTF-8).
Undecodable bytes reach here as surrogates (decoding with errors="surrogateescape").
"""

from __future__ import annotations

import unicodedata
from html import escape as _html

MAX_NAME = 512  # characters of one name shown; longer ones end with MARK
MAX_MESSAGE = 4096  # characters of one message (an error, a note)
MARK = "...[cut]"


def _char(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte (surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if o < 0x20 or o == 0x7F:
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{o:02x}")
    if c == "\\":
        return "\\\\"
    if o >= 0x80 and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
        return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
    return c


def _visible(s: str) -> str:
    if s.isascii() and s.isprintable() and "\\" not in s:  # the common case, fast
        return s
    return "".join(_char(c) for c in s)


def for_terminal(s: str, limit: int = MAX_NAME) -> str:
    """s with every control, format or undecodable character shown as an escape, at most
    limit characters of it (then MARK)."""
    s = str(s)
    cut = len(s) > limit
    shown = _visible(s[:limit] if cut else s)
    return shown + MARK if cut else shown


def message(s: str) -> str:
    """A message for a person that may quote untrusted names: line breaks kept (a located
    recipe error spans lines), every line escaped."""
    return "\n".join(for_terminal(line, MAX_MESSAGE) for line in str(s).split("\n"))


def for_xml(s: str, limit: int = MAX_NAME) -> str:
    """For XML/HTML text and attribute values."""
    return _html(for_terminal(s, limit), quote=True)


def for_folded(s: str, limit: int = MAX_NAME) -> str:
    """A frame name in a folded-stack line: no newline or `;` can split it."""
    return for_terminal(s, limit).replace(";", ":")


def for_utf8(s: str) -> bytes:
    """The exact name as valid UTF-8 (undecodable bytes as U+FFFD): pprof's strings."""
    try:
        raw = str(s).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoding made
        raw = str(s).encode("utf-8", "replace")
    return raw.decode("utf-8", "replace").encode("utf-8")
