"""The pass that binds a program's probes to files: each probe's library short name resolved
to the file the traced program loads (probedsl.process.libraries), its symbol checked, its aliases
folded, its copies in other roots found, its usdt sites read."""

from __future__ import annotations

import difflib
import os
from dataclasses import replace
from typing import Dict, List, Tuple

from probedsl.binaries import elf, usdt
from probedsl import ir
from probedsl.errors import Diagnostic, ProbedslError, RecipeError
from probedsl.process.libraries import SAFE_PATH, LibraryResolver
from probedsl.process.realfile import real_key


def resolve(program: ir.Program, resolver: LibraryResolver, source: str = "") -> ir.Program:
    """Fill in each uprobe's library path, check its symbol, and drop probes that alias an
    earlier probe's address in the same resource (glibc's aligned_alloc is memalign):
    attaching both would count one call twice."""
    diagnostics: List[Diagnostic] = []
    unprobed: List[str] = []
    resources = []
    for res in program.resources:
        seen: Dict[Tuple[str, int, bool], ir.Probe] = {}
        probes = []
        for probe in res.probes:
            if probe.kind == ir.ProbeKind.USDT:
                found = _usdt_sites(probe, resolver, program.filename, diagnostics)
                if found:
                    probes.append(replace(probe, path=found[0], sites=found[1]))
                elif found is None:
                    unprobed.append(probe.label)
                continue
            if probe.kind != ir.ProbeKind.UPROBE:
                probes.append(probe)
                continue
            path = resolver.resolve(probe.library)
            if path is None:
                diagnostics.append(Diagnostic(program.filename, probe.span, f"library '{probe.library}' not found"))
                continue
            if not SAFE_PATH.match(path):
                diagnostics.append(
                    Diagnostic(
                        program.filename,
                        probe.span,
                        f"library path {path!r} has characters probedsl does not put in a probe",
                    )
                )
                continue
            syms = elf.symbols(path)
            address = syms.address_of(probe.function) if syms else None
            if address is None and probe.optional:
                unprobed.append(f"{os.path.basename(path)}:{probe.function}")
                continue
            if address is None:
                near = difflib.get_close_matches(probe.function, list(syms.by_name) if syms else [], n=3)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                diagnostics.append(
                    Diagnostic(program.filename, probe.span, f"function '{probe.function}' not found in {path}{hint}")
                )
                continue
            key = (path, address, probe.at_return)
            if key in seen:
                continue
            seen[key] = probe
            probes.append(replace(probe, path=path, also=_other_copies(path, probe, resolver)))
        resources.append(replace(res, probes=tuple(probes)))
    if diagnostics:
        raise RecipeError(diagnostics, source)
    return replace(program, resources=tuple(resources), unprobed=tuple(dict.fromkeys(unprobed)))


def _usdt_sites(probe: ir.Probe, resolver: LibraryResolver, filename: str, diagnostics: List[Diagnostic]):
    """(file, sites) of the first of the program's files holding the probe; None when none does;
    () when it is there but cannot be probed (a diagnostic says why)."""
    provider, name = probe.function.split(":")
    for path in dict.fromkeys(resolver.program_files()):
        found = usdt.sites(path, provider, name)
        if not found:
            continue
        if not SAFE_PATH.match(path):
            diagnostics.append(
                Diagnostic(filename, probe.span, f"file path {path!r} has characters probedsl does not put in a probe")
            )
            return ()
        try:
            for site in found:
                for index in probe.args_read:
                    if index >= len(site.args):
                        raise ProbedslError(
                            f"{probe.label} in {path} has {len(site.args)} argument(s); the "
                            f"recipe reads argument {index + 1}"
                        )
                    usdt.location(site.args[index])
        except ProbedslError as exc:
            diagnostics.append(Diagnostic(filename, probe.span, str(exc)))
            return ()
        return path, tuple(found)
    return None


def _other_copies(path: str, probe: ir.Probe, resolver: LibraryResolver) -> Tuple[str, ...]:
    """The probe's library in other roots, once per real file (two containers of one image
    share their layer's file: a probe on each path would count each call twice), where it has
    the function."""
    copies: Dict[Tuple[int, int], str] = {}
    for other in [path] + resolver.elsewhere(probe.library):
        key = real_key(other)
        if key is None:
            continue
        syms = elf.symbols(other)
        if SAFE_PATH.match(other) and syms and syms.address_of(probe.function) is not None:
            copies.setdefault(key, other)
    return tuple(p for p in copies.values() if p != path)
