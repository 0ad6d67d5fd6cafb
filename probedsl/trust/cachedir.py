"""Which cache directories a run may trust.

probedsl runs as root, and its environment (XDG_CACHE_HOME under `sudo -E`, a capability
holder's HOME) may point at a directory another user writes. What a cache holds changes what
root reports (unwind rows) or loads (compiled programs), so a cache is used only if every
directory from the cache root down, and each file in it, belongs to the effective user (or
root) and is writable by no one else; the directories above the root must be as safe, or
sticky (/tmp). Otherwise the run says so once and uses a private place of its own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import stat
import sys
import tempfile
from typing import Callable, Optional

from probedsl.notices import note

PRIVATE_ROOT = "/var/cache/probedsl"  # root's own, when the environment's is not trusted


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (os.geteuid(), 0)


def _safe(st: os.stat_result, sticky_ok: bool = False) -> bool:
    """Owned by us or root, and no one else can write it (or, above a cache root, it is a
    sticky directory: others cannot rename or remove what is ours in it)."""
    if not _owner_ok(st):
        return False
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) == 0:
        return True
    return sticky_ok and stat.S_ISDIR(st.st_mode) and bool(st.st_mode & stat.S_ISVTX)


def why_untrusted(root: str, path: str = "") -> str:
    """ "" when root (a cache root) and path (a directory or file under it, or root itself)
    may be trusted; else which component is not and why. Components that do not exist yet
    are fine: we create them private."""
    real_root = os.path.realpath(root)
    parts = real_root.strip("/").split("/")
    current = "/"
    for i, part in enumerate([""] + parts):
        current = os.path.join(current, part) if part else current
        why = _component(current, sticky_ok=i < len(parts), link_ok=True)
        if why is not None:
            return why
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root)) if path else "."
    if rel.startswith(".."):
        return f"{path}: not under {root}"
    for part in [] if rel == "." else rel.split("/"):
        current = os.path.join(current, part)
        why = _component(current, sticky_ok=False, link_ok=False)
        if why is not None:
            return why
    return ""


def _component(path: str, sticky_ok: bool, link_ok: bool) -> Optional[str]:
    """None: trusted, look further; "": absent (we create the rest private); else why not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if (not link_ok and stat.S_ISLNK(st.st_mode)) or not _safe(st, sticky_ok):
        return _describe(path, st)
    return None


def _describe(path: str, st: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not _owner_ok(st):
        return f"{path} belongs to {owner}"
    return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o})"


def user_cache_root() -> str:
    """$XDG_CACHE_HOME, else ~/.cache."""
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def private_root() -> str:
    """The effective user's own cache root, from the password database, not the environment."""
    if os.geteuid() == 0:
        return PRIVATE_ROOT
    try:
        return os.path.join(pwd.getpwuid(os.geteuid()).pw_dir, ".cache", "probedsl")
    except KeyError:
        return ""


def directory(
    kind: str, root: Optional[str] = None, sub: Optional[str] = None, quiet: bool = False, fallback: bool = True
) -> str:
    """A trusted directory for one cache (e.g. "unwind-rows"), created private (0700), or ""
    when there is none (then compute, do not cache). root: the cache root the environment
    names ($XDG_CACHE_HOME by default, with `probedsl/KIND` under it; sub overrides that).
    quiet: no note when another place or none is used (a cache that only saves time);
    fallback: else the user's private place (not for the install's build, which must be there)."""
    say = (lambda _: None) if quiet else note
    # resolved once: every later use goes through the components checked, never again
    # through a link (a user's symlink in sticky /tmp could be swapped after the check)
    root = os.path.realpath(root or user_cache_root())
    wanted = os.path.join(root, sub if sub is not None else os.path.join("probedsl", kind))
    why = why_untrusted(root, wanted)
    if not why:
        if not _make(wanted):
            say(f"cache {wanted} cannot be made (a read-only file system?): computed, not cached")
            return ""
        why = why_untrusted(root, wanted)  # a component someone else made meanwhile
        if not why:
            return wanted
    private = private_root() if fallback else ""
    place = os.path.join(private, kind) if private else ""
    if place and not why_untrusted(private, place) and _make(place):
        say(f"cache {wanted} not used: {why}; using {place}")
        return place
    say(f"cache {wanted} not used: {why}; computed, not cached")
    return ""


def _make(path: str) -> bool:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError:
        pass  # read-only: files there may still be read
    return os.path.isdir(path)


def file_ok(root: str, path: str) -> bool:
    """Whether a cache file (under a directory directory() gave) may be read: a regular file,
    ours or root's, writable by no one else."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode) and _safe(st):
        return True
    _not_used(path, st)
    return False


def _not_used(path: str, st: os.stat_result) -> None:
    why = (
        _describe(path, st) if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode) else f"{path} is not a regular file"
    )
    note(f"cache file not used: {why}")


def read_trusted(root: str, path: str, limit: int = -1) -> Optional[bytes]:
    """A cache file's bytes (at most limit) when it may be loaded (file_ok's test, made on the
    descriptor that is read: no link followed, no swap between the test and the read); else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            note(f"cache file not used: {path} is a symbolic link")
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not (stat.S_ISREG(st.st_mode) and _safe(st)):
            _not_used(path, st)
            return None
        return f.read(limit)


