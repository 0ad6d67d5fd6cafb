"""Where tracefs is: /sys/kernel/tracing, or under debugfs where only that is mounted."""

from __future__ import annotations

import os
from typing import Tuple

ROOTS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def files(name: str) -> Tuple[str, ...]:
    """name in each place tracefs may be, in the order to look."""
    return tuple(os.path.join(root, name) for root in ROOTS)
