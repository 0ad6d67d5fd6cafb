"""What both generators share: expression lowering helpers and the templates' environment."""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Dict, Optional

import jinja2

from probedsl import ir
from probedsl.errors import Span
from probedsl.errors import ProbedslError
from probedsl.targets.base import Generated


class Backend:
    """Shared expression lowering: subclasses fill RENDER for each IR value type."""

    name = ""
    template = ""
    RENDER: Dict[type, Callable] = {}

    def __init__(self, target):
        self.target = target  # a probedsl.targets.Target: the version's flags and limits
        self.env = _environment()

    def expr(self, value: ir.Value) -> str:
        render = self.RENDER.get(type(value))
        if render is None:
            raise ProbedslError(f"{self.name} cannot express {type(value).__name__}")
        return render(self, value)

    def binop(self, value: ir.BinOp) -> str:
        if value.op in ("==", "!=", "<", "<=", ">", ">="):
            return f"({self.signed(self.expr(value.left))} {value.op} {self.signed(self.expr(value.right))})"
        return f"({self.expr(value.left)} {value.op} {self.expr(value.right)})"

    def signed(self, text: str) -> str:
        raise NotImplementedError

    def placed(self, probe, path: str, why_not: str = "") -> str:
        """Where the probe sits, for the generated comment ("" at the entry when that is the
        place); why_not: why it stays at the entry although placement chose another place."""
        offset, instruction = probe.place_in(path)
        if not offset:
            return ""
        where = f"{probe.function}+{offset}: {instruction}"
        if why_not:
            return self.comment(f"at the entry, not {where}: {why_not}")
        return self.comment(f"at {where} (emulated; the entry's instruction would be single-stepped)")

    def comment(self, text: str) -> str:
        """Recipe text in a generated comment: one line, no comment terminator, no control
        character (bpftrace's lexer stops at a NUL even inside a comment)."""
        printable = "".join(c if c.isprintable() else " " for c in text)
        return " ".join(printable.split()).replace("*/", "* /")

    def render_template(self, **view) -> Generated:
        text = self.env.get_template(self.template).render(**view)
        line_map = {}
        for n, line in enumerate(text.splitlines(), 1):
            marker = "recipe-line "
            if marker in line:
                tail = line.split(marker, 1)[1].split()[0].rstrip(")")
                l, _, c = tail.partition(":")
                line_map[n] = Span(int(l), int(c or 1))
        return Generated(text, line_map)


# how the templates are compiled: also part of the name a compiled template is kept under
_OPTIONS = dict(undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_kept: Optional["_KeptBytecode"] = None


class _KeptBytecode(jinja2.BytecodeCache):
    """The templates compiled to Python code, kept between runs (bcc.c.j2 took 0.037 s to compile
    at every start). A generator reads no file itself: kept, the caller's, loads and keeps them
    (probedsl.cli: a trusted cache directory; the bytes are a pickled checksum and marshalled
    code). Named by jinja's version and the options too: jinja's own check is the template's
    text and Python's version only."""

    def __init__(self, kept):
        self.kept = kept
        self.ident = hashlib.sha256(f"{jinja2.__version__}\0{sorted(map(str, _OPTIONS.items()))}".encode()).hexdigest()

    def _name(self, bucket) -> str:
        return f"{bucket.key}-{self.ident[:16]}.jinja"

    def load_bytecode(self, bucket) -> None:
        data = self.kept.load(self._name(bucket))
        if data:
            try:
                bucket.bytecode_from_string(data)  # (a version or checksum that differs: no code)
            except Exception:  # a damaged file (cut short): compiled again, and written anew
                bucket.reset()

    def dump_bytecode(self, bucket) -> None:
        self.kept.keep(self._name(bucket), bucket.bytecode_to_string())


def keep_templates_in(kept) -> None:
    """Keep the compiled templates in kept from now on (probedsl.language.parser.KeptFiles:
    load(name), keep(name, bytes))."""
    global _kept
    _kept = _KeptBytecode(kept)
    _environment.cache_clear()


def compile_templates() -> None:
    """Compile every template now (kept where keep_templates_in said)."""
    env = _environment()
    for name in env.list_templates():
        env.get_template(name)


def keep_no_templates() -> None:
    global _kept
    _kept = None
    _environment.cache_clear()


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("probedsl.backends", "templates"), bytecode_cache=_kept, **_OPTIONS
    )
