"""The kernel mount table and the low-level detach, shared by the CLI and the CSI driver.

Why one module: ``fuse-crypt mount/unmount`` and the CSI node plugin both have to answer
"is something mounted at this path, and is its daemon still alive?" from the same
source of truth, /proc/self/mountinfo, and both have to get rid of dead FUSE mounts.
A daemon killed with SIGKILL leaves its mount point in the table; every access then
fails with ENOTCONN (or ECONNABORTED after a connection abort) until someone detaches
it. Lookups never stat the path, so they work on such dead mounts.

The CSI driver depends on ``fuse_crypt``, never the other way, so this lives here.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
# A FUSE unmount can block on a wedged daemon; never let that hang the caller forever.
DETACH_TIMEOUT = 10.0
_DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, reduced to what we need."""

    mountpoint: str
    fstype: str
    source: str
    options: str


class UnmountError(OSError):
    """Neither fusermount3 nor umount(8) could detach the mount point.

    An OSError (EBUSY) so callers that treat any OS failure alike need nothing special;
    ``reason`` holds the tool's own last error line for callers that word their own.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(errno.EBUSY, f"cannot unmount {path}: {reason}")
        self.reason = reason


def _unescape(field: str) -> str:
    # The kernel escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_entries(mountinfo: str = MOUNTINFO) -> list[MountEntry]:
    """All mounts visible to this process, in mount order (later entries stack on top)."""
    entries: list[MountEntry] = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            lparts = left.split(" ")
            rparts = right.split(" ")
            if len(lparts) < 6 or len(rparts) < 2:
                continue
            entries.append(
                MountEntry(
                    mountpoint=_unescape(lparts[4]),
                    fstype=rparts[0],
                    source=_unescape(rparts[1]),
                    options=lparts[5],
                )
            )
    return entries


def mounts_by_point(mountinfo: str = MOUNTINFO) -> dict[str, MountEntry]:
    """Mount point → entry; where mounts stack, the topmost wins."""
    return {entry.mountpoint: entry for entry in mount_entries(mountinfo)}


def find_mount(path: str, *, resolve: bool = False) -> MountEntry | None:
    """The topmost mount at ``path``; ``resolve`` also tries the path with symlinks resolved.

    Kubelet may hand the CSI driver a target path through a symlink, while the kernel
    records the resolved one; the CLI wants the exact path it was given.
    """
    mounts = mounts_by_point()
    found = mounts.get(os.path.abspath(path))
    if found is None and resolve:
        found = mounts.get(os.path.realpath(path))
    return found


def is_dead_mount(path: str) -> bool:
    """True if ``path`` is a FUSE mount whose daemon is gone (ENOTCONN / ECONNABORTED)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno in _DEAD_ERRNOS
    return False


def is_live_mount(path: str) -> bool:
    """True if ``path`` is a mount point in the table and answers stat."""
    return find_mount(path) is not None and not is_dead_mount(path)


def _run(argv: list[str], timeout: float) -> str | None:
    """Run one unmount tool; None on success, else its last error line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        return f"{argv[0]} not found"
    except subprocess.TimeoutExpired:
        return f"{argv[0]} timed out after {timeout:.0f}s"
    if proc.returncode == 0:
        return None
    msg = (proc.stderr or proc.stdout).strip()
    return msg.splitlines()[-1] if msg else f"{argv[0]} exited {proc.returncode}"


def detach(path: str, *, lazy: bool = False, timeout: float = DETACH_TIMEOUT) -> None:
    """Unmount ``path`` with ``fusermount3 -u [-z]``, falling back to ``umount [-l]``.

    ``lazy`` detaches even a busy or dead mount (it goes once the last user lets go).
    Raises UnmountError carrying fusermount3's reason (the FUSE-aware one of the two).
    """
    first = _run(["fusermount3", "-u", *(["-z"] if lazy else []), path], timeout)
    if first is None:
        return
    second = _run(["umount", *(["-l"] if lazy else []), path], timeout)
    if second is None:
        return
    raise UnmountError(path, first)
