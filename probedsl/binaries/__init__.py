"""Reading executable files: ELF symbols and segments (elf), separate debug files by build
id, debuglink and debuginfod (debuginfod's client in debuginfo), file:line through addr2line
(sourcelines), call-frame rows from .eh_frame/.debug_frame (cfi), USDT notes (usdt), x86-64
decoding and uprobe costs at a function's entry (x86). Takes paths; gives facts about the
files. No pipeline stage is imported here.
"""
