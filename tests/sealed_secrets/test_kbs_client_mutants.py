"""KbsClient in-process: a scripted KBS behind a fake urllib3 pool, every rule exactly.

The peer tests (test_kbs_client.py) run the protocol over real HTTP(S); these run each rule
of the client (what it sends, what it accepts, how each failure is typed and worded, when it
retries and re-attests) in milliseconds, so that a mutation run (tools/mutation.py) can
judge kbs_client.py by them. Resources are encrypted with the KBS peer's own JWE builder,
which is written independently of sealed_secrets.jwe.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urllib3

from sealed_secrets import kbs_client
from sealed_secrets.errors import (
    AttestationError,
    BadResponse,
    KbsError,
    KbsUnavailable,
    PolicyDenied,
    ResolverError,
    ResourceNotFound,
    TlsError,
    Unauthorized,
)
from sealed_secrets.evidence import SUPPORTED_HASHES, report_data_binding
from sealed_secrets.jwe import TeeKeyPair
from sealed_secrets.kbs_client import (
    INSECURE_HTTP_REFUSED,
    MAX_RESPONSE_BYTES,
    NO_TRUST_ANCHOR,
    KbsClient,
    check_ca_pem,
    load_ca_pem,
)
from tests.peers.kbs_server import jwe_encrypt, make_tls_material

URL = "http://kbs.test:8080"
R1 = "kbs:///default/key/1"
PATH1 = "/kbs/v0/resource/default/key/1"
SECRET = b"the resource"
ADDITIONAL = '{"device":"gpu0"}'


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


def _jwt(claims: dict[str, Any]) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'ES256'})}.{enc(claims)}.c2ln"


# -- a scripted KBS ----------------------------------------------------------------------------


class Resp:
    """What urllib3's pool returns with preload_content=False."""

    def __init__(
        self,
        status: int,
        body: bytes | Any = b"",
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
        chunks: list[bytes] | None = None,
    ) -> None:
        self.status = status
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.headers = urllib3.HTTPHeaderDict()
        items = headers.items() if isinstance(headers, dict) else headers or []
        for k, v in items:
            self.headers.add(k, v)
        self._chunks = list(chunks) if chunks is not None else [body]
        self.reads: list[tuple[int, bool]] = []
        self.released = False

    def read(self, amt: int, decode_content: bool = True) -> bytes:
        self.reads.append((amt, decode_content))
        return self._chunks.pop(0) if self._chunks else b""

    def release_conn(self) -> None:
        self.released = True