def write_whole(path: str, data: bytes) -> bool:
    """Written whole (private, then renamed) or not at all: two runs may write one file at once.
    False when it could not be written (a cache that is not written only costs the next run)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".new-")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def shipped_root() -> str:
    """Where the install keeps what it built once for every run (scripts/setup.sh runs
    probedsl.cli.build_once): the Python environment's share/probedsl, which runs only read;
    resolved once, as directory() does."""
    return os.path.realpath(os.path.join(sys.prefix, "share", "probedsl"))


def shipped_path(kind: str, name: str) -> str:
    """Where the install keeps the file of that kind (read by shipped_file)."""
    return os.path.join(shipped_root(), kind, name)


def shipped_file(kind: str, name: str, limit: int = -1) -> Optional[bytes]:
    """The file of that kind the install built (shipped_path: at most limit bytes), when it
    and every directory from / down pass the checks a cache's do; else None, and always with
    PROBEDSL_INSTALL_CACHE=0 (a run as on an install that built nothing)."""
    if os.environ.get("PROBEDSL_INSTALL_CACHE", "1") == "0":
        return None
    root, path = shipped_root(), shipped_path(kind, name)
    if not os.path.lexists(path) or why_untrusted(root, path):  # (another user's install: built here)
        return None
    return read_trusted(os.path.dirname(path), path, limit)


def ship(build: Callable[[Callable[[str], "Kept"]], None]) -> str:
    """build(kept) run into shipped_root() (kept(kind): that kind's place there), then made
    readable by all: "" when done, else why not (an untrusted place, nothing written)."""
    root = shipped_root()
    why = why_untrusted(root, root)
    if why:
        return f"cannot build into {root}: {why}"
    build(lambda kind: Kept(kind, root=root))
    share(root)
    if not any(files for _, _, files in os.walk(root)):
        return f"cannot build into {root}: nothing could be written there"
    return ""


def share(root: str) -> None:
    """What the install built under root (a trusted directory), made readable by every user (it
    was made private, as caches are), still writable by its owner alone. Each directory and
    regular file is changed through a descriptor opened without following a link."""
    for where, _, files in os.walk(root):  # (os.walk descends into no link)
        _chmod(where, 0o755)
        for name in files:
            _chmod(os.path.join(where, name), 0o644)


def _chmod(path: str, mode: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # a link (ELOOP), or gone: left as it is
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


class Kept:
    """Files of one cache kind that only save time (the recipe parser's tables, the compiled
    templates, BCC's compiled programs): loaded only when read_trusted passes them, written
    whole; the directory found at first use, quietly. A file the user's cache lacks is looked
    for in what the install built (shipped_file). root: keep under root/kind instead of the
    user's cache (the install's build)."""

    def __init__(self, kind: str, root: Optional[str] = None):
        self.kind = kind
        self._root = root
        self._where: Optional[str] = None

    def _dir(self) -> str:
        if self._where is None:
            sub = self.kind if self._root else None
            self._where = directory(self.kind, self._root, sub, quiet=True, fallback=self._root is None)
        return self._where

    def load(self, name: str) -> Optional[bytes]:
        where = self._dir()
        path = os.path.join(where, name) if where else ""
        if path and os.path.lexists(path):
            return read_trusted(where, path)
        return shipped_file(self.kind, name)

    def used(self, name: str) -> None:
        """A file loaded and used: the last that a bound (keep's most) removes."""
        with contextlib.suppress(OSError):
            os.utime(self._path(name), follow_symlinks=False)

    def forget(self, name: str) -> None:
        """A file that failed where it was used: the next run builds it afresh. An empty file
        takes its place in the user's cache (one the install built stays there): the next
        load gives b"", which no kind reads as one of its files."""
        with contextlib.suppress(OSError):
            write_whole(self._path(name), b"")

    def _path(self, name: str) -> str:
        """name's path in the trusted directory (OSError when there is none)."""
        if not self._dir():
            raise FileNotFoundError(name)
        return os.path.join(self._dir(), name)

    def keep(self, name: str, data: bytes, most: int = 0) -> bool:
        """most: how many files the kind keeps (0: no bound); the least recently used go first."""
        where = self._dir()
        if not (where and write_whole(os.path.join(where, name), data)):
            return False
        if most:
            _prune(where, most)
        return True


def _prune(where: str, most: int) -> None:
    found = []
    with os.scandir(where) as entries:
        for entry in entries:
            if entry.name.startswith(".new-"):  # another run's, being written
                continue
            with contextlib.suppress(OSError):  # one another run removed meanwhile
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
    for _, path in sorted(found)[: max(0, len(found) - most)]:
        with contextlib.suppress(OSError):
            os.unlink(path)
