"""The node's view of mounts: the kernel mount table, unmounting, and probing a mount.

One seam for everything the node core and the supervisor ask the kernel about mounts, so
the crash matrix, idempotency and recovery tests can run against an in-memory table
(tests/csi_driver/fakes.py) without root or FUSE. The real table reads /proc/self/mountinfo
(fuse_crypt.mounttable) and probes mounts on a helper thread (csi_driver/fsprobe.py) so a
hung FUSE daemon cannot wedge the caller.
"""

from __future__ import annotations

import ctypes
import errno
import os

from csi_driver import fsprobe
from fuse_crypt import mounttable
from fuse_crypt.mounttable import MountEntry

_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8

__all__ = ["MountEntry", "MountTable", "umount_nofollow", "umount_nofollow_errno"]


def umount_nofollow(target: str, *, lazy: bool = False) -> bool:
    """umount2(target, UMOUNT_NOFOLLOW) as root; True if it unmounted.

    fusermount3 and umount(8) resolve the path themselves, so a symlink swapped in at the
    target after validation would point them at another volume; the kernel's NOFOLLOW
    flag closes that window. False (caller falls back to mounttable.detach) when not root,
    busy or anything else fails.
    """
    return umount_nofollow_errno(target, lazy=lazy) == 0


def umount_nofollow_errno(target: str, *, lazy: bool = False) -> int | None:
    """As umount_nofollow, but why it failed: 0 if it unmounted, else umount2's errno
    (EBUSY: something still holds a file or a working directory in the mount), None if
    umount2 cannot be called here (not root, no libc symbol). A caller that waits out a
    transient EBUSY needs to tell it from the failures that no wait cures."""
    if os.geteuid() != 0:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        flags = _UMOUNT_NOFOLLOW | (_MNT_DETACH if lazy else 0)
        rc: int = libc.umount2(os.fsencode(target), flags)
    except (OSError, AttributeError):
        return None
    return 0 if rc == 0 else ctypes.get_errno() or errno.EIO


class MountTable:
    """The kernel's mounts. Paths are compared exactly (callers pass resolved paths)."""

    def all(self) -> dict[str, MountEntry]:
        return mounttable.mounts_by_point()

    def find(self, target: str) -> MountEntry | None:
        return mounttable.find_mount(target)

    def detach(self, target: str, *, lazy: bool = False) -> None:
        """fusermount -u (-z) / umount (-l); raises OSError if it stays mounted."""
        mounttable.detach(target, lazy=lazy)

    def unmount(self, target: str, *, lazy: bool = False) -> None:
        """Unmount without following a symlink swapped in at ``target`` when we can; a busy
        mount falls back to a lazy detach."""
        if self.find(target) is None or umount_nofollow(target, lazy=lazy):
            return
        try:
            self.detach(target, lazy=lazy)
        except OSError:
            self.detach(target, lazy=True)

    def probe(self, target: str, timeout: float) -> str:
        """``"live"``, ``"dead"`` (ENOTCONN), ``"hung"`` or ``"error"`` (csi_driver/fsprobe.py)."""
        return fsprobe.state(target, timeout)

    def statvfs(self, target: str, timeout: float) -> os.statvfs_result:
        """statvfs of the mount; fsprobe.MountHung if it does not answer in time."""
        return fsprobe.call(target, os.statvfs, timeout)
