"""Read a small configuration file the guest trusts (CA bundle, CDH config, resource file).

Such a path is named by the guest's own configuration, but what sits at that path may still
have been planted: a FIFO blocks a reader forever, a symlink points somewhere else, a huge
sparse file exhausts memory. So the file is opened without following a final symlink and
without blocking, must be a regular file, and is read with a size cap.
"""

from __future__ import annotations

import errno
import os

from fuse_crypt import safeio
from sealed_secrets.errors import ResolverError


def read_small_file(path: str, *, limit: int, what: str) -> bytes:
    """The bytes of the regular file at ``path`` (at most ``limit``); raise ResolverError.

    Error messages name ``what`` and the path (configuration, not secret) and the reason.
    The reading itself is fuse_crypt.safeio's, the one bounded reader of the project.
    """
    try:
        return safeio.read_small_regular_file(path, limit)
    except safeio.NotRegularFileError:
        raise ResolverError(f"{what} {path} is not a regular file") from None
    except safeio.FileTooLargeError:
        raise ResolverError(f"{what} {path} is larger than {limit} bytes") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResolverError(f"{what} {path} is a symlink; refusing to follow it") from None
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise ResolverError(f"{what} {path} unreadable: {reason}") from None
