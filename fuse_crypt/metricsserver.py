"""The bounded /metrics HTTP server every process of this project uses.

/metrics is reachable by whoever can reach the bind address, so it must not be a way to
exhaust a process that holds keys: prometheus_client's own server starts a thread per
connection without limit (1,500 idle connections pinned 1,500 plugin threads). ``MetricsServer``
serves at most ``max_connections`` at once (more are closed at once), gives each connection
``timeout`` seconds in total (idle or dripping clients are cut off), and binds only where
told: an empty host means loopback, never every interface. Used by the CSI plugins
(csi_driver/metrics.py) and by ``fuse-crypt mount --metrics-addr``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["CONNECTION_TIMEOUT", "MAX_CONNECTIONS", "MetricsServer", "parse_addr", "serve"]

MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT = 5.0


def serve(
    addr: str,
    registry: CollectorRegistry,
    *,
    max_connections: int = MAX_CONNECTIONS,
    timeout: float = CONNECTION_TIMEOUT,
) -> MetricsServer:
    """Serve /metrics on ``HOST:PORT`` from a daemon thread (port 0 picks one; empty HOST =
    127.0.0.1). ValueError for a malformed address, OSError if it cannot bind."""
    host, port = parse_addr(addr)
    server = MetricsServer((host, port), registry, max_connections, timeout)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def parse_addr(addr: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` → (host, port); ValueError if malformed."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--metrics-addr must be HOST:PORT, got {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.0"  # one request per connection

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = generate_latest(self.server.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Silent: request lines are client-controlled and not worth a log line."""


class MetricsServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with a connection limit and a total time limit per connection."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(
        self,
        addr: tuple[str, int],
        registry: CollectorRegistry,
        max_connections: int,
        timeout: float,
    ) -> None:
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.conn_timeout = timeout
        self._slots = threading.BoundedSemaphore(max(1, max_connections))
        self._open: dict[socket.socket, float] = {}
        self._open_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(addr, _Handler)
        threading.Thread(target=self._reaper, name="metrics-reaper", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:  # a TCP socket
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close at once, no thread
            return
        try:
            request.settimeout(self.conn_timeout)
            with self._open_lock:
                self._open[request] = time.monotonic() + self.conn_timeout
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)
            self._slots.release()

    def _forget(self, request: socket.socket) -> None:
        with self._open_lock:
            self._open.pop(request, None)

    def _reaper(self) -> None:
        """Cut connections that outlive their total time (a client dripping bytes)."""
        while not self._closed.wait(min(1.0, self.conn_timeout / 2)):
            now = time.monotonic()
            with self._open_lock:
                expired = [s for s, t in self._open.items() if t < now]
            for sock in expired:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()
