"""Read a small configuration file the guest trusts (CA bundle, CDH config, resource file).

Such a path is named by the guest's own configuration, but what sits at that path may still
have been planted: a FIFO blocks a reader forever, a symlink points somewhere else, a huge
sparse file exhausts memory. So the file is opened without following a final symlink and
without blocking, must be a regular file, and is read with a size cap.
"""

from __future__ import annotations

import errno
import os
import stat

from sealed_secrets.errors import ResolverError

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_small_file(path: str, *, limit: int, what: str) -> bytes:
    """The bytes of the regular file at ``path`` (at most ``limit``); raise ResolverError.

    Error messages name ``what`` and the path (configuration, not secret) and the reason.
    """
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResolverError(f"{what} {path} is a symlink; refusing to follow it") from None
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise ResolverError(f"{what} {path} unreadable: {reason}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ResolverError(f"{what} {path} is not a regular file")
        if st.st_size > limit:
            raise ResolverError(f"{what} {path} is larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise ResolverError(f"{what} {path} unreadable: errno {exc.errno}") from None
    finally:
        os.close(fd)
    if size > limit:
        raise ResolverError(f"{what} {path} is larger than {limit} bytes")
    return b"".join(chunks)
