"""KBS protocol v0.4.0 client against the KBS and AA test peers (real HTTP, real gRPC)."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import time
from typing import Any

import pytest

from sealed_secrets.errors import (
    AttestationError,
    BadResponse,
    KbsUnavailable,
    PolicyDenied,
    ResolverError,
    ResourceNotFound,
    TlsError,
    Unauthorized,
    UnsealFailed,
)
from sealed_secrets.evidence import (
    AaEvidenceProvider,
    canonical_runtime_data,
    report_data_binding,
)
from sealed_secrets.kbs_client import KbsClient
from sealed_secrets.resolver import build_resolver
from tests.peers.aa_server import AaServer
from tests.peers.harness import RESOURCES, kbs_and_aa, kbs_spec, short_tmpdir
from tests.peers.kbs_server import KbsServer

R1 = "kbs:///default/key/1"


def client_for(kbs: KbsServer, aa: AaServer, **kw: Any) -> KbsClient:
    kw.setdefault("retries", 0)
    if kbs.ca_path and "ca" not in kw:
        kw["ca"] = kbs.ca_path
    if not kbs.ca_path:
        kw.setdefault("insecure_http", True)
    return KbsClient(kbs.url, evidence_provider=AaEvidenceProvider(aa.target), **kw)


# --- the derived vector of coco-interfaces.md 6.4 ------------------------------------------

VECTOR_NONCE = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
VECTOR_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "alg": "ECDH-ES+A256KW",
    "x": "4jH376AuwTUCIx65AJ_56D7SZzWf7sGcEA7_Csq21UM",
    "y": "rjdceysnSa5ZfzWOPGCURMUuHndxBAGUu4ISTIVN0yA",
}


def test_jcs_binding_derived_vector() -> None:
    canonical = canonical_runtime_data(VECTOR_NONCE, VECTOR_JWK, "")
    assert canonical == (
        b'{"additional-evidence":"","nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",'
        b'"tee-pubkey":{"alg":"ECDH-ES+A256KW","crv":"P-256","kty":"EC",'
        b'"x":"4jH376AuwTUCIx65AJ_56D7SZzWf7sGcEA7_Csq21UM",'
        b'"y":"rjdceysnSa5ZfzWOPGCURMUuHndxBAGUu4ISTIVN0yA"}}'
    )
    digest = report_data_binding(VECTOR_NONCE, VECTOR_JWK, "")
    assert digest.hex() == (
        "edb9dfa98e7ebfb03ff01812b502429cfd0c76ae1943e251e910bbc7cbff66e9"
        "8d80fbc548caeca7d8315573c22305d2"
    )
    assert base64.b64encode(digest).decode() == (
        "7bnfqY5+v7A/8BgStQJCnP0Mdq4ZQ+JR6RC7x8v/ZumNgPvFSMrsp9gxVXPCIwXS"
    )
    # additional devices bind the two-member form
    two = canonical_runtime_data(VECTOR_NONCE, VECTOR_JWK, None)
    assert two.startswith(b'{"nonce":') and b"additional-evidence" not in two
    assert report_data_binding(VECTOR_NONCE, VECTOR_JWK, None) == hashlib.sha384(two).digest()


def test_sample_evidence_from_aa_peer_matches_vector() -> None:
    with short_tmpdir() as d, AaServer(f"{d}/aa.sock") as aa:
        provider = AaEvidenceProvider(aa.target)
        digest = report_data_binding(VECTOR_NONCE, VECTOR_JWK, "")
        assert provider.tee_type() == "sample"
        assert provider.primary_evidence(digest) == (
            b'{"svn": "1", "report_data": '
            b'"7bnfqY5+v7A/8BgStQJCnP0Mdq4ZQ+JR6RC7x8v/ZumNgPvFSMrsp9gxVXPCIwXS"}'
        )
        assert json.loads(provider.additional_evidence(b"x"))["sample-device"]["report_data"] == (
            base64.b64encode(b"x").decode()
        )
        provider.close()


# --- full flow ------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_full_flow_via_aa_evidence(key_type: str, peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa, tee_key_type=key_type)
    assert client.get_resource(R1) == RESOURCES["default/key/1"]
    assert kbs.calls["auth"] == 1 and kbs.calls["attest_ok"] == 1
    assert aa.calls["GetEvidence"] == 1
    assert len(aa.runtime_data[0]) == 48  # SHA-384 report data by default


def test_token_reused_across_resources(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa)
    for _ in range(3):
        assert client.get_resource("kbs:///default/key/1") == RESOURCES["default/key/1"]
        assert client.get_resource("kbs:///default/key/2") == RESOURCES["default/key/2"]
    assert kbs.calls["attest"] == 1 and kbs.calls["auth"] == 1
    assert kbs.calls["resource"] == 6
    headers = set(kbs.state.seen_auth_headers)
    assert len(headers) == 1 and next(iter(headers)).startswith("Bearer ")


def test_reattests_when_kbs_forgets_session_and_token(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa)
    client.get_resource(R1)
    kbs.expire_all()
    assert client.get_resource(R1) == RESOURCES["default/key/1"]
    assert kbs.calls["attest_ok"] == 2
    assert kbs.calls["resource"] == 3  # one 401, then the retry with the fresh token


def test_reattests_before_token_exp() -> None:
    with kbs_and_aa(token_ttl=0.6) as (kbs, aa):
        client = client_for(kbs, aa, refresh_margin=0.1)
        client.get_resource(R1)
        client.get_resource(R1)
        assert kbs.calls["attest_ok"] == 1
        time.sleep(0.6)
        assert client.get_resource(R1) == RESOURCES["default/key/1"]
        assert kbs.calls["attest_ok"] == 2
        assert kbs.calls["resource"] == 3  # re-attested proactively: no 401 round trip


def test_expired_session_cookie_with_valid_token_still_works() -> None:
    with kbs_and_aa(session_timeout=0.3) as (kbs, aa):
        client = client_for(kbs, aa)
        client.get_resource(R1)
        time.sleep(0.4)
        client.get_resource(R1)
        assert kbs.calls["attest_ok"] == 1


def test_session_timeout_between_auth_and_attest_fails_cleanly() -> None:
    with kbs_and_aa(session_timeout=0.2) as (kbs, aa):
        kbs.inject("attest", "delay", 0.4)
        client = client_for(kbs, aa)
        with pytest.raises(AttestationError) as info:
            client.get_resource(R1)
        assert info.value.status == 401 and info.value.problem_type.endswith("ExpiredCookie")


def test_selected_hash_algorithm_is_honoured() -> None:
    with kbs_and_aa(selected_hash="sha512") as (kbs, aa):
        client = client_for(kbs, aa)
        assert client.get_resource(R1) == RESOURCES["default/key/1"]
        assert len(aa.runtime_data[0]) == 64


# --- error classes ----------------------------------------------------------------------------


def test_policy_denied_is_403(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa)
    with pytest.raises(PolicyDenied) as info:
        client.get_resource("kbs:///denied/key/1")
    assert info.value.status == 403 and info.value.problem_type.endswith("/PolicyDeny")
    assert kbs.calls["attest"] == 1  # a policy refusal is not retried by re-attesting


def test_missing_resource_is_404(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    with pytest.raises(ResourceNotFound) as info:
        client_for(kbs, aa).get_resource("kbs:///default/key/404")
    assert info.value.status == 404


def test_persistent_401_is_unauthorized_after_one_reattest(
    peers: tuple[KbsServer, AaServer],
) -> None:
    kbs, aa = peers
    kbs.inject("resource", "status", 401, count=2)
    with pytest.raises(Unauthorized) as info:
        client_for(kbs, aa).get_resource(R1)
    assert info.value.status == 401
    assert kbs.calls["attest_ok"] == 2


def test_attestation_rejected_when_evidence_does_not_bind(
    peers: tuple[KbsServer, AaServer],
) -> None:
    kbs, aa = peers
    aa.tamper = True
    with pytest.raises(AttestationError) as info:
        client_for(kbs, aa).get_resource(R1)
    assert info.value.status == 401 and "VerificationFailed" in str(info.value)
    assert kbs.calls["attest_ok"] == 0


def test_aa_unreachable_is_attestation_error(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, _ = peers
    client = KbsClient(
        kbs.url,
        evidence_provider=AaEvidenceProvider("unix:///nonexistent/aa.sock", timeout=2),
        insecure_http=True,
    )
    with pytest.raises(AttestationError, match="UNAVAILABLE"):
        client.get_resource(R1)


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_are_unavailable(status: int, peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    kbs.inject("resource", "status", status)
    with pytest.raises(KbsUnavailable) as info:
        client_for(kbs, aa).get_resource(R1)
    assert info.value.status == status


def test_transient_5xx_is_retried(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    kbs.inject("auth", "status", 503)
    kbs.inject("resource", "status", 502)
    client = client_for(kbs, aa, retries=2, backoff=0.01)
    assert client.get_resource(R1) == RESOURCES["default/key/1"]
    assert kbs.calls["auth"] == 2 and kbs.calls["resource"] == 2


def test_timeout_is_unavailable(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa, timeout=0.3)
    client.get_resource(R1)
    kbs.inject("resource", "delay", 1.0)
    started = time.monotonic()
    with pytest.raises(KbsUnavailable, match="timed out"):
        client.get_resource(R1)
    assert time.monotonic() - started < 0.9


def test_body_read_timeout_is_unavailable(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa, timeout=0.3)
    client.get_resource(R1)
    kbs.inject("resource", "slow_body", 1.0)
    with pytest.raises(KbsUnavailable, match="timed out"):
        client.get_resource(R1)
    assert client.get_resource(R1) == RESOURCES["default/key/1"]


def test_connection_refused_is_unavailable(peers: tuple[KbsServer, AaServer]) -> None:
    _, aa = peers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = KbsClient(
        f"http://127.0.0.1:{port}",
        evidence_provider=AaEvidenceProvider(aa.target),
        retries=0,
        insecure_http=True,
    )
    with pytest.raises(KbsUnavailable, match="unreachable"):
        client.get_resource(R1)


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
@pytest.mark.parametrize("kind", ["tag", "ciphertext", "protected", "alg", "missing"])
def test_bad_jwe_is_bad_response(
    kind: str, key_type: str, peers: tuple[KbsServer, AaServer]
) -> None:
    kbs, aa = peers
    client = client_for(kbs, aa, tee_key_type=key_type)
    kbs.inject("resource", "bad_jwe", kind)
    with pytest.raises(BadResponse):
        client.get_resource(R1)
    # the client stays usable: the next, intact response decrypts
    assert client.get_resource(R1) == RESOURCES["default/key/1"]


def test_non_json_resource_is_bad_response(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    kbs.inject("resource", "not_json")
    with pytest.raises(BadResponse, match="not JSON"):
        client_for(kbs, aa).get_resource(R1)


def test_bad_uri_never_reaches_kbs(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers
    with pytest.raises(ResolverError):
        client_for(kbs, aa).get_resource("kbs:///default/../etc")
    assert sum(kbs.calls.values()) == 0


# --- TLS -------------------------------------------------------------------------------------


def test_tls_with_configured_ca() -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        assert kbs.url.startswith("https://")
        assert client_for(kbs, aa).get_resource(R1) == RESOURCES["default/key/1"]


def test_tls_fails_without_the_ca(tmp_path: Any) -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        with pytest.raises(ResolverError, match="system trust store is never used"):
            KbsClient(kbs.url, evidence_provider=AaEvidenceProvider(aa.target), retries=0)
        with short_tmpdir() as other:
            from tests.peers.kbs_server import make_tls_material

            wrong_ca, _, _ = make_tls_material(other)
            wrong = client_for(kbs, aa, ca=wrong_ca)
            with pytest.raises(TlsError):
                wrong.get_resource(R1)
        assert kbs.calls["auth"] == 0


# --- through the resolver ----------------------------------------------------------------------


def test_build_resolver_kbs_spec_with_tls_and_cache() -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        r = build_resolver(f"kbs:{kbs.url}?aa={aa.target}&ca={kbs.ca_path}", cache_ttl=30)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        assert r.get_resource("kbs://ignored-host/default/key/1") == RESOURCES["default/key/1"]
        assert kbs.calls["resource"] == 1
        with pytest.raises(PolicyDenied):
            r.get_resource("kbs:///denied/key/1")


VECTOR_A = (
    "sealed.eyJiNjQiOnRydWUsImFsZyI6IkVTMjU2Iiwia2lkIjoia2JzOi8vL2RlZmF1bHQvc2lnbmluZy1rZXkv"
    "c2VhbGVkLXNlY3JldCJ9.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2R"
    "lZmF1bHQvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6e30s"
    "ImFubm90YXRpb25zIjp7fX0.ZI2fTv5ramHqHQa9DKBFD5hlJ_Mjf6cEIcpsNGshpyhEiKklML0abfH600TD7LAFHf"
    "53oDIJmEcVsDtJ20UafQ"
)
KATA_JWK = (
    b'{"alg":"ES256","crv":"P-256","kid":"sealed-secret-test-key","kty":"EC","use":"sig",'
    b'"x":"4jH376AuwTUCIx65AJ_56D7SZzWf7sGcEA7_Csq21UM",'
    b'"y":"rjdceysnSa5ZfzWOPGCURMUuHndxBAGUu4ISTIVN0yA"}'
)


def test_unseal_vector_a_through_kbs_end_to_end() -> None:
    resources = dict(RESOURCES)
    resources["default/signing-key/sealed-secret"] = KATA_JWK
    with kbs_and_aa(resources) as (kbs, aa):
        r = build_resolver(kbs_spec(kbs, aa), cache_ttl=30)
        allow = ["kbs:///default/signing-key/"]
        assert r.unseal(VECTOR_A, allowed_kids=allow) == RESOURCES["default/sealed-secret/test"]
        assert r.unseal(VECTOR_A, allowed_kids=allow) == RESOURCES["default/sealed-secret/test"]
        assert kbs.calls["attest"] == 1
        assert kbs.calls["resource"] == 2  # signing key + value, then both from the cache
        # the signing key is gated by the KBS policy like any other resource
        kbs.state.deny.append("default/signing-key/*")
        r2 = build_resolver(kbs_spec(kbs, aa), cache_ttl=30)
        with pytest.raises(UnsealFailed):  # same answer as a bad signature: nothing to probe
            r2.unseal(VECTOR_A, allowed_kids=allow)


# --- token mode: the AA runs the handshake (GetToken "kbs") -------------------------------------


def test_token_from_aa_get_token() -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        aa.kbs_url, aa.kbs_ca = kbs.url, kbs.ca_path
        r = build_resolver(
            f"kbs:{kbs.url}?aa={aa.target}&ca={kbs.ca_path}&attest=token", cache_ttl=0
        )
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        assert r.get_resource("kbs:///default/key/2") == RESOURCES["default/key/2"]
        assert aa.calls["GetToken"] == 1 and aa.calls["GetEvidence"] == 0
        assert kbs.calls["attest_ok"] == 1
        kbs.expire_all()  # token rejected → a fresh token from the AA
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        assert aa.calls["GetToken"] == 2
        with pytest.raises(PolicyDenied):
            r.get_resource("kbs:///denied/key/1")


def test_token_mode_failures_are_attestation_errors() -> None:
    with kbs_and_aa() as (kbs, aa):
        r = build_resolver(kbs_spec(kbs, aa, "&attest=token&retries=0"))
        with pytest.raises(AttestationError, match="GetToken failed"):
            r.get_resource(R1)  # AA has no KBS configured
        aa.kbs_url = kbs.url
        aa.bad_token_reply = True
        with pytest.raises(AttestationError, match="tee_keypair"):
            r.get_resource(R1)


def test_concurrent_callers_share_one_attestation(peers: tuple[KbsServer, AaServer]) -> None:
    import concurrent.futures

    kbs, aa = peers
    client = client_for(kbs, aa)
    uris = [f"kbs:///default/key/{1 + i % 2}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(client.get_resource, uris))
    assert results == [RESOURCES[u.removeprefix("kbs:///")] for u in uris]
    assert kbs.calls["attest"] == 1 and kbs.calls["resource"] == 16


# --- the peers are strict, so the client's protocol details are really tested ----------------


def _raw_attest(kbs: KbsServer, *, as_string: bool = False, reuse: tuple | None = None) -> Any:
    """Speak RCAR to the KBS peer by hand (urllib), to check the peer's own strictness."""
    import urllib.error
    import urllib.request

    from sealed_secrets.jwe import TeeKeyPair

    def post(path: str, body: Any, cookie: str | None = None) -> tuple[int, Any, Any]:
        req = urllib.request.Request(
            kbs.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read()), resp.headers
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()), err.headers

    if reuse is None:
        _, challenge, headers = post(
            "/kbs/v0/auth",
            {"version": "0.4.0", "tee": "sample", "extra-params": {}},
        )
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        nonce = challenge["nonce"]
    else:
        cookie, nonce = reuse
    pub = TeeKeyPair("ec").public_jwk()
    digest = report_data_binding(nonce, pub, "", "sha384")
    evidence: Any = {"svn": "1", "report_data": base64.b64encode(digest).decode()}
    if as_string:
        evidence = json.dumps(evidence)
    body = {
        "runtime-data": {"nonce": nonce, "tee-pubkey": pub},
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    }
    status, doc, _ = post("/kbs/v0/attest", body, cookie)
    return status, doc, (cookie, nonce)


