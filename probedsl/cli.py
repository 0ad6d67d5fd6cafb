"""Command line: compile, check and run recipes. Errors are one located line, never a traceback."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import sys

import click

from probedsl.passes import allocators
from probedsl.run import options
from probedsl.report import history
from probedsl.outputs import write
from probedsl import compiler, report, targets
from probedsl.trust import cachedir, escape
from probedsl.outputs import formats
from probedsl.run import session
from probedsl.run.doctor import backends_usable, checks, report as report_checks
from .errors import ProbedslError, RecipeError


def _set_pairs(values):
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ProbedslError(f"--set {item!r}: write --set NAME=VALUE")
        pairs[name] = value
    return pairs


def _complete_recipe(ctx, param, incomplete):
    """RECIPE completes to bundled recipe names, and to files (the shell's own completion, which
    bash uses where no name matches). The file item goes first: click's bash script clears the
    names it has collected when it meets one."""
    from click.shell_completion import CompletionItem
    names = [CompletionItem(name) for name, _ in compiler.bundled_names() if name.startswith(incomplete)]
    return [CompletionItem(incomplete, type="file")] + names


def _check_output(fmt: str, output) -> None:
    """pprof is binary: refuse to pour it on a terminal (before any tracing, not after)."""
    if fmt == "pprof" and not output and sys.stdout.isatty():
        raise ProbedslError("--format pprof writes a binary file: add -o FILE.pb.gz (or redirect stdout)")


def format_options(fn):
    fn = click.option("--color/--no-color", default=None, help="colour text output (default: when a terminal)")(fn)
    fn = click.option("-o", "--output", type=click.Path(dir_okay=False), help="write reports to FILE")(fn)
    fn = click.option("--format", "fmt", type=click.Choice(sorted(formats.FORMATS)), default="text",
                      show_default=True)(fn)
    return fn


def allocation_options(fn):
    """Which calls acquire: the allocator's library and a size range (BCC memleak's -O, -z, -Z)."""
    fn = click.option("-Z", "--max-size", type=click.IntRange(min=0), metavar="BYTES",
                      help="trace only acquisitions of at most BYTES (tested in the kernel, at entry)")(fn)
    fn = click.option("-z", "--min-size", type=click.IntRange(min=0), metavar="BYTES",
                      help="trace only acquisitions of at least BYTES (tested in the kernel, at entry)")(fn)
    fn = click.option("--symbols-prefix", metavar="PREFIX",
                      help="the allocator's C calls carry this prefix (je_ for a prefixed jemalloc)")(fn)
    fn = click.option("-O", "--object", "obj", metavar="LIB",
                      help="the library the allocation calls are in, instead of libc (a path, or a name: "
                           "jemalloc)")(fn)
    fn = click.option("--allocator", type=click.Choice(sorted(allocators.KNOWN)),
                      help="the program's allocator: memleak's calls move to its library, and its own calls "
                           "(jemalloc's mallocx family, C++ operators) are added")(fn)
    return fn


EXAMPLES = """\b
Examples:
  probedsl run memleak -- ./leak                  launch a command, report its outstanding heap
  probedsl run memleak --pid 1234 --backend bcc   a live process, complete -O2 stacks
  probedsl run memleak --comm app --interval 10   every process named app, a report every 10 s
  probedsl run memleak --reachability -- ./leak   which blocks are lost, as valgrind says
  probedsl compile memleak --target bpftrace      the generated bpftrace script
  probedsl doctor                                 what this machine can trace with
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXAMPLES)
@click.version_option(package_name="probedsl", prog_name="probedsl")
def cli():
    """probedsl: describe a paired resource (acquire/release) once; trace it with bpftrace or BCC."""


@cli.command()
@click.argument("recipe", shell_complete=_complete_recipe)
def check(recipe):
    """Validate RECIPE, and lower it for every backend and version; print every error as file:line:col."""
    parsed = compiler.load(recipe)
    program = compiler.build(parsed, complete=False)
    compiler.check_backends(program, parsed.source)
    probes = sum(len(r.probes) for r in program.resources)
    click.echo(f"{recipe}: ok ({len(program.resources)} resource(s), {probes} probe(s) after folding aliases; "
               f"lowers to {targets.supported()})")
    for label in program.unprobed:
        click.echo(f"  {label}: looked for in the traced program's files when it runs "
                   f"(compile --program EXE shows where)")
    for label, function, offset, instruction, path in compiler.placements(program):
        click.echo(f"  {label}: probed at {function}+{offset} ({instruction}, emulated; its "
                   f"entry's instruction is single-stepped) in {path}")
    for line in compiler.tail_jumps(program):
        click.echo(f"  {line}")


