"""Client of a Confidential Data Hub: GetResource and UnsealSecret, over ttrpc or gRPC.

Used when the guest already runs CDH (which owns attestation, KBS access and sealed-secret
verification); this process then never holds a KBS token or TEE key. The stock ``ttrpc-cdh``
is reached with ``unix:///run/confidential-containers/cdh.sock`` (ttrpc, the default), the
``grpc-cdh`` build with ``grpc+unix:///…`` or ``host:port`` (sealed_secrets.guest_rpc).

CDH reports every failure as INTERNAL with a text message, so only transport problems
(UNAVAILABLE, DEADLINE_EXCEEDED) map to a specific class; the rest surface as KbsError
(resources) or ProviderError (unseal) carrying a shortened CDH message.
"""

from __future__ import annotations

import logging

import grpc

from sealed_secrets.errors import (
    KbsError,
    KbsUnavailable,
    PolicyDenied,
    ProviderError,
    ResourceNotFound,
    SealedSecretError,
    Unauthorized,
)
from sealed_secrets.guest_rpc import GuestRpc
from sealed_secrets.resource_uri import parse_resource_uri

log = logging.getLogger(__name__)

DEFAULT_CDH_SOCKET = "unix:///run/confidential-containers/cdh.sock"
RESOURCE_SERVICE = "api.GetResourceService"
SEALED_SECRET_SERVICE = "api.SealedSecretService"
_DETAIL_MAX = 200
_BY_CODE: dict[grpc.StatusCode, type[KbsError]] = {
    grpc.StatusCode.UNAVAILABLE: KbsUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: KbsUnavailable,
    grpc.StatusCode.NOT_FOUND: ResourceNotFound,
    grpc.StatusCode.PERMISSION_DENIED: PolicyDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
}


def _detail(exc: grpc.RpcError) -> str:
    text = exc.details() if hasattr(exc, "details") else ""
    return "".join(c for c in (text or "") if c.isprintable())[:_DETAIL_MAX]


class CdhClient:
    """ResourceSource backed by CDH, plus ``unseal`` delegated to CDH."""

    def __init__(self, target: str = DEFAULT_CDH_SOCKET, *, timeout: float = 50.0) -> None:
        self._rpc = GuestRpc(target)
        self.target = str(self._rpc)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"CdhClient(target={self.target!r})"

    def close(self) -> None:
        self._rpc.close()

    def _code(self, exc: grpc.RpcError) -> grpc.StatusCode:
        return exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN

    def get_resource(self, uri: str) -> bytes:
        parsed = parse_resource_uri(uri)
        from coco_proto import confidential_data_hub_pb2 as pb

        try:
            resp = self._rpc.call(
                RESOURCE_SERVICE,
                "GetResource",
                pb.GetResourceRequest(ResourcePath=str(parsed)),
                pb.GetResourceResponse,
                self.timeout,
            )
        except grpc.RpcError as exc:
            code = self._code(exc)
            log.warning("cdh get_resource failed uri=%s code=%s", parsed, code.name)
            cls = _BY_CODE.get(code, KbsError)
            raise cls(
                f"CDH GetResource {parsed} failed: code={code.name} detail={_detail(exc)!r}"
            ) from None
        log.info("cdh resource ok uri=%s bytes=%d", parsed, len(resp.Resource))
        return bytes(resp.Resource)

    def unseal(self, sealed: str) -> bytes:
        from coco_proto import confidential_data_hub_pb2 as pb

        try:
            resp = self._rpc.call(
                SEALED_SECRET_SERVICE,
                "UnsealSecret",
                pb.UnsealSecretInput(secret=sealed.encode("utf-8")),
                pb.UnsealSecretOutput,
                self.timeout,
            )
        except grpc.RpcError as exc:
            code = self._code(exc)
            log.warning("cdh unseal failed code=%s", code.name)
            cls: type[SealedSecretError] = _BY_CODE.get(code, ProviderError)
            raise cls(
                f"CDH UnsealSecret failed: code={code.name} detail={_detail(exc)!r}"
            ) from None
        log.info("cdh unseal ok bytes=%d", len(resp.plaintext))
        return bytes(resp.plaintext)
