"""The front half of the pipeline: recipe file -> checked AST -> IR -> backend text."""
from __future__ import annotations

import os
import sys
from dataclasses import replace
from importlib import resources
from typing import Mapping, Optional, Tuple

from . import allocators, ast, checker, ir, libraries, lower, parser, resolve, targets
from . import backends
from .targets.base import Generated
from .errors import Diagnostic, ProbedslError, RecipeError


def bundled():
    """(name, parsed recipe) for each recipe shipped in probedsl.recipes, sorted by name."""
    return [(name, parser.parse(entry.read_text(), entry.name)) for name, entry in bundled_names()]


def find_recipe(name_or_path: str) -> str:
    """A path (has a '/' or ends in .probe), else the name of a bundled recipe (memleak)."""
    if "/" in name_or_path or name_or_path.endswith(".probe"):
        if os.path.isfile(name_or_path):
            return name_or_path
    else:
        bundled = resources.files("probedsl.recipes").joinpath(f"{name_or_path}.probe")
        if bundled.is_file():
            return str(bundled)
    names = ", ".join(name for name, _ in bundled_names())
    raise ProbedslError(f"recipe not found: {name_or_path} (bundled: {names})")


def bundled_names():
    return [(e.name[:-len(".probe")], e) for e in sorted(resources.files("probedsl.recipes").iterdir(),
                                                         key=lambda e: e.name) if e.name.endswith(".probe")]


def load(path: str) -> ast.Recipe:
    """Parse and check a recipe file ("-": standard input, read once and kept); RecipeError
    lists every located problem."""
    source, path = read_source(path)
    recipe = parser.parse(source, path)
    checker.check(recipe)
    return recipe


_stdin_source: Optional[str] = None


def read_source(name_or_path: str) -> Tuple[str, str]:
    """(text, where) of a recipe: a file, a bundled name, or "-" (standard input, "<stdin>")."""
    global _stdin_source
    if name_or_path == "-":
        if _stdin_source is None:        # read once: a second read would find it empty
            try:
                _stdin_source = sys.stdin.read()
            except UnicodeDecodeError as exc:
                raise ProbedslError(f"cannot read the recipe on standard input: {exc}") from None
        return _stdin_source, "<stdin>"
    path = find_recipe(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbedslError(f"cannot read recipe {path}: {exc}") from None


def build(recipe: ast.Recipe, overrides: Mapping[str, str] = {}, *,
          resolver: Optional[libraries.LibraryResolver] = None,
          max_live: int = ir.DEFAULT_MAX_LIVE, allocator: Optional[allocators.Choice] = None,
          complete: bool = True) -> ir.Program:
    """Checked recipe -> IR with libraries resolved and aliases folded; allocator: its probes
    moved to another allocator's library (probedsl.allocators). complete: a resource whose
    optional probes (moved ones, usdt) all went must be an error (check only looks)."""
    program = lower.lower(recipe, lower.parameter_values(recipe, overrides), max_live)
    program = allocators.apply(program, allocator)
    optional = {r.name: [p.label for p in r.probes if p.optional and any(a.kind == "acquire" for a in p.actions)]
                for r in program.resources}
    program = resolve.resolve(program, resolver or libraries.LibraryResolver(), recipe.source)
    for res in program.resources:
        if not complete or not optional[res.name] or any(a.kind == "acquire" for p in res.probes for a in p.actions):
            continue
        if allocator:
            raise ProbedslError(f"{allocator.library}: none of {res.name}'s allocation calls is there"
                                + (f" with the prefix {allocator.prefix}" if allocator.prefix else ""))
        raise ProbedslError(f"no file of the program has {' or '.join(optional[res.name])} (looked in the "
                            f"program given by --pid or -- CMD and its libraries)")
    return program


def check_backends(program: ir.Program, source: str = "") -> None:
    """Lower for every target (each backend, each dialect); a construct one cannot express is a
    located recipe error. Probes are generated one at a time so that each error has its place."""
    diagnostics = []
    for cls in targets.TARGETS:
        generator = backends.for_target(cls())
        for res in program.resources:
            for probe in res.probes:
                one = replace(program, resources=(replace(res, probes=(probe,)),), reports=())
                try:
                    generator.generate(one)
                except ProbedslError as exc:
                    diagnostics.append(Diagnostic(program.filename, probe.span, f"{cls().name}: {exc}"))
    if diagnostics:
        raise RecipeError(diagnostics, source)


def generate(program: ir.Program, target: "targets.Target", ready_pid: int = 0) -> Generated:
    """ready_pid: the runtime's pid, which bpftrace probes watch for its requests."""
    return backends.for_target(target).generate(program, ready_pid)