@cli.command()
def doctor():
    """What this machine has for tracing (backends and the target each gets, kernel features,
    rights, tools), what is missing and the command that fixes it; exit 1 when no backend can run."""
    found = checks()
    click.echo(report_checks(found), nl=False)
    sys.exit(0 if backends_usable(found) else 1)


@cli.command()
@click.argument("recipe", shell_complete=_complete_recipe)
def show(recipe):
    """Print a recipe's text: a bundled one by name (memleak), to read or to copy and edit."""
    click.echo(compiler.read_source(recipe)[0], nl=False)


@cli.command("list")
def list_cmd():
    """The bundled recipes, with their descriptions and parameters (run them by name)."""
    for name, recipe in compiler.bundled():
        params = ", ".join(f"{p.name}={p.default}" for p in recipe.params)
        click.echo(f"{name:<12} {recipe.description}" + (f"  [params: {params}]" if params else ""))


@cli.command()
@click.argument("recipe", shell_complete=_complete_recipe)
@click.option("--target", "target", default=targets.DEFAULT_BACKEND, show_default=True,
              help="bpftrace or bcc (the installed version's dialect, else the newest), or one version's "
                   "dialect: bpftrace-0.17, bpftrace-0.23, ...")
@click.option("--dump", type=click.Choice(["ir"]), help="print the IR and its storage layout instead")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="write here instead of stdout")
@click.option("--pid", type=int, help="filter the generated program to this pid")
@click.option("--comm", help="filter the generated program to processes with this name")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="override a recipe parameter")
@click.option("--sample", type=click.IntRange(min=1), default=1, help="record one acquisition in N")
@click.option("--stacks", type=click.Choice(["fp", "dwarf"]), default="fp", show_default=True,
              help="bcc: include the call-frame unwinder (its tables are filled by `probedsl run`; the "
                   "standalone loader leaves them empty, so its stacks are frame-pointer walks)")
@click.option("--probe-at", type=click.Choice(["placed", "entry"]), default="placed", show_default=True,
              help="placed: each uprobe on an emulated instruction of its function's entry path, for "
                   "this machine's libraries (a comment shows where); entry: at function entries")
@click.option("--program", metavar="EXE", type=click.Path(exists=True, dir_okay=False),
              help="resolve libraries and usdt probes as this program would (else: as ldconfig knows them)")
@allocation_options
def compile(recipe, target, dump, output, pid, comm, sets, sample, stacks, probe_at, program, allocator, obj,
            symbols_prefix, min_size, max_size):
    """Print the bpftrace script, or the BCC loader (C text inside), generated for RECIPE."""
    chosen = targets.from_name(target)
    choices, resolver = compiler.compile_choices(
        pid=pid, comm=comm, program=program, sets=_set_pairs(sets), allocator=allocator, obj=obj,
        symbols_prefix=symbols_prefix, min_size=min_size, max_size=max_size, sample=sample, stacks=stacks,
        placed=probe_at == "placed")
    program, _ = compiler.plan(compiler.load(recipe), chosen, choices, resolver)
    text = compiler.dump(program) if dump == "ir" else compiler.generate(program, chosen).standalone
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


class _RunCommand(click.Command):
    """Remembers how many arguments came after `--` (the command): the ones before it may be
    BCC memleak's [interval [count]]."""

    def parse_args(self, ctx, args):
        ctx.meta["after_dashes"] = len(args) - args.index("--") - 1 if "--" in args else None
        return super().parse_args(ctx, args)


def _positional(ctx, words, command_line):
    """(interval, count, command) from what followed RECIPE: numbers first are interval and
    count, the rest (or what came after --, or -c's text) the command."""
    after = ctx.meta.get("after_dashes")
    before = list(words[:len(words) - after]) if after is not None else list(words)
    command = list(words[len(words) - after:]) if after is not None else []
    numbers = []
    while before and before[0].isdigit() and len(numbers) < 2:
        numbers.append(int(before.pop(0)))
    if before and after is not None:
        raise ProbedslError(f"unexpected argument {before[0]!r} before --: after RECIPE come [interval [count]], "
                            f"the command after --")
    command = before + command                  # `run memleak ./prog` without -- still launches it
    if command_line is not None:
        if command:
            raise ProbedslError("-c gives the command as one string: leave out the command after --")
        command = shlex.split(command_line)
        if not command:
            raise ProbedslError("-c: the command is empty")
    if numbers and numbers[0] == 0:
        raise ProbedslError("interval: must be at least 1 second")
    return (numbers + [None, None])[:2] + [command]


@cli.command(cls=_RunCommand)
@click.argument("recipe", shell_complete=_complete_recipe)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--backend", type=click.Choice(targets.BACKENDS), default=targets.DEFAULT_BACKEND, show_default=True,
              help="the installed version picks the dialect; probedsl supports " + targets.supported())
