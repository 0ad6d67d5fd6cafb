"""The front half of the pipeline: recipe file -> checked AST -> IR -> backend text."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Callable, List, Mapping, Optional, Tuple

from probedsl.passes import allocators, placement, reentry, resolve
from probedsl.language import ast, checker, parser
from probedsl import ir, targets
from probedsl.ir import layout, lower, printer
from probedsl.process import libraries, procfs
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
    return [
        (e.name[: -len(".probe")], e)
        for e in sorted(resources.files("probedsl.recipes").iterdir(), key=lambda e: e.name)
        if e.name.endswith(".probe")
    ]


def keep_between_runs(kept: Callable[[str], parser.KeptFiles]) -> None:
    """Where what the compiler builds the same at every start is kept between runs:
    kept(kind) gives the place for one kind (probedsl.trust.cachedir.Kept), for the recipe
    parser's tables and the compiled templates."""
    parser.keep_tables_in(kept("grammar"))
    backends.keep_templates_in(kept("templates"))


def build_once(kept: Callable[[str], parser.KeptFiles]) -> None:
    """Build now what every first start would (the parser's tables, every template compiled),
    kept in kept(kind): the install keeps them for all runs (probedsl.cli.build_once)."""
    keep_between_runs(kept)
    parser.build_tables()
    backends.compile_templates()


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
        if _stdin_source is None:  # read once: a second read would find it empty
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


def build(
    recipe: ast.Recipe,
    overrides: Mapping[str, str] = {},
    *,
    resolver: Optional[libraries.LibraryResolver] = None,
    max_live: int = ir.DEFAULT_MAX_LIVE,
    allocator: Optional[allocators.Choice] = None,
    complete: bool = True,
) -> ir.Program:
    """Checked recipe -> IR with libraries resolved and aliases folded; allocator: its probes
    moved to another allocator's library (probedsl.passes.allocators). complete: a resource whose
    optional probes (moved ones, usdt) all went must be an error (check only looks)."""
    program = lower.lower(recipe, lower.parameter_values(recipe, overrides), max_live)
    program = allocators.apply(program, allocator)
    optional = {
        r.name: [p.label for p in r.probes if p.optional and any(a.kind == "acquire" for a in p.actions)]
        for r in program.resources
    }
    program = resolve.resolve(program, resolver or libraries.LibraryResolver(), recipe.source)
    for res in program.resources:
        if not complete or not optional[res.name] or any(a.kind == "acquire" for p in res.probes for a in p.actions):
            continue
        if allocator:
            raise ProbedslError(
                f"{allocator.library}: none of {res.name}'s allocation calls is there"
                + (f" with the prefix {allocator.prefix}" if allocator.prefix else "")
            )
        raise ProbedslError(
            f"no file of the program has {' or '.join(optional[res.name])} (looked in the "
            f"program given by --pid or -- CMD and its libraries)"
        )
    return program


@dataclass(frozen=True)
class Choices:
    """What the command line chose about the program; each pass of `plan` reads its part."""

    sets: Mapping[str, str] = field(default_factory=dict)  # --set NAME=VALUE
    allocator: Optional[allocators.Choice] = None  # --allocator, -O, --symbols-prefix
    max_live: int = 0  # 0: the target's default
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    scope: ir.Scope = field(default_factory=ir.Scope)
    sample: int = 1
    read_live: bool = False  # the live table is read (--ages, --reachability)
    min_age: Optional[float] = None  # --min-age (seconds): also reads it
    stacks: Optional[str] = None  # "fp" or "dwarf"; None: the target's best
    placed: bool = True  # --probe-at placed
    # --private-libs: a copy of each probed library for the traced command only
    private: Optional[Callable[[ir.Program], ir.Program]] = None


def compile_choices(
    *,
    pid: Optional[int],
    comm: Optional[str],
    program: Optional[str],
    sets: Mapping[str, str],
    allocator: Optional[str],
    obj: Optional[str],
    symbols_prefix: Optional[str],
    min_size: Optional[int],
    max_size: Optional[int],
    sample: int,
    stacks: Optional[str],
    placed: bool,
) -> Tuple[Choices, libraries.LibraryResolver]:
    """`probedsl compile`'s options as choices, and the resolver that finds libraries as
    `program` (an executable) would, else as ldconfig knows them."""
    scope = ir.Scope()
    if pid is not None:
        scope = ir.Scope("pid", pid=pid)
    elif comm is not None:
        scope = ir.Scope("comm", comm=procfs.valid_comm(comm))
    resolver = libraries.LibraryResolver(command=os.path.realpath(program) if program else None)
    return Choices(
        sets=sets,
        allocator=allocators.choose(allocator, obj, symbols_prefix, resolver.resolve),
        min_size=min_size,
        max_size=max_size,
        scope=scope,
        sample=sample,
        stacks=stacks,
        placed=placed,
    ), resolver


