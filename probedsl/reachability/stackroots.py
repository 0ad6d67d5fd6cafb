"""Where each paused thread's stack begins for the scan: its stack pointer, the exit path's caller, the red zone, stacks made on the heap (swapcontext)."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from probedsl.binaries import elf
from probedsl.process.tether import Paused
from probedsl.reachability.regions import Region


RED_ZONE = 128  # x86-64: a leaf function may keep data below its rsp


def _stack_tops(pid: int, paused: Paused, regions: List[Region]) -> List[int]:
    """Where each paused thread's live stack begins (live_stacks)."""
    return live_stacks(pid, paused, regions)[0]


def live_stacks(pid: int, paused: Paused, regions: List[Region]) -> Tuple[List[int], List[int]]:
    """(where each paused thread's live stack begins, the registers of the frame that called
    exit()). The live stack begins at the frame that called exit() for the thread ending the
    process (libc's exit path below it is not a root); at the stack pointer less the red zone
    for a thread stopped in user code (a leaf function may keep live data there); at the stack
    pointer for one stopped in a system call (its wrapper keeps none). The registers are the
    callee-saved ones exit()'s caller had when it called: live in that frame, they sit in the
    exit path's frames (which saved them there and reused the registers), or still in place."""
    tops, words = [], []
    for regs in paused.registers.values():
        call = regs["orig_rax"]
        if call in (_SYS_EXIT, _SYS_EXIT_GROUP):
            found = _exit_caller(pid, regs, regions)
            tops.append(found[0] if found else regs["rsp"])
            words += found[1].values() if found else []
        elif call == _NO_SYSCALL:
            tops.append(max(regs["rsp"] - RED_ZONE, 0))
        else:
            tops.append(regs["rsp"])
    return tops, words


_SYS_EXIT, _SYS_EXIT_GROUP = 60, 231


_NO_SYSCALL = (1 << 64) - 1  # orig_rax of a thread stopped outside a system call


# libc's functions between a call of exit() (or _exit) and the exit_group system call
EXIT_PATH = frozenset(
    {
        "exit",
        "__GI_exit",
        "__run_exit_handlers",
        "_exit",
        "_Exit",
        "__GI__exit",
        "quick_exit",
        "__GI_quick_exit",
        "syscall",
    }
)


def _exit_caller_sp(pid: int, regs, regions: List[Region]) -> Optional[int]:
    found = _exit_caller(pid, regs, regions)
    return found[0] if found else None


def _exit_caller(pid: int, regs, regions: List[Region]) -> Optional[Tuple[int, Dict[str, int]]]:
    """The stack pointer of the frame that called into libc's exit path, found by unwinding
    the exiting thread with its libc's call-frame rows (probedsl.binaries.cfi) while the frames are
    EXIT_PATH functions or unnamed ones of the file the thread stopped in (without libc's debug
    symbols its local functions, __run_exit_handlers among them, have no name): the stack
    pointer above the outermost EXIT_PATH frame, and that frame's callee-saved registers
    (rbx, rbp, r12-r15: those whose value the rows recover); None when there is none."""
    from probedsl.binaries import cfi

    pc, sp = regs["rip"], regs["rsp"]
    # the callee-saved registers as each frame found them; one whose rule the rows do not
    # give as a slot (another register, an expression) is unknown from there on
    kept = {cfi.REGISTER_NAMES[n]: regs[cfi.REGISTER_NAMES[n]] for n in (cfi.RBP, *cfi.CALLEE_SAVED)}
    found: Optional[Tuple[int, Dict[str, int]]] = None
    first = ""  # the file of the frame the thread stopped in
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            word = lambda at: int.from_bytes(os.pread(mem.fileno(), 8, at), "little")
            for depth in range(16):
                # a caller's pc is a return address: look up the call before it
                at = pc if depth == 0 else pc - 1
                region = next((r for r in regions if r.start <= at < r.end and "x" in r.perms and r.path), None)
                symbols = elf.symbols(region.path) if region else None
                table = cfi.table(region.path) if region else None
                if symbols is None or table is None:
                    break
                vaddr = at - region.start + symbols.file_offset_to_vaddr(region.offset)
                function = symbols.function_at(vaddr)
                first = first or region.path
                named = function is not None and function[0] in EXIT_PATH
                if not named and (function is not None or region.path != first):
                    break
                row = table.row_at(vaddr)
                if row is None or row.cfa_register not in (cfi.RSP, cfi.RBP):
                    break
                if row.cfa_register == cfi.RBP and "rbp" not in kept:
                    break
                cfa = (sp if row.cfa_register == cfi.RSP else kept["rbp"]) + row.cfa_offset
                for n, rule in ((cfi.RBP, row.rbp), *row.saved):
                    name = cfi.REGISTER_NAMES[n]
                    if rule is not None and rule[0] == "offset":
                        kept[name] = word(cfa + rule[1])
                    elif rule is not None:
                        kept.pop(name, None)
                pc, sp = word(cfa - 8), cfa
                if named:
                    found = (cfa, dict(kept))
    except OSError:
        return None
    return found


def _heap_stacks(heap, starts: np.ndarray, ends: np.ndarray, live: List[int]) -> List[Tuple[int, int, int]]:
    """(block start, live top, block end) of each thread running on a stack that is a heap
    block (swapcontext, coroutines): the part below the top is dead, not a source of pointers;
    the part above holds the thread's live frames, roots as any thread's stack."""
    found = []
    for top in live:
        if not any(lo <= top < hi for lo, hi in heap):
            continue
        i = int(np.searchsorted(starts, np.uint64(top), side="right")) - 1
        if i >= 0 and top < int(ends[i]):
            found.append((int(starts[i]), top & ~7, int(ends[i])))
    return found