@click.option("--comm", help="trace every process with this name, now and later")
@click.option("-p", "--pid", type=int, help="trace this live process until it exits")
@click.option("-c", "--command", "command_line", metavar="'CMD ARGS'",
              help="launch and trace this command line (split as a shell would, never run by one)")
@click.option("--all", "all_", is_flag=True, help="trace every process (system-wide) until Ctrl-C")
@click.option("--follow-forks/--no-follow-forks", default=True, show_default=True,
              help="with --pid or -- CMD, trace the children it forks (BCC then attaches to every "
                   "process and filters in BPF; --no-follow-forks keeps BCC's per-pid uprobes)")
@click.option("--private-libs/--no-private-libs", default=True, show_default=True,
              help="with -- CMD, probe private copies of its libraries so other processes pay nothing "
                   "(not needed where the backend scopes uprobes to the command: bcc, bpftrace 0.20+, "
                   "with --no-follow-forks)")
@click.option("--per-process", is_flag=True,
              help="with --comm (bcc): attach to each process with the name (found at start, at exec, at "
                   "fork) so others pay nothing; what one does in its first milliseconds is missed")
@click.option("--interval", type=click.IntRange(min=1), help="print a report every N seconds")
@click.option("--live", is_flag=True,
              help="a full-screen view refreshed every --interval (default 1 s), like top: s sorts, enter "
                   "expands a stack, p pauses, q quits with the final report; plain reports when not a terminal")
@click.option("--duration", type=click.FloatRange(min=0), default=0, help="stop after N seconds")
@click.option("-T", "--top", type=click.IntRange(min=1), help="stacks per report (overrides the recipe)")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="override a recipe parameter")
@format_options
@allocation_options
@click.option("--min-age", type=click.FloatRange(min=0),
              help="hide resources younger than SECONDS (reads every live entry at each report)")
@click.option("--older", type=click.IntRange(min=0), metavar="MS",
              help="BCC memleak's -o: hide resources younger than MS milliseconds (--min-age in ms)")
@click.option("--ages", is_flag=True, help="show each group's oldest age: reads every live entry at each "
                                           "report (seconds with a million live); default: the kernel's tallies")
@click.option("-s", "--sample", type=click.IntRange(min=1), default=1, show_default=True,
              help="record one acquisition in N (chosen at random); reports show estimates scaled by N")
@click.option("--estimate", is_flag=True, help="first count calls of the probed functions for a second "
                                              "(cheapest probe) and print what tracing them will cost")
@click.option("--growth-intervals", type=click.IntRange(min=1), default=3, show_default=True,
              help="flag a stack GROWING after it grew in this many interval reports in a row")
@click.option("--stacks", type=click.Choice(["dwarf", "fp"]),
              help="how user stacks are walked: dwarf (bcc's default: unwound from each file's call-frame "
                   "information, complete on code built without frame pointers) or fp (frame pointers: "
                   "cheaper, cut where they stop being certain; bpftrace's only way)")
@click.option("--probe-at", type=click.Choice(["placed", "entry"]), default="placed", show_default=True,
              help="placed: each uprobe on the first instruction of its function's entry path that the "
                   "kernel emulates (one trap, not two; docs/usage.md); entry: at the function's entry")
@click.option("--reachability", is_flag=True,
              help="with --pid or -- CMD: at each report and at its exit, pause the process, scan its memory "
                   "and split live blocks as valgrind does: definitely/indirectly/possibly lost, still "
                   "reachable (docs/reachability.md)")
@click.option("--leaks-only", is_flag=True, help="with --reachability: leave still-reachable blocks out of the "
                                                 "stack entries")
@click.option("--python-native", is_flag=True,
              help="keep the interpreter's own native frames (_PyEval_EvalFrameDefault...) that Python frames "
                   "explain (folded away by default; docs/python.md)")
@click.option("--python-frames/--no-python-frames", default=True, show_default=True,
              help="with --backend bcc: walk a CPython's own frame chain at each acquisition (docs/python.md)")
@click.option("--prometheus", metavar="ADDR:PORT",
              help="serve the latest report as Prometheus gauges at http://ADDR:PORT/metrics while tracing "
                   "(refreshed at each --interval report, else every 10 s; docs/fleet.md)")
@click.option("--max-live", type=click.IntRange(min=1),
              help="live resources each table holds (default: 1000000 on bcc and bpftrace 0.25+; bpftrace "
                   "0.17-0.19 262144, 0.20-0.24 131072, which size every keyed map so)")
