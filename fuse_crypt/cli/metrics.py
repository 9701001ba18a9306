"""Prometheus metrics for one daemon (``mount`` or ``block-serve --metrics-addr HOST:PORT``).

Why a backend proxy: the frontend talks to storage only through the StorageBackend
interface, so counting at that seam measures every ciphertext byte and operation without
touching the crypto or FUSE code. Block crypto and authentication failures are counted by
:class:`BlockCounters`, the observer the daemon hands to its ContentEnc
(``serve(block_observer=...)``): nothing is patched, and no other ContentEnc counts.
Only counts and sizes are exported: never names, paths below the mount, or keys.

Shared by both daemons: :func:`parse_addr`, :func:`start` and the start time / uptime
gauges. Each daemon's own metrics are built unregistered (``registry=None``) and handed to
:func:`start`, so a scrape shows only the daemon's own series: a block daemon does not
export the mount's ``fuse_crypt_plain_bytes_read_total 0`` beside its real counts. The
block daemon's are in :mod:`fuse_crypt.blockfront.metrics`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Info
from prometheus_client.registry import Collector

from fuse_crypt import metricsserver
from fuse_crypt.cli.exitcodes import OTHER, USAGE, CliError

START_TIME = Gauge("fuse_crypt_start_time_seconds", "Unix time the daemon started")
UPTIME = Gauge("fuse_crypt_uptime_seconds", "Seconds since the daemon started")

# The mount daemon's own (registered by start(), see the module doc).
MOUNT_INFO = Info("fuse_crypt_mount", "The mounted fuse-crypt volume", registry=None)
BACKEND_OPS = Counter(
    "fuse_crypt_backend_ops_total", "Storage backend operations by method", ["op"], registry=None
)
BACKEND_ERRORS = Counter(
    "fuse_crypt_backend_errors_total",
    "Storage backend operations that raised",
    ["op"],
    registry=None,
)
CIPHER_BYTES_READ = Counter(
    "fuse_crypt_cipher_bytes_read_total", "Ciphertext bytes read from the backend", registry=None
)
CIPHER_BYTES_WRITTEN = Counter(
    "fuse_crypt_cipher_bytes_written_total",
    "Ciphertext bytes written to the backend",
    registry=None,
)
BLOCKS_DECRYPTED = Counter(
    "fuse_crypt_blocks_decrypted_total",
    "4 KiB content blocks decrypted (holes included)",
    registry=None,
)
BLOCKS_ENCRYPTED = Counter(
    "fuse_crypt_blocks_encrypted_total", "4 KiB content blocks encrypted", registry=None
)
PLAIN_BYTES_READ = Counter(
    "fuse_crypt_plain_bytes_read_total", "Plaintext bytes decrypted", registry=None
)
PLAIN_BYTES_WRITTEN = Counter(
    "fuse_crypt_plain_bytes_written_total", "Plaintext bytes encrypted", registry=None
)
AUTH_FAILURES = Counter(
    "fuse_crypt_auth_failures_total",
    "Content blocks whose authentication failed (EIO)",
    registry=None,
)
MOUNT_METRICS: tuple[Collector, ...] = (
    BACKEND_OPS,
    BACKEND_ERRORS,
    CIPHER_BYTES_READ,
    CIPHER_BYTES_WRITTEN,
    BLOCKS_DECRYPTED,
    BLOCKS_ENCRYPTED,
    PLAIN_BYTES_READ,
    PLAIN_BYTES_WRITTEN,
    AUTH_FAILURES,
)


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (empty HOST = loopback; PORT 0 = any free port, printed once bound);
    a usage error otherwise."""
    try:
        return metricsserver.parse_addr(addr)
    except ValueError:
        raise CliError(f"--metrics-addr must be HOST:PORT, got {addr!r}", USAGE) from None


def start(
    addr: str,
    info: Info,
    collectors: Iterable[Collector],
    *,
    read_only: bool,
    **labels: str,
) -> None:
    """Serve /metrics on ``addr`` from a daemon thread (once per process, after any fork).

    ``info`` (set to ``labels`` and ``read_only``) and ``collectors`` are the daemon's own
    metrics, registered here beside the shared start time and uptime.

    Port 0 binds a free port chosen by the kernel (no window in which another process can
    take it, as there is when a caller picks a "free" port and passes it in) and prints
    ``Serving metrics on HOST:PORT``, so a person can find it; the CSI node plugin finds it
    from /proc instead (csi_driver/proc.py ``loopback_listen_port``)."""
    _, port = parse_addr(addr)
    started = time.time()
    for collector in (info, *collectors):
        REGISTRY.register(collector)
    info.info({**labels, "read_only": str(read_only).lower()})
    START_TIME.set(started)
    UPTIME.set_function(lambda: time.time() - started)
    try:
        server = metricsserver.serve(addr, REGISTRY)
    except OSError as e:
        raise CliError(f"cannot serve metrics on {addr}: {e.strerror}", OTHER) from None
    if port == 0:
        host, bound = str(server.server_address[0]), int(server.server_address[1])
        print(f"Serving metrics on {host}:{bound}", flush=True)


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
