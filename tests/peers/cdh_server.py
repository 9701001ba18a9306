"""A Confidential Data Hub test peer: GetResource and UnsealSecret over gRPC or ttrpc.

Backed by a resource dict ``{"repo/type/tag": bytes}``. UnsealSecret follows CDH's rules
(coco-interfaces.md 1): ``sealed.`` prefix, four dot-separated sections, JWS ES256 with the
verification JWK fetched from the ``kid`` resource URI, payload version ``0.1.0``, vault
secrets with provider ``kbs`` resolved from the same dict; with ``skip_verification`` the
header and signature are ignored, as CDH's ``skip_sealed_secret_verification`` does. Like the
upstream gRPC server, every failure is reported as INTERNAL ``[CDH] [ERROR]: ...``.
Implemented without the product code it tests.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from coco_proto import confidential_data_hub_pb2 as pb
from coco_proto import confidential_data_hub_pb2_grpc as pb_grpc
from tests.peers.grpc_unix import UnixGrpcPeer


class CdhFailure(Exception):
    pass


def _b64u(text: str) -> bytes:
    if "=" in text:
        raise CdhFailure("base64 padding not allowed")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise CdhFailure("invalid base64") from None


def _resource_key(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme != "kbs":
        raise CdhFailure(f"not a resource uri: {uri}")
    return parts.path.lstrip("/")


class _Cdh(pb_grpc.SealedSecretServiceServicer, pb_grpc.GetResourceServiceServicer):
    def __init__(self, peer: CdhServer) -> None:
        self.peer = peer

    def _get(self, uri: str) -> bytes:
        key = _resource_key(uri)
        if key not in self.peer.resources:
            raise CdhFailure(f"get resource failed: {uri} not found")
        return self.peer.resources[key]

    def _verify(self, header_b64: str, payload_b64: str, sig_b64: str) -> None:
        header = json.loads(_b64u(header_b64))
        if header.get("alg") != "ES256":
            raise CdhFailure("JWS algorithm must be ES256")
        jwk = json.loads(self._get(header["kid"]))
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise CdhFailure("verification key must be an EC P-256 JWK")
        pub = ec.EllipticCurvePublicNumbers(
            int.from_bytes(_b64u(jwk["x"]), "big"),
            int.from_bytes(_b64u(jwk["y"]), "big"),
            ec.SECP256R1(),
        ).public_key()
        sig = _b64u(sig_b64)
        if len(sig) != 64:
            raise CdhFailure("bad signature length")
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            pub.verify(der, f"{header_b64}.{payload_b64}".encode(), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise CdhFailure("signature verification failed") from None

    def _unseal(self, sealed: str) -> bytes:
        if not sealed.startswith("sealed."):
            raise CdhFailure("secret must start with 'sealed.'")
        sections = sealed.split(".")
        if len(sections) != 4:
            raise CdhFailure("sealed secret must have 4 sections")
        _, header_b64, payload_b64, sig_b64 = sections
        if not self.peer.skip_verification:
            self._verify(header_b64, payload_b64, sig_b64)
        payload = json.loads(_b64u(payload_b64))
        if payload.get("version") != "0.1.0":
            raise CdhFailure("unsupported secret version")
        if payload.get("type") != "vault" or str(payload.get("provider")).lower() != "kbs":
            raise CdhFailure("this peer only serves vault secrets with provider kbs")
        return self._get(payload["name"])

    def GetResource(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("GetResource", context)
        try:
            return pb.GetResourceResponse(Resource=self._get(request.ResourcePath))
        except CdhFailure as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"[CDH] [ERROR]: {exc}")

    def UnsealSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("UnsealSecret", context)
        try:
            plaintext = self._unseal(bytes(request.secret).decode("utf-8"))
        except (CdhFailure, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            context.abort(grpc.StatusCode.INTERNAL, f"[CDH] [ERROR]: {type(exc).__name__}: {exc}")
        return pb.UnsealSecretOutput(plaintext=plaintext)


class CdhServer(UnixGrpcPeer):
    """Run the CDH peer on ``unix://<socket_path>``; use as a context manager."""

    def __init__(
        self,
        socket_path: str,
        resources: dict[str, bytes],
        *,
        skip_verification: bool = False,
        transport: str = "grpc",
    ) -> None:
        super().__init__(socket_path, transport=transport)
        self.resources = dict(resources)
        self.skip_verification = skip_verification

    def _register(self, server: grpc.Server) -> None:
        servicer = _Cdh(self)
        pb_grpc.add_SealedSecretServiceServicer_to_server(servicer, server)
        pb_grpc.add_GetResourceServiceServicer_to_server(servicer, server)
