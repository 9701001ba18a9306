"""An Attestation Agent test peer: gRPC on a unix socket with the CoCo sample attester.

GetEvidence returns ``{"svn":"1","report_data":"<standard base64 of RuntimeData>"}`` (the
sample attester's JSON, coco-interfaces.md 5), GetTeeType returns ``sample`` and
GetAdditionalEvidence returns empty evidence (no additional devices). Faults can be queued
per RPC as gRPC status codes.
"""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from concurrent import futures
from typing import Any

import grpc

from coco_proto import attestation_agent_pb2 as pb
from coco_proto import attestation_agent_pb2_grpc as pb_grpc


class _Servicer(pb_grpc.AttestationAgentServiceServicer):
    def __init__(self, peer: AaServer) -> None:
        self.peer = peer

    def _enter(self, rpc: str, context: grpc.ServicerContext) -> None:
        with self.peer.lock:
            self.peer.calls[rpc] += 1
            queue = self.peer.faults.get(rpc)
            code = queue.pop(0) if queue else None
        if code is not None:
            context.abort(code, "injected fault")

    def GetEvidence(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GetEvidence", context)
        with self.peer.lock:
            self.peer.runtime_data.append(bytes(request.RuntimeData))
        evidence = {
            "svn": self.peer.svn,
            "report_data": base64.b64encode(request.RuntimeData).decode(),
        }
        if self.peer.tamper:
            evidence["report_data"] = base64.b64encode(b"\0" * 48).decode()
        return pb.GetEvidenceResponse(Evidence=json.dumps(evidence).encode())

    def GetAdditionalEvidence(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GetAdditionalEvidence", context)
        return pb.GetEvidenceResponse(Evidence=b"")

    def GetTeeType(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GetTeeType", context)
        return pb.GetTeeTypeResponse(tee=self.peer.tee)

    def GetAdditionalTees(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._enter("GetAdditionalTees", context)
        return pb.GetAdditionalTeesResponse(additional_tees=[])


class AaServer:
    """Run the AA peer on ``unix://<socket_path>``; use as a context manager."""

    def __init__(self, socket_path: str, *, tee: str = "sample", svn: str = "1") -> None:
        self.socket_path = socket_path
        self.tee = tee
        self.svn = svn
        self.tamper = False  # True: report_data no longer binds the runtime data
        self.lock = threading.Lock()
        self.calls: Counter = Counter()
        self.faults: dict[str, list[grpc.StatusCode]] = {}
        self.runtime_data: list[bytes] = []
        self._server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"unix://{self.socket_path}"

    def inject(self, rpc: str, code: grpc.StatusCode, count: int = 1) -> None:
        with self.lock:
            self.faults.setdefault(rpc, []).extend([code] * count)

    def start(self) -> AaServer:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_AttestationAgentServiceServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(self.target)
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
        self._server = None

    def __enter__(self) -> AaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
