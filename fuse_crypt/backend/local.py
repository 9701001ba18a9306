"""``LocalDirBackend``: ciphertext in a directory of a local (or host-shared) filesystem.

The storage is untrusted (the host controls it), so no symlink planted in it may
ever be followed: calls resolve relative to one directory fd opened at
construction (renaming or replacing the cipher directory's *path* later cannot
redirect I/O); the parent directory of every path is opened with ``openat2``
``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`` (or, where the kernel lacks openat2, by
walking components with ``O_NOFOLLOW``, as gocryptfs does), and the last component
is handled with ``*at`` calls that never follow it either.  A directory swapped for
a symlink therefore yields ELOOP instead of writes somewhere else in the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat as stat_mod
from collections.abc import Callable
from typing import Any, TypeVar

from ..safeio import SMALL_OPEN_FLAGS, check_regular, read_capped
from . import base
from .base import RENAME_EXCHANGE, RENAME_NOREPLACE, DirEntry, Stat, StorageBackend

_T = TypeVar("_T")

_O_BASE = os.O_CLOEXEC | os.O_NOFOLLOW
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

_SYS_OPENAT2 = 437  # same number on every Linux architecture
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# A typed prototype of syscall(2) for openat2: ctypes then converts plain ints and
# bytes in C instead of building c_long/c_char_p wrappers per call (a few us per
# open, paid twice per created file).
_openat2_call = ctypes.CFUNCTYPE(
    ctypes.c_long,
    ctypes.c_long,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    use_errno=True,
)(("syscall", _libc))
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_HOW_SIZE = ctypes.sizeof(_OpenHow)
#: Prebuilt open_how structs by (flags, mode): read-only for the kernel, so sharing
#: them between threads is safe; bounded because modes come from callers.
_how_cache: dict[tuple[int, int], tuple[_OpenHow, int]] = {}
_HOW_CACHE_MAX = 256


def _open_how(flags: int, mode: int) -> tuple[_OpenHow, int]:
    """(open_how, its address) for (flags, mode); the caller keeps the tuple alive
    for the duration of the syscall (another thread may clear the cache)."""
    hit = _how_cache.get((flags, mode))
    if hit is None:
        how = _OpenHow(flags, mode, _RESOLVE)
        hit = (how, ctypes.addressof(how))
        if len(_how_cache) >= _HOW_CACHE_MAX:
            _how_cache.clear()
        _how_cache[(flags, mode)] = hit
    return hit


def _to_stat(st: os.stat_result) -> Stat:
    return Stat(
        st.st_mode,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        st.st_atime_ns,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_blocks,
        st.st_blksize,
    )


def _check(path: str) -> str:
    """Map a backend path to a relative OS path; refuse anything that could escape."""
    return base.check_path(path) or "."


class LocalDirBackend(StorageBackend):
    """A cipher directory on a local filesystem, via ``os.*`` calls."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        # O_PATH: usable as dirfd for every *at call and for fstatfs, but grants no
        # read access by itself.
        self._rfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._openat2 = True

    # -- safe resolution ------------------------------------------------------------

    def _openat2_beneath(self, rel: str, flags: int, mode: int) -> int | None:
        """openat2(root, rel, RESOLVE_BENEATH|NO_SYMLINKS); None if unavailable."""
        if not flags & os.O_CREAT:
            mode = 0  # openat2 rejects a mode without O_CREAT
        how = _open_how(flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
        fd: int = _openat2_call(_SYS_OPENAT2, self._rfd, os.fsencode(rel), how[1], _HOW_SIZE)
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):  # EPERM: seccomp without openat2
            raise OSError(err, os.strerror(err))
        self._openat2 = False
        return None

    def _open_dir(self, rel: str) -> int:
        """O_PATH fd of directory ``rel`` (below the root), never via a symlink."""
        if self._openat2:
            fd = self._openat2_beneath(rel, _DIR_FLAGS, 0)
            if fd is not None:
                return fd
        fd = self._rfd
        try:
            for comp in rel.split("/"):
                nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                if fd != self._rfd:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != self._rfd:
                os.close(fd)
            raise
        return fd

    def _parent(self, path: str) -> tuple[int, str]:
        """(fd of the parent directory, last component) for a checked path.
        The caller must ``_done(fd)`` it."""
        p = _check(path)
        parent, sep, name = p.rpartition("/")
        if not sep:
            return self._rfd, p
        return self._open_dir(parent), name

    def _done(self, fd: int) -> None:
        if fd != self._rfd:
            os.close(fd)

    def __repr__(self) -> str:
        return f"LocalDirBackend(root={self.root!r})"

    # -- metadata ---------------------------------------------------------------

    def lstat(self, path: str) -> Stat:
        fd, name = self._parent(path)
        try:
            return _to_stat(os.stat(name, dir_fd=fd, follow_symlinks=False))
        finally:
            self._done(fd)

    def _open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """open() of the object at ``path`` in one openat2 call where possible
        (the hot path for file opens); no symlink anywhere is ever followed."""
        if self._openat2:
            fd = self._openat2_beneath(_check(path), flags, mode)
            if fd is not None:
                return fd
        pfd, name = self._parent(path)
        try:
            return os.open(name, flags | _O_BASE, mode, dir_fd=pfd)
        finally:
            self._done(pfd)

    def listdir(self, path: str) -> list[str]:
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def scandir(self, path: str) -> list[DirEntry]:
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            out = []
            with os.scandir(fd) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        t = stat_mod.S_IFDIR
                    elif e.is_file(follow_symlinks=False):
                        t = stat_mod.S_IFREG
                    elif e.is_symlink():
                        t = stat_mod.S_IFLNK
                    else:
                        t = stat_mod.S_IFMT(e.stat(follow_symlinks=False).st_mode)
                    out.append(DirEntry(e.name, e.inode(), t))
            return out
        finally:
            os.close(fd)

    def mkdir(self, path: str, mode: int) -> None:
        fd, name = self._parent(path)
        try:
            os.mkdir(name, mode, dir_fd=fd)
        finally:
            self._done(fd)

    def rmdir(self, path: str) -> None:
        fd, name = self._parent(path)
        try:
            os.rmdir(name, dir_fd=fd)
        finally:
            self._done(fd)

    def unlink(self, path: str) -> None:
        fd, name = self._parent(path)
        try:
            os.unlink(name, dir_fd=fd)
        finally:
            self._done(fd)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (flags and _renameat2 is None):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        ofd, oname = self._parent(old)
        try:
            nfd, nname = self._parent(new)
            try:
                if flags == 0:
                    os.rename(oname, nname, src_dir_fd=ofd, dst_dir_fd=nfd)
                    return
                assert _renameat2 is not None
                rc = _renameat2(ofd, os.fsencode(oname), nfd, os.fsencode(nname), flags)
                if rc != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            finally:
                self._done(nfd)
        finally:
            self._done(ofd)

    def link(self, src: str, dst: str) -> None:
        sfd, sname = self._parent(src)
        try:
            dfd, dname = self._parent(dst)
            try:
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
            finally:
                self._done(dfd)
        finally:
            self._done(sfd)

    def symlink(self, target: str, path: str) -> None:
        fd, name = self._parent(path)
        try:
            os.symlink(target, name, dir_fd=fd)
        finally:
            self._done(fd)

    def mknod(self, path: str, mode: int, dev: int = 0) -> None:
        fd, name = self._parent(path)
        try:
            os.mknod(name, mode, dev, dir_fd=fd)
        finally:
            self._done(fd)

    def readlink(self, path: str) -> str:
        fd, name = self._parent(path)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            self._done(fd)

    def chmod(self, path: str, mode: int) -> None:
        # fchmodat(AT_SYMLINK_NOFOLLOW) is not available; chmod through an O_PATH fd
        # of the object itself instead (a symlink there gives EOPNOTSUPP, never its
        # target).
        fd = self._open(path, os.O_PATH)
        try:
            if stat_mod.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, "chmod on a symlink")
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        fd, name = self._parent(path)
        try:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        finally:
            self._done(fd)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        if atime_ns is None and mtime_ns is None:
            return
        fd, name = self._parent(path)
        try:
            if atime_ns is None or mtime_ns is None:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=fd, follow_symlinks=False)
        finally:
            self._done(fd)

    def statfs(self) -> dict[str, int]:
        sv = os.statvfs(self._rfd)
        return {
            "f_bsize": sv.f_bsize,
            "f_frsize": sv.f_frsize,
            "f_blocks": sv.f_blocks,
            "f_bfree": sv.f_bfree,
            "f_bavail": sv.f_bavail,
            "f_files": sv.f_files,
            "f_ffree": sv.f_ffree,
            "f_favail": sv.f_favail,
            "f_namemax": sv.f_namemax,
        }

    # -- extended attributes ------------------------------------------------------

    # Python has no *xattrat(); a path through the parent's /proc/self/fd entry plus
    # follow_symlinks=False on the last component is the symlink-proof equivalent.

    def _xattr(self, path: str, fn: Callable[..., _T], *args: Any) -> _T:
        fd, name = self._parent(path)
        try:
            return fn(f"/proc/self/fd/{fd}/{name}", *args, follow_symlinks=False)
        finally:
            self._done(fd)

    def getxattr(self, path: str, name: str) -> bytes:
        return self._xattr(path, os.getxattr, name)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        self._xattr(path, os.setxattr, name, value, flags)

    def listxattr(self, path: str) -> list[str]:
        return self._xattr(path, os.listxattr)

    def removexattr(self, path: str, name: str) -> None:
        self._xattr(path, os.removexattr, name)

    # -- small whole files ------------------------------------------------------------

    def read_small_file(self, path: str, max_size: int = 1 << 20) -> bytes:
        """Non-blocking, no symlinks, regular files only, at most ``max_size`` bytes
        (see :mod:`fuse_crypt.safeio`): a FIFO as a ``gocryptfs.diriv`` gives EIO for
        that directory instead of wedging a FUSE worker thread."""
        fd = self._open(path, SMALL_OPEN_FLAGS)
        try:
            return read_capped(fd, max_size)
        finally:
            os.close(fd)

    def write_small_file_excl(
        self, path: str, data: bytes, mode: int, *, sync: bool = True
    ) -> None:
        pfd, name = self._parent(path)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BASE, mode, dir_fd=pfd)
            try:
                self._write_all(fd, data, 0)
                if sync:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=pfd)
                raise
            os.close(fd)
        finally:
            self._done(pfd)

    # -- file handles -------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        """A regular file only: opened with O_NONBLOCK (a FIFO planted where a cipher
        file was must not block the open) and refused with EIO unless fstat says
        regular.  O_NONBLOCK has no effect on regular-file I/O, so it stays set."""
        if flags & os.O_APPEND:
            raise OSError(errno.EINVAL, "O_APPEND is not allowed on backend handles")
        fd = self._open(path, flags | os.O_NONBLOCK | os.O_NOCTTY, mode)
        try:
            check_regular(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def pread(self, handle: int, size: int, offset: int) -> bytes:
        data = os.pread(handle, size, offset)
        if len(data) == size or not data:
            return data
        # A short read before EOF (rare: signals, network filesystems) -- finish it.
        parts = [data]
        got = len(data)
        while got < size:
            more = os.pread(handle, size - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pread_into(self, handle: int, buf: memoryview, offset: int) -> int:
        want = len(buf)
        got = os.preadv(handle, [buf], offset)
        while 0 < got < want:  # short read before EOF: finish it
            more = os.preadv(handle, [buf[got:]], offset + got)
            if more <= 0:
                break
            got += more
        return got

    @staticmethod
    def _write_all(fd: int, data: bytes | memoryview, offset: int) -> int:
        n = os.pwrite(fd, data, offset)
        if n == len(data):
            return n
        mv = memoryview(data)
        while n < len(data):
            w = os.pwrite(fd, mv[n:], offset + n)
            if w <= 0:
                raise OSError(errno.EIO, "short write")
            n += w
        return n

    def pwrite(self, handle: int, data: bytes | memoryview, offset: int) -> int:
        return self._write_all(handle, data, offset)

    def ftruncate(self, handle: int, size: int) -> None:
        os.ftruncate(handle, size)

    def fstat(self, handle: int) -> Stat:
        return _to_stat(os.fstat(handle))

    def fsync(self, handle: int, datasync: bool = False) -> None:
        if datasync:
            os.fdatasync(handle)
        else:
            os.fsync(handle)

    def fallocate(self, handle: int, mode: int, offset: int, length: int) -> None:
        if _fallocate is None:
            raise OSError(errno.EOPNOTSUPP, "fallocate unavailable")
        if _fallocate(handle, mode, offset, length) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def close(self, handle: int) -> None:
        os.close(handle)

    def fsyncdir(self, path: str) -> None:
        fd = self._open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def destroy(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
