"""The front half of the pipeline: recipe file -> checked AST -> IR -> backend text."""
from __future__ import annotations

import os
from importlib import resources
from typing import Mapping, Optional

from . import ast, checker, ir, libraries, lower, parser
from .backends import Generated, backend
from .errors import ProbedslError


def find_recipe(name_or_path: str) -> str:
    """A path, or the name of a bundled recipe (memleak)."""
    if os.path.exists(name_or_path):
        return name_or_path
    if "/" not in name_or_path and not name_or_path.endswith(".probe"):
        bundled = resources.files("probedsl.recipes").joinpath(f"{name_or_path}.probe")
        if bundled.is_file():
            return str(bundled)
    raise ProbedslError(f"recipe not found: {name_or_path}")


def load(path: str) -> ast.Recipe:
    """Parse and check a recipe file; RecipeError lists every located problem."""
    path = find_recipe(path)
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbedslError(f"cannot read recipe {path}: {exc}") from None
    recipe = parser.parse(source, path)
    checker.check(recipe)
    return recipe


def build(recipe: ast.Recipe, overrides: Mapping[str, str] = {}, *,
          resolver: Optional[libraries.LibraryResolver] = None,
          max_live: int = ir.DEFAULT_MAX_LIVE) -> ir.Program:
    """Checked recipe -> IR with libraries resolved and aliases folded."""
    program = lower.lower(recipe, lower.parameter_values(recipe, overrides), max_live)
    return libraries.resolve(program, resolver or libraries.LibraryResolver(), recipe.source)


def generate(program: ir.Program, target: str, ready_pid: int = 0) -> Generated:
    """ready_pid: the runtime's pid, which bpftrace probes watch for its requests."""
    return backend(target).generate(program, ready_pid)
