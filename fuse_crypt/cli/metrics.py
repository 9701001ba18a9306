"""Prometheus metrics for one mount daemon (``mount --metrics-addr HOST:PORT``).

Why a backend proxy: the frontend talks to storage only through the StorageBackend
interface, so counting at that seam measures every ciphertext byte and operation without
touching the crypto or FUSE code. Block crypto and authentication failures are counted by
:class:`BlockCounters`, the observer the daemon hands to its ContentEnc
(``serve(block_observer=...)``): nothing is patched, and no other ContentEnc counts.
Only counts and sizes are exported: never names, paths below the mount, or keys.
"""

from __future__ import annotations

import functools
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


class BlockCounters:
    """The Prometheus side of :class:`fuse_crypt.contentenc.BlockObserver`."""

    def encrypted(self, blocks: int, plain_bytes: int) -> None:
        BLOCKS_ENCRYPTED.inc(blocks)
        PLAIN_BYTES_WRITTEN.inc(plain_bytes)

    def decrypted(self, blocks: int, plain_bytes: int) -> None:
        BLOCKS_DECRYPTED.inc(blocks)
        PLAIN_BYTES_READ.inc(plain_bytes)

    def auth_failed(self) -> None:
        AUTH_FAILURES.inc()
