"""A CSI gRPC client over a unix socket, the way kubelet and the sidecars talk to plugins.

Used by `coco-csi demo`, the benchmark and the tests; product plugins never import it.
"""

from __future__ import annotations

import grpc

from coco_proto import csi_pb2, csi_pb2_grpc
from csi_driver.server import socket_path

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


class CsiClient:
    def __init__(self, endpoint: str, *, timeout: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path(endpoint)}")
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CsiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mount_capability(
    mode: csi_pb2.VolumeCapability.AccessMode.Mode = Mode.SINGLE_NODE_WRITER,
    flags: tuple[str, ...] = (),
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(mount_flags=list(flags)),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )
