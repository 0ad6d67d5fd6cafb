"""DEPTH Python frames deep (the module's, DEPTH - 2 nested calls, the loop's), CALLS
malloc/free pairs through ctypes; it reads a line first (a tracer attaches meanwhile), then
prints the loop's own seconds."""

import ctypes
import sys
import time

libc = ctypes.CDLL(None)
malloc, free = libc.malloc, libc.free
malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
free.restype, free.argtypes = None, [ctypes.c_void_p]


def loop(calls):
    started = time.perf_counter()
    for _ in range(calls):
        free(malloc(64))
    return time.perf_counter() - started


def nest(depth, calls):
    return loop(calls) if depth <= 1 else nest(depth - 1, calls)


depth, calls = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
print(nest(depth - 2, calls))
