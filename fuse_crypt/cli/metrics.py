"""Prometheus metrics for one mount daemon (``mount --metrics-addr HOST:PORT``).

Why a backend proxy: the frontend talks to storage only through the StorageBackend
interface, so counting at that seam measures every ciphertext byte and operation without
touching the crypto or FUSE code. Block decryptions and authentication failures are
counted by wrapping the daemon's own ContentEnc instances (see ``instrument_content``),
again without changing the frontend.
Only counts and sizes are exported: never names, paths below the mount, or keys.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Info

from fuse_crypt import metricsserver
from fuse_crypt.cli.exitcodes import OTHER, USAGE, CliError

MOUNT_INFO = Info("fuse_crypt_mount", "The mounted fuse-crypt volume")
START_TIME = Gauge("fuse_crypt_start_time_seconds", "Unix time the mount daemon started")
UPTIME = Gauge("fuse_crypt_uptime_seconds", "Seconds since the mount daemon started")
BACKEND_OPS = Counter(
    "fuse_crypt_backend_ops_total", "Storage backend operations by method", ["op"]
)
BACKEND_ERRORS = Counter(
    "fuse_crypt_backend_errors_total", "Storage backend operations that raised", ["op"]
)
CIPHER_BYTES_READ = Counter(
    "fuse_crypt_cipher_bytes_read_total", "Ciphertext bytes read from the backend"
)
CIPHER_BYTES_WRITTEN = Counter(
    "fuse_crypt_cipher_bytes_written_total", "Ciphertext bytes written to the backend"
)
BLOCKS_DECRYPTED = Counter(
    "fuse_crypt_blocks_decrypted_total", "4 KiB content blocks decrypted (holes included)"
)
BLOCKS_ENCRYPTED = Counter("fuse_crypt_blocks_encrypted_total", "4 KiB content blocks encrypted")
PLAIN_BYTES_READ = Counter("fuse_crypt_plain_bytes_read_total", "Plaintext bytes decrypted")
PLAIN_BYTES_WRITTEN = Counter("fuse_crypt_plain_bytes_written_total", "Plaintext bytes encrypted")
AUTH_FAILURES = Counter(
    "fuse_crypt_auth_failures_total", "Content blocks whose authentication failed (EIO)"
)

_CIPHER_BS = 4128
_PLAIN_BS = 4096


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (empty HOST = loopback); a usage error otherwise."""
    try:
        host, port = metricsserver.parse_addr(addr)
    except ValueError:
        raise CliError(f"--metrics-addr must be HOST:PORT, got {addr!r}", USAGE) from None
    if port == 0:
        raise CliError(f"--metrics-addr must be HOST:PORT with a port, got {addr!r}", USAGE)
    return host, port


def start(addr: str, *, cipherdir: str, mountpoint: str, read_only: bool) -> None:
    """Serve /metrics on ``addr`` from a daemon thread (call after any fork)."""
    parse_addr(addr)
    started = time.time()
    MOUNT_INFO.info(
        {"cipherdir": cipherdir, "mountpoint": mountpoint, "read_only": str(read_only).lower()}
    )
    START_TIME.set(started)
    UPTIME.set_function(lambda: time.time() - started)
    try:
        metricsserver.serve(addr, REGISTRY)
    except OSError as e:
        raise CliError(f"cannot serve metrics on {addr}: {e.strerror}", OTHER) from None


def _count_call(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    ops = BACKEND_OPS.labels(op=name)
    errs = BACKEND_ERRORS.labels(op=name)

    if name == "pread":

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            ops.inc()
            try:
                out = fn(*a, **kw)
            except BaseException:
                errs.inc()
                raise
            CIPHER_BYTES_READ.inc(len(out))
            return out

    elif name == "pwrite":

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            ops.inc()
            data = a[1] if len(a) > 1 else kw.get("data", b"")
            try:
                out = fn(*a, **kw)
            except BaseException:
                errs.inc()
                raise
            CIPHER_BYTES_WRITTEN.inc(len(data))
            return out

    else:

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            ops.inc()
            try:
                return fn(*a, **kw)
            except BaseException:
                errs.inc()
                raise

    return wrapper


class InstrumentedBackend:
    """Transparent StorageBackend proxy that counts calls and ciphertext bytes."""

    def __init__(self, inner: Any) -> None:
        self.__dict__["_inner"] = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr
        wrapped = _count_call(name, attr)
        self.__dict__[name] = wrapped  # cache: later lookups skip __getattr__
        return wrapped

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def __repr__(self) -> str:
        return f"InstrumentedBackend({self._inner!r})"


_inside = threading.local()


def _count_dec(nbytes_ct: int, nbytes_plain: int) -> None:
    BLOCKS_DECRYPTED.inc(-(-nbytes_ct // _CIPHER_BS))
    PLAIN_BYTES_READ.inc(nbytes_plain)


def _count_enc(nbytes_plain: int) -> None:
    BLOCKS_ENCRYPTED.inc(-(-nbytes_plain // _PLAIN_BS))
    PLAIN_BYTES_WRITTEN.inc(nbytes_plain)


def _wrap(cls: Any, name: str, counter: Callable[[Any, Any], None]) -> None:
    """Replace ``cls.name`` by a counting wrapper (outermost call counts once)."""
    from fuse_crypt.errors import CorruptDataError

    orig = getattr(cls, name, None)
    if orig is None or getattr(orig, "_fuse_crypt_counted", False):
        return

    @functools.wraps(orig)
    def wrapper(self: Any, *args: Any) -> Any:
        outer = not getattr(_inside, "active", False)
        _inside.active = True
        try:
            out = orig(self, *args)
        except CorruptDataError:
            if outer:
                AUTH_FAILURES.inc()
            raise
        finally:
            if outer:
                _inside.active = False
        if outer:
            counter(args, out)
        return out

    wrapper._fuse_crypt_counted = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapper)


def instrument_content() -> None:
    """Count block crypto in this process by wrapping the content-crypto entry points.

    Wraps ContentEnc's batch methods and, if present, the frontend's zero-copy
    BlockCrypt adapter (its hot path bypasses ContentEnc). Only ever called inside a
    mount daemon started with --metrics-addr, so the classes are untouched elsewhere.
    """
    from fuse_crypt.contentenc import ContentEnc

    # args = (first_block, data, file_id[, out]); out = bytes or a length
    _wrap(ContentEnc, "decrypt_blocks", lambda a, out: _count_dec(len(a[1]), len(out)))
    _wrap(ContentEnc, "encrypt_blocks", lambda a, out: _count_enc(len(a[1])))
    try:
        from fuse_crypt.fusefrontend.blockio import BlockCrypt
    except ImportError:
        return
    _wrap(BlockCrypt, "decrypt_into", lambda a, out: _count_dec(len(a[1]), int(out)))
    _wrap(BlockCrypt, "encrypt_into", lambda a, out: _count_enc(len(a[1])))
