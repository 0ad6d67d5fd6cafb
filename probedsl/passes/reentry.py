"""Where one release call enters a probed function a second time: a tail jump back into the
probed instructions, which would release the same key twice (the second time as an unknown
key).

glibc 2.43's free() ends its slow paths (the thread's first free sets up its tcache; a block
whose tcache key matches is checked for a double free) with `jmp free`; Debian sid's jemalloc
makes sized `delete[]` one `jmp` to sized `delete`. A tail jump leaves rsp as it was at the
call's entry (the return address on top), so the second hit of the probe shows the same
thread and stack pointer: each such branch gets a small probe that leaves (thread, rsp) in a
map, and a release of an unknown key at the (thread, rsp) left there is that call's second
hit: not counted as unknown (a hit whose key is known is always a release, so a mark left
behind can never hide one). Where the branches cannot be probed (bpftrace built without bfd),
the probe of the function holding them leaves the mark after each of its releases. A function
whose every call is such a jump (the thunk) is not probed at all in that file (`forwards`).

Which of these a target probes, and how the generated code tells the second hit, is the
target's (probedsl.targets.base: reentries). The code reached from each probed release function by jumps (not calls: a call pushes, and a
callee's release is another call) is decoded with iced-x86, up to MAX_INSTRUCTIONS.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace as _replace
from typing import Dict, Optional, Tuple

from probedsl.binaries import elf
from probedsl import ir
from probedsl.binaries.x86 import LOOKAHEAD

MAX_INSTRUCTIONS = 20000  # decoded per probed function and file (glibc's free: ~2,000)
WINDOW = 15 * LOOKAHEAD  # a branch landing this close to an entry may pass its probe


@dataclass(frozen=True)
class Site:
    path: str
    address: int  # the branch instruction (ELF virtual address)
    code: str  # its bytes (hex), checked again before attaching
    target: int  # where it lands: offset from the entered function's entry
    origin: str  # the probed function whose call reaches it


def apply(program: ir.Program) -> ir.Program:
    """Each release-only uprobe with the branches that enter it again (`reentered`) and the
    files where its function only forwards to another probed one (`forwards`)."""
    resources = []
    for res in program.resources:
        releases = [
            p
            for p in res.probes
            if p.kind == "uprobe" and not p.at_return and p.actions and all(a.kind == "release" for a in p.actions)
        ]
        found: Dict[int, list] = {p.id: [] for p in releases}
        forwards: Dict[int, list] = {p.id: [] for p in releases}
        for origin in releases:
            for path in origin.files:
                for fn, site in _sites(
                    path, origin.function, tuple(sorted({p.function for p in releases if path in p.files}))
                ):
                    entered = next(p for p in releases if p.function == fn)
                    if (
                        fn != origin.function
                        and site.target == 0
                        and _same_actions(origin, entered)
                        and site.address == _probe_address(path, origin)
                    ):
                        forwards[origin.id].append(path)  # every call of origin is this jump
                    elif site.target <= entered.place_in(path)[0]:
                        found[entered.id].append(site)  # it passes the probed instruction
        probes = []
        for p in res.probes:
            if p.id in found:
                unique: Dict[Tuple[str, int], Site] = {}
                for site in found[p.id]:  # a branch reached from several origins: once
                    unique.setdefault((site.path, site.address), site)
                # where p only forwards, nothing of p is attached to be entered again
                sites = tuple(s for s in unique.values() if s.path not in forwards[p.id])
                p = _replace(p, reentered=sites, forwards=tuple(dict.fromkeys(forwards[p.id])))
            probes.append(p)
        resources.append(_replace(res, probes=tuple(probes)))
    return _replace(program, resources=tuple(resources))


def _same_actions(a: ir.Probe, b: ir.Probe) -> bool:
    return [(x.kind, x.key, x.guard) for x in a.actions] == [(x.kind, x.key, x.guard) for x in b.actions]


def _probe_address(path: str, probe: ir.Probe) -> int:
    """The address of the probed instruction (the placed one, else the entry)."""
    syms = elf.symbols(path)
    entry = syms.address_of(probe.function) if syms else None
    return (entry or 0) + probe.place_in(path)[0]


def _sites(path: str, origin: str, entered: Tuple[str, ...]):
    """(entered function, Site) for each branch reached by jumps from origin's entry that lands
    within WINDOW bytes of an entered function's entry."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return ()
    return _walk(path, origin, entered, mtime)


