"""Passes that bind a program to this machine: ir.Program -> ir.Program.

allocators (--allocator, -O: another allocator's library), resolve (library short names ->
the files the traced program loads, symbols checked, aliases folded, usdt sites read),
private_libs (a private copy of each probed library for a launched command), placement (each
uprobe on an instruction the kernel emulates), reentry (tail jumps back into a probed release
told apart from a second release). compiler.plan runs them in one order.
"""
