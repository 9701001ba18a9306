"""Reading files the host can tamper with: no blocking, no links, bounded size.

The state directory is a hostPath in the chart, so the node plugin's own state file is
host-controlled input too: a FIFO there would block a worker forever, a sparse 3 GiB file
would exhaust memory, a symlink would read some other file. gocryptfs.conf has its own
reader (``fuse_crypt.configfile.ConfFile.read``); this is for everything else the csi_driver
reads back from disk.
"""

from __future__ import annotations

import errno
import os
import stat


class HostFileError(OSError):
    """The file exists but is not a regular file of acceptable size (message is safe)."""


def read_bounded(path: str, limit: int) -> bytes:
    """The whole of regular file ``path`` if it holds at most ``limit`` bytes.

    Raises FileNotFoundError if missing, HostFileError for a link, FIFO, device, directory
    or oversize file, OSError otherwise.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HostFileError(errno.ELOOP, f"{path} is a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HostFileError(errno.EINVAL, f"{path} is not a regular file")
        if st.st_size > limit:
            raise HostFileError(errno.EFBIG, f"{path} is larger than {limit} bytes")
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew after fstat
                raise HostFileError(errno.EFBIG, f"{path} is larger than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)
