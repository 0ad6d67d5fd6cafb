"""Processes on this machine: /proc read with bounds (procfs), files seen through other roots
(roots: chroots, containers), ptrace (ptrace), a command launched and held before its exec
(launcher), a target held at exit for --reachability (tether), its mappings as they change
(mappings), the libraries a program loads (libraries). Takes pids and paths; gives what the
kernel says of them.
"""
