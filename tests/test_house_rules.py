"""The rules of the house: which wing of probedsl may import which (docs/design.md draws the
map). Read from the code's own imports (ast, function-level ones included), so a broken rule
fails here naming the file, the line and the import."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
GROUND = {"errors", "notices", "threads", "faults"}
TOP = {"cli", "__main__", "compiler"}

# wing -> the wings it may import (besides itself and the ground); everything else is refused
MAY_IMPORT: Dict[str, Set[str]] = {
    "ground": set(),  # errors, notices, threads, faults
    "trust": set(),
    "language": set(),
    "ir": {"language"},
    "targets": {"ir", "process"},  # data and detection: never generators or drivers
    "backends": {"ir", "targets"},  # read no file, import no runtime wing
    "process": {"trust"},
    "binaries": {"trust", "process"},
    "passes": {"language", "ir", "binaries", "process", "trust"},
    "stacks": {"ir", "binaries", "process", "trust"},
    "drivers": {"ir", "targets", "binaries", "process", "stacks", "trust"},  # never generators or passes
    "report": {"ir", "drivers", "stacks"},  # never the run, never an output
    "reachability": {"ir", "binaries", "process", "drivers", "report"},
    "outputs": {"report", "stacks", "trust"},  # render what the report holds: no ELF, no /proc
    "compiler": {"language", "ir", "passes", "targets", "backends", "process"},
    "cli": {"compiler", "run", "report", "outputs", "targets", "trust", "passes"},  # assembles no IR
    "__main__": {"cli"},
}
WINGS = set(MAY_IMPORT) - {"ground", "compiler", "cli", "__main__"} | {"run"}
MAY_IMPORT["run"] = (WINGS - {"run"}) | {"compiler"}  # the run drives every stage


def wing_of(module: str) -> str:
    """probedsl.run.session -> run; probedsl.errors -> ground; probedsl.cli -> cli."""
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in GROUND:
        return "ground"
    return parts[1]


@functools.lru_cache(maxsize=1)
def modules() -> Dict[str, Path]:
    found = {}
    for path in sorted([*(ROOT / "probedsl").rglob("*.py"), *(ROOT / "backends").rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("").parts
        rel = ("probedsl", *rel) if rel[0] == "backends" else rel
        found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    return found


def imports(module: str, path: Path, known: Set[str]) -> List[Tuple[int, str]]:
    """(line, imported probedsl module) for every import in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("probedsl")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("probedsl"):
                found += [
                    (node.lineno, f"{source}.{a.name}" if f"{source}.{a.name}" in known else source) for a in node.names
                ]
    return found


@functools.lru_cache(maxsize=1)
def graph() -> Dict[str, List[Tuple[int, str]]]:
    found = modules()
    return {m: imports(m, p, set(found)) for m, p in found.items()}


def test_every_module_is_in_a_wing():
    strays = [
        m
        for m in modules()
        if m.count(".") == 1 and wing_of(m) not in GROUND | TOP | {"ground"} and wing_of(m) not in WINGS
    ]
    assert not strays, f"modules outside every wing (put each in one, see docs/design.md): {strays}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_wing_imports_one_the_rules_refuse(module):
    here = wing_of(module)
    allowed = MAY_IMPORT.get(here)
    if allowed is None:
        return  # the package itself
    path = modules()[module]
    broken = [
        f"{path.relative_to(ROOT)}:{line}: {here} imports {target} ({wing_of(target)})"
        for line, target in imports(module, path, set(modules()))
        if wing_of(target) not in allowed | {here, "ground", "package"}
    ]
    assert not broken, "house rule broken:\n" + "\n".join(broken)


def test_no_module_imports_itself_back():
    """No circle between modules (a circle hides in function-level imports; those count)."""
    edges = {m: {t for _, t in deps if t != m} for m, deps in graph().items()}
    state: Dict[str, int] = {}
    circles = []

    def visit(m: str, path: List[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t) :] + [t] if t in path else [m, t])
            elif t in edges and not state.get(t):
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if not state.get(m):
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these (one concept per module): {long}"


def figures() -> Dict[str, int]:
    """The import graph in numbers: modules, wings, imports between them, circles, long modules."""
    deps = graph()
    module_edges = {(m, t) for m, found in deps.items() for _, t in found if t != m and t in deps}
    wing_edges = {(wing_of(m), wing_of(t)) for m, t in module_edges if wing_of(m) != wing_of(t)}
    return {
        "modules": len(deps),
        "wings": len({wing_of(m) for m in deps} - {"package", "ground"}),
        "imports between modules": len(module_edges),
        "imports between wings": len(wing_edges),
        "modules over 400 lines": sum(len(p.read_text().splitlines()) > 400 for p in modules().values()),
    }


if __name__ == "__main__":  # python3 tests/test_house_rules.py: the figures of the house
    for name, value in figures().items():
        print(f"{name}: {value}")
