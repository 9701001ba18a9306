"""Controller service (thin): protobuf ↔ LocalBackend."""

from __future__ import annotations

import grpc

from coco_proto import csi_pb2, csi_pb2_grpc
from csi_driver import convert
from csi_driver.core.controller import LocalBackend
from csi_driver.deadline import Deadline
from csi_driver.metrics import Metrics
from csi_driver.rpc import csi_rpc

RPC = csi_pb2.ControllerServiceCapability.RPC.Type


class ControllerServicer(csi_pb2_grpc.ControllerServicer):
    def __init__(self, backend: LocalBackend, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.metrics = metrics or Metrics()

    @csi_rpc("ControllerGetCapabilities")
    def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:  # noqa: N802
        caps = [
            csi_pb2.ControllerServiceCapability(rpc=csi_pb2.ControllerServiceCapability.RPC(type=t))
            for t in (RPC.CREATE_DELETE_VOLUME,)
        ]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    @csi_rpc("CreateVolume")
    def CreateVolume(
        self, request: csi_pb2.CreateVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.CreateVolumeResponse:  # noqa: N802
        rec, ctx = self.backend.create(
            request.name,
            convert.capabilities(request.volume_capabilities),
            dict(request.parameters),
            required_bytes=request.capacity_range.required_bytes,
            limit_bytes=request.capacity_range.limit_bytes,
            has_content_source=request.HasField("volume_content_source"),
            secrets=dict(request.secrets),
        )
        return csi_pb2.CreateVolumeResponse(
            volume=csi_pb2.Volume(
                volume_id=rec.volume_id, capacity_bytes=rec.capacity_bytes, volume_context=ctx
            )
        )

    @csi_rpc("DeleteVolume")
    def DeleteVolume(
        self, request: csi_pb2.DeleteVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.DeleteVolumeResponse:  # noqa: N802
        self.backend.delete(
            request.volume_id,
            secrets=dict(request.secrets),
            deadline=Deadline.from_grpc(context),
        )
        return csi_pb2.DeleteVolumeResponse()

    @csi_rpc("ValidateVolumeCapabilities")
    def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:  # noqa: N802
        reason = self.backend.validate(
            request.volume_id,
            convert.capabilities(request.volume_capabilities),
            dict(request.volume_context),
        )
        if reason is not None:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=dict(request.volume_context),
            volume_capabilities=list(request.volume_capabilities),
            parameters=dict(request.parameters),
            mutable_parameters=dict(request.mutable_parameters),
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)