class Kbs:
    """Answers /auth, /attest and resources like a KBS; each step can be overridden."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.nonce = "bm9uY2U="
        self.token = _jwt({"exp": 4_000_000_000})
        self.cookie = "kbs-session-id=sess-1; Path=/"
        self.extra: Any = None
        self.tee_pubkey: dict[str, Any] | None = None
        self.auth: Callable[[], Resp] | None = None
        self.attest: Callable[[], Resp] | None = None
        self.resource: list[Resp] = []
        self.resources: dict[str, bytes] = {PATH1: SECRET}

    def request(self, method: str, url: str, **kw: Any) -> Resp:
        body = json.loads(kw["body"]) if kw.get("body") is not None else None
        self.calls.append({"method": method, "url": url, "json": body, **kw})
        path = url.removeprefix(URL)
        if path == "/kbs/v0/auth":
            if self.auth is not None:
                return self.auth()
            doc: dict[str, Any] = {"nonce": self.nonce}
            if self.extra is not None:
                doc["extra-params"] = self.extra
            return Resp(200, doc, {"Set-Cookie": self.cookie})
        if path == "/kbs/v0/attest":
            self.tee_pubkey = body["runtime-data"]["tee-pubkey"]
            if self.attest is not None:
                return self.attest()
            return Resp(200, {"token": self.token})
        if self.resource:
            return self.resource.pop(0)
        assert self.tee_pubkey is not None
        return Resp(200, jwe_encrypt(self.resources[path], self.tee_pubkey))

    def clear(self) -> None:
        pass

    def paths(self) -> list[str]:
        return [c["url"].removeprefix(URL) for c in self.calls]


class Evidence:
    def __init__(self, primary: bytes | None = None) -> None:
        self.asked: list[tuple[str, bytes]] = []
        self.primary = primary

    def tee_type(self) -> str:
        return "sample"

    def additional_evidence(self, report_data: bytes) -> str:
        self.asked.append(("additional", report_data))
        return ADDITIONAL

    def primary_evidence(self, report_data: bytes) -> bytes:
        self.asked.append(("primary", report_data))
        if self.primary is not None:
            return self.primary
        return json.dumps({"report_data": base64.b64encode(report_data).decode()}).encode()


@pytest.fixture
def kbs() -> Kbs:
    return Kbs()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(kbs_client.time, "sleep", slept.append)
    return slept


def client(kbs: Kbs, evidence: Evidence | None = None, **kw: Any) -> KbsClient:
    kw.setdefault("retries", 0)
    c = KbsClient(URL, evidence_provider=evidence or Evidence(), insecure_http=True, **kw)
    c._pool = kbs  # type: ignore[assignment]
    return c


# -- the handshake and the fetch, as sent ------------------------------------------------------


def test_rcar_handshake_and_fetch_send_exactly_the_protocol(kbs: Kbs) -> None:
    ev = Evidence()
    c = client(kbs, ev, timeout=7.0)
    assert c.get_resource(R1) == SECRET
    assert kbs.paths() == ["/kbs/v0/auth", "/kbs/v0/attest", PATH1]
    auth, attest, get = kbs.calls
    assert auth["method"] == "POST" and attest["method"] == "POST" and get["method"] == "GET"
    assert auth["json"] == {
        "version": "0.4.0",
        "tee": "sample",
        "extra-params": {"supported-hash-algorithms": list(SUPPORTED_HASHES)},
    }
    for call in kbs.calls:
        assert call["retries"] is False and call["redirect"] is False
        assert call["preload_content"] is False and call["decode_content"] is False
        assert call["timeout"].connect_timeout == 7.0 and call["timeout"].read_timeout == 7.0
        assert call["headers"]["Accept"] == "application/json"
        assert call["headers"]["Accept-Encoding"] == "identity"
    assert auth["headers"]["Content-Type"] == "application/json"
    assert auth["body"] == json.dumps(auth["json"]).encode()
    assert "Content-Type" not in get["headers"] and get["body"] is None
    assert "Cookie" not in auth["headers"]
    assert attest["headers"]["Cookie"] == "kbs-session-id=sess-1"
    pub = attest["json"]["runtime-data"]["tee-pubkey"]
    assert attest["json"]["runtime-data"] == {"nonce": kbs.nonce, "tee-pubkey": pub}
    assert pub["kty"] == "EC" and pub["alg"] == "ECDH-ES+A256KW"
    evidence = attest["json"]["tee-evidence"]
    assert evidence["additional_evidence"] == ADDITIONAL
    # the binding: additional evidence over (nonce, key), primary over all three
    first = report_data_binding(kbs.nonce, pub, None, "sha384")
    second = report_data_binding(kbs.nonce, pub, ADDITIONAL, "sha384")
    assert ev.asked == [("additional", first), ("primary", second)]
    assert evidence["primary_evidence"] == {"report_data": base64.b64encode(second).decode()}
    assert get["headers"]["Authorization"] == f"Bearer {kbs.token}"
    assert get["headers"]["Cookie"] == "kbs-session-id=sess-1"
    assert c.attestations == 1


def test_the_token_is_reused_until_rejected(kbs: Kbs) -> None:
    c = client(kbs)
    assert c.get_resource(R1) == SECRET and c.get_resource(R1) == SECRET
    assert kbs.paths() == ["/kbs/v0/auth", "/kbs/v0/attest", PATH1, PATH1]
    assert c.attestations == 1
    c.attest()  # forced
    assert kbs.paths()[4:] == ["/kbs/v0/auth", "/kbs/v0/attest"] and c.attestations == 2
    assert repr(c) == "KbsClient(url='http://kbs.test:8080', attested=True)"


def test_a_query_is_passed_on(kbs: Kbs) -> None:
    kbs.resources[PATH1 + "?a=1"] = b"q"
    assert client(kbs).get_resource(R1 + "?a=1") == b"q"


def test_rsa_tee_key(kbs: Kbs) -> None:
    c = client(kbs, tee_key_type="RSA")
    assert c.tee_key_type == "rsa" and c.get_resource(R1) == SECRET
    assert kbs.tee_pubkey is not None and kbs.tee_pubkey["kty"] == "RSA"


# -- the challenge --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "alg"),
    [
        (None, "sha384"),
        ({}, "sha384"),
        ({"selected-hash-algorithm": "SHA512"}, "sha512"),
        ({"selected-hash-algorithm": "sha256"}, "sha256"),
        ({"selected-hash-algorithm": ""}, "sha384"),
        (json.dumps({"selected-hash-algorithm": "sha256"}), "sha256"),
        ("  ", "sha384"),
        ("{not json", "sha384"),
        ("[1]", "sha384"),
    ],
)
def test_the_selected_hash_algorithm_is_used(kbs: Kbs, extra: Any, alg: str) -> None:
    kbs.extra = extra
    ev = Evidence()
    client(kbs, ev).get_resource(R1)
    assert kbs.tee_pubkey is not None
    assert ev.asked[-1] == (
        "primary",
        report_data_binding(kbs.nonce, kbs.tee_pubkey, ADDITIONAL, alg),
    )


def test_an_unsupported_hash_algorithm_is_refused(kbs: Kbs) -> None:
    kbs.extra = {"selected-hash-algorithm": "MD5" + "x" * 40}
    text = "KBS selected an unsupported hash algorithm: " + repr("md5" + "x" * 17)
    with pytest.raises(AttestationError, match=_exactly(text)):
        client(kbs).get_resource(R1)
    assert kbs.paths() == ["/kbs/v0/auth"]


@pytest.mark.parametrize("nonce", [None, "", 5, "n" * 1025])
def test_a_challenge_without_a_usable_nonce_is_refused(kbs: Kbs, nonce: Any) -> None:
    kbs.nonce = nonce
    text = "KBS challenge lacks a nonce (or it is longer than 1024)"
    with pytest.raises(BadResponse, match=_exactly(text)):
        client(kbs).get_resource(R1)


def test_the_longest_nonce_passes(kbs: Kbs) -> None:
    kbs.nonce = "n" * 1024
    assert client(kbs).get_resource(R1) == SECRET


@pytest.mark.parametrize("body", [b"[]", b'"x"', b"null"])
def test_a_challenge_that_is_not_an_object_is_refused(kbs: Kbs, body: bytes) -> None:
    kbs.auth = lambda: Resp(200, body, {"Set-Cookie": "kbs-session-id=s"})
    with pytest.raises(BadResponse, match="^KBS challenge lacks a nonce"):
        client(kbs).get_resource(R1)


def test_a_challenge_that_is_not_json_is_refused(kbs: Kbs) -> None:
    kbs.auth = lambda: Resp(200, b"{", {"Set-Cookie": "kbs-session-id=s"})
    with pytest.raises(BadResponse, match=_exactly("KBS /auth response is not JSON")) as info:
        client(kbs).get_resource(R1)
    assert info.value.status == 200


@pytest.mark.parametrize(
    "cookies",
    [
        [],
        [("Set-Cookie", "other=1")],
        [("Set-Cookie", "kbs-session-id=")],
        [("Set-Cookie", 'kbs-session-id="a\\r\\nX: y"')],
        [("Set-Cookie", "kbs-session-id=" + "a" * 513)],
        [("Set-Cookie", "kbs-session-id=a b")],
    ],
)
def test_a_challenge_without_a_usable_session_cookie_is_refused(
    kbs: Kbs, cookies: list[tuple[str, str]]
) -> None:
    kbs.auth = lambda: Resp(200, {"nonce": "n"}, cookies)
    text = "KBS /auth response lacks a usable kbs-session-id cookie"
    with pytest.raises(BadResponse, match=_exactly(text)):
        client(kbs).get_resource(R1)
    assert kbs.paths() == ["/kbs/v0/auth"]


def test_session_cookie_among_others_and_after_a_broken_one(kbs: Kbs) -> None:
    cookies = [
        ("Set-Cookie", "broken=\x00; ;;="),
        ("Set-Cookie", ",="),  # CookieError: skipped, the next header still counts
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "kbs-session-id=" + "s" * 512 + "; HttpOnly"),
    ]
    kbs.auth = lambda: Resp(200, {"nonce": "n"}, cookies)
    client(kbs).get_resource(R1)
    assert kbs.calls[1]["headers"]["Cookie"] == "kbs-session-id=" + "s" * 512


@pytest.mark.parametrize(
    ("status", "doc", "text"),
    [
        (401, {"type": "https://x/Unauthorized", "detail": "no"}, "type=Unauthorized detail='no'"),
        (400, b"not json", "type=- detail=''"),
        (403, {"type": 5, "detail": 6}, "type=- detail=''"),
    ],
)
def test_a_rejected_auth_is_an_attestation_error(
    kbs: Kbs, status: int, doc: Any, text: str
) -> None:
    kbs.auth = lambda: Resp(status, doc)
    with pytest.raises(AttestationError) as info:
        client(kbs).get_resource(R1)
    assert str(info.value) == f"KBS /auth rejected: status={status} {text}"
    assert info.value.status == status
    assert info.value.problem_type == (
        doc.get("type") if isinstance(doc, dict) and isinstance(doc.get("type"), str) else None
    )


# -- evidence and the attestation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("primary", "text"),
    [
        (b"not json", "TEE evidence from the attestation agent is not JSON"),
        (b'"a string"', "TEE evidence from the attestation agent is not a JSON object"),
        (b"[1]", "TEE evidence from the attestation agent is not a JSON object"),
    ],
)
def test_evidence_must_be_a_json_object(kbs: Kbs, primary: bytes, text: str) -> None:
    with pytest.raises(AttestationError, match=_exactly(text)):
        client(kbs, Evidence(primary)).get_resource(R1)
    assert kbs.paths() == ["/kbs/v0/auth"]


def test_a_rejected_attestation_is_worded_and_typed(kbs: Kbs) -> None:
    kbs.attest = lambda: Resp(401, {"type": "https://kbs/PolicyDeny", "detail": "bad\x00 tcb"})
    with pytest.raises(AttestationError) as info:
        client(kbs).get_resource(R1)
    assert str(info.value) == (
        "KBS rejected the attestation: status=401 type=PolicyDeny detail='bad tcb'"
    )
    assert info.value.status == 401 and info.value.problem_type == "https://kbs/PolicyDeny"


@pytest.mark.parametrize(
    "doc", [{}, {"token": 5}, {"token": ""}, {"token": "a b"}, {"token": "a\n"}, ["x"]]
)
def test_an_attestation_reply_without_a_usable_token_is_refused(kbs: Kbs, doc: Any) -> None:
    kbs.attest = lambda: Resp(200, doc)
    c = client(kbs)
    with pytest.raises(BadResponse, match=_exactly("KBS /attest response lacks a usable token")):
        c.get_resource(R1)
    assert c.attestations == 0 and c._session_id is None


def test_an_attestation_reply_that_is_not_json_is_refused(kbs: Kbs) -> None:
    kbs.attest = lambda: Resp(200, b"<html>")
    with pytest.raises(BadResponse, match=_exactly("KBS /attest response is not JSON")):
        client(kbs).get_resource(R1)


def test_the_longest_token_passes(kbs: Kbs) -> None:
    kbs.token = "t" * 65536
    assert client(kbs).get_resource(R1) == SECRET
    kbs2 = Kbs()
    kbs2.token = "t" * 65537
    with pytest.raises(BadResponse):
        client(kbs2).get_resource(R1)


# -- token expiry --------------------------------------------------------------------------------


def test_a_token_is_renewed_a_margin_before_it_expires(kbs: Kbs) -> None:
    now = [994.0]
    kbs.token = _jwt({"exp": 1000})
    c = client(kbs, refresh_margin=5.0, clock=lambda: now[0])
    c.get_resource(R1)
    now[0] = 994.999
    c.get_resource(R1)
    assert c.attestations == 1
    now[0] = 995.0
    c.get_resource(R1)
    assert c.attestations == 2
    assert kbs.paths().count("/kbs/v0/auth") == 2


def test_a_token_without_exp_is_kept(kbs: Kbs) -> None:
    kbs.token = _jwt({"sub": "x"})
    c = client(kbs, clock=lambda: 1e12)
    c.get_resource(R1)
    c.get_resource(R1)
    assert c.attestations == 1


@pytest.mark.parametrize(
    ("token", "exp"),
    [
        (_jwt({"exp": 1000}), 1000.0),
        (_jwt({"exp": 1000.5}), 1000.5),
        (_jwt({"exp": "1000"}), None),
        (_jwt({"exp": None}), None),
        (_jwt({"exp": 10**400}), None),
        (_jwt([1, 2]), None),
        ("no-dots", None),
        ("a.!!!.c", None),
        ("a.bm90IGpzb24.c", None),
        ("a." + base64.urlsafe_b64encode(b'{"exp":7}').decode().rstrip("=") + ".c", 7.0),
        ("a." + base64.urlsafe_b64encode(b'{"exp": 70}').decode().rstrip("=") + ".c", 70.0),
        ("a." + base64.urlsafe_b64encode(b'{"exp":  700}').decode() + ".c", 700.0),
    ],
)
def test_token_expiry(token: str, exp: float | None) -> None:
    assert kbs_client._token_expiry(token) == exp


# -- resource replies ------------------------------------------------------------------------------


def test_a_rejected_token_is_replaced_once(kbs: Kbs) -> None:
    kbs.resource = [Resp(401, {"type": "https://x/TokenExpired"})]
    c = client(kbs)
    assert c.get_resource(R1) == SECRET
    assert kbs.paths() == [
        "/kbs/v0/auth",
        "/kbs/v0/attest",
        PATH1,
        "/kbs/v0/auth",
        "/kbs/v0/attest",
        PATH1,
    ]
    assert c.attestations == 2


@pytest.mark.parametrize(
    ("ptype", "cls", "short"),
    [
        ("https://kbs/PolicyDeny", PolicyDenied, "PolicyDeny"),
        ("https://kbs/TokenExpired", Unauthorized, "TokenExpired"),
        (None, Unauthorized, "-"),
    ],
)
def test_a_fresh_token_rejected_again_is_an_error(
    kbs: Kbs, ptype: str | None, cls: type[KbsError], short: str
) -> None:
    doc = {"detail": "d"} if ptype is None else {"type": ptype, "detail": "d"}
    kbs.resource = [Resp(401, doc), Resp(401, doc)]
    c = client(kbs)
    with pytest.raises(KbsError) as info:
        c.get_resource(R1)
    assert type(info.value) is cls
    assert str(info.value) == f"KBS rejected a fresh token for {R1}: type={short} detail='d'"
    assert info.value.status == 401 and info.value.problem_type == ptype
    assert c._token is None and kbs.paths().count("/kbs/v0/auth") == 2


@pytest.mark.parametrize(
    ("status", "doc", "cls", "text"),
    [
        (
            403,
            {"type": "https://kbs/PolicyDeny", "detail": "no"},
            PolicyDenied,
            f"KBS policy denied {PATH1}: no",
        ),
        (
            403,
            {"type": "https://kbs/PolicyDeny"},
            PolicyDenied,
            f"KBS policy denied {PATH1}: PolicyDeny",
        ),
        (404, {"detail": "gone"}, ResourceNotFound, f"KBS has no resource {PATH1}: gone"),
        (404, {}, ResourceNotFound, f"KBS has no resource {PATH1}: -"),
        (
            404,
            {"type": "https://kbs/NotFound"},
            ResourceNotFound,
            f"KBS has no resource {PATH1}: NotFound",
        ),
        (
            418,
            {"type": "t", "detail": "x"},
            KbsError,
            f"KBS refused {PATH1}: status=418 type=t detail='x'",
        ),
        (302, b"", KbsError, f"KBS refused {PATH1}: status=302 type=- detail=''"),
    ],
)
def test_resource_refusals_are_typed_and_worded(
    kbs: Kbs, status: int, doc: Any, cls: type[KbsError], text: str
) -> None:
    kbs.resource = [Resp(status, doc)]
    with pytest.raises(KbsError, match=_exactly(text)) as info:
        client(kbs).get_resource(R1)
    assert type(info.value) is cls and info.value.status == status
    assert info.value.problem_type == (doc.get("type") if isinstance(doc, dict) else None)


def test_a_resource_reply_that_is_not_json_is_refused(kbs: Kbs) -> None:
    kbs.resource = [Resp(200, b"plain")]
    with pytest.raises(BadResponse, match=_exactly("KBS resource response is not JSON")):
        client(kbs).get_resource(R1)


def test_no_session_cookie_is_sent_with_a_provider_token(kbs: Kbs) -> None:
    key = TeeKeyPair("ec")

    class _Tokens:
        def get_token(self) -> tuple[str, TeeKeyPair]:
            return _jwt({"exp": 2000}), key

    kbs.tee_pubkey = key.public_jwk()
    c = KbsClient(URL, token_provider=_Tokens(), insecure_http=True, clock=lambda: 0.0)
    c._pool = kbs  # type: ignore[assignment]
    assert c.get_resource(R1) == SECRET
    assert kbs.paths() == [PATH1] and "Cookie" not in kbs.calls[0]["headers"]
    assert c.attestations == 1 and c._token is not None and c._token.expires_at == 2000.0
    assert repr(c._token) == "_Token(expires_at=2000.0)"


@pytest.mark.parametrize("bad", ["", "a b", "a\r\nX: y", "t" * 65537])
def test_a_provider_token_a_jwt_cannot_be_is_refused(kbs: Kbs, bad: str) -> None:
    class _Tokens:
        def get_token(self) -> tuple[str, TeeKeyPair]:
            return bad, TeeKeyPair("ec")

    c = KbsClient(URL, token_provider=_Tokens(), insecure_http=True)
    c._pool = kbs  # type: ignore[assignment]
    text = "attestation agent token has characters a JWT cannot"
    with pytest.raises(AttestationError, match=_exactly(text)):
        c.get_resource(R1)
    assert c.attestations == 0 and kbs.calls == []


# -- HTTP plumbing ---------------------------------------------------------------------------------


def test_server_errors_are_unavailable_and_retried(kbs: Kbs, sleeps: list[float]) -> None:
    kbs.resource = [
        Resp(503, {"type": "https://x/Busy", "detail": "later"}),
        Resp(500, b""),
    ]
    c = client(kbs, retries=2, backoff=0.5)
    assert c.get_resource(R1) == SECRET
    assert sleeps == [0.5, 1.0]


def test_retries_run_out(kbs: Kbs, sleeps: list[float]) -> None:
    kbs.resource = [Resp(503, {"type": "https://x/Busy", "detail": "later"}) for _ in range(2)]
    c = client(kbs, retries=1, backoff=0.25)
    with pytest.raises(KbsUnavailable) as info:
        c.get_resource(R1)
    assert str(info.value) == f"KBS server error 503 on {PATH1}: later"
    assert info.value.status == 503 and info.value.problem_type == "https://x/Busy"
    assert sleeps == [0.25]


@pytest.mark.parametrize(("doc", "tail"), [({"type": "https://x/Busy"}, "Busy"), (b"", "-")])
def test_server_error_wording_without_detail(kbs: Kbs, doc: Any, tail: str) -> None:
    kbs.resource = [Resp(500, doc)]
    with pytest.raises(KbsUnavailable, match=_exactly(f"KBS server error 500 on {PATH1}: {tail}")):
        client(kbs).get_resource(R1)


def test_status_499_is_not_a_server_error(kbs: Kbs) -> None:
    kbs.resource = [Resp(499, b"")]
    with pytest.raises(KbsError) as info:
        client(kbs, retries=3).get_resource(R1)
    assert type(info.value) is KbsError


def test_negative_retries_mean_none(kbs: Kbs) -> None:
    assert client(kbs, retries=-3).retries == 0
    assert client(kbs, retries=2.9).retries == 2  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ["gzip", " GZIP ", "br", "x" * 50])
def test_a_compressed_reply_is_refused(kbs: Kbs, encoding: str) -> None:
    resp = Resp(200, b"{}", {"Content-Encoding": encoding})
    kbs.auth = lambda: resp
    text = f"KBS response is compressed ({encoding.strip().lower()[:20]!r})"
    with pytest.raises(BadResponse, match=_exactly(text)):
        client(kbs).get_resource(R1)
    assert resp.released


@pytest.mark.parametrize("encoding", ["identity", " Identity ", ""])
def test_identity_encoding_is_accepted(kbs: Kbs, encoding: str) -> None:
    real = kbs.request

    def request(method: str, url: str, **kw: Any) -> Resp:
        resp = real(method, url, **kw)
        resp.headers["Content-Encoding"] = encoding
        return resp

    kbs.request = request  # type: ignore[method-assign]
    assert client(kbs).get_resource(R1) == SECRET


def test_the_reply_is_read_in_chunks_up_to_the_cap(kbs: Kbs) -> None:
    chunk = b" " * (64 * 1024)
    n = MAX_RESPONSE_BYTES // len(chunk)
    body = json.dumps({"nonce": "n"}).encode()
    at_cap = Resp(200, chunks=[chunk] * (n - 1) + [body + b" " * (len(chunk) - len(body))])
    at_cap.headers.add("Set-Cookie", "kbs-session-id=s")
    kbs.auth = lambda: at_cap
    client(kbs).get_resource(R1)
    assert at_cap.released
    assert all(r == (64 * 1024, False) for r in at_cap.reads)
    assert len(at_cap.reads) == n + 1  # the last read sees the end


def test_a_reply_above_the_cap_is_refused(kbs: Kbs) -> None:
    chunk = b" " * (64 * 1024)
    n = MAX_RESPONSE_BYTES // len(chunk)
    over = Resp(200, chunks=[chunk] * n + [b" "] + [chunk] * 100)
    kbs.auth = lambda: over
    with pytest.raises(BadResponse, match=_exactly("KBS response too large: POST /kbs/v0/auth")):
        client(kbs).get_resource(R1)
    assert len(over.reads) == n + 1 and over.released  # stopped reading at the cap


def test_a_reply_that_trickles_in_is_a_timeout(kbs: Kbs, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(kbs_client.time, "monotonic", tick)
    slow = Resp(200, chunks=[b"{"] * 10)
    kbs.auth = lambda: slow
    with pytest.raises(KbsUnavailable, match=_exactly(f"KBS timed out: POST {URL}/kbs/v0/auth")):
        client(kbs, timeout=1.0).get_resource(R1)
    # start at 1 s, deadline 4 s; one clock reading per chunk (2, 3, 4, 5): the 4th is past
    assert len(slow.reads) == 4 and slow.released


@pytest.mark.parametrize(
    ("exc", "cls", "text"),
    [
        (
            urllib3.exceptions.SSLError("bad cert"),
            TlsError,
            "KBS TLS verification failed for {url} (trust: insecure-http)",
        ),
        (
            urllib3.exceptions.NewConnectionError(None, "refused"),
            KbsUnavailable,
            "KBS unreachable: {url} (NewConnectionError)",
        ),  # type: ignore[arg-type]
        (
            urllib3.exceptions.ConnectTimeoutError("slow"),
            KbsUnavailable,
            "KBS timed out: POST {url}",
        ),
        (
            urllib3.exceptions.ReadTimeoutError(None, "u", "slow"),
            KbsUnavailable,
            "KBS timed out: POST {url}",
        ),  # type: ignore[arg-type]
        (
            urllib3.exceptions.ProtocolError("reset"),
            KbsUnavailable,
            "KBS unreachable: {url} (ProtocolError)",
        ),
        (
            ConnectionResetError(104, "reset"),
            KbsUnavailable,
            "KBS unreachable: {url} (ConnectionResetError)",
        ),
    ],
)
def test_transport_failures_are_typed(
    kbs: Kbs, exc: Exception, cls: type[KbsError], text: str
) -> None:
    def fail() -> Resp:
        raise exc

    kbs.auth = fail
    url = URL + "/kbs/v0/auth"
    with pytest.raises(KbsError, match=_exactly(text.format(url=url))) as info:
        client(kbs).get_resource(R1)
    assert type(info.value) is cls and info.value.__suppress_context__


def test_transport_failures_are_retried(kbs: Kbs, sleeps: list[float]) -> None:
    fails = [urllib3.exceptions.ProtocolError("reset")]

    def flaky() -> Resp:
        if fails:
            raise fails.pop()
        return Resp(200, {"nonce": "n"}, {"Set-Cookie": "kbs-session-id=s"})

    kbs.auth = flaky
    assert client(kbs, retries=1, backoff=2.0).get_resource(R1) == SECRET
    assert sleeps == [2.0]


# -- problem documents -------------------------------------------------------------------------


def _reply(body: bytes) -> Any:
    return kbs_client._Reply(400, body, urllib3.HTTPHeaderDict())


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b"", (None, "")),
        (b"[1]", (None, "")),
        (b'{"type": "t", "detail": "d"}', ("t", "d")),
        (b'{"type": 1, "detail": ["d"]}', (None, "")),
        (b'{"detail": "a\\u0000b\\nc\\u200bd"}', (None, "abcd")),
        (
            json.dumps({"type": "\x01" + "t" * 300, "detail": "d" * 300}).encode(),
            ("t" * 200, "d" * 200),
        ),
        (json.dumps({"type": "t", "detail": "d" * 70000}).encode(), (None, "")),
        (b'{"detail": "' + b"d" * (65536 - 14) + b'"}', (None, "d" * 200)),  # 65536 bytes
        (b'{"detail": "' + b"d" * (65536 - 13) + b'"}', (None, "")),  # cut: not JSON
    ],
)
def test_problem_documents(body: bytes, expect: tuple[str | None, str]) -> None:
    assert kbs_client._problem(_reply(body)) == expect


@pytest.mark.parametrize(
    ("ptype", "short"),
    [
        (None, "-"),
        ("", "-"),
        ("PolicyDeny", "PolicyDeny"),
        ("https://a/b/PolicyDeny", "PolicyDeny"),
        ("a/", ""),
    ],
)
def test_short_type(ptype: str | None, short: str) -> None:
    assert kbs_client._short_type(ptype) == short


def test_reattest_carries_type_and_detail() -> None:
    r = kbs_client._Reattest("t", "d")
    assert (r.ptype, r.detail, str(r)) == ("t", "d", "t")


# -- construction and trust ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    ca, cert, _key = make_tls_material(str(tmp_path_factory.mktemp("tls")))
    return ca, Path(ca).read_text()


def _ev() -> Evidence:
    return Evidence()


@pytest.mark.parametrize(
    ("url", "kw", "text"),
    [
        (5, {}, "KBS URL must be a string"),
        ("ftp://kbs", {}, "KBS URL must be https://host[:port], got 'ftp://kbs'"),
        ("https://", {}, "KBS URL must be https://host[:port], got 'https://'"),
        ("kbs.test", {}, "KBS URL must be https://host[:port], got 'kbs.test'"),
        ("https://kbs?x=1", {}, "KBS URL must not carry credentials, a query or a fragment"),
        ("https://kbs#f", {}, "KBS URL must not carry credentials, a query or a fragment"),
        ("https://u:p@kbs", {}, "KBS URL must not carry credentials, a query or a fragment"),
        ("http://kbs/", {}, INSECURE_HTTP_REFUSED.format(url="http://kbs")),
        (
            "http://kbs",
            {"insecure_http": True, "cert_sha256": "a" * 64},
            "ca= and cert-sha256= need an https:// KBS URL",
        ),
        ("https://kbs", {"insecure_http": True}, "insecure-http applies only to http:// KBS URLs"),
        ("https://kbs/p/", {}, NO_TRUST_ANCHOR.format(url="https://kbs/p")),
        (
            "https://kbs",
            {"cert_sha256": "a" * 63},
            "cert-sha256 must be the 64 hex digits of the certificate's SHA-256",
        ),
        (
            "https://kbs",
            {"cert_sha256": "g" * 64},
            "cert-sha256 must be the 64 hex digits of the certificate's SHA-256",
        ),
        (
            "http://kbs",
            {"insecure_http": True, "tee_key_type": "dsa"},
            "tee_key_type must be 'ec' or 'rsa', not 'dsa'",
        ),
    ],
)
def test_construction_refusals_are_exact(url: Any, kw: dict[str, Any], text: str) -> None:
    with pytest.raises(ResolverError, match=_exactly(text)):
        KbsClient(url, evidence_provider=_ev(), **kw)


def test_exactly_one_token_source(kbs: Kbs) -> None:
    text = "KbsClient needs exactly one of evidence_provider, token_provider"
    with pytest.raises(ResolverError, match=_exactly(text)):
        KbsClient(URL, insecure_http=True)
    with pytest.raises(ResolverError, match=_exactly(text)):
        KbsClient(URL, insecure_http=True, evidence_provider=_ev(), token_provider=object())  # type: ignore[arg-type]


def test_trust_anchors(tls: tuple[str, str]) -> None:
    ca_path, ca_pem = tls
    fp = "AB:" * 31 + "AB"
    assert KbsClient("https://kbs", evidence_provider=_ev(), ca=ca_path).trust == "ca"
    assert KbsClient("https://kbs", evidence_provider=_ev(), ca_pem=ca_pem).trust == "ca"
    c = KbsClient("https://kbs:8443/", evidence_provider=_ev(), cert_sha256=fp)
    assert c.trust == "cert-sha256" and c.base_url == "https://kbs:8443" and c.ca is None
    both = KbsClient(
        "https://kbs", evidence_provider=_ev(), ca=ca_path, cert_sha256=" " + fp + "\n"
    )
    assert both.trust == "ca+cert-sha256" and both.ca == ca_path
    assert client(Kbs()).trust == "insecure-http"
    with pytest.raises(
        ResolverError, match=_exactly("give the KBS trust anchors once: ca= or ca_pem, not both")
    ):
        KbsClient("https://kbs", evidence_provider=_ev(), ca=ca_path, ca_pem=ca_pem)
    with pytest.raises(
        ResolverError, match=_exactly("ca= and cert-sha256= need an https:// KBS URL")
    ):
        KbsClient("http://kbs", evidence_provider=_ev(), insecure_http=True, ca_pem=ca_pem)
    with pytest.raises(
        ResolverError, match=_exactly("KBS certificate (kbs_cert) holds no PEM certificate")
    ):
        KbsClient("https://kbs", evidence_provider=_ev(), ca_pem="nothing")


def test_tls_options_trust_only_the_pins(tls: tuple[str, str]) -> None:
    _, ca_pem = tls
    pinned = kbs_client._tls_options(ca_pem, None)
    ctx = pinned["ssl_context"]
    assert pinned["cert_reqs"] == ssl.CERT_REQUIRED and "assert_fingerprint" not in pinned
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    # the defaults are kept, the partial-chain flag is added
    assert ctx.verify_flags == ssl.VERIFY_X509_TRUSTED_FIRST | ssl.VERIFY_X509_PARTIAL_CHAIN
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert len(ctx.get_ca_certs()) == 1  # the pinned CA, nothing from the system store
    fp_only = kbs_client._tls_options(None, "ab" * 32)
    assert fp_only["cert_reqs"] == ssl.CERT_NONE and fp_only["assert_fingerprint"] == "ab" * 32
    assert fp_only["ssl_context"].verify_mode == ssl.CERT_NONE
    assert fp_only["ssl_context"].get_ca_certs() == []
    assert fp_only["ssl_context"].minimum_version == ssl.TLSVersion.TLSv1_2


def test_fingerprints_are_normalised() -> None:
    assert kbs_client._normalise_fingerprint(" AB:cd" + "0" * 60 + "\t") == "abcd" + "0" * 60
    assert kbs_client._normalise_fingerprint("A" * 64) == "a" * 64


def test_ca_files_and_text(tmp_path: Path, tls: tuple[str, str]) -> None:
    ca_path, ca_pem = tls
    assert load_ca_pem(ca_path) == ca_pem
    assert check_ca_pem(ca_pem, what="w") == ca_pem
    with pytest.raises(ResolverError, match=_exactly("w holds no PEM certificate")):
        check_ca_pem("junk", what="w")
    broken = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(ResolverError, match=_exactly("w holds no usable PEM certificate")):
        check_ca_pem(broken, what="w")
    bad = tmp_path / "ca.pem"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ResolverError, match=_exactly(f"KBS CA file {bad} is not PEM text")):
        load_ca_pem(str(bad))
    bad.write_text(broken)
    with pytest.raises(
        ResolverError, match=_exactly(f"KBS CA file {bad} holds no usable PEM certificate")
    ):
        load_ca_pem(str(bad))
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    with pytest.raises(
        ResolverError, match=_exactly(f"KBS CA file {big} is larger than 1048576 bytes")
    ):
        load_ca_pem(str(big))
    edge = tmp_path / "edge.pem"
    edge.write_bytes(ca_pem.encode() + b"\n" * (1024 * 1024 - len(ca_pem)))
    assert load_ca_pem(str(edge)).startswith(ca_pem)


def test_close_clears_the_pool(kbs: Kbs) -> None:
    cleared: list[bool] = []
    c = client(kbs)
    kbs.clear = lambda: cleared.append(True)  # type: ignore[method-assign]
    c.close()
    assert cleared == [True]
    assert repr(client(Kbs())) == "KbsClient(url='http://kbs.test:8080', attested=False)"


def test_every_attestation_counts(kbs: Kbs) -> None:
    key = TeeKeyPair("ec")

    class _Tokens:
        def get_token(self) -> tuple[str, TeeKeyPair]:
            return _jwt({}), key

    c = KbsClient(URL, token_provider=_Tokens(), insecure_http=True)
    c.attest()
    c.attest()
    assert c.attestations == 2
    ev = client(kbs)
    ev.attest()
    ev.attest()
    assert ev.attestations == 2


# -- the log lines an operator reads (what happened, never a secret) ---------------------------

_LOG = "sealed_secrets.kbs_client"


def _logged(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, tuple[Any, ...]]]:
    return [(r.levelno, str(r.msg), tuple(r.args or ())) for r in caplog.records if r.name == _LOG]


def test_handshake_and_fetch_log_lines(
    kbs: Kbs, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1e6]

    def tick() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(kbs_client.time, "monotonic", tick)
    kbs.extra = {"selected-hash-algorithm": "sha512"}
    with caplog.at_level(logging.INFO, logger=_LOG):
        client(kbs).get_resource(R1)
    lines = _logged(caplog)
    (_, msg, args), (_, msg2, args2) = lines[-2:]
    assert msg == "kbs attested url=%s tee=%s hash=%s key=%s ms=%d"
    assert args[:4] == (URL, "sample", "sha512", "ECDH-ES+A256KW")
    assert isinstance(args[4], int) and args[4] % 1000 == 0 and 1000 <= args[4] < 100_000
    assert msg2 == "kbs resource ok uri=%s bytes=%d"
    assert (str(args2[0]), args2[1]) == (R1, len(SECRET))


def test_provider_token_and_expiry_log_lines(kbs: Kbs, caplog: pytest.LogCaptureFixture) -> None:
    key = TeeKeyPair("ec")
    now = [0.0]

    class _Tokens:
        def get_token(self) -> tuple[str, TeeKeyPair]:
            return _jwt({"exp": 100}), key

    with caplog.at_level(logging.INFO, logger=_LOG):
        c = KbsClient(URL, token_provider=_Tokens(), insecure_http=True, clock=lambda: now[0])
        c.attest()
        now[0] = 99.0
        c._valid_token()
    assert _logged(caplog) == [
        (
            logging.WARNING,
            "kbs INSECURE plain http url=%s: the KBS is not authenticated and any host "
            "on the path can inject keys (insecure-http=true; tests only)",
            (URL,),
        ),
        (logging.INFO, "kbs token from provider url=%s key=%s", (URL, "ECDH-ES+A256KW")),
        (logging.INFO, "kbs token expiring, re-attesting url=%s", (URL,)),
        (logging.INFO, "kbs token from provider url=%s key=%s", (URL, "ECDH-ES+A256KW")),
    ]


@pytest.mark.parametrize(
    ("exc", "msg", "args"),
    [
        (
            urllib3.exceptions.SSLError("x"),
            "kbs tls verification failed url=%s trust=%s",
            ("{url}", "insecure-http"),
        ),
        (
            urllib3.exceptions.NewConnectionError(None, "x"),
            "kbs unreachable url=%s error=%s",
            ("{url}", "NewConnectionError"),
        ),  # type: ignore[arg-type]
        (
            urllib3.exceptions.ConnectTimeoutError("x"),
            "kbs timeout method=%s url=%s timeout=%s",
            ("POST", "{url}", 3.0),
        ),
        (
            urllib3.exceptions.ProtocolError("x"),
            "kbs unreachable url=%s error=%s",
            ("{url}", "ProtocolError"),
        ),
    ],
)
def test_transport_failure_log_lines(
    kbs: Kbs, caplog: pytest.LogCaptureFixture, exc: Exception, msg: str, args: tuple[Any, ...]
) -> None:
    def fail() -> Resp:
        raise exc

    kbs.auth = fail
    url = URL + "/kbs/v0/auth"
    with caplog.at_level(logging.INFO, logger=_LOG), pytest.raises(KbsError):
        client(kbs, timeout=3.0).get_resource(R1)
    want = tuple(a.format(url=url) if isinstance(a, str) else a for a in args)
    assert (logging.WARNING, msg, want) in _logged(caplog)


def test_server_error_and_rejection_log_lines(kbs: Kbs, caplog: pytest.LogCaptureFixture) -> None:
    kbs.resource = [Resp(502, {"type": "https://x/Gateway"})]
    with caplog.at_level(logging.INFO, logger=_LOG), pytest.raises(KbsUnavailable):
        client(kbs).get_resource(R1)
    assert (
        logging.WARNING,
        "kbs server error method=%s path=%s status=%d type=%r",
        ("GET", PATH1, 502, "Gateway"),
    ) in _logged(caplog)
    caplog.clear()
    other = Kbs()
    other.attest = lambda: Resp(403, {"type": "https://kbs/PolicyDeny"})
    with caplog.at_level(logging.INFO, logger=_LOG), pytest.raises(AttestationError):
        client(other).get_resource(R1)
    assert (
        logging.WARNING,
        "kbs attestation rejected url=%s tee=%r status=%d type=%r",
        (URL, "sample", 403, "PolicyDeny"),
    ) in _logged(caplog)


def test_defaults_and_pool_limits() -> None:
    c = KbsClient("https://kbs/pX/", evidence_provider=_ev(), cert_sha256="ab" * 32)
    assert c.base_url == "https://kbs/pX"
    assert (c.timeout, c.retries, c.backoff, c.tee_key_type, c.refresh_margin) == (
        10.0,
        2,
        0.2,
        "ec",
        5.0,
    )
    plain = KbsClient("http://kbs/X", evidence_provider=_ev(), insecure_http=True)
    assert plain.base_url == "http://kbs/X"
    for pool in (c._pool, plain._pool):
        assert pool.pools._maxsize == 2  # type: ignore[attr-defined]
        assert pool.connection_pool_kw["maxsize"] == 8  # type: ignore[attr-defined]


def test_reattestation_and_retry_log_lines(
    kbs: Kbs, caplog: pytest.LogCaptureFixture, sleeps: list[float]
) -> None:
    kbs.resource = [Resp(401, {"type": "https://x/TokenExpired"}), Resp(503, b"")]
    c = client(kbs, retries=1)
    with caplog.at_level(logging.INFO, logger=_LOG):
        c.get_resource(R1)
    got = [(m, tuple(str(a) for a in args)) for _, m, args in _logged(caplog)]
    assert ("kbs token rejected, re-attesting uri=%s type=%s", (R1, "TokenExpired")) in got
    assert ("kbs retry uri=%s attempt=%d", (R1, "1")) in got
