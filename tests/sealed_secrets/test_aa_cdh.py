"""Attestation Agent and Confidential Data Hub clients against their gRPC test peers.

The same clients over ttrpc: test_ttrpc.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import grpc
import pytest

from sealed_secrets.cdh_client import CdhClient
from sealed_secrets.errors import (
    AttestationError,
    KbsError,
    KbsUnavailable,
    ProviderError,
    ResolverError,
    SealedSecretError,
    UnsealFailed,
)
from sealed_secrets.evidence import AaEvidenceProvider
from sealed_secrets.resolver import build_resolver
from tests.peers.aa_server import AaServer
from tests.peers.cdh_server import CdhServer
from tests.peers.harness import short_tmpdir

# coco-interfaces.md 2.1 / 2.3
VECTOR_A = (
    "sealed.eyJiNjQiOnRydWUsImFsZyI6IkVTMjU2Iiwia2lkIjoia2JzOi8vL2RlZmF1bHQvc2lnbmluZy1rZXkv"
    "c2VhbGVkLXNlY3JldCJ9.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2R"
    "lZmF1bHQvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6e30s"
    "ImFubm90YXRpb25zIjp7fX0.ZI2fTv5ramHqHQa9DKBFD5hlJ_Mjf6cEIcpsNGshpyhEiKklML0abfH600TD7LAFHf"
    "53oDIJmEcVsDtJ20UafQ"
)
VECTOR_C = (
    "sealed.fakejwsheader.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2"
    "RlZmF1bHQvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6"
    "e30sImFubm90YXRpb25zIjp7fX0.fakesignature"
)
KATA_JWK = (
    b'{"alg":"ES256","crv":"P-256","kid":"sealed-secret-test-key","kty":"EC","use":"sig",'
    b'"x":"4jH376AuwTUCIx65AJ_56D7SZzWf7sGcEA7_Csq21UM",'
    b'"y":"rjdceysnSa5ZfzWOPGCURMUuHndxBAGUu4ISTIVN0yA"}'
)
PLAIN = b"unsealed_secret"
RESOURCES = {
    "default/sealed-secret/test": PLAIN,
    "default/signing-key/sealed-secret": KATA_JWK,
    "default/key/1": b"\x00cdh-resource\xff",
}


@pytest.fixture
def cdh() -> Iterator[CdhServer]:
    with short_tmpdir() as d, CdhServer(f"{d}/cdh.sock", RESOURCES) as server:
        yield server


# --- Attestation Agent ---------------------------------------------------------------------


def test_aa_sample_evidence(aa: AaServer) -> None:
    p = AaEvidenceProvider(aa.target)
    assert p.tee_type() == "sample"
    report = bytes(range(48))
    ev = json.loads(p.primary_evidence(report))
    assert ev == {"svn": "1", "report_data": base64.b64encode(report).decode()}
    assert aa.runtime_data == [report]
    extra = json.loads(p.additional_evidence(report))
    assert extra == {
        "sample-device": {"svn": "1", "report_data": base64.b64encode(report).decode()}
    }
    aa.additional_evidence = False  # a guest without devices answers with nothing
    assert p.additional_evidence(report) == ""
    p.close()


def test_aa_without_additional_evidence_rpc_means_none(aa: AaServer) -> None:
    aa.inject("GetAdditionalEvidence", grpc.StatusCode.UNIMPLEMENTED)
    assert AaEvidenceProvider(aa.target).additional_evidence(b"r") == ""


def test_aa_failure_is_attestation_error(aa: AaServer) -> None:
    aa.inject("GetEvidence", grpc.StatusCode.INTERNAL)
    with pytest.raises(AttestationError, match="GetEvidence failed: code=INTERNAL"):
        AaEvidenceProvider(aa.target).primary_evidence(b"r")
    aa.inject("GetAdditionalEvidence", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(AttestationError, match="UNAVAILABLE"):
        AaEvidenceProvider(aa.target).additional_evidence(b"r")


def test_grpc_peer_target_names_its_transport(aa: AaServer) -> None:
    """``unix://`` means ttrpc (CoCo's default), so the gRPC peers say ``grpc+unix://``."""
    assert aa.target == f"grpc+unix://{aa.socket_path}"
    with pytest.raises(ResolverError):
        AaEvidenceProvider("relative.sock")


# --- Confidential Data Hub ------------------------------------------------------------------


def test_cdh_get_resource(cdh: CdhServer) -> None:
    c = CdhClient(cdh.target)
    assert c.get_resource("kbs:///default/key/1") == RESOURCES["default/key/1"]
    with pytest.raises(KbsError, match="code=INTERNAL") as info:
        c.get_resource("kbs:///default/key/404")
    assert "not found" in str(info.value)
    c.close()


def test_cdh_unavailable_and_timeout(cdh: CdhServer) -> None:
    cdh.inject("GetResource", grpc.StatusCode.UNAVAILABLE)
    with pytest.raises(KbsUnavailable):
        CdhClient(cdh.target).get_resource("kbs:///default/key/1")
    cdh.inject("GetResource", 1.0)
    with pytest.raises(KbsUnavailable, match="DEADLINE_EXCEEDED"):
        CdhClient(cdh.target, timeout=0.2).get_resource("kbs:///default/key/1")


def test_cdh_socket_absent_is_unavailable() -> None:
    with pytest.raises(KbsUnavailable):
        CdhClient("unix:///nonexistent/cdh.sock", timeout=2).get_resource("kbs:///a/b/c")


def test_cdh_unseal_signed_vector_a(cdh: CdhServer) -> None:
    assert CdhClient(cdh.target).unseal(VECTOR_A) == PLAIN


def test_cdh_unseal_rejects_unsigned_and_tampered(cdh: CdhServer) -> None:
    c = CdhClient(cdh.target)
    with pytest.raises(ProviderError, match="code=INTERNAL"):
        c.unseal(VECTOR_C)
    head, payload, sig = VECTOR_A.removeprefix("sealed.").split(".")
    bad_sig = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BA")
    with pytest.raises(ProviderError):
        c.unseal(f"sealed.{head}.{payload}.{bad_sig}")


def test_cdh_unseal_legacy_with_verification_skipped() -> None:
    with short_tmpdir() as d, CdhServer(f"{d}/c.sock", RESOURCES, skip_verification=True) as s:
        assert CdhClient(s.target).unseal(VECTOR_C) == PLAIN


def test_cdh_resolver_spec(cdh: CdhServer) -> None:
    r = build_resolver(f"cdh:{cdh.target}", cache_ttl=30)
    for _ in range(3):
        assert r.get_resource("kbs:///default/key/1") == RESOURCES["default/key/1"]
    assert cdh.calls["GetResource"] == 1
    with pytest.raises(UnsealFailed):  # the kid gate applies before anything reaches CDH
        r.unseal(VECTOR_A)
    assert cdh.calls["UnsealSecret"] == 0
    assert r.unseal(VECTOR_A, allowed_kids=["kbs:///default/signing-key/sealed-secret"]) == PLAIN
    assert cdh.calls["UnsealSecret"] == 1
    with pytest.raises(SealedSecretError, match="not a sealed secret"):
        r.unseal("plain-text")
    assert cdh.calls["UnsealSecret"] == 1
