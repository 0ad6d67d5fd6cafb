"""Notes from deep inside a run (a cache ignored, a debug file refused, a file over a parser's
bound) for the report: said once each, collected by the session into every report's notes."""
from __future__ import annotations

import threading
from typing import List

_said: List[str] = []
_lock = threading.Lock()


def note(text: str) -> None:
    with _lock:
        if text not in _said:
            _said.append(text)


def all_notes() -> List[str]:
    """Every note said so far in this process, in order."""
    with _lock:
        return list(_said)


def clear() -> None:
    with _lock:
        _said.clear()
