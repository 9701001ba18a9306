"""``serve()``: mount a volume with libfuse3 (via mfusepy) and run the request loop.

Readiness: libfuse calls ``init`` after ``mount(2)`` but *before* the kernel accepts
requests, so ``on_ready`` fires from a watcher thread once ``init`` ran and the
mount point really shows a different device than its parent (a stat there then
goes through our own, already running, loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from . import _libfuse  # noqa: F401  (selects libfuse3 before mfusepy loads)

import mfusepy  # isort: skip

from ..backend import Stat, StorageBackend
from ..configfile import ConfFile
from ..contentenc import BlockObserver, ContentEnc
from ..cryptocore import CryptoCore
from ..errors import (
    ConfigError,
    CorruptDataError,
    FuseCryptError,
    InvalidNameError,
    NameTooLongError,
)
from ..nametransform import DIRIV_NAME, NameTransform
from .allocator import malloc_trim, tune_process
from .files import MAX_IO
from .operations import CryptOperations
from .quota import Quota
from .stopsignals import StopSignals, note_destroy, note_init

log = logging.getLogger("fuse_crypt.fusefrontend")

_READ_AHEAD_KB = 2048

#: libfuse worker threads.  libfuse 3.14's own defaults are max_threads=10 and
#: max_idle_threads=UINT_MAX ("never retire"), but 3.14 then rejects its own idle
#: default with "Ignoring invalid max threads value 4294967295" on every mount.
#: Passing both explicitly keeps the same behaviour without the noise: with
#: max_idle == max_threads idle workers are never retired either, which
#: :func:`_pin_thread_state` relies on (a retired thread would leak its state).
_MAX_THREADS = 10


_tls = threading.local()


def _pin_thread_state() -> None:
    """Keep this libfuse worker's Python thread state alive between callbacks.

    ctypes runs each callback from a foreign (libfuse) thread inside
    PyGILState_Ensure/Release; when the thread has no state of its own, a new
    PyThreadState is created and destroyed around *every* request (tens of
    microseconds, which dominated small-file latency).  One extra Ensure that is
    never released keeps it.  libfuse (3.14 default) never retires idle workers,
    so the pinned states do not accumulate (serve() sets max_idle_threads equal to
    max_threads to keep it that way)."""
    if threading.get_ident() != threading.main_thread().ident:
        ctypes.pythonapi.PyGILState_Ensure()
    _tls.pinned = True


class CryptFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with the fixes and fast paths we need.

    * errors: our typed exceptions become errno values here, in one place, and
      unexpected exceptions are logged without their arguments (which may hold
      plaintext) and answered with EIO;
    * worker threads keep their Python thread state (:func:`_pin_thread_state`);
    * ``rename`` passes renameat2 flags (mfusepy drops them, which would turn
      RENAME_NOREPLACE into a silent overwrite);
    * ``truncate`` passes the file handle (ftruncate on an unlinked open file);
    * ``read``/``write`` work on libfuse's buffers directly, ``getattr`` and
      ``readdir`` fill libfuse's structs directly, ``create`` skips mfusepy's
      per-call signature inspection.
    """

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> int:
        if not getattr(_tls, "pinned", False):
            _pin_thread_state()
        try:
            return func(*args, **kwargs) or 0
        except OSError as e:
            if isinstance(e.errno, int) and e.errno > 0:
                return -e.errno
            log.error("event=bad_errno op=%s", func.__name__)
            return -errno.EIO
        except CorruptDataError:
            log.warning("event=corrupt_data op=%s cpath=%s", func.__name__, self._cpath_arg(args))
            return -errno.EIO
        except NameTooLongError:
            return -errno.ENAMETOOLONG
        except InvalidNameError:
            return -errno.EINVAL
        except Exception as e:
            if func.__name__.startswith("init"):
                raise
            log.error(
                "event=internal_error op=%s cpath=%s error=%s",
                func.__name__,
                self._cpath_arg(args),
                type(e).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return -errno.EIO
        except BaseException as e:
            self._FUSE__critical_exception = e  # what mfusepy re-raises after the loop
            log.critical("event=fatal op=%s error=%s", func.__name__, type(e).__name__)
            mfusepy.fuse_exit()
            return -errno.EFAULT

    def _cpath_arg(self, args: tuple[Any, ...]) -> str:
        """What a log line may say about the request's path: the cached cipher path
        (the host sees it anyway), never the plaintext name, which must not leave the
        TEE; "?" when it is not cached (looking it up could fail or block again)."""
        if not args or not isinstance(args[0], bytes):
            return "-"
        try:
            plain = args[0].decode(self.encoding, self.errors)
            cpath = self.operations.paths.cached_cipher_path(plain)
        except Exception:  # noqa: BLE001 - logging must never fail the request
            return "?"
        if cpath is None:
            return "?"
        return cpath or "/"

    # read/write: hand the operations a memoryview of libfuse's own buffer instead
    # of mfusepy's bytes copies (two 1 MiB allocations + copies per request).

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        out = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents)))
        n: int = self.operations.read_into(fip.contents.fh, out.cast("B"), offset)
        return n

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        data = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents)))
        n: int = self.operations.write(None, data.cast("B"), offset, fip.contents.fh)
        return n

    # getattr/readdir: fill libfuse's struct stat directly from our Stat instead of
    # going through mfusepy's dict + set_st_attrs (hot for small-file workloads).

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        p = None if path is None else path.decode(self.encoding, self.errors)
        st, size = self.operations.stat(p, fh)
        ctypes.memset(buf, 0, _STAT_SIZE)
        _fill_stat(buf.contents, st, size)
        return 0

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        # No READDIRPLUS attributes: libfuse's high-level API only passes them on
        # for offset-based listings, and the kernel asks for "plus" on the first
        # reply page only; the entries carry inode and type, as getdents needs.
        p = None if path is None else path.decode(self.encoding, self.errors)
        enc, errs = self.encoding, self.errors
        cst = mfusepy.c_stat()
        for name, ino, typ in self.operations.readdir_entries(p, fip.contents.fh):
            cst.st_ino = ino
            cst.st_mode = typ
            if filler(buf, name.encode(enc, errs), cst, 0, 0) != 0:
                break
        return 0

    def create(self, path: bytes, mode: int, fip: Any) -> int:
        # mfusepy inspects the signature of operations.create on every call.
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        _append_direct(fi)
        return 0

    def open(self, path: bytes, fip: Any) -> int:
        fi = fip.contents
        fi.fh = self.operations.open(path.decode(self.encoding, self.errors), fi.flags)
        _append_direct(fi)
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        rc: int = self.operations.rename(
            old.decode(self.encoding, self.errors), new.decode(self.encoding, self.errors), flags
        )
        return rc

    # init/destroy: tell the stop-signal handling which session to end, and when
    # libfuse is about to free it.

    def init_fuse_3(self, conn: Any, config: Any) -> None:
        note_init()
        super().init_fuse_3(conn, config)

    def destroy(self, private_data: Any) -> Any:
        note_destroy()
        return super().destroy(private_data)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        p = None if path is None else path.decode(self.encoding, self.errors)
        rc: int = self.operations.truncate(p, length, fh)
        return rc


