"""A rendered report written where the user asked: -o FILE replaced whole (never half), a device or FIFO written in place, else standard output."""

from __future__ import annotations

import contextlib
import os
from typing import Optional


def write_report(text, output: Optional[str], out) -> None:
    """A rendered report (str, or bytes: pprof) to the output file (through a symlink: its
    target), else to `out`. A regular file is replaced whole; a device or a pipe is written
    as it is (a pipe with no reader is an error, not a wait)."""
    real = os.path.realpath(output) if output else ""
    if output and os.path.exists(real) and not os.path.isfile(real):
        data = text if isinstance(text, bytes) else text.encode()
        fd = os.open(real, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO: a pipe nobody reads
        with os.fdopen(fd, "wb") as f:
            os.set_blocking(fd, True)
            f.write(data)
    elif output:
        tmp = f"{real}.tmp"
        try:
            with open(tmp, "wb" if isinstance(text, bytes) else "w") as f:
                f.write(text)
            os.replace(tmp, real)  # readers never see half a report
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    elif isinstance(text, bytes):
        out.flush()
        getattr(out, "buffer", out).write(text)
        getattr(out, "buffer", out).flush()
    else:
        out.write(text)
        out.flush()
