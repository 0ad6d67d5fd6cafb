"""Generators: lowering from the IR to backend text (a bpftrace script; BCC's C and its Python
loader), one small class per backend over shared helpers (base). A generator reads no file and
runs no pass: everything it needs is in the program. Which one a run uses, configured for which
version, is its target's choice (probedsl.targets)."""

from __future__ import annotations

from probedsl.targets.base import Target

from .base import Backend, compile_templates, keep_templates_in
from .bcc import BccBackend
from .bpftrace import BpftraceBackend

_BY_BACKEND = {"bcc": BccBackend, "bpftrace": BpftraceBackend}


__all__ = ["Backend", "compile_templates", "for_target", "keep_templates_in"]


def for_target(target: Target) -> Backend:
    """The generator for this target, configured by its version's flags."""
    return _BY_BACKEND[target.backend](target)
