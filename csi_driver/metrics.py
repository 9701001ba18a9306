"""Prometheus metrics of one plugin instance (served by fuse_crypt.metricsserver).

Each plugin gets its own CollectorRegistry so that several plugins (node and controller in
`coco-csi demo`, many in the tests) can live in one process without name clashes.

The /metrics server itself is fuse_crypt.metricsserver's (bounded connections and time,
loopback unless told otherwise). With ``--volume-metrics`` the node plugin's registry also
holds the volume daemons' series (csi_driver/volumemetrics.py, fetched at scrape time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fuse_crypt import metricsserver
from fuse_crypt.metricsserver import CONNECTION_TIMEOUT, MAX_CONNECTIONS

if TYPE_CHECKING:
    from csi_driver.supervisor import DaemonEndpoint
    from csi_driver.volumemetrics import Fetch, VolumeMetricsCollector

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Counters and gauges the node and controller plugins update."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.publishes = Counter(
            "coco_csi_node_publish_total",
            "NodePublishVolume calls by result",
            ["result"],
            registry=self.registry,
        )
        self.publish_seconds = Histogram(
            "coco_csi_node_publish_seconds",
            "NodePublishVolume latency, request to usable mount",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.failures = Counter(
            "coco_csi_rpc_failures_total",
            "Failed CSI RPCs by method and gRPC code",
            ["method", "code"],
            registry=self.registry,
        )
        self.mounted = Gauge(
            "coco_csi_mounted_volumes",
            "Volumes currently published by this node plugin",
            registry=self.registry,
        )
        self.mount_restarts = Counter(
            "coco_csi_mount_restarts_total",
            "Mount daemons restarted by the supervisor after an unexpected exit",
            registry=self.registry,
        )

    def add_volume_daemons(
        self,
        sources: Callable[[], Iterable[DaemonEndpoint]],
        fetch: Fetch | None = None,
        **limits: Any,
    ) -> VolumeMetricsCollector:
        """Export the volume daemons' series too, fetched from ``sources()`` at each scrape
        (``fetch``: the loopback HTTP GET unless a test gives its own; ``limits``: the
        collector's timeout, budget, max_bytes, workers)."""
        from csi_driver.volumemetrics import VolumeMetricsCollector

        if fetch is None:
            from csi_driver.loopscrape import fetch as http_fetch

            fetch = http_fetch
        collector = VolumeMetricsCollector(sources, fetch, **limits)
        self.registry.register(collector)
        self.volume_daemons = collector
        return collector

    def serve(
        self,
        addr: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = CONNECTION_TIMEOUT,
    ) -> tuple[str, int]:
        """Serve /metrics on ``HOST:PORT`` (port 0 picks one; empty HOST = 127.0.0.1);
        returns the bound address."""
        self.server = metricsserver.serve(
            addr, self.registry, max_connections=max_connections, timeout=timeout
        )
        bound = self.server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        collector = getattr(self, "volume_daemons", None)
        if collector is not None:
            collector.close()
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
