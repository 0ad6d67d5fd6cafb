"""Threads probedsl starts: named, joined with a bound, and never ending the run with a traceback.

An exception in one of them becomes one line in `failures()`, which the session puts in the
report's notes (the report is then marked incomplete); the measurement is untouched. Threads
started by libraries go through the same hook (threading.excepthook).
"""

from __future__ import annotations

import gc
import sys
import threading
from typing import Callable, Dict, List, Tuple

_lock = threading.Lock()
_failures: Dict[str, Tuple[int, List[str]]] = {}  # thread name -> (failures, the first few as lines)
_KEPT = 3


def failed(where: str, exc: BaseException) -> None:
    """Record an exception caught in a thread (or a callback it runs) as one line."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    with _lock:
        count, lines = _failures.get(where, (0, []))
        _failures[where] = (count + 1, lines if len(lines) >= _KEPT else lines + [line])


def failures() -> List[str]:
    """One line per thread that failed: how often, and the first failures."""
    with _lock:
        out = []
        for where, (count, lines) in _failures.items():
            shown = "; ".join(dict.fromkeys(lines))
            out.append(f"{where} failed {count} time{'s' if count != 1 else ''}: {shown}")
        return out


def reset() -> None:
    """A run's start: no failures yet, and the interpreter set for a run's threads."""
    with _lock:
        _failures.clear()
    # the main thread's many short calls into the kernel (ctypes lets the GIL go at each) take it
    # back only when a thread decoding tables in Python gives it up: at the switch interval, 5 ms
    # by default. Attaching memleak's 17 uprobes for python3 took 0.25 s so, 0.03 s at 0.5 ms.
    sys.setswitchinterval(0.0005)
    # the collector passes over every live object each 700 allocations by default: what was
    # imported is kept out of its passes (freeze), and a run's decoding (python3's call-frame
    # rows: 65,000 tuples, kept) passed over less often; 0.07 s of a start. Process-wide, for
    # the process a run is.
    gc.freeze()
    gc.set_threshold(50_000)


def _hook(args) -> None:
    if args.exc_type is SystemExit:
        return
    failed(args.thread.name if args.thread else "a thread", args.exc_value or args.exc_type())


threading.excepthook = _hook


def start(name: str, target: Callable[[], None]) -> threading.Thread:
    """A daemon thread named `name` whose exception is recorded, not printed."""

    def run():
        try:
            target()
        except Exception as exc:  # anything: the run goes on and says so
            failed(name, exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def join(thread: threading.Thread, bound_s: float, harmless: bool = False) -> bool:
    """Join with a bound; False if the thread did not end in time: a failure (recorded),
    or, harmless, work whose result nothing will use any more (the thread ends with the process)."""
    thread.join(bound_s)
    if thread.is_alive():
        if not harmless:
            failed(thread.name, TimeoutError(f"did not end within {bound_s:.0f} s"))
        return False
    return True
