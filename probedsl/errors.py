"""Diagnostics: located recipe errors rendered as `file:line:col: message` plus a caret."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence


@dataclass(frozen=True)
class Span:
    """Where in a recipe: 1-based line and column (0, 0: nowhere)."""

    line: int
    column: int
    end_line: int = 0
    end_column: int = 0


NO_SPAN = Span(0, 0)


@dataclass(frozen=True)
class Diagnostic:
    filename: str
    span: Span
    message: str

    def render(self, source: str) -> str:
        head = f"{self.filename}:{self.span.line}:{self.span.column}: error: {self.message}"
        lines = source.splitlines()
        if not (1 <= self.span.line <= len(lines)):
            return head
        text = lines[self.span.line - 1].replace("\t", " ")
        width = 1
        if self.span.end_line == self.span.line and self.span.end_column > self.span.column:
            width = self.span.end_column - self.span.column
        return f"{head}\n  {text}\n  {' ' * (self.span.column - 1)}{'^' * width}"


class ProbedslError(Exception):
    """An error the user can act on; the CLI prints it as one line, without a traceback."""


def one_line(exc: BaseException) -> str:
    """exc in one line for a note: its first line; the type's name unless it is the user's."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(exc, ProbedslError) and first:
        return first
    return f"{type(exc).__name__}: {first}".rstrip(": ")


class RecipeError(ProbedslError):
    """One or more located problems in a recipe."""

    def __init__(self, diagnostics: Sequence[Diagnostic], source: str):
        self.diagnostics: List[Diagnostic] = sorted(diagnostics, key=lambda d: (d.span.line, d.span.column))
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(d.render(self.source) for d in self.diagnostics)
