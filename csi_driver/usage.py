"""How much a volume's ciphertext directory holds: what NodeGetVolumeStats reports as used.

The directory is host storage, so the walk is fd-based and never follows a link (a
directory swapped for a symlink mid-walk is not entered), and bounded in entries; the
caller bounds it in time (csi_driver/fsprobe.py) because the storage may hang.
"""

from __future__ import annotations

import os
import stat

MAX_ENTRIES = 1_000_000
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class TooManyEntries(OSError):
    """The tree has more than the walk's bound of entries."""


def tree_usage(root: str, max_entries: int = MAX_ENTRIES) -> tuple[int, int]:
    """(bytes allocated, entries) below ``root``; raises OSError if ``root`` cannot be
    opened as a directory, TooManyEntries past ``max_entries``."""
    used = entries = 0
    stack = [os.open(root, _DIR_FLAGS)]
    try:
        while stack:
            fd = stack.pop()
            try:
                with os.scandir(fd) as it:
                    names = [e.name for e in it]
                for name in names:
                    entries += 1
                    if entries > max_entries:
                        raise TooManyEntries(f"more than {max_entries} entries")
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed meanwhile
                    used += st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode):
                        try:
                            stack.append(os.open(name, _DIR_FLAGS, dir_fd=fd))
                        except OSError:
                            continue  # swapped for a link or removed: not ours to count
            finally:
                os.close(fd)
    finally:
        for fd in stack:
            os.close(fd)
    return used, entries