def check_choices(target: "targets.Target", choices: Choices) -> int:
    """The options' checks against the target, before anything is started; the live table's size."""
    max_live = choices.max_live or target.default_max_live
    if target.max_live_limit is not None and max_live > target.max_live_limit:
        raise ProbedslError(
            f"--max-live {max_live}: {target.name} holds at most {target.max_live_limit} "
            f"live entries per table (tallies pack the count in its bits); use --backend bcc"
        )
    if choices.stacks == "dwarf" and not target.dwarf_stacks:
        raise ProbedslError(
            f"--stacks dwarf: {target.name} walks user stacks by frame pointers only "
            "(they are cut where they stop being certain); --backend bcc unwinds them"
        )
    return max_live


def plan(
    recipe: ast.Recipe, target: "targets.Target", choices: Choices, resolver: Optional[libraries.LibraryResolver] = None
) -> Tuple[ir.Program, List[str]]:
    """Every pass, in one order, shared by `compile` and `run` (and so --estimate):
    lowered, allocator moved, libraries resolved, sized, scoped, sampled, stacks chosen,
    private copies, placed. Returns the program and notes for the user (what was not probed)."""
    program = build(
        recipe, choices.sets, resolver=resolver, max_live=check_choices(target, choices), allocator=choices.allocator
    )
    program = sized(program, choices.min_size, choices.max_size).with_scope(choices.scope)
    notes = []
    calls = [label for label in program.unprobed if not label.startswith("usdt:")]
    usdts = [label for label in program.unprobed if label.startswith("usdt:")]
    if calls:
        notes.append(f"note: not probed, not in the allocator's library: {', '.join(calls)}")
    if usdts:
        notes.append(f"note: not probed, no file of the program has them: {', '.join(usdts)}")
    program = program.sampled(choices.sample).reading_live(choices.read_live or program.needs_live(choices.min_age))
    program = program.walking_stacks(choices.stacks or ("dwarf" if target.dwarf_stacks else "fp"))
    if choices.private is not None:
        program = choices.private(program)
    if choices.placed:
        program = placement.apply(program)
    program = reentry.apply(program)  # where it is placed (or at entries), tail jumps
    return program, notes


def sized(program: ir.Program, least: Optional[int], most: Optional[int]) -> ir.Program:
    """--min-size/--max-size, refused where nothing records a size."""
    if least is None and most is None:
        return program
    if least is not None and most is not None and least > most:
        raise ProbedslError(f"--min-size {least} is above --max-size {most}: nothing would be traced")
    if not any(r.records("size") for r in program.resources):
        raise ProbedslError(f"--min-size/--max-size: recipe {program.name} records no size")
    return program.size_filtered(least, most)


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


def generate(program: ir.Program, target: "targets.Target", ready_pid: int = 0, pidns_ino: int = 0) -> Generated:
    """ready_pid: the runtime's pid, which bpftrace probes watch for its requests; pidns_ino:
    the PID namespace it runs in (process/pidns.py), 0 for the host's."""
    return backends.for_target(target).generate(program, ready_pid, pidns_ino)


def dump(program: ir.Program) -> str:
    """The IR and the storage it needs, as `compile --dump ir` prints them."""
    return printer.dump(program) + layout.dump(program)


def tail_jumps(program: ir.Program) -> List[str]:
    """What check says of tail jumps into probed releases (probedsl.passes.reentry)."""
    lines = []
    for probe in (p for r in reentry.apply(placement.apply(program)).resources for p in r.probes):
        lines += [
            f"{probe.label}: not probed in {path}: each call is a jump to another probed function"
            for path in probe.forwards
        ]
        lines += [
            f"{probe.label}: entered again within one {s.origin} call by the tail jump at 0x{s.address:x} "
            f"in {s.path} (told apart, not counted twice)"
            for s in probe.reentered
        ]
    return lines


def placements(program: ir.Program) -> List[Tuple[str, str, int, str, str]]:
    """(label, function, offset, instruction, file) of each probe placed past its entry."""
    found = []
    for probe in (p for r in placement.apply(program).resources for p in r.probes):
        offset, instruction = probe.place_in(probe.path)
        if offset:
            found.append((probe.label, probe.function, offset, instruction, probe.path))
    return found
