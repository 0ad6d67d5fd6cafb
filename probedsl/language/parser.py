"""Recipe text -> AST, with every syntax error turned into a located Diagnostic."""

from __future__ import annotations

import functools
import hashlib
import io
import sys
from importlib import resources
from typing import Any, List, Optional, Protocol, Union

import lark
from lark import (
    Lark,
    Token,
    Transformer,
    Tree,
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    v_args,
)
from lark.tree import Meta

from probedsl.language import ast
from probedsl.errors import Diagnostic, RecipeError, Span

# Friendlier words for terminals in "expected ..." messages.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "a number",
    "STRING": "a string",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "COLON": "':'",
    "COMMA": "','",
    "EQUAL": "'='",
    "__ANON_0": "'->'",
    "CMP_OP": "a comparison",
    "SUM_OP": "'+' or '-'",
    "PRODUCT_OP": "'*', '/' or '%'",
}


class KeptFiles(Protocol):
    """Where the caller keeps what a run builds the same every time (probedsl.cli: a trusted
    cache directory, probedsl.trust.cachedir.Kept): load(name) gives a file's bytes when they
    may be loaded (lark's tables are a pickle, which can run code as it loads), else None;
    keep(name, bytes) writes one whole or not at all."""

    def load(self, name: str) -> Optional[bytes]: ...

    def keep(self, name: str, data: bytes) -> bool: ...


_kept: Optional[KeptFiles] = None
_OPTIONS = dict(parser="lalr", propagate_positions=True, maybe_placeholders=True)


def keep_tables_in(kept: Optional[KeptFiles]) -> None:
    """Keep the parser's tables (lark's analysis of the grammar, ~0.045 s of each start to
    build) there from now on; None: build them at every run."""
    global _kept
    _kept = kept
    _parser.cache_clear()


def build_tables() -> None:
    """Build the parser's tables now (kept where keep_tables_in said)."""
    _parser()


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("probedsl.grammar").joinpath("recipe.lark").read_text()
    ident = f"{grammar}\0{sorted(_OPTIONS.items())}\0{lark.__version__}\0{sys.version_info[:2]}"
    name = f"recipe-{hashlib.sha256(ident.encode()).hexdigest()[:24]}.pickle"
    data = _kept.load(name) if _kept else None
    if data:
        try:
            return Lark.load(io.BytesIO(data))
        except Exception:  # a damaged file (lark raises many kinds): built again below
            pass
    parser = Lark(grammar, **_OPTIONS)
    if _kept:
        out = io.BytesIO()
        parser.save(out)
        _kept.keep(name, out.getvalue())
    return parser


def _span(meta_or_token: Union[Meta, Token]) -> Span:
    return Span(
        meta_or_token.line or 0,
        meta_or_token.column or 0,
        getattr(meta_or_token, "end_line", 0) or 0,
        getattr(meta_or_token, "end_column", 0) or 0,
    )


def _name(tok: Token) -> ast.Name:
    return ast.Name(str(tok), _span(tok))


def _unquote(tok: Token) -> str:
    return str(tok)[1:-1]


