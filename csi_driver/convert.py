"""Protobuf → the core's plain dataclasses: the only place a CSI message is taken apart.

The cores (csi_driver/core) never import grpc or protobuf; the servicers call these.
"""

from __future__ import annotations

from collections.abc import Iterable

from coco_proto import csi_pb2
from csi_driver.core.node import PublishRequest
from csi_driver.core.volcap import AccessType, Capability
from csi_driver.volumes.block import StageRequest


def capability(pb: csi_pb2.VolumeCapability) -> Capability:
    kind = pb.WhichOneof("access_type")
    access_type = {"mount": AccessType.MOUNT, "block": AccessType.BLOCK}.get(
        kind or "", AccessType.NONE
    )
    mode = pb.access_mode.mode if pb.HasField("access_mode") else 0
    return Capability(
        access_type=access_type,
        access_mode=int(mode),
        fs_type=pb.mount.fs_type if kind == "mount" else "",
        mount_flags=tuple(pb.mount.mount_flags) if kind == "mount" else (),
    )


def capabilities(pbs: Iterable[csi_pb2.VolumeCapability]) -> list[Capability]:
    return [capability(pb) for pb in pbs]


def publish_request(request: csi_pb2.NodePublishVolumeRequest) -> PublishRequest:
    return PublishRequest(
        volume_id=request.volume_id,
        target_path=request.target_path,
        capability=(
            capability(request.volume_capability) if request.HasField("volume_capability") else None
        ),
        readonly=request.readonly,
        secrets=dict(request.secrets),
        volume_context=dict(request.volume_context),
        staging_target_path=request.staging_target_path,
    )


def stage_request(request: csi_pb2.NodeStageVolumeRequest) -> StageRequest:
    return StageRequest(
        volume_id=request.volume_id,
        staging_target_path=request.staging_target_path,
        capability=(
            capability(request.volume_capability) if request.HasField("volume_capability") else None
        ),
        secrets=dict(request.secrets),
        volume_context=dict(request.volume_context),
        publish_context=dict(request.publish_context),
    )
