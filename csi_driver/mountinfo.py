"""Kernel mount table queries and unmounting, for FUSE mounts we (or a previous run) made.

/proc/self/mountinfo is the single source of truth after a plugin restart: the state file
says what we meant to mount, mountinfo says what is actually mounted.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fs_type: str
    source: str
    options: str


def read_mounts(path: str = MOUNTINFO) -> dict[str, MountEntry]:
    """Mount point → entry (the last, i.e. topmost, mount wins)."""
    result: dict[str, MountEntry] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            pre, sep, post = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            fields = pre.split(" ")
            tail = post.split(" ")
            if len(fields) < 6 or len(tail) < 3:
                continue
            mp = _unescape(fields[4])
            result[mp] = MountEntry(mp, tail[0], _unescape(tail[1]), fields[5])
    return result


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in read_mounts() or path in read_mounts()


def mount_entry(path: str) -> MountEntry | None:
    mounts = read_mounts()
    return mounts.get(path) or mounts.get(os.path.realpath(path))


def is_dead_mount(path: str) -> bool:
    """True when the FUSE daemon behind ``path`` is gone (ENOTCONN / ECONNABORTED)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


def unmount(path: str, *, lazy: bool = False, timeout: float = 10.0) -> None:
    """Unmount a FUSE mount (fusermount3, falling back to umount(8)); raises OSError."""
    flags = ["-u", "-z"] if lazy else ["-u"]
    try:
        res = subprocess.run(
            ["fusermount3", *flags, path], capture_output=True, text=True, timeout=timeout
        )
        if res.returncode == 0:
            return
        detail = res.stderr.strip()
    except FileNotFoundError:
        detail = "fusermount3 not found"
    res = subprocess.run(
        ["umount", *(["-l"] if lazy else []), path], capture_output=True, text=True, timeout=timeout
    )
    if res.returncode != 0:
        raise OSError(errno.EBUSY, f"cannot unmount {path}: {detail or res.stderr.strip()}")
