"""Notes from deep inside a run (a cache ignored, a debug file refused, a file over a parser's
bound) for the report: said once each, collected by the session into every report's notes."""

from __future__ import annotations

import threading
from typing import Dict, List

_said: List[str] = []
_counts: Dict[str, int] = {}  # a note said once with how often it happened
_lock = threading.Lock()


def note(text: str) -> None:
    with _lock:
        if text not in _said:
            _said.append(text)


def count(text: str, n: int = 1) -> None:
    """A note that may happen many times (a file read at every report): said once, as
    "TEXT (N times)"."""
    with _lock:
        _counts[text] = _counts.get(text, 0) + n


def all_notes() -> List[str]:
    """Every note said so far in this process, in order (counted ones last)."""
    with _lock:
        return list(_said) + [f"{t} ({n} time{'s' if n > 1 else ''})" for t, n in _counts.items()]


def clear() -> None:
    with _lock:
        _said.clear()
        _counts.clear()