_STAT_SIZE = ctypes.sizeof(mfusepy.c_stat)


def _append_direct(fi: Any) -> None:
    """O_APPEND handles bypass the page cache (direct_io): the daemon places each
    append at its own end of file (files.OpenFile.append), and a cached write is
    split by the kernel at a partial page into two requests, which another hard-link
    name's append could then land between.  Uncached, one write() is one request."""
    if fi.flags & os.O_APPEND:
        fi.direct_io = 1


def _fill_stat(cst: Any, st: Stat, size: int) -> None:
    cst.st_mode = st.mode
    cst.st_ino = st.ino
    cst.st_nlink = st.nlink
    cst.st_uid = st.uid
    cst.st_gid = st.gid
    cst.st_size = size
    cst.st_blocks = st.blocks
    cst.st_blksize = st.blksize
    cst.st_atimespec.tv_sec, cst.st_atimespec.tv_nsec = divmod(st.atime_ns, 1_000_000_000)
    cst.st_mtimespec.tv_sec, cst.st_mtimespec.tv_nsec = divmod(st.mtime_ns, 1_000_000_000)
    cst.st_ctimespec.tv_sec, cst.st_ctimespec.tv_nsec = divmod(st.ctime_ns, 1_000_000_000)


_TRIM_INTERVAL = 2.0


def _tune_readahead(mountpoint: str) -> None:
    """Raise the mount's readahead window (default 128 KiB) so sequential reads
    arrive as 1 MiB requests (per-request overhead dominates in Python) with a
    second one in flight, overlapping its backing pread with our decryption.
    2 MiB measured best: 4 MiB adds ~10 MiB peak RSS for no clear gain.  Best
    effort (needs root and writable sysfs); failure only costs throughput."""
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(_READ_AHEAD_KB))
    except OSError as e:
        log.debug("event=readahead_not_tuned errno=%s", e.errno)


