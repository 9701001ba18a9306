"""Prometheus metrics of ``fuse-crypt block-serve --metrics-addr HOST:PORT``.

:class:`BlockMetrics` is the observer :class:`.serve.BlockOperations` calls once per
answered request on ``disk`` (read, write, fsync): two ``Counter.inc`` calls for a read or
write (~0.45 µs each here, against a ~43 µs round trip for one 4 KiB read), one for an
fsync. Without ``--metrics-addr`` the daemon has no observer, never imports this module
or prometheus_client, and the hot path only tests ``self.metrics is None``.

Sectors decrypted/encrypted are not counted: it would be a third ``inc`` per request, and
the loop device sends whole sectors, so they are the plaintext bytes divided by the
``sector_size`` in ``fuse_crypt_block_info``.

The server, the address check, ``start`` (which registers these), the start time and
uptime are the mount daemon's (:mod:`fuse_crypt.cli.metrics`). Only counts and sizes are
exported, plus the device path and mount point in the info labels (as the mount names its
cipherdir): never data, keys or the passphrase.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge, Info
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .device import CryptDevice
from .native import OPS

if TYPE_CHECKING:
    from .native import NativeLoop

T = TypeVar("T")

BLOCK_INFO = Info("fuse_crypt_block", "The LUKS2 data segment this daemon serves", registry=None)
SIZE = Gauge("fuse_crypt_block_size_bytes", "Plaintext size of the served disk", registry=None)
#: (name, help) of each counter; the Python loop's Counters and the C loop's families share them
_REQUESTS = (
    "fuse_crypt_block_requests_total",
    "Requests on disk answered, by op (read, write, fsync), errors included",
)
_ERRORS = (
    "fuse_crypt_block_errors_total",
    "Requests on disk answered with an errno, by op and errno name",
)
_BYTES_READ = ("fuse_crypt_block_plain_bytes_read_total", "Plaintext bytes returned to reads")
_BYTES_WRITTEN = (
    "fuse_crypt_block_plain_bytes_written_total",
    "Plaintext bytes accepted from writes",
)
REQUESTS = Counter(*_REQUESTS, ["op"], registry=None)
ERRORS = Counter(*_ERRORS, ["op", "errno"], registry=None)
BYTES_READ = Counter(*_BYTES_READ, registry=None)
BYTES_WRITTEN = Counter(*_BYTES_WRITTEN, registry=None)
BLOCK_METRICS = (SIZE, REQUESTS, ERRORS, BYTES_READ, BYTES_WRITTEN)


class NativeCounts(Collector):
    """The C request loop's counters (:mod:`.native`), read at each scrape under the same
    names as the Python loop's Counters: the loop counts with atomic adds, no Python runs
    per request."""

    def __init__(self, owner: BlockMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        loop = self._owner.loop
        if loop is not None:
            requests, read, written, errors = loop.counts()
        else:
            requests, read, written, errors = {op: 0 for op in OPS}, 0, 0, {}
        fam = CounterMetricFamily(*_REQUESTS, labels=["op"])
        for op, n in requests.items():
            fam.add_metric([op], n)
        yield fam
        fam = CounterMetricFamily(*_ERRORS, labels=["op", "errno"])
        for (op, code), n in sorted(errors.items()):
            fam.add_metric([op, errno.errorcode.get(code, str(code))], n)
        yield fam
        yield CounterMetricFamily(*_BYTES_READ, value=read)
        yield CounterMetricFamily(*_BYTES_WRITTEN, value=written)


class BlockMetrics:
    """The counting side of BlockOperations (children resolved once, not per request), or
    with ``native`` the reader of the C loop's counters (:meth:`attach`)."""

    def __init__(self, device: CryptDevice, *, native: bool = False) -> None:
        #: the C loop while it serves (``native``); its counters and size are the truth
        self.loop: NativeLoop | None = None
        self.native = native

        def size() -> int:
            loop = self.loop
            return loop.size() if loop is not None else device.size

        SIZE.set_function(size)
        self._reads = REQUESTS.labels(op="read")
        self._writes = REQUESTS.labels(op="write")
        self._fsyncs = REQUESTS.labels(op="fsync")
        self._bytes_read = BYTES_READ
        self._bytes_written = BYTES_WRITTEN

        self._done: dict[str, Callable[[Any], None]] = {
            "read": self.read,
            "write": self.wrote,
            "fsync": self.synced,
        }

    def collectors(self) -> tuple[Collector, ...]:
        """What ``fuse_crypt.cli.metrics.start`` registers for this daemon."""
        if self.native:
            return (SIZE, NativeCounts(self))
        return BLOCK_METRICS

    def attach(self, loop: NativeLoop) -> None:
        self.loop = loop

    def detach(self) -> None:
        self.loop = None

    def run(self, op: str, call: Callable[..., T], *args: Any) -> T:
        """Answer one ``op`` request through ``call(*args)`` and count it: its bytes when
        it returns (reads and writes return how many), its errno when it raises."""
        try:
            n = call(*args)
        except Exception as e:
            self.failed(op, e)
            raise
        self._done[op](n)
        return n

    def read(self, n: int) -> None:
        self._reads.inc()
        self._bytes_read.inc(n)

    def wrote(self, n: int) -> None:
        self._writes.inc()
        self._bytes_written.inc(n)

    def synced(self, _: object = None) -> None:
        self._fsyncs.inc()

    def failed(self, op: str, exc: BaseException) -> None:
        """A request of ``op`` that raised: counted with the errno FUSE answers (an
        OSError's own, EIO for anything else, as CryptFUSE maps it)."""
        code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        if not isinstance(code, int) or code <= 0:
            code = errno.EIO
        REQUESTS.labels(op=op).inc()
        ERRORS.labels(op=op, errno=errno.errorcode.get(code, str(code))).inc()


__all__ = ["BLOCK_INFO", "BLOCK_METRICS", "BlockMetrics"]
