"""Every BCC compile (BPF(), a kept compile's tables-only one too) reads all of /proc/kallsyms
into a symbol cache, 0.1-0.15 s of each start here (121,000 lines), only to learn whether the
kernel has bpf_probe_read_kernel and bpf_probe_read_user (b_frontend_action.cc's
DoMiscWorkAround, BCC 0.26-0.37): it then uses them rather than bpf_probe_read. Every kernel
probedsl runs on has both (its programs call bpf_probe_read_user: 5.5+). So the compile's
thread is given a /proc/kallsyms of those two lines: a thread may have a mount namespace of its
own, and in it /proc is made private before the file is bound over, so that no other namespace
sees it. Where a step is refused (no CAP_SYS_ADMIN, a seccomp filter) the compile reads the
real file, as before."""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 1 << 12, 1 << 14, 1 << 18
# what BCC looks up, at an address in the kernel's half (bcc_procutils_each_ksym skips the rest)
LINES = b"ffffffff00000000 T bpf_probe_read_kernel\nffffffff00000000 T bpf_probe_read_user\n"
KALLSYMS = b"/proc/kallsyms"
# a namespace copies every mount, and its end removes them, each under the kernel's mount lock:
# on a host of thousands of containers' mounts that could cost more than the 0.12 s it saves
MOST_MOUNTS = 500

_libc = ctypes.CDLL(None, use_errno=True)


def narrow_for_this_thread() -> bool:
    """This thread's /proc/kallsyms becomes LINES (True), or stays the kernel's (False). Only for
    a thread of probedsl's own that ends after its compile: its mount namespace ends with it."""
    if os.geteuid() != 0 or _mounts() > MOST_MOUNTS:
        return False
    if _libc.unshare(CLONE_NEWNS) != 0:  # (CLONE_NEWNS unshares CLONE_FS too)
        return False
    # the namespace's mounts are copies of the process's, peers of the shared ones: until /proc
    # is private, a mount on it would propagate back to them
    if _libc.mount(None, b"/proc", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    try:
        fd, path = tempfile.mkstemp(prefix="probedsl-kallsyms-")
    except OSError:
        return False
    try:
        os.write(fd, LINES)
        # by the descriptor: that file, whatever the directory's owner does to its name meanwhile
        return _libc.mount(f"/proc/thread-self/fd/{fd}".encode(), KALLSYMS, None, MS_BIND, None) == 0
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _mounts() -> int:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return MOST_MOUNTS + 1
