"""Tracing another allocator: memleak's malloc family moved from libc to the library that
serves it (-O/--object, --symbols-prefix, as BCC memleak), and with --allocator NAME the
calls only that allocator has (recipes/allocators/NAME.probe) added to the same resource."""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib import resources
from typing import Optional, Tuple

from probedsl.language import checker, parser
from probedsl import ir
from probedsl.ir import lower
from probedsl.errors import ProbedslError

DEFAULT_OBJECT = "libc"  # where the recipes' allocation probes are written


@dataclass(frozen=True)
class Known:
    libraries: Tuple[str, ...]  # the library short names it ships as, first found wins
    package: str  # Debian's package, for the error when none is found


KNOWN = {
    "glibc": Known(("libc",), "libc6"),
    "jemalloc": Known(("libjemalloc",), "libjemalloc2"),
    "tcmalloc": Known(("libtcmalloc_minimal", "libtcmalloc"), "libtcmalloc-minimal4 (Debian 13: ...4t64)"),
    "mimalloc": Known(("libmimalloc",), "libmimalloc2.0 (Debian 13: libmimalloc3)"),
}


@dataclass(frozen=True)
class Choice:
    name: str  # a KNOWN allocator, or "" for -O alone
    library: str  # short name or path the probes move to
    prefix: str = ""  # --symbols-prefix: je_ for a jemalloc built with one


def choose(allocator: Optional[str], obj: Optional[str], prefix: Optional[str], resolve) -> Optional[Choice]:
    """The options -> a Choice (None: the recipe as written). resolve(short name) -> path or None."""
    if not (allocator or obj or prefix):
        return None
    if allocator and allocator not in KNOWN:
        raise ProbedslError(f"--allocator {allocator}: choose from {', '.join(KNOWN)}")
    if obj:
        library = obj if "/" in obj else obj if obj.startswith("lib") else "lib" + obj  # BCC's -O c
        if resolve(library) is None:
            raise ProbedslError(
                f"-O {obj}: no such library for this program (a path, or a name like jemalloc or libjemalloc)"
            )
    elif allocator:
        known = KNOWN[allocator]
        library = next((name for name in known.libraries if resolve(name)), None)
        if library is None:
            raise ProbedslError(
                f"--allocator {allocator}: {' or '.join(known.libraries)} not found for this "
                f"program (apt install {known.package}, or name the library with -O PATH)"
            )
    else:
        library = DEFAULT_OBJECT
    return Choice(allocator or "", library, prefix or "")


def apply(program: ir.Program, choice: Optional[Choice]) -> ir.Program:
    """The program's libc probes moved to the chosen library, the allocator's own calls added
    to the resource they belong to. Moved probes are optional: a call the library lacks
    (jemalloc has no pvalloc) is left out with a note."""
    if choice is None:
        return program
    extra = _extra(choice.name) if choice.name else None
    moved_from = {DEFAULT_OBJECT} | ({p.library for r in extra.resources for p in r.probes} if extra else set())
    resources = []
    for res in program.resources:
        probes = [
            _move(p, choice) if p.kind == ir.ProbeKind.UPROBE and p.library in moved_from else p for p in res.probes
        ]
        if extra:
            added = [
                p for r in extra.resources if r.name == res.name and r.key_names == res.key_names for p in r.probes
            ]
            probes += [
                replace(_move(p, choice), id=len(probes) + i + 1, resource=res.name) for i, p in enumerate(added)
            ]
        resources.append(replace(res, probes=tuple(probes)))
    if extra and not any(r.name == e.name for r in program.resources for e in extra.resources):
        raise ProbedslError(
            f"--allocator {choice.name}: adds to a resource named "
            f"{', '.join(e.name for e in extra.resources)}, which this recipe has not (memleak has)"
        )
    return replace(program, resources=tuple(resources))


def _move(probe: ir.Probe, choice: Choice) -> ir.Probe:
    # C++ operators keep their names: a prefixed build renames only the C calls
    function = probe.function if probe.function.startswith("_Z") else choice.prefix + probe.function
    return replace(probe, library=choice.library, function=function, optional=True)


def _extra(name: str) -> Optional[ir.Program]:
    entry = resources.files("probedsl.recipes").joinpath("allocators", f"{name}.probe")
    if not entry.is_file():
        return None
    recipe = parser.parse(entry.read_text(), f"allocators/{name}.probe")
    checker.check(recipe)
    return lower.lower(recipe, {})