@functools.lru_cache(maxsize=256)
def _walk(path: str, origin: str, entered: Tuple[str, ...], _mtime_ns: int):
    from iced_x86 import Decoder, FlowControl

    syms = elf.symbols(path)
    if not syms or not syms.address_of(origin):
        return ()
    entries = {syms.address_of(f): f for f in entered if syms.address_of(f)}

    slots = _plt_slots(path, _mtime_ns)

    def landing(target: int) -> Optional[Tuple[str, int]]:
        near = [start for start in entries if start <= target < start + WINDOW]
        if near:  # the nearest entry at or before it
            return entries[max(near)], target - max(near)
        # a PLT stub: the function its slot names (this file's own, when the process binds
        # the name to it: a preloaded or first-linked allocator, as --allocator assumes)
        called = slots.get(_stub_slot(syms.read(target, 32), target))
        return (called, 0) if called in entered else None

    start = syms.address_of(origin)
    todo, seen, found, decoded = [start], set(), [], 0
    while todo and decoded < MAX_INSTRUCTIONS:
        block = todo.pop()
        if block in seen:
            continue
        code = syms.read(block, 4096)
        for ins in Decoder(64, code, ip=block):
            if ins.ip in seen and ins.ip != block or ins.is_invalid:
                break
            seen.add(ins.ip)
            decoded += 1
            flow = ins.flow_control
            if flow in (FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH):
                target = ins.near_branch_target
                lands = landing(target)
                if lands and target != ins.ip:
                    offset = ins.ip - block
                    found.append(
                        (lands[0], Site(path, ins.ip, code[offset : offset + ins.len].hex(), lands[1], origin))
                    )
                if target and not (lands and lands[1] == 0):
                    todo.append(target)  # within the same call: follow it (an entry's own
                    # code is walked from that entry)
                if flow == FlowControl.UNCONDITIONAL_BRANCH:
                    break
            elif flow in (
                FlowControl.RETURN,
                FlowControl.INDIRECT_BRANCH,
                FlowControl.INTERRUPT,
                FlowControl.EXCEPTION,
            ):
                break
            if ins.next_ip >= block + len(code) - 15:
                todo.append(ins.next_ip)  # decode the rest from a fresh read
                break
    return tuple(found)


def _stub_slot(code: bytes, address: int) -> int:
    """The GOT slot a PLT stub at address jumps through (`endbr64; bnd jmp *slot(%rip)`), or 0."""
    from iced_x86 import Decoder, FlowControl, Mnemonic, OpKind, Register

    for count, ins in enumerate(Decoder(64, code, ip=address)):
        if count >= 2 or ins.is_invalid:
            return 0
        if ins.mnemonic == Mnemonic.ENDBR64:
            continue
        if (
            ins.flow_control == FlowControl.INDIRECT_BRANCH
            and ins.op0_kind == OpKind.MEMORY
            and ins.memory_base == Register.RIP
        ):
            return ins.memory_displacement  # iced gives the absolute address for rip-relative
        return 0
    return 0


@functools.lru_cache(maxsize=64)
def _plt_slots(path: str, _mtime_ns: int) -> Dict[int, str]:
    """GOT slot address -> the function its PLT stub calls (.rela.plt's jump slots)."""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    slots: Dict[int, str] = {}
    try:
        with open(path, "rb") as f:
            elf_file = ELFFile(f)
            for section in elf_file.iter_sections():
                if isinstance(section, RelocationSection) and section.name in (".rela.plt", ".rel.plt"):
                    symbols = elf_file.get_section(section["sh_link"])
                    for rel in section.iter_relocations():
                        if rel["r_info_sym"]:
                            slots[rel["r_offset"]] = symbols.get_symbol(rel["r_info_sym"]).name
    except Exception:  # pyelftools on a damaged file raises many kinds: no stubs named
        return {}
    return slots
