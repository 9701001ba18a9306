"""Prometheus metrics of one plugin instance (served by fuse_crypt.metricsserver).

Each plugin gets its own CollectorRegistry so that several plugins (node and controller in
`coco-csi demo`, many in the tests) can live in one process without name clashes.

The /metrics server itself is fuse_crypt.metricsserver's (bounded connections and time,
loopback unless told otherwise).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fuse_crypt import metricsserver
from fuse_crypt.metricsserver import CONNECTION_TIMEOUT, MAX_CONNECTIONS

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
        server = getattr(self, "server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
