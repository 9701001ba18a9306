"""``serve_block()``: a FUSE mount holding one file, ``disk``, the plaintext of a segment.

The file is what ``losetup --direct-io=on`` attaches; the filesystem on top (ext4, xfs)
brings its own page cache, so every open of ``disk`` is uncached here (FOPEN_DIRECT_IO):
the loop device's reads and writes reach the daemon as they are issued, a flush/FUA from
the filesystem's journal becomes our ``fsync`` and an ``fdatasync`` of the device, and
no second copy of the plaintext sits in the kernel's cache of this FUSE file.

Two loops answer the requests, with the same semantics (tests/fuse_crypt/test_blockloop.py
runs both): the C loop of :mod:`.native` by default, and ``BlockOperations`` below through
the gocryptfs frontend's libfuse plumbing (``CryptFUSE``: error mapping, zero-copy
read/write buffers) where the C loop was not built or ``FUSE_CRYPT_BLOCK_LOOP=python``.
Either way ``StopSignals`` makes SIGINT/SIGTERM/SIGHUP always end it and ``run_fuse_loop``
reports readiness and exit the same way to the supervising node plugin.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..backend import Stat
from ..fusefrontend import MAX_IO, CryptFUSE, StopSignals, run_fuse_loop  # libfuse3 first

import mfusepy  # isort: skip

from ..errors import FuseCryptError
from . import native
from .device import CryptDevice

if TYPE_CHECKING:  # prometheus_client is imported only with --metrics-addr
    from .metrics import BlockMetrics

log = logging.getLogger("fuse_crypt.blockfront")

DISK_NAME = "disk"
FSNAME = "fuse-crypt-block"
_ROOT_INO = 1
_DISK_INO = 2
_DISK_FH = 1
#: libfuse worker threads (both loops); idle ones are kept, never retired
_THREADS = 4


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class BlockOperations(mfusepy.Operations):  # type: ignore[misc]
    """The two-entry filesystem: ``/`` and ``/disk``; nothing can be created or renamed.

    ``metrics`` (``--metrics-addr``) sees every answered read, write and fsync; without it
    the request paths only test ``metrics is None`` (no Prometheus work at all)."""

    def __init__(self, device: CryptDevice, metrics: BlockMetrics | None = None) -> None:
        self.dev = device
        self.metrics = metrics
        self.initialized = threading.Event()
        self._t = time.time_ns()
        self._uid = os.getuid()
        self._gid = os.getgid()
        self.io_count = 0

    def init_with_config(self, conn_info: Any, config_3: Any) -> None:
        if conn_info is not None:
            conn_info.max_write = MAX_IO
            if hasattr(conn_info, "max_read"):
                conn_info.max_read = MAX_IO
        if config_3 is not None:
            config_3.use_ino = 1
            config_3.nullpath_ok = 1
            # The size changes when the disk grows: getattr re-reads it, never cached.
            config_3.attr_timeout = 0.0
            config_3.entry_timeout = 1.0
        self.initialized.set()

    # -- attributes ----------------------------------------------------------------------

    def _which(self, path: str | None, fh: int | None) -> str:
        if path is None:
            if fh == _DISK_FH:
                return DISK_NAME
            raise _err(errno.EBADF)
        if path == "/":
            return "/"
        if path == "/" + DISK_NAME:
            return DISK_NAME
        raise _err(errno.ENOENT)

    def stat(self, path: str | None, fh: int | None = None) -> tuple[Stat, int]:
        what = self._which(path, fh)
        t = self._t
        if what == "/":
            st = Stat(
                stat.S_IFDIR | 0o755, _ROOT_INO, 0, 2, self._uid, self._gid, 0, t, t, t, 0, 4096
            )
            return st, 0
        mode = 0o400 if self.dev.read_only else 0o600
        if self.dev.fixed_size is None:
            # A grown disk shows at once (`losetup -c` re-reads the size through here).
            with contextlib.suppress(OSError):
                self.dev.refresh_size()
        size = self.dev.size
        st = Stat(
            stat.S_IFREG | mode,
            _DISK_INO,
            0,
            1,
            self._uid,
            self._gid,
            size,
            t,
            t,
            t,
            size // 512,
            self.dev.sector_size,
        )
        return st, size

    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        st, size = self.stat(path, fh)
        return {"st_mode": st.mode, "st_ino": st.ino, "st_nlink": st.nlink, "st_size": size}

    def readdir_entries(self, path: str | None, fh: int) -> list[tuple[str, int, int]]:
        return [
            (".", _ROOT_INO, stat.S_IFDIR),
            ("..", _ROOT_INO, stat.S_IFDIR),
            (DISK_NAME, _DISK_INO, stat.S_IFREG),
        ]

    def readdir(self, path: str | None, fh: int) -> list[str]:
        return [".", "..", DISK_NAME]

    def access(self, path: str, amode: int) -> int:
        self._which(path, None)
        if amode & os.W_OK and self.dev.read_only:
            raise _err(errno.EROFS)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        blocks = self.dev.size // 4096
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 2,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    # -- the disk file ---------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        if self._which(path, None) != DISK_NAME:
            raise _err(errno.EISDIR)
        if self.dev.read_only and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise _err(errno.EROFS)
        # A device that grew (NodeExpandVolume) shows its new size at the next open.
        if self.dev.fixed_size is None:
            with contextlib.suppress(OSError):
                self.dev.refresh_size()
        return _DISK_FH

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        raise _err(errno.EACCES)

    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        return self.dev.read(offset, size)

    def read_into(self, fh: int, out: memoryview, offset: int) -> int:
        """Hot path used by CryptFUSE.read: decrypt into libfuse's buffer."""
        self.io_count += 1
        if self.metrics is None:
            return self.dev.read_into(out, offset)
        return self.metrics.run("read", self.dev.read_into, out, offset)

    def write(self, path: str | None, data: memoryview, offset: int, fh: int) -> int:
        self.io_count += 1
        if self.metrics is None:
            return self.dev.write(data, offset)
        return self.metrics.run("write", self.dev.write, data, offset)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        # O_TRUNC and ftruncate: the size is the device's; only a no-op passes.
        self._which(path, fh)
        if length != self.dev.size:
            raise _err(errno.EPERM)
        return 0

    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        if self.metrics is None:
            self.dev.sync()
        else:
            self.metrics.run("fsync", self.dev.sync)
        return 0

    def flush(self, path: str | None, fh: int) -> int:
        return 0

    def release(self, path: str | None, fh: int) -> int:
        return 0

    def chmod(self, path: str, mode: int) -> int:
        raise _err(errno.EPERM)

    def chown(self, path: str, uid: int, gid: int) -> int:
        raise _err(errno.EPERM)

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        return 0

    def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: int) -> int:
        raise _err(errno.EOPNOTSUPP)  # no discard/punch-hole: it would leak what is unused

    def destroy(self, path: str) -> None:
        pass


