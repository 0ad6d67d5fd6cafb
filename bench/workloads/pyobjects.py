"""CALLS small Python objects made and dropped, one in KEEP kept in a list (a leak of small
objects, which pymalloc serves); it reads a line first (a tracer attaches meanwhile), then
prints the objects kept and the loop's own seconds, and ends at once (os._exit: the kept
objects are still allocated when the tracer reports the ended process)."""

import os
import sys
import time

kept = []


def make(i):
    return {"i": i, "name": "x"}  # a dict of two items: well under pymalloc's 512 bytes


def loop(calls, keep):
    started = time.perf_counter()
    for i in range(calls):
        item = make(i)
        if i % keep == 0:
            kept.append(item)
    return time.perf_counter() - started


calls, keep = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
seconds = loop(calls, keep)
print(len(kept), seconds, flush=True)
os._exit(0)
