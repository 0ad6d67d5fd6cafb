"""A process's files as probedsl can open them. A process in a chroot or in another mount
namespace (a container) names files inside its own root: /usr/lib/.../libc.so.6 there is
another file than ours."""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

from probedsl.process import procfs


def stat_key(path: str) -> Optional[Tuple[int, int]]:
    """(device, inode) of the file at path (a process's root: /proc/PID/root); None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def root_key(pid: int) -> Optional[Tuple[int, int]]:
    """stat_key of the process's root; a thread's that runs once the leader ended alone (the
    leader's /proc/PID/root is gone then, procfs.proc_dir)."""
    return stat_key(f"/proc/{pid}/root") or stat_key(f"{procfs.proc_dir(pid)}/root")


def root_link(pid: int) -> str:
    """The process's root as its /proc link names it (see root_key). Raises OSError."""
    try:
        return os.readlink(f"/proc/{pid}/root")
    except OSError:
        return os.readlink(f"{procfs.proc_dir(pid)}/root")


def root_prefix(pid: int) -> Optional[str]:
    """ "" when the process shares our root; the directory that is its root, seen from here (a
    chroot in our mount namespace); None when no path here reaches it (another mount
    namespace) or the process is gone."""
    theirs = root_key(pid)
    if theirs is None:
        return None
    if theirs == stat_key("/"):
        return ""
    try:
        link = root_link(pid)
    except OSError:
        return None
    return link.rstrip("/") if link.startswith("/") and stat_key(link) == theirs else None


def one_per_other_root(pids: Iterable[int]) -> List[int]:
    """One process for each root other than ours that these processes have."""
    ours, chosen = stat_key("/"), {}
    for pid in pids:
        root = root_key(pid)
        if root is not None and root != ours:
            chosen.setdefault(root, pid)
    return sorted(chosen.values())


def chroot_command(argv: List[str]) -> Tuple[str, List[str]]:
    """(root, command) when argv runs a command through chroot(8), else ("", argv)."""
    if not argv or os.path.basename(argv[0]) != "chroot":
        return "", argv
    rest = argv[1:]
    while rest and rest[0].startswith("-"):  # chroot's own options: --userspec[=]U:G, --skip-chdir...
        rest = rest[2:] if rest[0] in ("--userspec", "--groups") else rest[1:]
    if len(rest) < 2 or not os.path.isdir(rest[0]):
        return "", argv
    return os.path.realpath(rest[0]), rest[1:]


def inside(pid: int, path: str) -> str:
    """A path from /proc/PID/maps (as its mount namespace names it) -> the path inside the
    process's root, as the process itself (and its perf mmap records) names it."""
    try:
        root = root_link(pid).rstrip("/")
    except OSError:
        return path
    return path[len(root) :] if root and path.startswith(root + "/") else path


def mapped_identity(pid: int, start: int, end: int) -> Optional[Tuple[int, int, int]]:
    """(major, minor, inode) of the file mapped at [start, end) in the process."""
    try:
        st = os.stat(f"/proc/{pid}/map_files/{start:x}-{end:x}")
    except OSError:
        return None
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def attach_path(pid: int, path: str) -> str:
    """A path naming the file `path` is in the process's root, for attaching a uprobe now."""
    prefix = root_prefix(pid)
    if prefix is None:
        return f"{procfs.proc_dir(pid)}/root{path}"
    return prefix + path


class RootedFiles:
    """Paths here for files that processes name in their own roots. A file in another mount
    namespace is opened while its process lives and held open (named /proc/OUR-PID/fd/N), so
    that it can still be read to name frames after the process ends."""

    def __init__(self):
        self._held: Dict[Tuple[int, int, str], str] = {}
        # chroot directories seen (or given: chroot ROOT CMD): a file of a process that ended
        # before we looked is found in one of them when its identity matches there
        self.known_roots: Set[str] = set()

    def path(self, pid: int, path: str, identity: Optional[Tuple[int, int, int]] = None) -> str:
        """path: as the process names it, inside its root. identity: (major, minor, inode) of
        the file, when known: a file here with that identity is the one. "" when it cannot be
        opened from here (its process, in another root, ended before we looked)."""
        if identity is not None and _is(path, identity):
            return path
        prefix = root_prefix(pid)
        if prefix:
            self.known_roots.add(prefix)
        if prefix is not None and (identity is None or _is(prefix + path, identity)):
            return prefix + path
        root = root_key(pid)
        if root is None:  # gone: ours only if nothing said otherwise
            if identity is None:
                return path
            return next((r + path for r in sorted(self.known_roots) if _is(r + path, identity)), "")
        key = (*root, path)
        if key not in self._held:
            try:
                fd = os.open(f"{procfs.proc_dir(pid)}/root{path}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return ""
            self._held[key] = f"/proc/{os.getpid()}/fd/{fd}"
        return self._held[key]

    def close(self) -> None:
        for name in self._held.values():
            try:
                os.close(int(name.rsplit("/", 1)[1]))
            except OSError:
                pass
        self._held.clear()


def _is(path: str, identity: Tuple[int, int, int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) == identity