def test_kbs_peer_refuses_evidence_sent_as_a_json_string(
    peers: tuple[KbsServer, AaServer],
) -> None:
    kbs, _ = peers
    status, doc, _ = _raw_attest(kbs, as_string=True)
    assert status == 401 and doc["detail"] == "evidence is not a JSON object"
    status, doc, _ = _raw_attest(kbs)  # the same evidence as an object passes
    assert status == 200 and "token" in doc


def test_kbs_peer_refuses_a_replayed_nonce(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, _ = peers
    status, _, session = _raw_attest(kbs)
    assert status == 200
    status, doc, _ = _raw_attest(kbs, reuse=session)  # same session, same nonce
    assert status == 401 and doc["detail"] == "nonce already used"
    fresh_status, _, (cookie, _) = _raw_attest(kbs)
    assert fresh_status == 200
    status, doc, _ = _raw_attest(kbs, reuse=(cookie, session[1]))  # old nonce, other session
    assert status == 401 and doc["detail"] == "nonce already used"


def test_additional_evidence_is_sent_and_bound(peers: tuple[KbsServer, AaServer]) -> None:
    """The AA peer reports a device; the KBS peer checks both bindings, so a client that bound
    "" (or the wrong runtime data for the device) would fail here and in every flow test."""
    kbs, aa = peers
    client = client_for(kbs, aa)
    assert client.get_resource(R1) == RESOURCES["default/key/1"]
    (att,) = kbs.state.attestations
    sent = att["tee-evidence"]["additional_evidence"]
    assert isinstance(sent, str) and "sample-device" in sent
    assert isinstance(att["tee-evidence"]["primary_evidence"], dict)
    nonce, pub = att["runtime-data"]["nonce"], att["runtime-data"]["tee-pubkey"]
    assert aa.additional_runtime_data == [report_data_binding(nonce, pub, None)]
    assert aa.runtime_data == [report_data_binding(nonce, pub, sent)]


def test_client_refuses_non_object_evidence_from_the_aa(peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = peers

    class StringEvidence(AaEvidenceProvider):
        def primary_evidence(self, report_data: bytes) -> bytes:
            return json.dumps(json.dumps({"svn": "1"})).encode()

    client = KbsClient(
        kbs.url, evidence_provider=StringEvidence(aa.target), insecure_http=True, retries=0
    )
    with pytest.raises(AttestationError, match="not a JSON object"):
        client.get_resource(R1)
    assert kbs.calls["attest"] == 0
