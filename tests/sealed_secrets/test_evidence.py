"""Report-data binding and the Attestation Agent client (sealed_secrets/evidence.py), unit level.

The AA is the protocol-level peer (tests/peers/aa_server.py) on a real unix socket; its
``raw_replies`` make it answer with exactly the bytes a broken or hostile AA would. Every
refusal is checked for its type and exact text. Written to kill the mutants that
tools/mutation.py found surviving in evidence.py.
"""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
import rfc8785

from sealed_secrets import evidence as ev
from sealed_secrets.errors import AttestationError
from tests.peers.aa_server import AaServer

NONCE = "bm9uY2U"
PUB = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "eA", "y": "eQ"}


def test_canonical_runtime_data_is_jcs_of_the_three_or_two_members() -> None:
    three = ev.canonical_runtime_data(NONCE, PUB, "{}")
    assert three == rfc8785.dumps({"additional-evidence": "{}", "nonce": NONCE, "tee-pubkey": PUB})
    assert three.startswith(b'{"additional-evidence":"{}","nonce":')
    assert ev.canonical_runtime_data(NONCE, PUB) == rfc8785.dumps(
        {"additional-evidence": "", "nonce": NONCE, "tee-pubkey": PUB}
    )
    two = ev.canonical_runtime_data(NONCE, PUB, None)
    assert two == rfc8785.dumps({"nonce": NONCE, "tee-pubkey": PUB})


@pytest.mark.parametrize("alg", ["sha256", "sha384", "sha512"])
def test_report_data_binding_hashes_the_canonical_bytes(alg: str) -> None:
    data = ev.canonical_runtime_data(NONCE, PUB, "x")
    assert ev.report_data_binding(NONCE, PUB, "x", alg) == hashlib.new(alg, data).digest()


def test_report_data_binding_defaults() -> None:
    data = ev.canonical_runtime_data(NONCE, PUB, "")
    assert ev.DEFAULT_HASH == "sha384"
    assert ev.report_data_binding(NONCE, PUB) == hashlib.sha384(data).digest()
    assert (
        ev.report_data_binding(NONCE, PUB, None)
        == hashlib.sha384(ev.canonical_runtime_data(NONCE, PUB, None)).digest()
    )


@pytest.mark.parametrize("alg", ["md5", "sha1", "SHA384", "sha3_384", ""])
def test_unsupported_hash_is_refused_by_name(alg: str) -> None:
    with pytest.raises(AttestationError) as info:
        ev.report_data_binding(NONCE, PUB, "", alg)
    assert str(info.value) == f"unsupported report-data hash algorithm: {alg!r}"


# Address forms (ttrpc by default, grpc+unix://, host:port) are tested with the transports in
# test_ttrpc.py::test_endpoint_forms.


def test_provider_defaults_repr_and_close(aa: AaServer) -> None:
    p = ev.AaEvidenceProvider(aa.target)
    assert p.timeout == 30.0 and p.target == aa.target
    assert repr(p) == f"AaEvidenceProvider(target={aa.target!r})"
    assert ev.AaEvidenceProvider().target == "ttrpc+" + ev.DEFAULT_AA_SOCKET  # CoCo's default
    assert p.tee_type() == "sample"
    p.close()
    assert p._rpc._channel is None and p._rpc._ttrpc is None
    assert p.tee_type() == "sample"  # a closed provider reconnects
    p.close()


def test_tee_type_is_lowercased_and_never_empty(aa: AaServer) -> None:
    aa.tee = "TDX"
    assert ev.AaEvidenceProvider(aa.target).tee_type() == "tdx"
    aa.tee = ""
    with pytest.raises(AttestationError) as info:
        ev.AaEvidenceProvider(aa.target).tee_type()
    assert str(info.value) == (
        "attestation agent reported no usable TEE type (want 1-32 of [A-Za-z0-9_-])"
    )


def test_empty_primary_evidence_is_refused(aa: AaServer) -> None:
    aa.raw_replies["GetEvidence"] = b""
    with pytest.raises(AttestationError) as info:
        ev.AaEvidenceProvider(aa.target).primary_evidence(b"r" * 48)
    assert str(info.value) == "attestation agent returned empty evidence"


