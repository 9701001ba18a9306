"""The fuse-crypt daemon's /metrics uses the same bounded server as the CSI plugins."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from fuse_crypt import metricsserver
from fuse_crypt.cli import metrics as cli_metrics


def test_empty_host_is_loopback_never_every_interface() -> None:
    assert cli_metrics.parse_addr(":9100") == ("127.0.0.1", 9100)
    assert metricsserver.parse_addr(":0") == ("127.0.0.1", 0)
    assert metricsserver.parse_addr("[::1]:80") == ("::1", 80)


def test_idle_connections_do_not_pin_threads() -> None:
    registry = CollectorRegistry()
    Counter("probe_total", "a metric", registry=registry).inc()
    server = metricsserver.serve("127.0.0.1:0", registry, max_connections=4, timeout=2.0)
    host, port = server.server_address[:2]
    before = threading.active_count()
    idle = [socket.create_connection((host, port)) for _ in range(200)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - before <= 4
    finally:
        for s in idle:
            s.close()
    time.sleep(2.5)  # the reaper cuts what is left; slots free again
    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
    assert b"probe_total 1.0" in body
    server.shutdown()
    server.server_close()
