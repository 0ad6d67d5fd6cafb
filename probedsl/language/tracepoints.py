"""Kernel tracepoint fields, read from tracefs (mounted by scripts/setup.sh if missing)."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Optional, Tuple

TRACEFS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
_FIELD = re.compile(r"^\s*field:.*?([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?;\s*offset:", re.M)


ANY = ("*",)  # tracefs is not readable here (not root): fields cannot be checked


@functools.lru_cache(maxsize=None)
def fields(category: str, event: str) -> Optional[Tuple[str, ...]]:
    """Field names of category:event (without the common_ ones), None if it does not exist,
    ANY when this user cannot read tracefs (`probedsl check` runs unprivileged)."""
    if not (re.fullmatch(r"\w+", category) and re.fullmatch(r"\w+", event)):
        return None
    for root in TRACEFS:
        fmt = root / "events" / category / event / "format"
        try:
            text = fmt.read_text()
        except PermissionError:
            return ANY
        except OSError:
            if root.exists() and not os.access(root, os.R_OK | os.X_OK):
                return ANY
            continue
        return tuple(m.group(1) for m in _FIELD.finditer(text) if not m.group(1).startswith("common_"))
    return None
