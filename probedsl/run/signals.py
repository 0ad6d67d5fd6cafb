"""The signals that end a run with its report (SIGINT, SIGTERM, SIGHUP): caught while tracing,
the previous handlers restored at the very end."""

from __future__ import annotations

import contextlib
import os
import signal

ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop:
    """Set by SIGINT/SIGTERM/SIGHUP; the run then ends with a final report. The handler only
    stores the signal: it runs in the main thread, and an Event.set() there deadlocked when the
    signal came while the main thread held that Event's lock inside Event.wait() (seen: a
    tracer hung at Ctrl-C)."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        self.signal = signum


def catch(handler, handlers: dict) -> None:
    """Route the ending signals to handler, keeping the previous handlers in handlers."""
    for s in ENDING:
        if s != signal.SIGHUP or signal.getsignal(s) is not signal.SIG_IGN:  # under nohup: ignored
            handlers[s] = signal.signal(s, handler)


def finishing(signum, frame) -> None:
    """Once the final report is being written: a second Ctrl-C would cost it, so say so instead."""
    # os.write: a print here could re-enter the stream the main thread is writing; a closed
    # terminal must not raise into the report being written
    with contextlib.suppress(OSError):
        os.write(2, b"probedsl: writing the final report; it follows (SIGKILL ends without it)\n")


def restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
