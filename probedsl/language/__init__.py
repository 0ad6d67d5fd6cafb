"""The recipe language: text -> a checked syntax tree.

Takes recipe text (grammar/recipe.lark); gives `ast.Recipe`, frozen dataclasses with the span
each node came from. parser: syntax, every error located; checker: meaning, every problem at
once (file:line:col); tracepoints: the running kernel's tracepoint fields, for the checker.
Imports nothing of probedsl but the ground (errors).
"""