class BlockFUSE(CryptFUSE):
    """CryptFUSE's plumbing for the block frontend; every open is uncached."""

    def _cpath_arg(self, args: tuple[Any, ...]) -> str:
        return "-"

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.open(path.decode(self.encoding, self.errors), fi.flags)
        fi.direct_io = 1
        return 0


def serve_block(
    device: CryptDevice,
    mountpoint: str,
    *,
    on_ready: Callable[[], None] | None = None,
    allow_other: bool = False,
    metrics: BlockMetrics | None = None,
) -> None:
    """Mount ``device``'s plaintext as ``<mountpoint>/disk`` and serve until unmounted or
    stopped by SIGINT/SIGTERM/SIGHUP. Takes ownership of ``device`` (closed, key wiped, at
    the end). Raises OSError if the mount point is unusable or libfuse fails. ``metrics``:
    the ``--metrics-addr`` observer, or None."""
    stop = StopSignals.install()
    try:
        _serve(device, os.path.abspath(mountpoint), stop, on_ready, allow_other, metrics)
    finally:
        if stop is not None:
            stop.restore()
        device.close()


def _serve(
    device: CryptDevice,
    mountpoint: str,
    stop: StopSignals | None,
    on_ready: Callable[[], None] | None,
    allow_other: bool,
    metrics: BlockMetrics | None,
) -> None:
    if not os.path.isdir(mountpoint):
        raise OSError(errno.ENOTDIR, "mount point is not a directory", mountpoint)
    if mfusepy.fuse_version_major != 3:
        raise FuseCryptError("libfuse3 is required (mfusepy loaded libfuse2)")
    if native.chosen(device):
        _serve_native(device, mountpoint, stop, on_ready, allow_other, metrics)
        return
    ops = BlockOperations(device, metrics)
    options: dict[str, Any] = {
        "fsname": FSNAME,
        "subtype": FSNAME,
        "max_read": MAX_IO,
        "max_threads": _THREADS,
        "max_idle_threads": _THREADS,
    }
    if device.read_only:
        options["ro"] = True
    if allow_other:
        options["allow_other"] = True
        options["default_permissions"] = True

    def loop() -> None:
        BlockFUSE(ops, mountpoint, foreground=True, nothreads=False, **options)

    run_fuse_loop(loop, ops.initialized, mountpoint, stop, on_ready)


def _serve_native(
    device: CryptDevice,
    mountpoint: str,
    stop: StopSignals | None,
    on_ready: Callable[[], None] | None,
    allow_other: bool,
    metrics: BlockMetrics | None,
) -> None:
    """The same mount served by the C request loop (:mod:`.native`): mounted here, INIT
    answered by the loop's first worker (a request that comes first waits in the kernel),
    ended by StopSignals through the loop's own exit call."""
    loop = native.NativeLoop(
        device, mountpoint, fsname=FSNAME, allow_other=allow_other, threads=_THREADS
    )
    log.info("event=block_loop engine=c mountpoint=%s", mountpoint)
    mounted = threading.Event()
    mounted.set()
    if metrics is not None:
        metrics.attach(loop)
    if stop is not None:
        stop.on_session(loop.exit)
    try:
        run_fuse_loop(loop.run, mounted, mountpoint, stop, on_ready)
    finally:
        if stop is not None:
            stop.on_destroy()
        if metrics is not None:
            metrics.detach()
        loop.close()
