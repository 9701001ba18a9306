"""The mfusepy ``Operations`` class: plaintext FUSE requests → backend calls.

Each method maps its plaintext path(s) to cipher paths (:mod:`.paths`), applies
the gocryptfs rules for that operation (dir IVs on mkdir/rmdir, ``.name`` side files
for long names, encrypted symlink targets and xattrs) and leaves content crypto to
:mod:`.files`.  Errors are raised as ``OSError``/``FuseCryptError`` and turned into
errno values in one place (:class:`.mount.CryptFUSE`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat as stat_mod
import threading
import time
from typing import Any

import mfusepy

from ..backend import RENAME_EXCHANGE, Stat, StorageBackend
from ..contentenc import ContentEnc
from ..errors import CorruptDataError
from ..nametransform import DIRIV_NAME, NameTransform
from .files import MAX_IO, FileTable
from .paths import PathMapper, join
from .quota import Quota
from .xattrs import XattrMapper

log = logging.getLogger("fuse_crypt.fusefrontend")

#: Kernel attribute / entry / negative-lookup cache lifetime, like gocryptfs.
CACHE_TIMEOUT = 1.0

_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_WRITE_ACC = os.O_WRONLY | os.O_RDWR
_PASS_FLAGS = os.O_SYNC | os.O_DSYNC
_DIR_FH_BIT = 1 << 62


def _erofs() -> OSError:
    return OSError(errno.EROFS, "read-only file system")


class CryptOperations(mfusepy.Operations):
    """gocryptfs-compatible forward-mode filesystem over a :class:`StorageBackend`."""

    use_ns = True

    def __init__(
        self,
        backend: StorageBackend,
        enc: ContentEnc,
        nt: NameTransform,
        *,
        use_diriv: bool = True,
        read_only: bool = False,
        quota: Quota | None = None,
    ) -> None:
        self.backend = backend
        self.enc = enc
        self.nt = nt
        self.read_only = read_only
        self.use_diriv = use_diriv
        self.paths = PathMapper(backend, nt, use_diriv=use_diriv)
        self.quota = quota
        self.files = FileTable(backend, enc, quota)
        self.xattrs = XattrMapper(backend, nt)
        self.initialized = threading.Event()
        self._is_root = os.geteuid() == 0
        self._dirs: dict[int, str] = {}
        self._dir_seq = 0
        self._dir_lock = threading.Lock()
        if backend.buffers_writes:
            # Only then: without a flush handler the kernel stops sending FLUSH.
            self.flush = self._flush

    # -- lifecycle ---------------------------------------------------------------------

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info is not None:
            conn_info.max_write = MAX_IO
            if hasattr(conn_info, "max_read"):
                conn_info.max_read = MAX_IO
        if config_3 is not None:
            config_3.entry_timeout = CACHE_TIMEOUT
            config_3.attr_timeout = CACHE_TIMEOUT
            config_3.negative_timeout = CACHE_TIMEOUT
            config_3.use_ino = 1
            # Unlink really unlinks (no ".fuse_hidden" renames); open handles keep
            # working because content I/O only uses the handle, never the path.
            config_3.hard_remove = 1
            config_3.nullpath_ok = 1
        self.initialized.set()

    def destroy(self, path: str) -> None:
        self.files.close_all()

    # -- helpers -----------------------------------------------------------------------

    def _rw(self) -> None:
        if self.read_only:
            raise _erofs()

    def _attrs(self, st: Stat, size: int) -> dict[str, int]:
        return {
            "st_mode": st.mode,
            "st_ino": st.ino,
            "st_nlink": st.nlink,
            "st_uid": st.uid,
            "st_gid": st.gid,
            "st_size": size,
            "st_atime": st.atime_ns,
            "st_mtime": st.mtime_ns,
            "st_ctime": st.ctime_ns,
            "st_blocks": st.blocks,
            "st_blksize": st.blksize,
        }

    def _chown_to_caller(self, cpath: str) -> None:
        """Running as root for other users (allow_other), new objects must belong
        to the caller, not to root."""
        if not self._is_root:
            return
        uid, gid, _ = mfusepy.fuse_get_context()
        if uid != 0 or gid != 0:
            self.backend.chown(cpath, uid, gid)

    def _begin_create(self, path: str) -> tuple[str, str, bool]:
        """Cipher parent, cipher path, and whether we created a ``.name`` file."""
        cparent, disk, long_cname = self.paths.cipher_parent_and_name(path)
        created = False
        if long_cname is not None:
            try:
                self.backend.write_small_file_excl(
                    join(cparent, NameTransform.long_name_companion(disk)),
                    long_cname.encode("ascii"),
                    0o444,  # like gocryptfs 2.3
                    sync=False,
                )
                created = True
            except FileExistsError:
                pass
        return cparent, join(cparent, disk), created

    def _abort_create(self, cpath: str, created_name: bool) -> None:
        if created_name:
            with contextlib.suppress(OSError):
                self.backend.unlink(NameTransform.long_name_companion(cpath))

    # -- attributes --------------------------------------------------------------------

    def stat(self, path: str | None, fh: int | None = None) -> tuple[Stat, int]:
        """Backend attributes plus the *plaintext* size (what getattr reports)."""
        if fh and not fh & _DIR_FH_BIT:
            st = self.files.fstat(fh)
            cpath = None
        else:
            if path is None:
                path = self._dir_path(path, fh or 0)
            cpath = self.paths.cipher_path(path)
            st = self.backend.lstat(cpath)
        return st, self._plain_size(st, cpath)

    def _plain_size(self, st: Stat, cpath: str | None) -> int:
        mode = st.mode
        if stat_mod.S_ISREG(mode):
            return self.enc.plain_size(st.size, strict=False)
        if stat_mod.S_ISLNK(mode) and cpath is not None:
            # Symlink size = length of the decrypted target, as gocryptfs reports.
            try:
                return len(os.fsencode(self.nt.decrypt_symlink(self.backend.readlink(cpath))))
            except (OSError, CorruptDataError):
                return st.size
        return st.size

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        st, size = self.stat(path, fh)
        return self._attrs(st, size)

    def readlink(self, path: str) -> str:
        cpath = self.paths.cipher_path(path)
        stored = self.backend.readlink(cpath)
        try:
            return self.nt.decrypt_symlink(stored)
        except CorruptDataError:
            log.warning("event=corrupt_symlink cpath=%s", cpath)  # never the plaintext path
            raise

    def chmod(self, path: str, mode: int) -> int:
        self._rw()
        self.backend.chmod(self.paths.cipher_path(path), stat_mod.S_IMODE(mode))
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._rw()
        self.backend.chown(self.paths.cipher_path(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._rw()
        now = time.time_ns()
        if times is None:
            atime: int | None = now
            mtime: int | None = now
        else:
            atime, mtime = (
                now if t == _UTIME_NOW else None if t == _UTIME_OMIT else int(t) for t in times
            )
        self.backend.utimens(self.paths.cipher_path(path), atime, mtime)
        return 0

    def access(self, path: str, amode: int) -> int:
        st = self.backend.lstat(self.paths.cipher_path(path))
        if amode == os.F_OK:
            return 0
        if amode & os.W_OK and self.read_only:
            raise _erofs()
        uid, gid, _ = mfusepy.fuse_get_context()
        mode = st.mode
        if uid == 0:
            if amode & os.X_OK and not stat_mod.S_ISDIR(mode) and not mode & 0o111:
                raise OSError(errno.EACCES, "permission denied")
            return 0
        if st.uid == uid:
            bits = (mode >> 6) & 7
        elif st.gid == gid:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if amode & 7 & ~bits:
            raise OSError(errno.EACCES, "permission denied")
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        sv = self.backend.statfs()
        sv["f_namemax"] = 255
        return self.quota.statfs(sv) if self.quota is not None else sv

    # -- directories -------------------------------------------------------------------

    # With nullpath_ok, readdir/fsyncdir get no path: remember it per handle.

    def opendir(self, path: str) -> int:
        self.backend.lstat(self.paths.cipher_path(path))
        with self._dir_lock:
            self._dir_seq += 1
            fh = _DIR_FH_BIT | self._dir_seq
            self._dirs[fh] = path
        return fh

    def releasedir(self, path: str | None, fh: int) -> int:
        self._dirs.pop(fh, None)
        return 0

    def _dir_path(self, path: str | None, fh: int) -> str:
        if path is None:
            path = self._dirs.get(fh)
            if path is None:
                raise OSError(errno.EBADF, "unknown directory handle")
        return path

    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        """mfusepy form of :meth:`readdir_entries`."""
        return [
            (name, {"st_ino": ino, "st_mode": typ}, 0)
            for name, ino, typ in self.readdir_entries(path, fh)
        ]

    def readdir_entries(self, path: str | None, fh: int) -> list[tuple[str, int, int]]:
        """(name, inode, type bits) per entry, ``.`` and ``..`` first.  Inode
        numbers are always filled: use_ino is on, and glibc drops d_ino 0."""
        path = self._dir_path(path, fh)
        cdir = self.paths.cipher_path(path)
        out = [(".", self.backend.lstat(cdir).ino, stat_mod.S_IFDIR), ("..", 1, stat_mod.S_IFDIR)]
        out.extend((name, ino, typ) for name, _disk, ino, typ in self.paths.list_dir(path, cdir))
        return out

    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        """Also makes the directory's IV durable: mkdir writes it without fsync
        (like gocryptfs), and an IV lost in a crash loses every name below it."""
        cdir = self.paths.cipher_path(self._dir_path(path, fh))
        if self.use_diriv:
            h = self.backend.open(join(cdir, DIRIV_NAME), os.O_RDONLY)
            try:
                self.backend.fsync(h)
            finally:
                self.backend.close(h)
        self.backend.fsyncdir(cdir)
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._rw()
        gen = self.paths.generation
        _, cpath, created_name = self._begin_create(path)
        backend = self.backend
        try:
            if self.use_diriv:
                # The diriv must be writable into the new directory even if the
                # requested mode forbids it; the mode is restored afterwards.
                backend.mkdir(cpath, stat_mod.S_IMODE(mode) | 0o700)
                iv = NameTransform.new_dir_iv()
                try:
                    backend.write_small_file_excl(join(cpath, DIRIV_NAME), iv, 0o444, sync=False)
                    if stat_mod.S_IMODE(mode) & 0o700 != 0o700:
                        backend.chmod(cpath, stat_mod.S_IMODE(mode))
                except BaseException:
                    self._remove_dir_quietly(cpath)
                    raise
            else:
                backend.mkdir(cpath, stat_mod.S_IMODE(mode))
            self._chown_to_caller(cpath)
            if self.use_diriv:
                self.paths.seed_dir_iv(cpath, iv, gen)
        except BaseException:
            self._abort_create(cpath, created_name)
            raise
        return 0

    def _remove_dir_quietly(self, cpath: str) -> None:
        with contextlib.suppress(OSError):
            self.backend.unlink(join(cpath, DIRIV_NAME))
        with contextlib.suppress(OSError):
            self.backend.rmdir(cpath)

    def _rmdir_cipher(self, cpath: str) -> None:
        """gocryptfs rmdir: park the diriv in the parent, remove the directory,
        then delete the parked diriv (restored if rmdir fails)."""
        backend = self.backend
        if not self.use_diriv:
            backend.rmdir(cpath)
            return
        entries = backend.listdir(cpath)
        if any(e != DIRIV_NAME for e in entries):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        if DIRIV_NAME not in entries:
            backend.rmdir(cpath)
            return
        cparent = cpath.rpartition("/")[0]
        parked = join(cparent, f"gocryptfs.diriv.rmdir.{int.from_bytes(os.urandom(8), 'big')}")
        backend.rename(join(cpath, DIRIV_NAME), parked)
        try:
            backend.rmdir(cpath)
        except BaseException:
            backend.rename(parked, join(cpath, DIRIV_NAME))
            raise
        try:
            backend.unlink(parked)
        except OSError:
            log.warning("event=stale_parked_diriv cpath=%s", parked)

    def rmdir(self, path: str) -> int:
        self._rw()
        cpath = self.paths.cipher_path(path)
        try:
            self._rmdir_cipher(cpath)
        finally:
            self.paths.invalidate()
        self.paths.remove_long_name(cpath)
        return 0

    # -- names ---------------------------------------------------------------------------

    def unlink(self, path: str) -> int:
        self._rw()
        cpath = self.paths.cipher_path(path)
        st = self.backend.lstat(cpath) if self.quota is not None else None
        self.backend.unlink(cpath)
        if self.quota is not None and st is not None and st.is_reg and st.nlink == 1:
            self.quota.charge(-st.size)
        self.paths.remove_long_name(cpath)
        return 0

    def symlink(self, target: str, source: str) -> int:
        """Create symlink ``target`` whose content is ``source`` (mfusepy order)."""
        self._rw()
        stored = self.nt.encrypt_symlink(source)
        _, cpath, created_name = self._begin_create(target)
        try:
            self.backend.symlink(stored, cpath)
            self._chown_to_caller(cpath)
        except BaseException:
            self._abort_create(cpath, created_name)
            raise
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        """FIFOs, sockets and (as root) device nodes; names encrypted as usual, the
        node itself carries no content to encrypt."""
        self._rw()
        if stat_mod.S_ISREG(mode):
            self.release(path, self.create(path, mode, os.O_EXCL))
            return 0
        _, cpath, created_name = self._begin_create(path)
        try:
            self.backend.mknod(cpath, mode, dev)
            self._chown_to_caller(cpath)
        except BaseException:
            self._abort_create(cpath, created_name)
            raise
        return 0

    def link(self, target: str, source: str) -> int:
        """Create hard link ``target`` to existing ``source`` (mfusepy order)."""
        self._rw()
        csrc = self.paths.cipher_path(source)
        _, cpath, created_name = self._begin_create(target)
        try:
            self.backend.link(csrc, cpath)
        except BaseException:
            self._abort_create(cpath, created_name)
            raise
        return 0

    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._rw()
        backend = self.backend
        cold = self.paths.cipher_path(old)
        is_dir = backend.lstat(cold).is_dir  # ENOENT before creating any .name file
        _, cnew, created_name = self._begin_create(new)
        if cold == cnew:
            return 0
        replaced = self._replaced_size(cnew, flags)
        try:
            try:
                backend.rename(cold, cnew, flags)
            except OSError as e:
                # A target directory always holds its diriv, so the backing rename
                # sees it as non-empty; remove it properly if it is otherwise empty.
                if not (is_dir and flags == 0 and e.errno in (errno.ENOTEMPTY, errno.EEXIST)):
                    raise
                self._rmdir_cipher(cnew)
                backend.rename(cold, cnew)
        except BaseException:
            self._abort_create(cnew, created_name)
            raise
        finally:
            if is_dir or flags & RENAME_EXCHANGE:
                self.paths.invalidate()
        if replaced and self.quota is not None:  # replaced is 0 without a quota
            self.quota.charge(-replaced)
        if not flags & RENAME_EXCHANGE:
            try:
                backend.lstat(cold)  # still there: old and new were hard links
            except FileNotFoundError:
                self.paths.remove_long_name(cold)
        return 0

    def _replaced_size(self, cnew: str, flags: int) -> int:
        """Bytes a rename frees by replacing the last link of a regular file (for the
        quota: "write a temp file, rename it over" must not use up the capacity)."""
        if self.quota is None or flags & RENAME_EXCHANGE:
            return 0
        try:
            st = self.backend.lstat(cnew)
        except OSError:
            return 0
        return st.size if st.is_reg and st.nlink == 1 else 0

    # -- files ---------------------------------------------------------------------------

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        self._rw()
        _, cpath, created_name = self._begin_create(path)
        try:
            bflags = os.O_RDWR | os.O_CREAT | (flags & (os.O_EXCL | _PASS_FLAGS))
            fh = self.files.open(
                cpath,
                bflags,
                stat_mod.S_IMODE(mode),
                True,
                keep_stat=True,
                append=bool(flags & os.O_APPEND),
            )
        except BaseException:
            self._abort_create(cpath, created_name)
            raise
        try:
            self._chown_to_caller(cpath)
        except BaseException:
            self.files.release(fh)
            raise
        return fh

    def open(self, path: str, flags: int) -> int:
        writable = bool(flags & _WRITE_ACC)
        if writable and self.read_only:
            raise _erofs()
        cpath = self.paths.cipher_path(path)
        # Writers need read access too: partial blocks are read-modify-written.
        bflags = (os.O_RDWR if writable else os.O_RDONLY) | (flags & _PASS_FLAGS)
        fh = self.files.open(cpath, bflags, 0, writable, append=bool(flags & os.O_APPEND))
        if writable and flags & os.O_TRUNC:
            try:
                self.files.truncate(fh, 0)
            except BaseException:
                self.files.release(fh)
                raise
        return fh

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.files.read(fh, size, offset)

    def read_into(self, fh: int, out: memoryview, offset: int) -> int:
        """Hot path used by :class:`.mount.CryptFUSE`: decrypt into libfuse's buffer."""
        return self.files.read_into(fh, out, offset)

    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: int) -> int:
        return self.files.write(fh, data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._rw()
        if fh:
            self.files.truncate(fh, length)
            return 0
        if path is None:
            raise OSError(errno.EBADF, "no path and no handle")
        cpath = self.paths.cipher_path(path)
        tfh = self.files.open(cpath, os.O_RDWR, 0, True)
        try:
            self.files.truncate(tfh, length)
        finally:
            self.files.release(tfh)
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        self._rw()
        self.files.fallocate(fh, mode, offset, size)
        return 0

    # No flush() for backends that write through: leaving it unimplemented lets the
    # kernel stop sending FLUSH on every close (one round trip per small file).
    # Buffering backends (object stores) get _flush as ``flush`` (see __init__).

    def _flush(self, path: str | None, fh: int) -> int:
        self.files.flush(fh)
        return 0

    def release(self, path: str | None, fh: int) -> int:
        self.files.release(fh)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.files.fsync(fh, bool(datasync))
        return 0

    # -- xattrs --------------------------------------------------------------------------

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        if name == "security.capability":
            raise OSError(errno.ENODATA, "no such attribute")  # hot: asked on every write
        return self.xattrs.get(self.paths.cipher_path(path), name)

    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self._rw()
        self.xattrs.set(self.paths.cipher_path(path), name, value, options)
        return 0

    def listxattr(self, path: str) -> list[str]:
        return self.xattrs.list(self.paths.cipher_path(path))

    def removexattr(self, path: str, name: str) -> int:
        self._rw()
        self.xattrs.remove(self.paths.cipher_path(path), name)
        return 0
