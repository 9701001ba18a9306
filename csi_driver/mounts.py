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
import logging
import os
import time
from collections.abc import Callable

from csi_driver import fsprobe
from fuse_crypt import mounttable
from fuse_crypt.mounttable import MountEntry

_MNT_DETACH = 2
_UMOUNT_NOFOLLOW = 8
#: How long an unmount waits out EBUSY before it gives up and leaves the mount as it was.
#: Once seen in the e2e tests under load: umount answered "target is busy" right after the
#: only writer had ended, so a short wait saves kubelet a retry round (seconds).
BUSY_WAIT = 2.0

__all__ = [
    "BUSY_WAIT",
    "MountBusy",
    "MountEntry",
    "MountTable",
    "umount_nofollow",
    "umount_nofollow_errno",
    "umount_when_idle",
]

log = logging.getLogger(__name__)


class MountBusy(OSError):
    """Still in use after :data:`BUSY_WAIT`: nothing was unmounted.

    Why not the lazy detach this used to fall back to: a lazily detached FUSE mount keeps
    serving whoever holds it, but its daemon is then stopped (and killed when it does not
    exit), so a pod process still writing loses what the daemon had not yet stored (an
    object-store volume's spooled writes) and gets ENOTCONN. Failing leaves a consistent
    state for kubelet's retry, which succeeds once the holder is gone.
    """

    def __init__(self, target: str, waited: float) -> None:
        super().__init__(
            errno.EBUSY,
            f"{target} is busy (a process still has a file or its working directory in "
            f"it) after {waited:g} s; nothing was unmounted, retry once it is closed",
        )


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


def umount_when_idle(
    target: str, still_mounted: Callable[[], bool], wait: float = BUSY_WAIT
) -> int | None:
    """umount2(target, UMOUNT_NOFOLLOW), waiting up to ``wait`` while it is busy.

    Returns 0 once unmounted (or once ``still_mounted()`` says someone else unmounted it
    meanwhile), and umount_nofollow_errno's answer for what no wait cures (None: not root;
    another errno), for the caller's fallback. Raises MountBusy when still busy at the end.
    """
    delay = 0.05
    give_up = time.monotonic() + wait
    while True:
        err = umount_nofollow_errno(target)
        if err != errno.EBUSY:
            return err
        if not still_mounted():
            return 0
        left = give_up - time.monotonic()
        if delay == 0.05:  # once per call: how often this happens is worth knowing
            log.info("mount busy; waiting", extra={"fields": {"target": target}})
        if left <= 0:
            raise MountBusy(target, wait)
        time.sleep(min(delay, left))
        delay *= 2


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
        """Unmount without following a symlink swapped in at ``target`` when we can.

        ``lazy`` (a dead or hung daemon: nothing left to lose, and a plain unmount would
        wait on it) detaches even a busy mount. Otherwise a busy mount is waited on for
        BUSY_WAIT and then left as it was (MountBusy), never detached lazily.
        """
        if self.find(target) is None:
            return
        if lazy:
            if not umount_nofollow(target, lazy=True):
                self.detach(target, lazy=True)
            return
        if umount_when_idle(target, lambda: self.find(target) is not None) == 0:
            return
        self.detach(target)  # not root, or umount2 refused for another reason

    def probe(self, target: str, timeout: float) -> str:
        """``"live"``, ``"dead"`` (ENOTCONN), ``"hung"`` or ``"error"`` (csi_driver/fsprobe.py)."""
        return fsprobe.state(target, timeout)

    def statvfs(self, target: str, timeout: float) -> os.statvfs_result:
        """statvfs of the mount; fsprobe.MountHung if it does not answer in time."""
        return fsprobe.call(target, os.statvfs, timeout)