def _watch_ready(
    initialized: threading.Event,
    mountpoint: str,
    done: threading.Event,
    on_ready: Callable[[], None] | None,
    before_ready: Callable[[], None] | None,
    after_ready: Callable[[threading.Event], None] | None,
) -> None:
    while not initialized.wait(0.05):
        if done.is_set():
            return
    while not done.is_set():
        try:
            if os.path.ismount(mountpoint):
                break
        except OSError:
            pass
        done.wait(0.01)
    else:
        return
    if before_ready is not None:
        before_ready()
    log.info("event=mounted mountpoint=%s", mountpoint)
    if on_ready is not None:
        try:
            on_ready()
        except Exception as e:
            log.error("event=on_ready_failed error=%s", type(e).__name__)
    if after_ready is not None:
        after_ready(done)


def run_fuse_loop(
    loop: Callable[[], None],
    initialized: threading.Event,
    mountpoint: str,
    stop: StopSignals | None,
    on_ready: Callable[[], None] | None,
    *,
    before_ready: Callable[[], None] | None = None,
    after_ready: Callable[[threading.Event], None] | None = None,
    cleanup: Callable[[], None] | None = None,
) -> None:
    """Run libfuse's ``loop`` in this thread, with a watcher thread that calls ``on_ready``
    once the kernel shows the mount, and end it the one way both frontends need.

    Why shared: the fuse-crypt filesystem and the block daemon are both supervised by the
    node plugin, which reads "ready" and exit codes the same way for each. libfuse3 reports a
    loop ended by SIGINT/SIGTERM/SIGHUP as a failure (exit code 8): that is an orderly
    shutdown if we were mounted and the mount is gone, an OSError(EIO) otherwise.
    ``before_ready`` runs once mounted, before ``on_ready``; ``after_ready`` runs in the
    watcher thread afterwards until the loop ends (it gets the "done" event); ``cleanup``
    runs after the loop, before the watcher is joined.
    """
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_ready,
        args=(initialized, mountpoint, done, on_ready, before_ready, after_ready),
        name="fuse-crypt-ready",
        daemon=True,
    )
    watcher.start()
    try:
        if stop is None:
            loop()
        else:
            stop.run(loop, on_stop=done.set)
    except RuntimeError as e:
        if not (initialized.is_set() and not os.path.ismount(mountpoint)):
            raise OSError(errno.EIO, f"libfuse failed (exit code {e})", mountpoint) from None
        log.info("event=stopped_by_signal mountpoint=%s", mountpoint)
    finally:
        done.set()
        if cleanup is not None:
            cleanup()
        with contextlib.suppress(RuntimeError):
            watcher.join(1.0)
        log.info("event=unmounted mountpoint=%s", mountpoint)


def _housekeeping(ops: CryptOperations, done: threading.Event) -> None:
    """Give freed I/O buffers back to the kernel once a burst of I/O is over.

    The raised malloc trim threshold (needed for throughput) means glibc keeps
    freed 1 MiB buffers; after a parallel burst that is ~20 MiB of idle RSS.  Trim
    only when the daemon went quiet, so busy periods never pay for page faults."""
    trim = malloc_trim()
    if trim is None:
        return
    last = ops.files.io_count
    dirty = False
    while not done.wait(_TRIM_INTERVAL):
        now = ops.files.io_count
        if now != last:
            last, dirty = now, True
        elif dirty:
            trim()
            dirty = False


def _release_setup_heap() -> None:
    """Give back what setting up a bounded-heap daemon left behind (an object-store
    SDK's parsed models, import-time garbage): a collection, then ``malloc_trim(0)``.
    Once, before serving, so the daemon starts from its smallest footprint (its RSS
    budget is 64 MiB with caches full, docs/fuse_crypt.md)."""
    import gc

    gc.collect()
    trim = malloc_trim()
    if trim is not None:
        trim()


def build_operations(
    backend: StorageBackend,
    master_key: bytes,
    conf: ConfFile | None,
    *,
    read_only: bool = False,
    capacity: int = 0,
    block_observer: BlockObserver | None = None,
) -> tuple[CryptOperations, CryptoCore]:
    """Keys and name options from the conf (or gocryptfs defaults for a bare
    master key) → the Operations object; checks the root dir IV up front so a
    wrong cipher directory fails before anything is mounted."""
    if conf is not None:
        core = conf.new_core(master_key)
        nt = conf.name_transform(core)
        use_diriv = conf.has("DirIV")
    else:
        core = CryptoCore(master_key)
        nt = NameTransform(core)
        use_diriv = True
    quota = Quota.scan(capacity, backend) if capacity else None
    ops = CryptOperations(
        backend,
        ContentEnc(core, block_observer),
        nt,
        use_diriv=use_diriv,
        read_only=read_only,
        quota=quota,
    )
    if not use_diriv:
        _refuse_dropped_diriv(backend, core)
    try:
        ops.paths.dir_iv("")
    except (CorruptDataError, OSError) as e:
        core.wipe()
        raise ConfigError("cipher directory has no valid root gocryptfs.diriv") from e
    return ops, core


