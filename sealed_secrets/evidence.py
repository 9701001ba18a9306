"""TEE evidence for the KBS handshake, obtained from the Attestation Agent (ttrpc or gRPC).

The KBS binds a session to a TEE key by asking the guest to put
``HASH(JCS({"additional-evidence", "nonce", "tee-pubkey"}))`` into the hardware report data
(coco-interfaces.md 6.4). Computing that digest here, with the same canonicalisation the
broker uses (RFC 8785), is what makes a stolen session useless without the TEE private key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any, Protocol

import grpc
import rfc8785

from sealed_secrets.errors import AttestationError, SealedSecretError
from sealed_secrets.guest_rpc import GuestRpc

log = logging.getLogger(__name__)

DEFAULT_AA_SOCKET = "unix:///run/confidential-containers/attestation-agent/attestation-agent.sock"
AA_SERVICE = "attestation_agent.AttestationAgentService"
# KBS protocol TEE names (tdx, snp, az-snp-vtpm, sample, …); the AA's answer goes into /auth.
_TEE_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_ABSENT_RPC = (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
DEFAULT_HASH = "sha384"
SUPPORTED_HASHES = ("sha256", "sha384", "sha512")


def _digest(hash_alg: str, data: bytes) -> bytes:
    if hash_alg not in SUPPORTED_HASHES:
        raise AttestationError(f"unsupported report-data hash algorithm: {hash_alg!r}")
    return hashlib.new(hash_alg, data).digest()


def canonical_runtime_data(
    nonce: str, tee_pubkey: dict[str, Any], additional_evidence: str | None = ""
) -> bytes:
    """JCS bytes of the structure bound into the primary evidence.

    ``additional_evidence=None`` gives the two-member form used for additional devices.
    """
    doc: dict[str, Any] = {"nonce": nonce, "tee-pubkey": tee_pubkey}
    if additional_evidence is not None:
        doc["additional-evidence"] = additional_evidence
    return rfc8785.dumps(doc)


def report_data_binding(
    nonce: str,
    tee_pubkey: dict[str, Any],
    additional_evidence: str | None = "",
    hash_alg: str = DEFAULT_HASH,
) -> bytes:
    """Digest that must appear as the TEE report data for this nonce and key."""
    return _digest(hash_alg, canonical_runtime_data(nonce, tee_pubkey, additional_evidence))


class EvidenceProvider(Protocol):
    """Source of TEE evidence (the AA in production; anything compatible in tests)."""

    def tee_type(self) -> str: ...

    def primary_evidence(self, report_data: bytes) -> bytes: ...

    def additional_evidence(self, report_data: bytes) -> str: ...


class AaEvidenceProvider:
    """EvidenceProvider backed by a CoCo Attestation Agent (ttrpc by default, or gRPC).

    ``target`` is a guest_rpc address: ``unix:///…`` / ``ttrpc+unix:///…`` for the stock
    ``ttrpc-aa``, ``grpc+unix:///…`` or ``host:port`` for ``grpc-aa``.
    """

    def __init__(self, target: str = DEFAULT_AA_SOCKET, *, timeout: float = 30.0) -> None:
        self._rpc = GuestRpc(target)
        self.target = str(self._rpc)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}(target={self.target!r})"

    def close(self) -> None:
        self._rpc.close()

    def _call(self, rpc: str, request: Any, response_type: Any) -> Any:
        try:
            return self._rpc.call(AA_SERVICE, rpc, request, response_type, self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            log.warning("aa call failed rpc=%s target=%s code=%s", rpc, self.target, name)
            err = AttestationError(f"attestation agent {rpc} failed: code={name}")
            err.grpc_code = code
            raise err from None

    def tee_type(self) -> str:
        from coco_proto import attestation_agent_pb2 as pb

        tee = str(self._call("GetTeeType", pb.GetTeeTypeRequest(), pb.GetTeeTypeResponse).tee)
        if not _TEE_NAME.fullmatch(tee):
            raise AttestationError(
                "attestation agent reported no usable TEE type (want 1-32 of [A-Za-z0-9_-])"
            )
        return tee.lower()

    def primary_evidence(self, report_data: bytes) -> bytes:
        from coco_proto import attestation_agent_pb2 as pb

        evidence = self._call(
            "GetEvidence", pb.GetEvidenceRequest(RuntimeData=report_data), pb.GetEvidenceResponse
        )
        if not evidence.Evidence:
            raise AttestationError("attestation agent returned empty evidence")
        return bytes(evidence.Evidence)

    def additional_evidence(self, report_data: bytes) -> str:
        """Evidence of additional devices as a JSON string, ``""`` if there are none.

        Older AAs lack the RPC; UNIMPLEMENTED (and ttrpc codegen's NOT_FOUND "is not
        supported") is treated as "no additional devices".
        """
        from coco_proto import attestation_agent_pb2 as pb

        try:
            resp = self._call(
                "GetAdditionalEvidence",
                pb.GetAdditionalEvidenceRequest(RuntimeData=report_data),
                pb.GetEvidenceResponse,
            )
        except AttestationError as exc:
            if getattr(exc, "grpc_code", None) in _ABSENT_RPC:
                return ""
            raise
        raw = bytes(resp.Evidence)
        if not raw:
            return ""
        try:
            text = raw.decode("utf-8")
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise AttestationError(
                "attestation agent returned non-JSON additional evidence"
            ) from None
        return text


class AaTokenProvider(AaEvidenceProvider):
    """TokenProvider: the AA runs the KBS handshake itself and hands over token and key.

    ``GetToken("kbs")`` returns ``{"token": "<JWT>", "tee_keypair": "<PEM private key>"}``
    (GC ``attestation-agent/src/token/kbs.rs``); the key decrypts the KBS resource JWEs.
    """

    def get_token(self) -> tuple[str, Any]:
        from coco_proto import attestation_agent_pb2 as pb
        from sealed_secrets.jwe import TeeKeyPair

        resp = self._call("GetToken", pb.GetTokenRequest(TokenType="kbs"), pb.GetTokenResponse)
        try:
            doc = json.loads(bytes(resp.Token))
            token, pem = doc["token"], doc["tee_keypair"]
            if not isinstance(token, str) or not token or not isinstance(pem, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise AttestationError("attestation agent GetToken reply is malformed") from None
        try:
            key = TeeKeyPair.from_pem(pem)
        except SealedSecretError:
            raise AttestationError(
                "attestation agent GetToken reply has a bad tee_keypair"
            ) from None
        return token, key
