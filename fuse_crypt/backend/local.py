"""``LocalDirBackend``: ciphertext in a directory of a local (or host-shared) filesystem.

All calls resolve relative to one directory fd opened at construction (``*at``
syscalls), so renaming or replacing the cipher directory's *path* after mount
cannot redirect I/O, and the last path component is never followed if it is a
symlink.  Intermediate components are resolved by the kernel; they are the
directories the frontend itself just looked up, which is the same trust level
gocryptfs has without ``-sharedstorage``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import stat as stat_mod

from .base import RENAME_EXCHANGE, RENAME_NOREPLACE, DirEntry, Stat, StorageBackend

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
    if path == "":
        return "."
    if path[0] == "/" or "\0" in path:
        raise OSError(errno.EINVAL, "invalid backend path")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise OSError(errno.EINVAL, "invalid backend path")
    return path


class LocalDirBackend(StorageBackend):
    """A cipher directory on a local filesystem, via ``os.*`` calls."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        # O_PATH: usable as dirfd for every *at call and for fstatfs, but grants no
        # read access by itself.
        self._rfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._proc = f"/proc/self/fd/{self._rfd}/"

    def __repr__(self) -> str:
        return f"LocalDirBackend(root={self.root!r})"

    # -- metadata ---------------------------------------------------------------

    def lstat(self, path: str) -> Stat:
        return _to_stat(os.stat(_check(path), dir_fd=self._rfd, follow_symlinks=False))

    def listdir(self, path: str) -> list[str]:
        fd = os.open(_check(path), os.O_RDONLY | os.O_DIRECTORY | _O_BASE, dir_fd=self._rfd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def scandir(self, path: str) -> list[DirEntry]:
        fd = os.open(_check(path), os.O_RDONLY | os.O_DIRECTORY | _O_BASE, dir_fd=self._rfd)
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
        os.mkdir(_check(path), mode, dir_fd=self._rfd)

    def rmdir(self, path: str) -> None:
        os.rmdir(_check(path), dir_fd=self._rfd)

    def unlink(self, path: str) -> None:
        os.unlink(_check(path), dir_fd=self._rfd)

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        o, n = _check(old), _check(new)
        if flags == 0:
            os.rename(o, n, src_dir_fd=self._rfd, dst_dir_fd=self._rfd)
            return
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or _renameat2 is None:
            raise OSError(errno.EINVAL, "unsupported rename flags")
        rc = _renameat2(self._rfd, os.fsencode(o), self._rfd, os.fsencode(n), flags)
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def link(self, src: str, dst: str) -> None:
        os.link(
            _check(src),
            _check(dst),
            src_dir_fd=self._rfd,
            dst_dir_fd=self._rfd,
            follow_symlinks=False,
        )

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, _check(path), dir_fd=self._rfd)

    def mknod(self, path: str, mode: int, dev: int = 0) -> None:
        os.mknod(_check(path), mode, dev, dir_fd=self._rfd)

    def readlink(self, path: str) -> str:
        return os.readlink(_check(path), dir_fd=self._rfd)

    def chmod(self, path: str, mode: int) -> None:
        # fchmodat(AT_SYMLINK_NOFOLLOW) is not available; chmod through an O_PATH fd
        # of the object itself instead (a symlink there gives EOPNOTSUPP, never its
        # target).
        fd = os.open(_check(path), os.O_PATH | _O_BASE, dir_fd=self._rfd)
        try:
            if stat_mod.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, "chmod on a symlink")
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(_check(path), uid, gid, dir_fd=self._rfd, follow_symlinks=False)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        p = _check(path)
        if atime_ns is None and mtime_ns is None:
            return
        if atime_ns is None or mtime_ns is None:
            st = os.stat(p, dir_fd=self._rfd, follow_symlinks=False)
            atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
            mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
        os.utime(p, ns=(atime_ns, mtime_ns), dir_fd=self._rfd, follow_symlinks=False)

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

    def _xpath(self, path: str) -> str:
        return self._proc + _check(path)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self._xpath(path), name, follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        os.setxattr(self._xpath(path), name, value, flags, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return os.listxattr(self._xpath(path), follow_symlinks=False)

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self._xpath(path), name, follow_symlinks=False)

    # -- small whole files ------------------------------------------------------------

    def read_small_file(self, path: str, max_size: int = 1 << 20) -> bytes:
        fd = os.open(_check(path), os.O_RDONLY | _O_BASE, dir_fd=self._rfd)
        try:
            data = os.read(fd, max_size + 1)
            if len(data) > max_size:
                raise OSError(errno.EFBIG, "small file too large")
            return data
        finally:
            os.close(fd)

    def write_small_file_excl(self, path: str, data: bytes, mode: int) -> None:
        p = _check(path)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BASE, mode, dir_fd=self._rfd)
        try:
            self._write_all(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(p, dir_fd=self._rfd)
            raise
        os.close(fd)

    # -- file handles -------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        if flags & os.O_APPEND:
            raise OSError(errno.EINVAL, "O_APPEND is not allowed on backend handles")
        return os.open(_check(path), flags | _O_BASE, mode, dir_fd=self._rfd)

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
    def _write_all(fd: int, data: bytes, offset: int) -> int:
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

    def pwrite(self, handle: int, data: bytes, offset: int) -> int:
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
        fd = os.open(_check(path), os.O_RDONLY | os.O_DIRECTORY | _O_BASE, dir_fd=self._rfd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def destroy(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
            self._rfd = -1
