"""BCC's compiles of the bundled memleak, made by the install for every user's first run
(scripts/setup.sh runs `python -m probedsl.run.prebuilt`).

A cold BCC start waits mostly for clang and LLVM (0.5-0.8 s of memleak's); a run whose C text
was compiled before compiles only its tables and loads the kept programs (drivers/bcc_kept.py).
The install runs memleak the ways a first run most often does (a command, a pid; dwarf and fp
stacks), each run with an empty cache of its own and compiling afresh, and copies what each kept
into the Python environment's share/probedsl (cachedir.shipped_root). A user's run looks there when its own
cache lacks the compile, under the same trust checks. A text the install did not build (another
recipe or options, a pid namespace, another kernel, BCC or headers) is compiled as before;
PROBEDSL_INSTALL_COMPILES=0 leaves what the install built unused.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from typing import List

from probedsl.trust import cachedir

STACKS = ("dwarf", "fp")
MOST = 16  # kept here (100-200 KB each): a few kernels' worth of the runs below


def runs(pid: int) -> List[List[str]]:
    """The `probedsl run` arguments whose compiles the install keeps."""
    out = []
    for stacks in STACKS:
        common = ["run", "memleak", "--backend", "bcc", "--stacks", stacks]
        out.append(common + ["--", "/bin/true"])
        out.append(common + ["--pid", str(pid), "--duration", "0.1"])
    return out


def build() -> str:
    """Run each and keep what it compiled; one line saying what was done (ValueError: why not)."""
    root = cachedir.shipped_root()
    why = cachedir.why_untrusted(root, root)
    if why:
        raise ValueError(f"cannot build into {root}: {why}")
    shipped = cachedir.Kept("bcc-programs", root=root)
    built = set()
    with tempfile.TemporaryDirectory(prefix="probedsl-prebuilt-") as work:
        sleeper = subprocess.Popen(["sleep", "600"])  # the --pid runs' process
        try:
            for i, argv in enumerate(runs(sleeper.pid)):
                cache = os.path.join(work, str(i))
                env = dict(os.environ, XDG_CACHE_HOME=cache, PROBEDSL_INSTALL_COMPILES="0")  # compiled afresh
                result = subprocess.run(
                    [sys.executable, "-m", "probedsl", *argv], env=env, capture_output=True, text=True, timeout=300
                )
                if result.returncode != 0:
                    said = (result.stderr.strip().splitlines() or ["no message"])[-1]
                    raise ValueError(f"`probedsl {' '.join(argv)}` failed: {said}")
                made = glob.glob(os.path.join(cache, "probedsl", "bcc-programs", "*.json"))
                if not made:
                    raise ValueError(f"`probedsl {' '.join(argv)}` kept no compile")
                for path in made:
                    with open(path, "rb") as f:
                        if not shipped.keep(os.path.basename(path), f.read(), most=MOST):
                            raise ValueError(f"cannot write into {root}")
                    built.add(os.path.basename(path))
        finally:
            sleeper.kill()
            sleeper.wait()
    cachedir.share(root)
    place = os.path.join(root, "bcc-programs")
    return f"BCC's compiles of memleak for a first run built into {place} ({len(built)} texts)"


def main() -> None:
    try:
        print(build())
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        sys.exit(f"BCC's compiles of memleak not built at install (a first run compiles them): {exc}")


if __name__ == "__main__":
    main()
