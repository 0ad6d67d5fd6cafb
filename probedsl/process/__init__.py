"""Processes on this machine: /proc read with bounds (procfs), files seen through other roots
(roots: chroots, containers), ptrace (ptrace), a command launched and held before its exec
(launcher), a target held by ptrace (tether: at its exit for --reachability, each child at its
fork while its uprobes go on; tree_tether: each child too at its own exit), its mappings as they change (mappings), a launched command
stopped at each load of code until the unwinder has its rows (mapping_hold), the libraries a
program loads (libraries). Takes pids and paths; gives what the kernel says of them.
"""
