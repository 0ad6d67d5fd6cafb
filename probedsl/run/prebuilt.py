"""BCC's compiles of the bundled memleak, and the unwind rows of the system's python3 and C
library, made by the install for every user's first run (scripts/setup.sh runs
`python -m probedsl.run.prebuilt`).

A cold BCC start waits mostly for clang and LLVM (0.5-0.8 s of memleak's); a run whose C text
was compiled before compiles only its tables and loads the kept programs (drivers/bcc_kept.py).
Then, with dwarf stacks, decoding python3's and libc's rows (~0.15 s) is what a first run of
python3 waits for. The install runs memleak the ways a first run most often does (a command, a
pid; dwarf and fp stacks), each run with an empty cache of its own and compiling afresh, and
copies what each kept into the Python environment's share/probedsl (cachedir.shipped_root). A
user's run looks there when its own cache lacks a compile or a file's rows (by build id), under
the same trust checks. A text the install did not build (another recipe or options, a pid
namespace, another kernel, BCC or headers) is compiled as before; with PROBEDSL_INSTALL_CACHE=0
a run reads nothing the install built.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from importlib import resources
from typing import Dict, List

from probedsl.drivers import bcc_kept
from probedsl.drivers.bcc_compat import _import_bcc
from probedsl.trust import cachedir

STACKS = ("dwarf", "fp")
# what is kept here, of each kind, at most: a few kernels' compiles (100-200 KB each), a few
# versions of each file's rows (python3's 130 KB)
MOST = {"bcc-programs": 16, "unwind-rows": 64}
# the command traced: its compile is any command's; python3's rows and its libraries' are kept
COMMAND = ["/usr/bin/python3", "-c", "pass"] if os.access("/usr/bin/python3", os.X_OK) else ["/bin/true"]


def runs(pid: int) -> List[List[str]]:
    """The `probedsl run` arguments whose compiles (and rows) the install keeps."""
    out = []
    for stacks in STACKS:
        common = ["run", "memleak", "--backend", "bcc", "--stacks", stacks]
        out.append(common + ["--", *COMMAND])
        out.append(common + ["--pid", str(pid), "--duration", "0.1"])
    return out


def inputs() -> str:
    """A digest of what the build depends on: probedsl's code and recipes, what a kept compile's
    name holds (BCC, clang and LLVM, the kernel and its headers: bcc_kept.name), the command and
    the C library. Built from the same, it is not built again (set-up runs at every test
    command); what it missed would cost a first run its compile, never a wrong program (a
    compile is used only under the name of exactly what it was compiled from)."""
    digest = hashlib.sha256(bcc_kept.name(_import_bcc(), "", []).encode())
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # probedsl/, backends/ beside it
    for top in (here, os.path.join(os.path.dirname(here), "backends"), str(resources.files("probedsl.recipes"))):
        for path in sorted(glob.glob(os.path.join(top, "**", "*"), recursive=True)):
            if os.path.isfile(path) and "__pycache__" not in path:
                with open(path, "rb") as f:
                    digest.update(path.encode() + f.read())
    for path in (COMMAND[0], "/lib/x86_64-linux-gnu/libc.so.6"):
        with contextlib.suppress(OSError):
            st = os.stat(path)
            digest.update(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def build() -> str:
    """Run each and keep what it compiled; one line saying what was done (ValueError: why not)."""
    root = cachedir.shipped_root()
    why = cachedir.why_untrusted(root, root)
    if why:
        raise ValueError(f"cannot build into {root}: {why}")
    stamp, built_from = os.path.join(root, ".memleak-built-from"), inputs()
    with contextlib.suppress(OSError, ValueError), open(stamp) as f:
        was = json.load(f)
        if was["from"] == built_from and all(os.path.isfile(os.path.join(root, p)) for p in was["files"]):
            return f"memleak's BCC compiles and its command's unwind rows already built into {root}"
    shipped = {kind: cachedir.Kept(kind, root=root) for kind in MOST}
    built: Dict[str, set] = {kind: set() for kind in MOST}
    with tempfile.TemporaryDirectory(prefix="probedsl-prebuilt-") as work:
        sleeper = subprocess.Popen(["/bin/sleep", "600"])  # the --pid runs' process
        try:
            for i, argv in enumerate(runs(sleeper.pid)):
                cache = os.path.join(work, str(i))
                env = {k: v for k, v in os.environ.items() if not k.startswith("PROBEDSL_FAULT")}  # (the tests')
                env.update(XDG_CACHE_HOME=cache, PROBEDSL_INSTALL_CACHE="0")  # all made afresh
                result = subprocess.run(
                    [sys.executable, "-m", "probedsl", *argv], env=env, capture_output=True, text=True, timeout=300
                )
                if result.returncode != 0:
                    said = (result.stderr.strip().splitlines() or ["no message"])[-1]
                    raise ValueError(f"`probedsl {' '.join(argv)}` failed: {said}")
                made = {kind: glob.glob(os.path.join(cache, "probedsl", kind, "*")) for kind in MOST}
                if not made["bcc-programs"]:
                    raise ValueError(f"`probedsl {' '.join(argv)}` kept no compile")
                for kind, paths in made.items():
                    for path in paths:
                        with open(path, "rb") as f:
                            if not shipped[kind].keep(os.path.basename(path), f.read(), most=MOST[kind]):
                                raise ValueError(f"cannot write into {root}")
                        built[kind].add(os.path.basename(path))
        finally:
            sleeper.kill()
            sleeper.wait()
    files = [os.path.join(kind, name) for kind, names in built.items() for name in sorted(names)]
    cachedir.write_whole(stamp, json.dumps({"from": built_from, "files": files}).encode())
    cachedir.share(root)
    return (
        f"memleak's BCC compiles and the unwind rows of its command built into {root} for a first run "
        f"({len(built['bcc-programs'])} texts, {len(built['unwind-rows'])} files' rows)"
    )


def main() -> None:
    try:
        print(build())
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        sys.exit(f"memleak's BCC compiles not built at install (a first run compiles them): {exc}")


if __name__ == "__main__":
    main()
