"""An Attestation Agent test peer on a unix socket (gRPC or ttrpc) with the sample attester.

GetEvidence returns ``{"svn":"1","report_data":"<standard base64 of RuntimeData>"}`` (the
sample attester's JSON, coco-interfaces.md 5), GetTeeType returns ``sample`` and
GetAdditionalEvidence returns one sample device by default,
``{"sample-device":{"svn":"1","report_data":"<standard base64 of RuntimeData>"}}``, so that a
client that binds ``""`` instead of the evidence it sends fails against the strict KBS peer
(``additional_evidence=False`` gives the empty answer of a guest without devices).
GetToken("kbs") runs the KBS v0.4.0 handshake against ``kbs_url`` itself (urllib +
cryptography, independent of the product client) and returns
``{"token": ..., "tee_keypair": "<PEM>"}`` as the AA does.
Faults can be queued per RPC as gRPC status codes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import urllib.request
from typing import Any

import grpc
import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coco_proto import attestation_agent_pb2 as pb
from coco_proto import attestation_agent_pb2_grpc as pb_grpc
from tests.peers.grpc_unix import UnixGrpcPeer


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def kbs_handshake(url: str, ca: str | None, tee: str, svn: str) -> dict[str, str]:
    """RCAR against a KBS as the AA's kbs token getter does; returns token + PEM key."""
    ctx = ssl.create_default_context(cafile=ca) if url.startswith("https") else None

    def post(path: str, body: dict[str, Any], cookie: str | None = None) -> tuple[Any, Any]:
        req = urllib.request.Request(
            url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})},
        )
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return json.loads(resp.read()), resp.headers

    challenge, headers = post(
        "/kbs/v0/auth",
        {
            "version": "0.4.0",
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512"]},
        },
    )
    cookie = headers["Set-Cookie"].split(";", 1)[0]
    extra = challenge.get("extra-params")
    alg = extra.get("selected-hash-algorithm", "sha384") if isinstance(extra, dict) else "sha384"
    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "alg": "ECDH-ES+A256KW",
        "x": _b64u(nums.x.to_bytes(32, "big")),
        "y": _b64u(nums.y.to_bytes(32, "big")),
    }
    nonce = challenge["nonce"]
    binding = rfc8785.dumps({"additional-evidence": "", "nonce": nonce, "tee-pubkey": jwk})
    report = hashlib.new(alg, binding).digest()
    evidence = {"svn": svn, "report_data": base64.b64encode(report).decode()}
    attest = {
        "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    }
    result, _ = post("/kbs/v0/attest", attest, cookie)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return {"token": result["token"], "tee_keypair": pem}


class _Servicer(pb_grpc.AttestationAgentServiceServicer):
    def __init__(self, peer: AaServer) -> None:
        self.peer = peer

    def GetEvidence(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("GetEvidence", context)
        with self.peer.lock:
            self.peer.runtime_data.append(bytes(request.RuntimeData))
        if "GetEvidence" in self.peer.raw_replies:
            return pb.GetEvidenceResponse(Evidence=self.peer.raw_replies["GetEvidence"])
        evidence = {
            "svn": self.peer.svn,
            "report_data": base64.b64encode(request.RuntimeData).decode(),
        }
        if self.peer.tamper:
            evidence["report_data"] = base64.b64encode(b"\0" * 48).decode()
        return pb.GetEvidenceResponse(Evidence=json.dumps(evidence).encode())

    def GetAdditionalEvidence(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("GetAdditionalEvidence", context)
        if "GetAdditionalEvidence" in self.peer.raw_replies:
            return pb.GetEvidenceResponse(Evidence=self.peer.raw_replies["GetAdditionalEvidence"])
        if not self.peer.additional_evidence:
            return pb.GetEvidenceResponse(Evidence=b"")
        with self.peer.lock:
            self.peer.additional_runtime_data.append(bytes(request.RuntimeData))
        device = {
            "svn": self.peer.svn,
            "report_data": base64.b64encode(request.RuntimeData).decode(),
        }
        return pb.GetEvidenceResponse(Evidence=json.dumps({"sample-device": device}).encode())

    def GetToken(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("GetToken", context)
        if "GetToken" in self.peer.raw_replies:
            return pb.GetTokenResponse(Token=self.peer.raw_replies["GetToken"])
        if request.TokenType != "kbs" or not self.peer.kbs_url:
            context.abort(grpc.StatusCode.INTERNAL, f"unsupported token type {request.TokenType}")
        try:
            reply = kbs_handshake(self.peer.kbs_url, self.peer.kbs_ca, self.peer.tee, self.peer.svn)
        except Exception as exc:  # report any handshake failure as the AA would
            context.abort(grpc.StatusCode.INTERNAL, f"get token failed: {type(exc).__name__}")
        if self.peer.bad_token_reply:
            reply = {"token": reply["token"], "tee_keypair": "not a pem"}
        return pb.GetTokenResponse(Token=json.dumps(reply).encode())

    def GetTeeType(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("GetTeeType", context)
        return pb.GetTeeTypeResponse(tee=self.peer.tee)

    def GetAdditionalTees(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.peer.enter("GetAdditionalTees", context)
        return pb.GetAdditionalTeesResponse(additional_tees=[])


class AaServer(UnixGrpcPeer):
    """Run the AA peer on ``unix://<socket_path>``; use as a context manager."""

    def __init__(
        self,
        socket_path: str,
        *,
        tee: str = "sample",
        svn: str = "1",
        kbs_url: str | None = None,
        kbs_ca: str | None = None,
        additional_evidence: bool = True,
        transport: str = "grpc",
    ) -> None:
        super().__init__(socket_path, transport=transport)
        self.additional_evidence = additional_evidence
        self.additional_runtime_data: list[bytes] = []
        self.kbs_url = kbs_url  # for GetToken("kbs"), like [token_configs.kbs] url
        self.kbs_ca = kbs_ca
        self.bad_token_reply = False
        # rpc -> the exact bytes to answer with (a hostile or broken AA), bypassing the rest
        self.raw_replies: dict[str, bytes] = {}
        self.tee = tee
        self.svn = svn
        self.tamper = False  # True: report_data no longer binds the runtime data
        self.runtime_data: list[bytes] = []

    def _register(self, server: grpc.Server) -> None:
        pb_grpc.add_AttestationAgentServiceServicer_to_server(_Servicer(self), server)