def test_primary_evidence_is_returned_as_sent(aa: AaServer) -> None:
    aa.raw_replies["GetEvidence"] = b"\x00opaque\xff"
    assert ev.AaEvidenceProvider(aa.target).primary_evidence(b"r") == b"\x00opaque\xff"


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"not json", b"[" * 100000])
def test_additional_evidence_must_be_utf8_json(aa: AaServer, raw: bytes) -> None:
    aa.raw_replies["GetAdditionalEvidence"] = raw
    with pytest.raises(AttestationError) as info:
        ev.AaEvidenceProvider(aa.target).additional_evidence(b"r")
    assert str(info.value) == "attestation agent returned non-JSON additional evidence"


def test_additional_evidence_is_returned_verbatim(aa: AaServer) -> None:
    aa.raw_replies["GetAdditionalEvidence"] = b'{"dev": "\xc3\xa9"}'
    assert ev.AaEvidenceProvider(aa.target).additional_evidence(b"r") == '{"dev": "é"}'
    aa.raw_replies["GetAdditionalEvidence"] = b""
    assert ev.AaEvidenceProvider(aa.target).additional_evidence(b"r") == ""


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL])
def test_rpc_failures_name_the_rpc_and_code(aa: AaServer, code: grpc.StatusCode) -> None:
    p = ev.AaEvidenceProvider(aa.target, timeout=5)
    for rpc, call in (
        ("GetAdditionalEvidence", lambda: p.additional_evidence(b"r")),
        ("GetEvidence", lambda: p.primary_evidence(b"r")),
        ("GetTeeType", p.tee_type),
    ):
        aa.inject(rpc, code)
        with pytest.raises(AttestationError) as info:
            call()
        assert str(info.value) == f"attestation agent {rpc} failed: code={code.name}"
        assert info.value.grpc_code == code


def test_only_unsupported_means_no_additional_devices(aa: AaServer) -> None:
    """UNIMPLEMENTED (gRPC) and NOT_FOUND (ttrpc codegen's "not supported") mean an AA without
    the method; any other failure is an error, never silently "no devices"."""
    for code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND):
        aa.inject("GetAdditionalEvidence", code)
        assert ev.AaEvidenceProvider(aa.target).additional_evidence(b"r") == ""
    aa.inject("GetAdditionalEvidence", grpc.StatusCode.INTERNAL)
    with pytest.raises(AttestationError):
        ev.AaEvidenceProvider(aa.target).additional_evidence(b"r")


def test_rpc_timeout_is_applied(aa: AaServer) -> None:
    aa.inject("GetTeeType", 2.0)
    with pytest.raises(AttestationError) as info:
        ev.AaEvidenceProvider(aa.target, timeout=0.3).tee_type()
    assert str(info.value) == "attestation agent GetTeeType failed: code=DEADLINE_EXCEEDED"


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b"[]",
        b"\xff",
        json.dumps({"tee_keypair": "pem"}).encode(),
        json.dumps({"token": "t"}).encode(),
        json.dumps({"token": "", "tee_keypair": "pem"}).encode(),
        json.dumps({"token": 5, "tee_keypair": "pem"}).encode(),
        json.dumps({"token": "t", "tee_keypair": 5}).encode(),
    ],
)
def test_malformed_token_reply_is_refused(aa: AaServer, reply: bytes) -> None:
    aa.raw_replies["GetToken"] = reply
    with pytest.raises(AttestationError) as info:
        ev.AaTokenProvider(aa.target).get_token()
    assert str(info.value) == "attestation agent GetToken reply is malformed"


def test_token_reply_with_a_bad_key_is_refused(aa: AaServer) -> None:
    aa.raw_replies["GetToken"] = json.dumps({"token": "t", "tee_keypair": "not a pem"}).encode()
    with pytest.raises(AttestationError) as info:
        ev.AaTokenProvider(aa.target).get_token()
    assert str(info.value) == "attestation agent GetToken reply has a bad tee_keypair"


def test_close_closes_the_channel_and_is_safe_when_never_connected(aa: AaServer) -> None:
    ev.AaEvidenceProvider(aa.target).close()  # never connected: nothing to close
    p = ev.AaEvidenceProvider(aa.target)
    p.tee_type()
    channel = p._rpc._channel
    assert channel is not None
    p.close()
    with pytest.raises(ValueError):  # grpc: "Cannot invoke RPC on closed channel!"
        channel.unary_unary("/x")(b"")


def test_rpc_failure_is_logged_with_rpc_target_and_code(
    aa: AaServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="sealed_secrets.evidence")
    aa.inject("GetEvidence", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(AttestationError):
        ev.AaEvidenceProvider(aa.target).primary_evidence(b"r")
    assert [r.getMessage() for r in caplog.records] == [
        f"aa call failed rpc=GetEvidence target={aa.target} code=UNAVAILABLE"
    ]
