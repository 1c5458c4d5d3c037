"""Which whole block device holds a path: path -> mount (/proc/self/mountinfo) -> device
number -> name (/sys/dev/block), with a partition replaced by its disk; device-mapper and md
devices stay themselves (dm-0, md0), since their own queue is what reads go through.

Filesystems without a device number of their own are followed where they lead: btrfs and
others with an anonymous number through the mount source (/dev/...), overlayfs through its
upper directory. A network or memory filesystem (nfs, tmpfs) has no local block device.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from agentd.paths import Paths, read_text


class NoBlockDevice(Exception):
    """The path is not on a local block device (one line saying why)."""


@dataclass(frozen=True)
class Mount:
    major: int
    minor: int
    root: str
    mount_point: str
    fstype: str
    source: str
    super_options: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Mounts in /proc/PID/mountinfo order (proc(5): ID PARENT MAJ:MIN ROOT POINT OPTS
    [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS)."""
    mounts = []
    for line in text.splitlines():
        f = line.split()
        if "-" not in f[6:]:
            continue
        sep = f.index("-", 6)
        if len(f) < sep + 3 or ":" not in f[2]:
            continue
        major, _, minor = f[2].partition(":")
        mounts.append(Mount(int(major), int(minor), _unescape(f[3]), _unescape(f[4]),
                            f[sep + 1], _unescape(f[sep + 2]),
                            f[sep + 3] if len(f) > sep + 3 else ""))
    return mounts


def mount_for(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount a (resolved, absolute) path lives on: the longest mount point containing it,
    the last mounted when several share a point (an overmount hides what is below)."""
    best = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/"):
                best = m
    return best


@dataclass(frozen=True)
class BlockDevice:
    name: str  # the whole device: vda, nvme0n1, dm-0, md0
    partition: str | None  # the partition the filesystem is on, when it is one
    major: int
    minor: int
    mount_point: str
    fstype: str


def _device_number(path: str, m: Mount, mounts: list[Mount], depth: int) -> tuple[int, int]:
    if m.major != 0:
        return m.major, m.minor
    if m.fstype == "overlay" and depth < 4:
        for opt in m.super_options.split(","):
            if opt.startswith("upperdir="):
                upper = opt[len("upperdir="):]
                inner = mount_for(upper, mounts)
                if inner is not None:
                    return _device_number(upper, inner, mounts, depth + 1)
    if m.source.startswith("/"):
        try:
            st = os.stat(m.source)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            return os.major(st.st_rdev), os.minor(st.st_rdev)
    raise NoBlockDevice(f"{path} is on {m.fstype} ({m.source}) at {m.mount_point}: "
                        "no local block device")


def block_device(path: str, paths: Paths | None = None) -> BlockDevice:
    """The whole block device holding `path` (NoBlockDevice when there is none)."""
    paths = paths or Paths()
    real = os.path.realpath(path)
    if not os.path.exists(real):
        raise NoBlockDevice(f"{path} does not exist")
    try:
        mounts = parse_mountinfo(read_text(paths.proc("self", "mountinfo")))
    except OSError as e:
        raise NoBlockDevice(f"cannot read mountinfo: {e.strerror}") from None
    return resolve(real, mounts, paths.sys("dev", "block"), shown=path)


def resolve(real: str, mounts: list[Mount], dev_block: str, shown: str = "") -> BlockDevice:
    """The whole block device of a resolved path, given the mounts and /sys/dev/block."""
    shown = shown or real
    m = mount_for(real, mounts)
    if m is None:
        raise NoBlockDevice(f"{shown}: no mount holds it")
    major, minor = _device_number(shown, m, mounts, 0)
    try:
        node = os.path.realpath(os.path.join(dev_block, f"{major}:{minor}"), strict=True)
    except OSError:
        raise NoBlockDevice(f"{shown}: device {major}:{minor} is not in {dev_block}") from None
    name = os.path.basename(node)
    partition = None
    if os.path.exists(os.path.join(node, "partition")):
        partition, name = name, os.path.basename(os.path.dirname(node))
    return BlockDevice(name.replace("!", "/"), partition, major, minor, m.mount_point, m.fstype)
