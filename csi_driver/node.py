"""Node service (thin): protobuf ↔ NodeCore."""

from __future__ import annotations

import time

import grpc

from coco_proto import csi_pb2, csi_pb2_grpc
from csi_driver import convert
from csi_driver.core.node import NodeCore
from csi_driver.deadline import Deadline
from csi_driver.rpc import csi_rpc

RPC = csi_pb2.NodeServiceCapability.RPC.Type
Unit = csi_pb2.VolumeUsage.Unit


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, core: NodeCore) -> None:
        self.core = core
        self.metrics = core.metrics

    @csi_rpc("NodeGetCapabilities")
    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:  # noqa: N802
        caps = [
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=t))
            for t in (
                RPC.STAGE_UNSTAGE_VOLUME,
                RPC.GET_VOLUME_STATS,
                RPC.EXPAND_VOLUME,
                RPC.VOLUME_CONDITION,
            )
        ]
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=caps)

    @csi_rpc("NodeGetInfo")
    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:  # noqa: N802
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.core.node_id, max_volumes_per_node=self.core.max_volumes
        )

    @csi_rpc("NodePublishVolume")
    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:  # noqa: N802
        start = time.perf_counter()
        req = convert.publish_request(request)
        try:
            self.core.publish(req, Deadline.from_grpc(context))
        except Exception:
            self.metrics.publishes.labels("error").inc()
            raise
        self.metrics.publishes.labels("ok").inc()
        self.metrics.publish_seconds.observe(time.perf_counter() - start)
        return csi_pb2.NodePublishVolumeResponse()

    @csi_rpc("NodeUnpublishVolume")
    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:  # noqa: N802
        self.core.unpublish(request.volume_id, request.target_path, Deadline.from_grpc(context))
        return csi_pb2.NodeUnpublishVolumeResponse()

    @csi_rpc("NodeStageVolume")
    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:  # noqa: N802
        self.core.stage(convert.stage_request(request), Deadline.from_grpc(context))
        return csi_pb2.NodeStageVolumeResponse()

    @csi_rpc("NodeUnstageVolume")
    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:  # noqa: N802
        self.core.unstage(
            request.volume_id, request.staging_target_path, Deadline.from_grpc(context)
        )
        return csi_pb2.NodeUnstageVolumeResponse()

    @csi_rpc("NodeExpandVolume")
    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:  # noqa: N802
        size = self.core.expand(request.volume_id, request.volume_path, request.staging_target_path)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    @csi_rpc("NodeGetVolumeStats")
    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:  # noqa: N802
        st = self.core.stats(request.volume_id, request.volume_path)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=[
                csi_pb2.VolumeUsage(
                    unit=Unit.BYTES,
                    total=st.bytes_total,
                    available=st.bytes_available,
                    used=st.bytes_used,
                ),
                csi_pb2.VolumeUsage(
                    unit=Unit.INODES,
                    total=st.inodes_total,
                    available=st.inodes_available,
                    used=st.inodes_used,
                ),
            ],
            # Required with the VOLUME_CONDITION capability (CSI spec), message included.
            volume_condition=csi_pb2.VolumeCondition(
                abnormal=st.abnormal is not None, message=st.abnormal or "the volume is served"
            ),
        )
