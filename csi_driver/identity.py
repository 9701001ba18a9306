"""Identity service (thin): plugin name/version, capabilities, readiness."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from google.protobuf import wrappers_pb2

from coco_proto import csi_pb2, csi_pb2_grpc
from csi_driver.constants import DRIVER_NAME, VENDOR_VERSION
from csi_driver.rpc import csi_rpc

ServiceType = csi_pb2.PluginCapability.Service.Type


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    def __init__(self, probe: Callable[[], tuple[bool, str]], *, controller: bool) -> None:
        self._probe = probe
        self._controller = controller

    @csi_rpc("GetPluginInfo")
    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:  # noqa: N802
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=VENDOR_VERSION)

    @csi_rpc("GetPluginCapabilities")
    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:  # noqa: N802
        caps = []
        if self._controller:
            caps.append(
                csi_pb2.PluginCapability(
                    service=csi_pb2.PluginCapability.Service(type=ServiceType.CONTROLLER_SERVICE)
                )
            )
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    @csi_rpc("Probe")
    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:  # noqa: N802
        ready, _reason = self._probe()
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))
