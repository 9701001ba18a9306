"""Reading small host-controlled files without blocking, following links or exhausting memory.

Why: the cipher directory lives on storage the host controls. A FIFO planted as
``gocryptfs.conf`` or ``gocryptfs.diriv`` blocks a plain ``open()`` forever (until a writer
appears), a symlink redirects the read into the guest, and a 3 GiB sparse file costs 3 GiB
of memory to ``read()``. Every small file from that storage is therefore opened with
:data:`SMALL_OPEN_FLAGS` (``O_NONBLOCK`` makes opening a FIFO return at once, ``O_NOFOLLOW``
refuses a symlink as the last component with ``ELOOP``, ``O_NOCTTY`` keeps a planted tty
from becoming our controlling terminal), checked with ``fstat`` to be a regular file, and
read with a cap: at most ``cap + 1`` bytes, so "too large" is detected without reading more.

Errors are ``OSError`` subclasses with a fixed errno, so backend callers can hand them to
the kernel as they are (``EIO`` for the wrong type, ``EFBIG`` for oversize) and the conf
reader can turn them into a :class:`~fuse_crypt.errors.ConfigError`.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = [
    "SMALL_OPEN_FLAGS",
    "FileTooLargeError",
    "NotRegularFileError",
    "check_regular",
    "read_capped",
    "read_small_regular_file",
    "fsync_dir",
    "write_new_file",
]

SMALL_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY


class NotRegularFileError(OSError):
    """The object is a FIFO, socket, device or directory where a regular file belongs."""

    def __init__(self, kind: str) -> None:
        super().__init__(errno.EIO, f"not a regular file ({kind})")
        self.kind = kind


class FileTooLargeError(OSError):
    """The file is larger than the caller's cap (nothing beyond ``cap + 1`` was read)."""

    def __init__(self, size: int, cap: int) -> None:
        super().__init__(errno.EFBIG, f"file too large ({size} bytes, limit {cap})")
        self.size = size
        self.cap = cap


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "unknown type"


def check_regular(fd: int) -> os.stat_result:
    """``fstat(fd)``, raising :class:`NotRegularFileError` unless it is a regular file."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(_kind(st.st_mode))
    return st


def read_capped(fd: int, cap: int) -> bytes:
    """Whole content of the regular file open at ``fd``, at most ``cap`` bytes.

    The size is checked before reading (a sparse 3 GiB file is refused without touching
    it) and again while reading (a file that grows between fstat and read is refused too).
    """
    st = check_regular(fd)
    if st.st_size > cap:
        raise FileTooLargeError(st.st_size, cap)
    chunks: list[bytes] = []
    got = 0
    while got <= cap:
        chunk = os.read(fd, cap + 1 - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got > cap:
        raise FileTooLargeError(got, cap)
    return b"".join(chunks)


def read_small_regular_file(path: str, cap: int, *, dir_fd: int | None = None) -> bytes:
    """Open ``path`` (relative to ``dir_fd`` if given) safely and return at most ``cap`` bytes.

    Raises ``FileNotFoundError`` if it is missing, ``OSError(ELOOP)`` if it is a symlink,
    :class:`NotRegularFileError` or :class:`FileTooLargeError`.
    """
    fd = os.open(path, SMALL_OPEN_FLAGS, dir_fd=dir_fd)
    try:
        return read_capped(fd, cap)
    finally:
        os.close(fd)


def write_new_file(path: str, data: bytes, mode: int) -> None:
    """Create ``path`` (never an existing file or a symlink: ``O_EXCL|O_NOFOLLOW``), write
    all of ``data`` and fsync it; the caller renames or fsyncs the directory as it needs."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
