"""Shared lifecycle of the gRPC test peers (AA, CDH): a server on ``unix://<path>``.

Why shared: the CoCo guest components are reached only over unix sockets, and every peer
needs the same start/stop, per-RPC call counting and fault injection so tests can make a
peer fail (a gRPC status) or stall (a delay) on the next N calls of one RPC.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent import futures
from typing import Self

import grpc

# A queued fault: a status code aborts the call, a number of seconds delays it.
Fault = grpc.StatusCode | float


class UnixGrpcPeer:
    """Base of a test peer; subclasses add their servicers in ``_register``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lock = threading.Lock()
        self.calls: Counter = Counter()
        self.faults: dict[str, list[Fault]] = {}
        self._server: grpc.Server | None = None

    @property
    def target(self) -> str:
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
        elif fault is not None:
            context.abort(fault, "injected fault")

    def _register(self, server: grpc.Server) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self._register(server)
        server.add_insecure_port(self.target)
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
