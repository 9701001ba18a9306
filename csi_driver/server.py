"""Plugin servers on a unix socket: wiring cores to servicers, start and stop."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from concurrent import futures
from dataclasses import dataclass

import grpc

from coco_proto import csi_pb2_grpc
from csi_driver.controller import ControllerServicer
from csi_driver.core.controller import LocalBackend
from csi_driver.core.node import NodeCore
from csi_driver.identity import IdentityServicer
from csi_driver.metrics import Metrics
from csi_driver.node import NodeServicer

log = logging.getLogger(__name__)


def socket_path(endpoint: str) -> str:
    """``unix:///abs/path.sock`` or ``unix:/abs`` or a bare absolute path → path."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://") :]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:") :]
    elif endpoint.startswith("/"):
        path = endpoint
    else:
        raise ValueError(f"endpoint must be a unix socket (unix:///path), got {endpoint!r}")
    if not path.startswith("/"):
        raise ValueError(f"unix socket path must be absolute: {endpoint!r}")
    return path


def _bind(server: grpc.Server, endpoint: str) -> str:
    path = socket_path(endpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale socket of a previous run
    except FileNotFoundError:
        pass
    if server.add_insecure_port(f"unix://{path}") == 0:
        raise OSError(f"cannot listen on {path}")
    return path


@dataclass
class Plugin:
    """A running plugin server."""

    server: grpc.Server
    socket: str
    metrics: Metrics
    node: NodeCore | None = None
    backend: LocalBackend | None = None

    def stop(self, *, unmount: bool = False, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
        if self.node is not None:
            self.node.shutdown(unmount=unmount)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


# gRPC workers kept free of volume work (NodeCore's max_parallel bounds that), so Identity,
# Probe and quick refusals always find a worker however many volumes hang.
SPARE_WORKERS = 8


def start_node(endpoint: str, core: NodeCore, *, workers: int = 16) -> Plugin:
    workers = max(workers, core.max_parallel + SPARE_WORKERS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    csi_pb2_grpc.add_IdentityServicer_to_server(
        IdentityServicer(core.probe, controller=False), server
    )
    csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(core), server)
    path = _bind(server, endpoint)
    server.start()
    log.info("node plugin listening", extra={"fields": {"socket": path, "node_id": core.node_id}})
    return Plugin(server, path, core.metrics, node=core)


def _backend_probe(backend: LocalBackend) -> tuple[bool, str]:
    ok = os.access(backend.root, os.W_OK)
    return ok, "ready" if ok else "backend root not writable"


def start_controller(
    endpoint: str, backend: LocalBackend, *, metrics: Metrics | None = None, workers: int = 8
) -> Plugin:
    metrics = metrics or Metrics()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))

    def probe() -> tuple[bool, str]:
        return _backend_probe(backend)

    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(probe, controller=True), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(backend, metrics), server)
    path = _bind(server, endpoint)
    server.start()
    log.info("controller plugin listening", extra={"fields": {"socket": path}})
    return Plugin(server, path, metrics, backend=backend)


def start_node_with_controller(
    endpoint: str, core: NodeCore, backend: LocalBackend, *, workers: int = 16
) -> Plugin:
    """Node and controller services on one endpoint (``coco-csi node --with-controller``).

    For single-node setups and tests: csi-sanity runs its node lifecycle specs (create →
    publish → stats → unpublish → delete) only against an endpoint whose Identity service
    advertises CONTROLLER_SERVICE. Ready only when both roles are ready.
    """
    workers = max(workers, core.max_parallel + SPARE_WORKERS)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))

    def probe() -> tuple[bool, str]:
        ready, reason = core.probe()
        return _backend_probe(backend) if ready else (ready, reason)

    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(probe, controller=True), server)
    csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(core), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(backend, core.metrics), server)
    path = _bind(server, endpoint)
    server.start()
    log.info(
        "node and controller plugin listening",
        extra={"fields": {"socket": path, "node_id": core.node_id}},
    )
    return Plugin(server, path, core.metrics, node=core, backend=backend)