def run(recipe, command, backend, comm, pid, command_line, all_, follow_forks, private_libs, per_process, interval,
        live, duration, top, sets, fmt, output, color, allocator, obj, symbols_prefix, min_size, max_size, min_age, older,
        ages, sample, estimate, growth_intervals, stacks, probe_at, reachability, leaks_only, python_native, python_frames,
        prometheus, max_live):
    """Trace with RECIPE: --comm NAME, --pid PID, --all, or -- CMD ARGS... (launched once probes attach).
    [INTERVAL [COUNT]] after RECIPE, as BCC memleak: a report every INTERVAL seconds, COUNT reports."""
    _check_output(fmt, output)
    every, count, command = _positional(click.get_current_context(), command, command_line)
    if every is not None and interval is not None and every != interval:
        raise ProbedslError(f"interval given twice: {every} and --interval {interval}")
    interval = interval or every
    if count is not None and duration:
        raise ProbedslError("COUNT and --duration both say when to stop: give one")
    if older is not None:
        if min_age is not None:
            raise ProbedslError("--older and --min-age both set the age: give one")
        min_age = older / 1000
    opts = options.RunOptions(recipe=recipe, backend=backend, comm=comm, pid=pid, all=all_,
                              follow_forks=follow_forks, private_libs=private_libs, per_process=per_process,
                              command=command, allocator=allocator, object=obj, symbols_prefix=symbols_prefix,
                              min_size=min_size, max_size=max_size,
                              interval=interval or (1 if live else 0), live=live, duration=duration, top=top, sets=_set_pairs(sets),
                              format=fmt, output=output, color=color, min_age=min_age, ages=ages, sample=sample, estimate=estimate,
                              growth_intervals=growth_intervals, stacks=stacks, probe_at=probe_at,
                              reachability=reachability, leaks_only=leaks_only, prometheus=prometheus,
                              max_live=max_live, python_native=python_native,
                              python_frames=python_frames, count=count or 0)
    _leave(session.run(opts))


@cli.command("report")
@click.argument("saved", type=click.Path(exists=True, dir_okay=False))
@format_options
def report_cmd(saved, fmt, output, color):
    """Re-render a run saved with --format json (the last report in the file)."""
    _check_output(fmt, output)
    rep = _load_report(saved)
    write.write_report(formats.render(rep, fmt, _color(color, fmt, output)), output, sys.stdout)


@cli.command("merge")
@click.argument("saved", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@format_options
def merge_cmd(saved, fmt, output, color):
    """Combine runs saved with --format json (from many hosts) into one report: entries matched
    by symbolic stack and summed."""
    _check_output(fmt, output)
    rep = history.merge([_load_report(path) for path in saved])
    write.write_report(formats.render(rep, fmt, _color(color, fmt, output)), output, sys.stdout)


@cli.command("diff")
@click.argument("before", type=click.Path(exists=True, dir_okay=False))
@click.argument("after", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--color/--no-color", default=None)
def diff_cmd(before, after, fmt, color):
    """Which stacks grew between two saved runs (matched by symbolic stack, not address)."""
    rows = history.diff(_load_report(before), _load_report(after))
    render = formats.diff_json if fmt == "json" else formats.diff_text
    click.echo(render(rows, _color(color, fmt, None)), nl=False)


def _color(color, fmt, output) -> bool:
    if fmt != "text" or output:
        return False
    return color if color is not None else sys.stdout.isatty() and "NO_COLOR" not in os.environ


def _load_report(path: str) -> report.Report:
    """The last probedsl JSON report in a file (a saved --format json run, maybe with interval reports)."""
    text = open(path, errors="replace").read()
    decoder, found, i = json.JSONDecoder(), None, 0
    while (i := text.find("{", i)) >= 0:
        try:
            doc, i = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        if isinstance(doc, dict) and doc.get("schema") == report.SCHEMA:
            found = doc
    if found is None:
        raise ProbedslError(f"{path}: no probedsl JSON report in it (save one with run --format json)")
    try:
        return report.Report.from_dict(found)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbedslError(f"{path}: cannot read the report: {exc}") from None


def _leave(status: int) -> None:
    """End `probedsl run` with its status once everything is written and closed, without the
    interpreter's teardown of the heap, which holds BCC's clang and LLVM (0.3-1 s measured,
    after the report): streams flushed, atexit handlers run, then the process ends."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(status)


def build_once() -> None:
    """scripts/setup.sh: what every first run would build (~0.09 s of its start), built into
    the environment for every user's runs (cachedir.shipped_root); one line and exit 1 if not."""
    why = cachedir.ship(compiler.build_once)
    if why:
        sys.exit(f"probedsl: {why}")


def main():
    compiler.keep_between_runs(cachedir.Kept)
    try:
        cli.main(standalone_mode=False)
    except RecipeError as exc:
        click.echo(escape.message(exc.render()), err=True)
        sys.exit(1)
    except ProbedslError as exc:          # may quote a traced program's names: escaped, one line
        click.echo(f"probedsl: error: {escape.for_terminal(str(exc), escape.MAX_MESSAGE)}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("probedsl: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
