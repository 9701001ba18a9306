"""The storage interface under the crypto layer: a POSIX-like view of *ciphertext*.

Everything above this interface (the FUSE frontend) handles plaintext; everything
below it only ever sees gocryptfs-format ciphertext, encrypted names and opaque bytes.
Keeping the surface small and path-based (no plaintext, no keys, no policy) is what
lets an object store (S3/OSS) or a raw block device implement it later without
touching the crypto code.

Conventions shared by every backend:

* Paths are cipher paths relative to the backend root, ``/``-separated, with no
  leading slash; ``""`` is the root itself.  Backends must reject ``..`` and absolute
  paths (the frontend never produces them, so seeing one means a bug or an attack).
* Every failure is an :class:`OSError` carrying the POSIX ``errno`` the frontend
  should hand to the kernel (``ENOENT``, ``EEXIST``, ``ENOTEMPTY``, ``EXDEV``...).
  Backends must never raise other exception types for I/O problems.
* Operations never follow a symlink in the *last* path component (``lstat``
  semantics), because the host controls the storage and could plant links that
  point outside it.
* File handles are opaque objects returned by :meth:`StorageBackend.open`; only the
  backend that produced a handle may interpret it.

Notes for object-store backends (S3/OSS) are in each method's docstring under
"Object store:".  The general model: a key per file, a "directory" is a key prefix
plus a marker object (``<dir>/``), metadata (mode, uid, gid, times, xattrs, symlink
target) lives in object user-metadata, and an open handle buffers or range-reads the
object.  Block-device filesystems implement the same calls over their own inode
layer.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import stat as stat_mod
from typing import Any, NamedTuple

#: Flags accepted by :meth:`StorageBackend.rename`; values equal Linux renameat2().
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

#: setxattr flags, values equal Linux XATTR_CREATE / XATTR_REPLACE.
XATTR_CREATE = 1
XATTR_REPLACE = 2


def check_path(path: str) -> str:
    """Refuse a backend path that could escape the backend's root (absolute, NUL, empty,
    ``.`` or ``..`` parts); ``""`` (the root) passes. The one check every backend makes
    before it maps a path to its own namespace."""
    if path == "":
        return path
    if path[0] == "/" or "\0" in path:
        raise OSError(errno.EINVAL, "invalid backend path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise OSError(errno.EINVAL, "invalid backend path")
    return path


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """Attributes of one backend object (what ``lstat`` returns).

    A dedicated type instead of :class:`os.stat_result` because non-local backends
    must be able to build it field by field, with nanosecond times.
    ``ino``/``dev`` identify the object for the open-file table (hard links share
    them); backends without inodes must still return a stable unique ``ino`` for as
    long as the object exists.
    """

    mode: int
    ino: int
    dev: int
    nlink: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blocks: int = 0
    blksize: int = 4096

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat_mod.S_ISREG(self.mode)

    @property
    def is_link(self) -> bool:
        return stat_mod.S_ISLNK(self.mode)


class DirEntry(NamedTuple):
    """One directory entry: name, inode number, file type bits (``S_IFMT``)."""

    name: str
    ino: int
    type: int


class StorageBackend(abc.ABC):
    """Abstract POSIX-like storage for ciphertext (see the module docstring)."""

    #: True if ``link`` works; frontends answer EPERM/ENOTSUP otherwise.
    supports_hardlinks: bool = True
    #: True if xattrs are stored; otherwise the xattr calls raise ENOTSUP.
    supports_xattrs: bool = True
    #: True if writes are buffered until :meth:`flush`/:meth:`fsync`/:meth:`close`
    #: (object stores).  The frontend then answers FUSE FLUSH, so that ``close(2)``
    #: reports a failed upload (EIO) instead of the kernel dropping the error.
    buffers_writes: bool = False
    #: True if the daemon serving this backend should keep its heap small rather than
    #: recycle large I/O buffers (network-bound object stores, whose daemon has an RSS
    #: budget); see ``fusefrontend/allocator.py``.
    bounded_heap: bool = False

    # -- metadata ---------------------------------------------------------------

    @abc.abstractmethod
    def lstat(self, path: str) -> Stat:
        """Attributes of ``path`` itself (a symlink is not followed).

        Object store: HEAD the object; fall back to the ``<path>/`` directory marker;
        synthesize ``ino`` from a hash of the key (stable while the key exists).
        """

    def stat(self, path: str) -> Stat:
        """Like :meth:`lstat`; backends do not follow symlinks either, on purpose
        (the kernel resolves symlinks at the plaintext level, above us)."""
        return self.lstat(path)

    @abc.abstractmethod
    def listdir(self, path: str) -> list[str]:
        """Names in directory ``path`` (without ``.``/``..``), in any order.

        Object store: LIST with ``prefix=<path>/`` and ``delimiter=/``; common
        prefixes are subdirectories.
        """

    def scandir(self, path: str) -> list[DirEntry]:
        """Entries of directory ``path`` with inode number and file type.

        The default stats every entry; backends that get both from the listing
        itself (``getdents`` d_ino/d_type) should override it.  Object store:
        synthesize ``ino`` as in :meth:`lstat`; the type comes from the listing.
        """
        out: list[DirEntry] = []
        prefix = f"{path}/" if path else ""
        for name in self.listdir(path):
            try:
                st = self.lstat(prefix + name)
            except FileNotFoundError:
                continue
            out.append(DirEntry(name, st.ino, stat_mod.S_IFMT(st.mode)))
        return out

    @abc.abstractmethod
    def mkdir(self, path: str, mode: int) -> None:
        """Create a directory; EEXIST if anything exists there.

        Object store: PUT a zero-byte ``<path>/`` marker with ``If-None-Match: *``.
        """

    @abc.abstractmethod
    def rmdir(self, path: str) -> None:
        """Remove an empty directory (ENOTEMPTY otherwise, ENOTDIR for files).

        Object store: LIST to check emptiness, then DELETE the marker.  Not atomic
        against concurrent creators; acceptable because one mount owns a volume.
        """

    @abc.abstractmethod
    def unlink(self, path: str) -> None:
        """Remove a non-directory (EISDIR/EPERM for directories)."""

    @abc.abstractmethod
    def rename(self, old: str, new: str, flags: int = 0) -> None:
        """POSIX rename, atomically replacing ``new`` (files, or empty dirs).

        ``flags`` may contain :data:`RENAME_NOREPLACE` (EEXIST if ``new`` exists) or
        :data:`RENAME_EXCHANGE` (swap both; EINVAL if unsupported).

        Object store: emulated. Files: server-side COPY then DELETE.  Directories:
        copy every key under the prefix, then delete; not atomic, so the backend
        must journal the move (e.g. a ``.rename-intent`` object) and finish or roll
        it back at the next mount.  Cipher names of children do not change on a
        directory rename (names depend only on their own directory's IV), so no
        re-encryption is ever needed.
        """

    @abc.abstractmethod
    def link(self, src: str, dst: str) -> None:
        """Create hard link ``dst`` to existing file ``src``.

        Object store: unsupported (``supports_hardlinks = False``; raise EPERM).
        A copy would silently break shared-write semantics.
        """

    @abc.abstractmethod
    def symlink(self, target: str, path: str) -> None:
        """Create symlink ``path`` whose content is ``target`` (already encrypted).

        Object store: a zero-byte object with the target in user-metadata and a
        symlink marker in its mode.
        """

    def mknod(self, path: str, mode: int, dev: int = 0) -> None:
        """Create a FIFO, socket or device node (``mode`` includes the type bits).

        Object store: unsupported by default (EPERM); special files have no
        meaning in a bucket.
        """
        del path, mode, dev
        raise OSError(errno.EPERM, "special files are not supported by this backend")

    @abc.abstractmethod
    def readlink(self, path: str) -> str:
        """Content of symlink ``path`` (EINVAL if it is not a symlink)."""

    @abc.abstractmethod
    def chmod(self, path: str, mode: int) -> None:
        """Set permission bits (object store: user-metadata)."""

    @abc.abstractmethod
    def chown(self, path: str, uid: int, gid: int) -> None:
        """Set owner without following symlinks; -1 leaves a value unchanged."""

    @abc.abstractmethod
    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        """Set times in ns without following symlinks; None leaves one unchanged.

        Object store: user-metadata (the object's own Last-Modified is not settable).
        """

    @abc.abstractmethod
    def statfs(self) -> dict[str, int]:
        """Capacity of the storage as ``statvfs`` keys (``f_bsize``, ``f_frsize``,
        ``f_blocks``, ``f_bfree``, ``f_bavail``, ``f_files``, ``f_ffree``,
        ``f_favail``, ``f_namemax``).

        Object store: report a large synthetic capacity (buckets have no fixed size)
        or the bucket quota if one is configured.
        """

    # -- extended attributes ------------------------------------------------------

    @abc.abstractmethod
    def getxattr(self, path: str, name: str) -> bytes:
        """Value of xattr ``name`` (ENODATA if absent). Names arrive already encrypted
        (``user.gocryptfs.*``) except POSIX ACL names.

        Object store: user-metadata entries (values base64, size limits apply:
        raise E2BIG beyond the store's per-object metadata limit).
        """

    @abc.abstractmethod
    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        """Set an xattr; ``flags`` is :data:`XATTR_CREATE`/:data:`XATTR_REPLACE`."""

    @abc.abstractmethod
    def listxattr(self, path: str) -> list[str]:
        """All xattr names of ``path``."""

    @abc.abstractmethod
    def removexattr(self, path: str, name: str) -> None:
        """Remove an xattr (ENODATA if absent)."""

    # -- small whole files (diriv, .name files, gocryptfs.conf) --------------------

    @abc.abstractmethod
    def read_small_file(self, path: str, max_size: int = 1 << 20) -> bytes:
        """Whole content of a small regular file (EFBIG beyond ``max_size``).

        The storage is hostile: never block (a FIFO), never follow a symlink (ELOOP),
        refuse anything but a regular file (EIO) and never read more than
        ``max_size + 1`` bytes (see :mod:`fuse_crypt.safeio`).

        These files are written once and never modified, so object stores can
        cache them aggressively.
        """

    @abc.abstractmethod
    def write_small_file_excl(
        self, path: str, data: bytes, mode: int, *, sync: bool = True
    ) -> None:
        """Create ``path`` exclusively (EEXIST if present) with ``data`` and ``mode``;
        with ``sync`` also durably (fsync) before returning.  The frontend passes
        ``sync=False`` for dir IVs and ``.name`` files like gocryptfs (an fsync per
        mkdir costs milliseconds) and syncs a directory's IV in ``fsyncdir``.

        Object store: PUT with ``If-None-Match: *``.
        """

    # -- file handles ---------------------------------------------------------------

    @abc.abstractmethod
    def open(self, path: str, flags: int, mode: int = 0o600) -> Any:
        """Open a regular file; ``flags`` are ``os.O_*`` (O_CREAT/O_EXCL/O_TRUNC
        honoured, O_APPEND must not be passed: the frontend computes offsets).
        Never follows a symlink in the last component (ELOOP), never blocks on a
        FIFO or device planted in the storage, and refuses anything that is not a
        regular file with EIO (the storage is hostile).

        Object store: a handle caches the object's size; writes go to a local
        spill file or a multipart upload committed on fsync/close.  Concurrent
        handles on one key must see each other's writes (share one state object).
        """

    @abc.abstractmethod
    def pread(self, handle: Any, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (short only at EOF).

        Object store: a ranged GET; sparse regions of spill files read as zeros.
        """

    def pread_into(self, handle: Any, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; returns the byte count (short only at EOF).

        The frontend's hot read path uses this with recycled buffers so a 1 MiB
        request allocates nothing.  Default: :meth:`pread` plus a copy.
        """
        data = self.pread(handle, len(buf), offset)
        buf[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    def pwrite(self, handle: Any, data: bytes | memoryview, offset: int) -> int:
        """Write all of ``data`` (any bytes-like object) at ``offset`` (extending
        with a hole if beyond EOF) and return ``len(data)``."""

    @abc.abstractmethod
    def ftruncate(self, handle: Any, size: int) -> None:
        """Set the file size; growing creates a hole (zeros)."""

    @abc.abstractmethod
    def fstat(self, handle: Any) -> Stat:
        """Attributes of the open file (size must reflect all completed writes)."""

    @abc.abstractmethod
    def fsync(self, handle: Any, datasync: bool = False) -> None:
        """Make completed writes durable (object store: complete the upload)."""

    def fallocate(self, handle: Any, mode: int, offset: int, length: int) -> None:
        """Reserve space; only mode 0 and FALLOC_FL_KEEP_SIZE need support.

        Default: a no-op for backends that cannot reserve (object stores), which is
        safe because it is only an ENOSPC-robustness optimisation.
        """
        del handle, mode, offset, length

    def flush(self, handle: Any) -> None:
        """Publish buffered writes of ``handle`` (``close(2)`` of one descriptor);
        raise EIO if that fails, keeping the data for a retry.  Default: nothing
        is buffered."""
        del handle

    @abc.abstractmethod
    def close(self, handle: Any) -> None:
        """Release a handle (object store: flush pending writes first)."""

    def fsyncdir(self, path: str) -> None:
        """Make directory entries durable (no-op where creation is already durable)."""
        del path

    def destroy(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release backend-wide resources at unmount."""