@v_args(meta=True)
class _ToAst(Transformer[Token, Any]):
    def start(self, meta: Meta, children: List[Any]) -> Any:
        head, *items = children
        name, description = head
        return ast.Recipe(
            name=name,
            description=description,
            params=tuple(i for i in items if isinstance(i, ast.Param)),
            resources=tuple(i for i in items if isinstance(i, ast.Resource)),
            reports=tuple(i for i in items if isinstance(i, ast.Report)),
            span=_span(meta),
        )

    def recipe_decl(self, meta: Meta, children: List[Any]) -> Any:
        name, description = children
        return str(name), _unquote(description) if description else ""

    def param_decl(self, meta: Meta, children: List[Any]) -> Any:
        name, value = children
        return ast.Param(str(name), int(str(value), 0), _span(meta))

    def key_single(self, meta: Meta, children: List[Any]) -> Any:
        return (str(children[0]),)

    def key_tuple(self, meta: Meta, children: List[Any]) -> Any:
        return tuple(str(c) for c in children)

    def resource_decl(self, meta: Meta, children: List[Any]) -> Any:
        name, key_names, *members = children
        return ast.Resource(
            name=str(name),
            key_names=key_names,
            events=tuple(m for m in members if isinstance(m, ast.Event)),
            records=tuple(m for m in members if isinstance(m, ast.Record)),
            span=_span(meta),
        )

    def _event(self, kind: str, meta: Meta, children: List[Any]) -> ast.Event:
        probe, key, *clauses = children
        return ast.Event(
            kind=kind,
            probe=probe,
            key=key,
            guards=tuple(c[1] for c in clauses if c[0] == "when"),
            assigns=tuple(c[1] for c in clauses if c[0] == "set"),
            also_releases=tuple(c[1] for c in clauses if c[0] == "releases"),
            also_acquires=tuple(c[1] for c in clauses if c[0] == "acquires"),
            span=_span(meta),
            through=tuple(c[1] for c in clauses if c[0] == "through"),
            until_exec=tuple(c[1] for c in clauses if c[0] == "until_exec"),
            also_changes=tuple(c[1] for c in clauses if c[0] == "changes"),
        )

    def acquire(self, meta: Meta, children: List[Any]) -> Any:
        return self._event("acquire", meta, children)

    def release(self, meta: Meta, children: List[Any]) -> Any:
        return self._event("release", meta, children)

    def change(self, meta: Meta, children: List[Any]) -> Any:
        return self._event("change", meta, children)

    def record(self, meta: Meta, children: List[Any]) -> Any:
        return ast.Record(tuple(_name(c) for c in children), _span(meta))

    def when_clause(self, meta: Meta, children: List[Any]) -> Any:
        return ("when", children[0])

    def set_clause(self, meta: Meta, children: List[Any]) -> Any:
        target, value = children
        return ("set", ast.Assign(_name(target), value, _span(meta)))

    def releases_clause(self, meta: Meta, children: List[Any]) -> Any:
        key, guard = children
        return ("releases", ast.AlsoRelease(key, guard, _span(meta)))

    def through_clause(self, meta: Meta, children: List[Any]) -> Any:
        return ("through", children[0])

    def until_exec_clause(self, meta: Meta, children: List[Any]) -> Any:
        return ("until_exec", children[0])

    def changes_clause(self, meta: Meta, children: List[Any]) -> Any:
        key, guard, until_exec = children
        return ("changes", ast.AlsoChange(key, guard, until_exec, _span(meta)))

    def acquires_clause(self, meta: Meta, children: List[Any]) -> Any:
        key, guard = children
        return ("acquires", ast.AlsoAcquire(key, guard, _span(meta)))

    def uprobe(self, meta: Meta, children: List[Any]) -> Any:
        library, function, *args = children
        return ast.UProbe(library, str(function), tuple(_name(a) for a in args if a is not None), _span(meta))

    def usdt(self, meta: Meta, children: List[Any]) -> Any:
        provider, name, *args = children
        return ast.Usdt(str(provider), str(name), tuple(_name(a) for a in args if a is not None), _span(meta))

    def tracepoint(self, meta: Meta, children: List[Any]) -> Any:
        category, event = children
        return ast.Tracepoint(str(category), str(event), _span(meta))

    def syscall(self, meta: Meta, children: List[Any]) -> Any:
        return ast.Syscall(str(children[0]), _span(meta))

    def library(self, meta: Meta, children: List[Any]) -> Any:
        tok = children[0]
        return _unquote(tok) if tok.type == "STRING" else str(tok)

    def key_single_expr(self, meta: Meta, children: List[Any]) -> Any:
        return (children[0],)

    def key_tuple_expr(self, meta: Meta, children: List[Any]) -> Any:
        return tuple(children)

    def report_decl(self, meta: Meta, children: List[Any]) -> Any:
        kind, resource, *rest = children
        group_by = []
        while rest and (rest[0] is None or isinstance(rest[0], Token)):
            tok = rest.pop(0)
            if tok is not None:
                group_by.append(_name(tok))
        aggs = tuple(i for i in rest if isinstance(i, ast.Aggregation))
        tops = [i[1] for i in rest if isinstance(i, tuple) and i[0] == "top"]
        ages = [i[1] for i in rest if isinstance(i, tuple) and i[0] == "min_age"]
        return ast.Report(
            str(kind),
            _name(resource),
            tuple(group_by),
            aggs,
            tops[-1] if tops else None,
            ages[-1] if ages else None,
            _span(meta),
        )

    def report_agg(self, meta: Meta, children: List[Any]) -> Any:
        function, argument, label = children
        return ast.Aggregation(
            str(function), _name(argument) if argument else None, str(label) if label else None, _span(meta)
        )

    def report_top(self, meta: Meta, children: List[Any]) -> Any:
        return ("top", children[0])

    def report_min_age(self, meta: Meta, children: List[Any]) -> Any:
        return ("min_age", children[0])

    def int_value(self, meta: Meta, children: List[Any]) -> Any:
        return int(str(children[0]), 0)

    def param_value(self, meta: Meta, children: List[Any]) -> Any:
        return ast.ParamRef(str(children[0]), _span(meta))

    # expressions
    def number(self, meta: Meta, children: List[Any]) -> Any:
        return ast.Number(int(str(children[0]), 0), _span(meta))

    def name(self, meta: Meta, children: List[Any]) -> Any:
        return _name(children[0])

    def index(self, meta: Meta, children: List[Any]) -> Any:
        array, index = children
        return ast.Index(_name(array), int(str(index), 0), _span(meta))

    def int32(self, meta: Meta, children: List[Any]) -> Any:
        return ast.Int32(children[0], _span(meta))

    def sign(self, meta: Meta, children: List[Any]) -> Any:
        op, operand = children
        if str(op) == "+":
            return operand
        if isinstance(operand, ast.Number):
            return ast.Number(-operand.value, _span(meta))
        return ast.BinOp("-", ast.Number(0, _span(meta)), operand, _span(meta))

    def deref(self, meta: Meta, children: List[Any]) -> Any:
        return ast.Deref(children[0], _span(meta))

    def not_op(self, meta: Meta, children: List[Any]) -> Any:
        return ast.Not(children[0], _span(meta))

    def _chain(self, meta: Meta, children: List[Any], op: Optional[str] = None) -> Any:
        result = children[0]
        rest = list(children[1:])
        while rest:
            operator = op or str(rest.pop(0))
            result = ast.BinOp(operator, result, rest.pop(0), _span(meta))
        return result

    def or_op(self, meta: Meta, children: List[Any]) -> Any:
        return self._chain(meta, children, "||")

    def and_op(self, meta: Meta, children: List[Any]) -> Any:
        return self._chain(meta, children, "&&")

    def cmp_op(self, meta: Meta, children: List[Any]) -> Any:
        return self._chain(meta, [c for c in children if c is not None])

    def arith_op(self, meta: Meta, children: List[Any]) -> Any:
        return self._chain(meta, children)


