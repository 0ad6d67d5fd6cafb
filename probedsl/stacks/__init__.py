"""Addresses -> named frames. stacktrust: where a frame-pointer stack stops being certain;
unwind_tables: the call-frame rows BCC's in-kernel unwinder walks (written to its maps,
cached on disk by build id); symbolizer: frames named from ELF symbols, debug files and
addr2line, a frame it cannot name shown as module+0xoffset.
"""
