"""The file a uprobe is placed on. The kernel registers a uprobe on the real inode behind a path
(d_real_inode): on overlayfs (a container's image) that is the layer's file, which every
container of one image shares, while os.stat (and, on this kernel, /proc/PID/maps) gives each
container's overlay its own device. Two tracers that compare stat keys would each place a
probe on the one real file and count every call twice; they compare real_key instead."""

from __future__ import annotations

import os
import re
import stat
from typing import List, Optional, Tuple

Key = Tuple[int, int]


def real_key(path: str) -> Optional[Key]:
    """(device, inode) of the real file behind path: the overlay's upper or lower layer's file
    when path is on overlayfs and its layers can be read from here, else os.stat's. None if
    the file is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    layer = _layer_file(path, st.st_dev)
    if layer:
        try:
            real = os.stat(layer)
            return real.st_dev, real.st_ino
        except OSError:
            pass
    return st.st_dev, st.st_ino


def _layer_file(path: str, dev: int) -> Optional[str]:
    """The layer file path resolves to, when the mount holding it is an overlay."""
    m = re.match(r"/proc/(\d+(?:/task/\d+)?)/root(/.*)", path)
    pid, inner = (m.group(1), m.group(2)) if m else ("self", os.path.realpath(path))
    best = None
    for mount_root, point, fstype, options in _mounts(pid):
        if fstype != "overlay" or not _same_device(mount_root, dev):
            continue
        if (inner == point or inner.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) > len(best[1])
        ):
            best = (mount_root, point, options)
    if best is None:
        return None
    mount_root, point, options = best
    rel = os.path.join(mount_root[1].lstrip("/"), inner[len(point.rstrip("/")) :].lstrip("/"))
    for layer in _layers(options):
        candidate = os.path.join(layer, rel)
        try:
            st = os.stat(candidate)  # the paths compared are those the maps name: no symlink
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return None  # a whiteout: deleted in this layer
        return candidate
    return None


def _mounts(pid: str) -> List[Tuple[Tuple[str, str], str, str, str]]:
    """((major:minor, root), mount point, fstype, super options) of each mount pid sees."""
    out = []
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                before, _, after = line.partition(" - ")
                fields, rest = before.split(), after.split()
                if len(fields) >= 5 and len(rest) >= 3:
                    out.append(((fields[2], _unescape(fields[3])), _unescape(fields[4]), rest[0], rest[2]))
    except OSError:
        pass
    return out


def _same_device(mount_root: Tuple[str, str], dev: int) -> bool:
    major, _, minor = mount_root[0].partition(":")
    return major.isdigit() and minor.isdigit() and os.makedev(int(major), int(minor)) == dev


def _layers(options: str) -> List[str]:
    """upperdir, then each lowerdir, top first; relative lowerdirs (docker's short links) are
    relative to the directory holding the workdir's parent."""
    opts = dict(o.partition("=")[::2] for o in re.split(r"(?<!\\),", options))
    base = os.path.dirname(os.path.dirname(opts.get("workdir", "").rstrip("/")))
    layers = [opts["upperdir"]] if opts.get("upperdir") else []
    for lower in re.split(r"(?<!\\):", opts.get("lowerdir", "")):
        if lower:
            layers.append(lower if lower.startswith("/") or not base else os.path.join(base, lower))
    return [_unescape(layer.replace("\\:", ":").replace("\\,", ",")) for layer in layers]


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