def _expected(exc: UnexpectedInput) -> str:
    names = sorted(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or [])
    words = []
    for n in names:
        word = _TERMINAL_WORDS.get(n)
        if word is None:
            pattern = _parser().get_terminal(n).pattern if n in {t.name for t in _parser().terminals} else None
            word = f"'{pattern.value}'" if pattern is not None and pattern.type == "str" else n.lower()
        if word not in words:
            words.append(word)
    return ", ".join(words[:8]) + (", ..." if len(words) > 8 else "")


def _syntax_diagnostic(exc: UnexpectedInput, filename: str, source: str) -> Diagnostic:
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        lines = source.rstrip().splitlines() or [""]
        span = Span(len(lines), len(lines[-1]) + 1)
        return Diagnostic(filename, span, f"unexpected end of recipe; expected {_expected(exc)}")
    if isinstance(exc, UnexpectedCharacters):
        pos = exc.pos_in_stream or 0
        char = source[pos] if pos < len(source) else "?"
        return Diagnostic(filename, Span(exc.line, exc.column), f"unexpected character {char!r}")
    assert isinstance(exc, UnexpectedToken)  # lark raises no other kind from parse
    tok = exc.token
    span = Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + 1)
    hint = ""
    if str(tok) == "release" and "__ANON_0" not in (exc.expected or ()):
        hint = " (inside an acquire, write 'releases KEY' to release another key)"
    return Diagnostic(filename, span, f"unexpected {str(tok)!r}; expected {_expected(exc)}{hint}")


def parse(source: str, filename: str = "<recipe>") -> ast.Recipe:
    """Parse recipe text; raises RecipeError with the first syntax error located."""
    try:
        tree: Tree[Token] = _parser().parse(source)
    except UnexpectedInput as exc:
        raise RecipeError([_syntax_diagnostic(exc, filename, source)], source) from None
    recipe = _ToAst().transform(tree)
    return ast.Recipe(
        recipe.name,
        recipe.description,
        recipe.params,
        recipe.resources,
        recipe.reports,
        filename=filename,
        source=source,
        span=recipe.span,
    )
