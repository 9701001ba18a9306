"""The volume daemons' I/O metrics on the node plugin's /metrics, labelled by volume.

Each mount daemon (``fuse-crypt mount``, ``fuse-crypt block-serve``) counts its own
requests, bytes and errors and serves them on a loopback port (the supervisor starts it with
``--metrics-addr 127.0.0.1:0``). Prometheus only reaches the plugin's port, so at scrape time
:class:`VolumeMetricsCollector` fetches each live daemon's /metrics and re-exports its series
with ``volume_id`` and ``target_path`` added: one scrape target per node, however many
volumes it serves, and a volume's series follow it through daemon restarts.

The collector knows no HTTP: it is given where the daemons are (``sources``) and a
``fetch(port, timeout, max_bytes) -> body`` (csi_driver/loopscrape.py in production, a fake
in tests). What may go wrong with a daemon is bounded and counted, never propagated: every
fetch gets at most ``timeout`` seconds and all of them end by ``budget`` seconds after the
scrape began (fetched ``workers`` at a time), a body over ``max_bytes`` or one that does
not parse is dropped, and each such daemon is left out of this scrape and counted in
``coco_csi_volume_metrics_failures_total{reason}``. The scrape itself always answers.

Only the daemons' ``fuse_crypt_*`` and ``process_*`` families pass: counts, sizes and the
volume's location (cipher dir or device, mount point), as the daemons document; never keys
or passphrases, which the daemons do not export. ``python_*`` (the client library's GC
and version series, alike in every daemon) are dropped, and so are the ``*_created``
gauges the client library adds beside every counter: in the text format each is one more
series per volume that says only when the daemon started (``fuse_crypt_start_time_seconds``
says it once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.supervisor import DaemonEndpoint

__all__ = [
    "FAILURE_REASONS",
    "Fetch",
    "FetchError",
    "VolumeMetricsCollector",
]

FETCH_TIMEOUT = 1.0  # one daemon: a live one answers in milliseconds
SCRAPE_BUDGET = 2.0  # all of them, well inside Prometheus' default 10 s scrape timeout
MAX_BODY = 1 << 20  # a daemon's body is ~6-9 KB
WORKERS = 4
PASSED_PREFIXES = ("fuse_crypt_", "process_")
ADDED_LABELS = ("volume_id", "target_path")
FAILURE_REASONS = ("timeout", "unreachable", "too_large", "bad_response", "malformed")


class FetchError(Exception):
    """A daemon answered, but not with a usable /metrics body; ``reason`` is one of
    FAILURE_REASONS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fetch(Protocol):
    """The /metrics body of the daemon on loopback ``port``, within ``timeout`` seconds and
    ``max_bytes``. Raises TimeoutError, OSError (cannot connect) or FetchError."""

    def __call__(self, port: int, timeout: float, max_bytes: int) -> bytes: ...


class VolumeMetricsCollector:
    """A prometheus_client collector of the live daemons' series, re-labelled by volume."""

    def __init__(
        self,
        sources: Callable[[], Iterable[DaemonEndpoint]],
        fetch: Fetch,
        *,
        timeout: float = FETCH_TIMEOUT,
        budget: float = SCRAPE_BUDGET,
        max_bytes: int = MAX_BODY,
        workers: int = WORKERS,
    ) -> None:
        self._sources = sources
        self._fetch = fetch
        self.timeout = timeout
        self.budget = budget
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="volume-metrics")
        self._lock = threading.Lock()
        self._failures = dict.fromkeys(FAILURE_REASONS, 0)

    def describe(self) -> list[Metric]:
        """Nothing up front: the names come from the daemons at scrape time (and never
        clash with the plugin's own ``coco_csi_*``)."""
        return []

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        deadline = started + self.budget
        endpoints = list(self._sources())
        futures: dict[Future[list[Metric]], DaemonEndpoint] = {}
        for ep in endpoints:
            try:
                futures[self._pool.submit(self._one, ep, deadline)] = ep
            except RuntimeError:  # closed (the plugin is stopping): ask no one else
                break
        # Each fetch ends by the deadline on its own; the margin only covers thread wake-up.
        done, pending = wait_all(futures, timeout=max(0.0, deadline - time.monotonic()) + 0.5)
        merged: dict[str, Metric] = {}
        scraped = 0
        for fut in futures:
            if fut in pending:
                fut.cancel()
                self._failed("timeout")
                continue
            try:
                families = fut.result()
            except FetchError as exc:
                self._failed(exc.reason)
                continue
            except TimeoutError:
                self._failed("timeout")
                continue
            except OSError:
                self._failed("unreachable")
                continue
            self._merge(merged, families, futures[fut])
            scraped += 1
        yield from merged.values()
        yield from self._own(scraped, len(endpoints), time.monotonic() - started)

    def _one(self, ep: DaemonEndpoint, deadline: float) -> list[Metric]:
        """Fetch and parse one daemon (in a pool thread)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the scrape budget is spent")
        body = self._fetch(ep.port, min(self.timeout, left), self.max_bytes)
        if len(body) > self.max_bytes:  # a fetch that did not cut it off itself
            raise FetchError("too_large")
        try:
            return list(text_string_to_metric_families(body.decode("utf-8")))
        except (ValueError, UnicodeDecodeError, IndexError, KeyError):
            raise FetchError("malformed") from None

    @staticmethod
    def _merge(merged: dict[str, Metric], families: list[Metric], ep: DaemonEndpoint) -> None:
        """Add ``ep``'s families to ``merged``: one family per name across all daemons (the
        exposition format allows a name once), each sample with the volume's labels."""
        extra = {"volume_id": ep.volume_id, "target_path": ep.target_path}
        for fam in families:
            if not fam.name.startswith(PASSED_PREFIXES) or fam.name.endswith("_created"):
                continue
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif out.type != fam.type:
                continue  # another daemon version typed it differently: keep the first
            for sample in fam.samples:
                out.samples.append(sample._replace(labels={**sample.labels, **extra}))

    def _failed(self, reason: str) -> None:
        with self._lock:
            self._failures[reason] += 1

    def _own(self, scraped: int, total: int, seconds: float) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "coco_csi_volume_metrics_failures",
            "Volume daemons left out of a node plugin scrape, by reason",
            labels=["reason"],
        )
        with self._lock:
            for reason, count in self._failures.items():
                failures.add_metric([reason], count)
        yield failures
        daemons = GaugeMetricFamily(
            "coco_csi_volume_metrics_daemons",
            "Volume daemons serving metrics at this scrape, by whether their series are in it",
            labels=["result"],
        )
        daemons.add_metric(["ok"], scraped)
        daemons.add_metric(["failed"], total - scraped)
        yield daemons
        yield GaugeMetricFamily(
            "coco_csi_volume_metrics_scrape_seconds",
            "Time this scrape spent fetching the volume daemons' metrics",
            value=seconds,
        )
