"""Command line: compile, check and run recipes. Errors are one located line, never a traceback."""
from __future__ import annotations

import sys

import click

from . import compiler, ir, session
from .errors import ProbedslError, RecipeError


def _set_pairs(values):
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ProbedslError(f"--set {item!r}: write --set NAME=VALUE")
        pairs[name] = value
    return pairs


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="probedsl")
def cli():
    """probedsl: describe a paired resource (acquire/release) once; trace it with bpftrace or BCC."""


@cli.command()
@click.argument("recipe")
def check(recipe):
    """Validate RECIPE; print every error as file:line:col with the line and a caret."""
    program = compiler.build(compiler.load(recipe))
    probes = sum(len(r.probes) for r in program.resources)
    click.echo(f"{recipe}: ok ({len(program.resources)} resource(s), {probes} probe(s) after folding aliases)")


@cli.command()
@click.argument("recipe")
@click.option("--target", "target", type=click.Choice(["bpftrace", "bcc"]), default="bpftrace", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), help="write here instead of stdout")
@click.option("--pid", type=int, help="filter the generated program to this pid")
@click.option("--comm", help="filter the generated program to processes with this name")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="override a recipe parameter")
def compile(recipe, target, output, pid, comm, sets):
    """Print the bpftrace script, or the BCC loader (C text inside), generated for RECIPE."""
    tgt = ir.Target()
    if pid is not None:
        tgt = ir.Target("pid", pid=pid)
    elif comm is not None:
        tgt = ir.Target("comm", comm=session.validate_comm(comm))
    program = compiler.build(compiler.load(recipe), _set_pairs(sets)).with_target(tgt)
    generated = compiler.generate(program, target)
    text = generated.text if target == "bpftrace" else generated.loader
    if output:
        with open(output, "w") as f:
            f.write(text)
    else:
        click.echo(text, nl=False)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("recipe")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--backend", type=click.Choice(["bpftrace", "bcc"]), default="bpftrace", show_default=True)
@click.option("--comm", help="trace every process with this name, now and later")
@click.option("--pid", type=int, help="trace this live process until it exits")
@click.option("--interval", type=click.IntRange(min=1), help="print a report every N seconds")
@click.option("--duration", type=click.FloatRange(min=0), default=0, help="stop after N seconds")
@click.option("--top", type=click.IntRange(min=1), help="stacks per report (overrides the recipe)")
@click.option("--set", "sets", multiple=True, metavar="NAME=VALUE", help="override a recipe parameter")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--max-live", type=click.IntRange(min=1), default=ir.DEFAULT_MAX_LIVE, show_default=True,
              help="live resources each table holds")
def run(recipe, command, backend, comm, pid, interval, duration, top, sets, fmt, max_live):
    """Trace with RECIPE: --comm NAME, --pid PID, or -- CMD ARGS... (launched once probes attach)."""
    opts = session.RunOptions(recipe=recipe, backend=backend, comm=comm, pid=pid, command=list(command),
                              interval=interval or 0, duration=duration, top=top, sets=_set_pairs(sets),
                              format=fmt, max_live=max_live)
    sys.exit(session.run(opts))


def main():
    try:
        cli.main(standalone_mode=False)
    except RecipeError as exc:
        click.echo(exc.render(), err=True)
        sys.exit(1)
    except ProbedslError as exc:
        click.echo(f"probedsl: error: {exc}", err=True)
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
