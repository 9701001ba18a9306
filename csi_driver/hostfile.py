"""Reading files the host can tamper with: no blocking, no links, bounded size.

The state directory is a hostPath in the chart, so the node plugin's own state file is
host-controlled input too: a FIFO there would block a worker forever, a sparse 3 GiB file
would exhaust memory, a symlink would read some other file. gocryptfs.conf has its own
reader (``fuse_crypt.configfile.ConfFile.read``); this is for everything else the csi_driver
reads back from disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile

from fuse_crypt import safeio


class HostFileError(OSError):
    """The file exists but is not a regular file of acceptable size (message is safe)."""


def read_bounded(path: str, limit: int) -> bytes:
    """The whole of regular file ``path`` if it holds at most ``limit`` bytes.

    Raises FileNotFoundError if missing, HostFileError for a link, FIFO, device, directory
    or oversize file, OSError otherwise. The reading itself is fuse_crypt.safeio's.
    """
    try:
        return safeio.read_small_regular_file(path, limit)
    except safeio.NotRegularFileError as exc:
        raise HostFileError(errno.EINVAL, f"{path} is not a regular file ({exc.kind})") from None
    except safeio.FileTooLargeError:
        raise HostFileError(errno.EFBIG, f"{path} is larger than {limit} bytes") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HostFileError(errno.ELOOP, f"{path} is a symlink") from None
        raise


def _open_regular(path: str, flags: int) -> int | None:
    """fd of regular file ``path`` opened without blocking or following links; None if
    something else is there."""
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    os.close(fd)
    return None


def open_append(path: str) -> int:
    """An fd appending to the regular file ``path`` (created 0600). A FIFO, symlink or
    device planted there is removed first: opening it would block or write elsewhere."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    for _ in range(3):
        fd = _open_regular(path, flags)
        if fd is not None:
            os.set_blocking(fd, True)
            return fd
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise HostFileError(errno.EISDIR, f"{path} is a directory")
        os.unlink(path)
    raise HostFileError(errno.EAGAIN, f"{path} keeps being replaced")


def read_from(path: str, offset: int, limit: int) -> bytes:
    """Up to ``limit`` bytes of regular file ``path`` from ``offset``; b"" if missing or not
    a regular file (callers use this for diagnostics only)."""
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except OSError:
        return b""
    if fd is None:
        return b""
    try:
        return os.pread(fd, limit, offset)
    finally:
        os.close(fd)


def regular_size(path: str) -> int:
    """Size of regular file ``path``; 0 if missing or anything else."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def read_json(path: str, limit: int) -> object:
    """The JSON document in regular file ``path`` (read_bounded: no links, no FIFOs, at most
    ``limit`` bytes). Raises FileNotFoundError, HostFileError/OSError, or ValueError for bad
    JSON (RecursionError, from absurd nesting, is reported as ValueError)."""
    raw = read_bounded(path, limit)
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply") from None


def write_json_atomic(path: str, doc: object, *, durable: bool = False) -> None:
    """Replace ``path`` with ``doc`` all at once: a crash leaves the old or the new file,
    never a mix. The temp file is created exclusively (O_EXCL, random name) beside it, so a
    link planted at a fixed temp name cannot redirect the write. ``durable``: fsync before
    the rename (for files that must survive a reboot, not just a process crash)."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