def _refuse_dropped_diriv(backend: StorageBackend, core: CryptoCore) -> None:
    """A conf without DirIV over a cipher directory that has a root dir IV was downgraded.

    Feature flags are not authenticated (gocryptfs wraps only the master key), so a host
    can delete ``DirIV`` from the conf and the password still unlocks it; every name
    written afterwards would be encrypted deterministically (equal names, equal cipher
    names, in every directory). gocryptfs' deterministic-name volumes never contain a
    ``gocryptfs.diriv``, so its presence in the root proves the flag was removed."""
    try:
        backend.lstat(DIRIV_NAME)
    except FileNotFoundError:
        return
    except OSError:
        pass  # something is there (unreadable): treat it as present
    core.wipe()
    raise ConfigError(
        "gocryptfs.conf lacks the DirIV flag but the cipher directory has a root "
        "gocryptfs.diriv: the conf was downgraded (refusing to write deterministic names)"
    )


def serve(
    backend: StorageBackend,
    master_key: bytes,
    conf: ConfFile | None,
    mountpoint: str,
    *,
    read_only: bool = False,
    foreground: bool = True,
    fsname: str = "fuse-crypt",
    on_ready: Callable[[], None] | None = None,
    allow_other: bool = False,
    capacity: int = 0,
    block_observer: BlockObserver | None = None,
) -> None:
    """Mount and serve until unmounted (``fusermount3 -u``, SIGINT/SIGTERM/SIGHUP;
    all of these return normally).  Called from the main thread, serve() owns the
    stop signals from here on, so one arriving at any point ends it promptly
    (:mod:`.stopsignals`); from another thread the caller keeps its own handling.

    ``foreground`` is accepted for the contract; this call always runs the loop in
    the calling process (daemonizing a threaded Python process is the CLI's job,
    done before keys are loaded).  Raises ``ConfigError`` for an unusable cipher
    directory and ``OSError`` if the mount point is unusable or libfuse fails.
    The caller keeps ownership of ``backend``.  ``block_observer`` is told about
    every block batch (the daemon's metrics; see ``contentenc.BlockObserver``).
    """
    del foreground
    stop = StopSignals.install()
    try:
        _serve(
            backend,
            master_key,
            conf,
            mountpoint,
            stop,
            read_only=read_only,
            fsname=fsname,
            on_ready=on_ready,
            allow_other=allow_other,
            capacity=capacity,
            block_observer=block_observer,
        )
    finally:
        if stop is not None:
            stop.restore()


def _serve(
    backend: StorageBackend,
    master_key: bytes,
    conf: ConfFile | None,
    mountpoint: str,
    stop: StopSignals | None,
    *,
    read_only: bool,
    fsname: str,
    on_ready: Callable[[], None] | None,
    allow_other: bool,
    capacity: int = 0,
    block_observer: BlockObserver | None = None,
) -> None:
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise OSError(errno.ENOTDIR, "mount point is not a directory", mountpoint)
    if mfusepy.fuse_version_major != 3:
        raise FuseCryptError("libfuse3 is required (mfusepy loaded libfuse2)")
    ops, core = build_operations(
        backend,
        master_key,
        conf,
        read_only=read_only,
        capacity=capacity,
        block_observer=block_observer,
    )
    bounded = bool(getattr(backend, "bounded_heap", False))
    tune_process(bounded_heap=bounded)
    if bounded:
        _release_setup_heap()
    options: dict[str, Any] = {
        "fsname": fsname,
        "subtype": "fuse-crypt",
        "max_read": MAX_IO,
        "max_threads": _MAX_THREADS,
        "max_idle_threads": _MAX_THREADS,
    }
    if read_only:
        options["ro"] = True
    if allow_other:
        # The daemon runs as root for other users: let the kernel check modes.
        options["allow_other"] = True
        options["default_permissions"] = True
    log.info("event=mounting mountpoint=%s read_only=%s", mountpoint, read_only)

    def loop() -> None:
        CryptFUSE(ops, mountpoint, foreground=True, nothreads=False, **options)

    def cleanup() -> None:
        ops.files.close_all()
        core.wipe()

    run_fuse_loop(
        loop,
        ops.initialized,
        mountpoint,
        stop,
        on_ready,
        before_ready=lambda: _tune_readahead(mountpoint),
        after_ready=lambda done: _housekeeping(ops, done),
        cleanup=cleanup,
    )
