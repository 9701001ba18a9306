"""Shared lifecycle of the AA and CDH test peers: a server on a unix socket, gRPC or ttrpc.

Why shared: the CoCo guest components are reached only over unix sockets, and every peer
needs the same start/stop, per-RPC call counting and fault injection so tests can make a
peer fail (a status code) or stall (a delay) on the next N calls of one RPC. One servicer
implements each component's behaviour; ``transport="ttrpc"`` serves the very same servicer
through tests/peers/ttrpc_server.py, as stock CoCo guests do.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent import futures
from typing import Any, Self

import grpc

# A queued fault: a status code aborts the call, a number of seconds delays it, and a
# WireFault name breaks the ttrpc reply itself (see ttrpc_server.WIRE_FAULTS).
Fault = grpc.StatusCode | float | str


class WireFault(Exception):
    """Raised by ``enter`` for a wire-level fault; only the ttrpc transport acts on it."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class UnixGrpcPeer:
    """Base of a test peer; subclasses add their servicers in ``_register``."""

    def __init__(self, socket_path: str, *, transport: str = "grpc") -> None:
        if transport not in ("grpc", "ttrpc"):
            raise ValueError(f"unknown peer transport {transport!r}")
        self.transport = transport
        self.socket_path = socket_path
        self.lock = threading.Lock()
        self.calls: Counter = Counter()
        self.faults: dict[str, list[Fault]] = {}
        self._server: Any = None

    @property
    def target(self) -> str:
        """The resolver-spec address: explicit ``grpc+unix://``; ``unix://`` means ttrpc."""
        if self.transport == "grpc":
            return f"grpc+unix://{self.socket_path}"
        return f"unix://{self.socket_path}"

    def inject(self, rpc: str, fault: Fault, count: int = 1) -> None:
        """Queue a status code (abort) or a delay in seconds for the next ``count`` calls."""
        with self.lock:
            self.faults.setdefault(rpc, []).extend([fault] * count)

    def enter(self, rpc: str, context: grpc.ServicerContext) -> None:
        """Count a call of ``rpc`` and apply its next queued fault, if any."""
        with self.lock:
            self.calls[rpc] += 1
            queue = self.faults.get(rpc)
            fault = queue.pop(0) if queue else None
        if isinstance(fault, float | int):
            time.sleep(fault)
        elif isinstance(fault, str):
            raise WireFault(fault)
        elif fault is not None:
            context.abort(fault, "injected fault")

    def _register(self, server: Any) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        if self.transport == "ttrpc":
            from tests.peers.ttrpc_server import TtrpcServer

            ttrpc = TtrpcServer(self.socket_path)
            self._register(ttrpc)  # the generated add_*_to_server calls register services
            self._server = ttrpc.start()
            return self
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._register(server)
        server.add_insecure_port(f"unix://{self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
