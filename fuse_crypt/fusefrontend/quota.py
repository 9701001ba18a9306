"""A byte budget for one mount (``fuse-crypt mount --capacity BYTES``).

A directory-backed volume has no quota of its own: without one, a pod fills the host's
disk and ``df`` in the pod shows the host's size. With a capacity, growing a file past
the budget fails with ENOSPC and ``statfs`` reports the volume's own size and free space.
The budget counts ciphertext bytes of regular files (what the volume costs its storage):
counted once at mount, then kept up to date by every size change made through the mount.
Changes made behind the mount's back are seen at the next mount.
"""

from __future__ import annotations

import errno
import threading

from fuse_crypt.backend import StorageBackend

# A volume with more entries than this is not counted in full at mount (bounded start-up);
# what is uncounted is then simply not charged.
MAX_SCAN_ENTRIES = 1_000_000


class Quota:
    def __init__(self, capacity: int, used: int = 0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.used = used
        self._lock = threading.Lock()

    @classmethod
    def scan(cls, capacity: int, backend: StorageBackend) -> Quota:
        """The budget with what the cipher directory already holds charged."""
        used = entries = 0
        stack = [""]
        while stack and entries < MAX_SCAN_ENTRIES:
            d = stack.pop()
            try:
                names = backend.listdir(d)
            except OSError:
                continue
            for name in names:
                entries += 1
                path = f"{d}/{name}" if d else name
                try:
                    st = backend.lstat(path)
                except OSError:
                    continue
                if st.is_dir:
                    stack.append(path)
                elif st.is_reg:
                    used += st.size
        return cls(capacity, used)

    def charge(self, delta: int) -> None:
        """Account a size change; ENOSPC (nothing charged) if growth would pass capacity."""
        with self._lock:
            if delta > 0 and self.used + delta > self.capacity:
                raise OSError(errno.ENOSPC, "volume capacity reached")
            self.used = max(0, self.used + delta)

    def statfs(self, sv: dict[str, int]) -> dict[str, int]:
        """``sv`` (the storage's statvfs) as the volume's own: its capacity as the size,
        the budget left (or the storage's free space, if less) as free."""
        bs = sv.get("f_frsize") or sv.get("f_bsize") or 4096
        with self._lock:
            left = max(0, self.capacity - self.used) // bs
        sv["f_blocks"] = self.capacity // bs
        sv["f_bfree"] = min(left, sv.get("f_bfree", left))
        sv["f_bavail"] = min(left, sv.get("f_bavail", left))
        return sv
