"""Request builders shared by the csi_driver tests (kubelet/provisioner shaped)."""

from __future__ import annotations

import os

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import Mode, mount_capability

from .conftest import KEY_RESOURCE, Env

__all__ = [
    "Mode",
    "mount_capability",
    "create_volume",
    "publish_request",
    "expect_code",
    "backend_blob",
]


def create_volume(env: Env, name: str = "pvc-1", **params: str) -> csi_pb2.Volume:
    parameters = {"keyResource": KEY_RESOURCE, **params}
    return env.ctrl.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[mount_capability()], parameters=parameters
        )
    ).volume


def publish_request(
    vol: csi_pb2.Volume | None,
    target: str,
    *,
    volume_id: str | None = None,
    readonly: bool = False,
    mode: int = Mode.SINGLE_NODE_WRITER,
    context: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
) -> csi_pb2.NodePublishVolumeRequest:
    ctx = dict(vol.volume_context) if vol is not None else {}
    ctx.update(context or {})
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id or (vol.volume_id if vol is not None else ""),
        target_path=target,
        volume_capability=mount_capability(mode),
        readonly=readonly,
        volume_context=ctx,
        secrets=secrets or {},
    )


def expect_code(code: grpc.StatusCode, call, request) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == code, info.value.details()
    return info.value


def backend_blob(path: str) -> bytes:
    """Every file name and byte under ``path``."""
    blob = b""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            blob += name.encode() + b"\0"
            with open(os.path.join(dirpath, name), "rb") as f:
                blob += f.read()
    return blob
