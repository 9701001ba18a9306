"""KBS protocol v0.4.0 client (RCAR: Request, Challenge, Attestation, Response).

One client holds at most one attestation token and the TEE key pair it is bound to; the
token is reused for every resource until the KBS rejects it (401) or it nears its ``exp``,
then the client re-attests once. Resources arrive as JWE encrypted to the TEE key, so the
plaintext exists only in this process, even if TLS were terminated elsewhere.

Why the server must be authenticated although resources are encrypted: the ``tee-pubkey`` the
guest sends is public. Whoever answers as the KBS can skip attestation, encrypt a key *it*
chose to that public key, and the guest would initialise a volume with it, readable offline
by the impostor. So ``http://`` is refused unless ``insecure_http`` says otherwise, and an
``https://`` KBS is verified only against what the guest's own configuration pins: a CA
bundle (``ca``/``ca_pem``, which may hold the KBS's self-signed certificate itself) and/or
the SHA-256 fingerprint of its certificate (``cert_sha256``). The system trust store is never
used: its content and the name resolution behind a public certificate are not the tenant's.
"""

from __future__ import annotations

import base64
import binascii
import http.cookies
import json
import logging
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import urllib3

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
from sealed_secrets.evidence import (
    DEFAULT_HASH,
    SUPPORTED_HASHES,
    EvidenceProvider,
    report_data_binding,
)
from sealed_secrets.files import read_small_file
from sealed_secrets.jwe import TeeKeyPair
from sealed_secrets.resource_uri import parse_resource_uri

# urllib3 types the pool of a ReadTimeoutError; a body read past its deadline has none at hand.
_NO_POOL = cast(Any, None)

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "0.4.0"
SESSION_COOKIE = "kbs-session-id"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
MAX_CA_BYTES = 1024 * 1024
_DETAIL_MAX = 200
_CHUNK = 64 * 1024
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# What may be echoed back into a request header: a hostile KBS must not be able to smuggle
# CR/LF or other header syntax into our next request (http.client would raise untyped).
_COOKIE_VALUE = re.compile(r"[A-Za-z0-9._~+/=-]{1,512}")
_TOKEN_VALUE = re.compile(r"[A-Za-z0-9._~+/=-]{1,65536}")
MAX_NONCE = 1024
INSECURE_HTTP_REFUSED = (
    "refusing plain http:// KBS URL {url}: without TLS anything on the network path (the "
    "host) can answer as the KBS, skip attestation and hand the guest a key of its choosing "
    "(encrypted to the public tee-pubkey). Use https:// with a pinned ca= or cert-sha256=, "
    "or set insecure-http=true for tests only"
)
NO_TRUST_ANCHOR = (
    "KBS URL {url} needs a pinned trust anchor: ca=/path/ca.pem (a CA bundle or the KBS "
    "certificate itself), cert-sha256=<hex fingerprint>, or kbs:cdh-config with kbs_cert; "
    "the system trust store is never used"
)


def _loads(data: bytes | str) -> Any:
    """json.loads that turns every failure, deep nesting included, into ValueError."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("not JSON") from None


@dataclass(frozen=True)
class _Reply:
    """What the client keeps of one HTTP response (body already read, size-capped)."""

    status: int
    content: bytes
    headers: Any  # urllib3 HTTPHeaderDict (getlist for Set-Cookie)


def _problem(resp: _Reply) -> tuple[str | None, str]:
    """RFC 7807 ``type`` and a short printable ``detail`` (server-written, no secrets)."""
    try:
        doc = _loads(resp.content[:65536])
    except ValueError:
        return None, ""
    if not isinstance(doc, dict):
        return None, ""
    raw_type, raw_detail = doc.get("type"), doc.get("detail")
    ptype = raw_type if isinstance(raw_type, str) else None
    detail = raw_detail if isinstance(raw_detail, str) else ""
    detail = "".join(c for c in detail if c.isprintable())[:_DETAIL_MAX]
    if ptype is not None:
        ptype = "".join(c for c in ptype if c.isprintable())[:_DETAIL_MAX]
    return ptype, detail


def _short_type(ptype: str | None) -> str:
    return ptype.rsplit("/", 1)[-1] if ptype else "-"


def _token_expiry(token: str) -> float | None:
    """``exp`` of a JWT, read without verification: used only to schedule re-attestation."""
    try:
        payload = token.split(".")[1]
        claims = _loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, OverflowError, binascii.Error):
        return None


def load_ca_pem(path: str) -> str:
    """The PEM text of a pinned CA bundle file (bounded, no symlinks); raise ResolverError."""
    raw = read_small_file(path, limit=MAX_CA_BYTES, what="KBS CA file")
    try:
        return check_ca_pem(raw.decode("ascii"), what=f"KBS CA file {path}")
    except UnicodeDecodeError:
        raise ResolverError(f"KBS CA file {path} is not PEM text") from None


def check_ca_pem(pem: str, *, what: str) -> str:
    """Make sure ``pem`` holds at least one certificate OpenSSL accepts as a trust anchor."""
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ResolverError(f"{what} holds no PEM certificate")
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError):
        raise ResolverError(f"{what} holds no usable PEM certificate") from None
    return pem


def _normalise_fingerprint(value: str) -> str:
    text = value.strip().lower().replace(":", "")
    if not _SHA256_HEX.fullmatch(text):
        raise ResolverError("cert-sha256 must be the 64 hex digits of the certificate's SHA-256")
    return text


def _tls_options(ca_pem: str | None, fingerprint: str | None) -> dict[str, Any]:
    """urllib3 pool options that trust exactly the pinned anchors (never the system store).

    The context is built here, with the anchors loaded once, so urllib3 never falls back to
    its default CA loading. OpenSSL's partial-chain flag lets a pinned certificate that is
    not a self-signed root (e.g. CDH's ``kbs_cert`` being the KBS leaf) anchor the chain.
    A fingerprint alone is the whole trust: then neither chain nor host name is consulted.
    """
    from urllib3.util.ssl_ import create_urllib3_context

    cert_reqs = ssl.CERT_REQUIRED if ca_pem is not None else ssl.CERT_NONE
    ctx = create_urllib3_context(ssl_minimum_version=ssl.TLSVersion.TLSv1_2, cert_reqs=cert_reqs)
    if ca_pem is not None:
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)
        ctx.load_verify_locations(cadata=ca_pem)
    opts: dict[str, Any] = {"ssl_context": ctx, "cert_reqs": cert_reqs}
    if fingerprint is not None:
        opts["assert_fingerprint"] = fingerprint
    return opts


class _Token:
    """The attestation token and the TEE key it is bound to; repr never shows either."""

    __slots__ = ("value", "key", "expires_at")

    def __init__(self, value: str, key: TeeKeyPair, expires_at: float | None) -> None:
        self.value = value
        self.key = key
        self.expires_at = expires_at

    def __repr__(self) -> str:
        return f"_Token(expires_at={self.expires_at})"


class _Reattest(Exception):
    """Internal: the KBS rejected our token (401)."""

    def __init__(self, ptype: str | None, detail: str) -> None:
        super().__init__(ptype)
        self.ptype = ptype
        self.detail = detail


class TokenProvider(Protocol):
    """Source of a ready attestation token plus the TEE key it is bound to (AA GetToken)."""

    def get_token(self) -> tuple[str, TeeKeyPair]: ...


class KbsClient:
    """Fetch KBS resources with an attestation token.

    The token comes either from our own RCAR handshake with evidence from an
    EvidenceProvider (the AA's GetEvidence), or ready-made from a TokenProvider (the AA's
    GetToken("kbs"), where the AA runs the handshake), as CoCo's kbs_protocol offers both.

    Server authentication (see the module docstring): ``ca`` (path) or ``ca_pem`` (text) pin
    trust anchors, ``cert_sha256`` pins the server certificate; an https URL needs at least
    one. ``insecure_http=True`` is required for an ``http://`` URL and allowed only there.
    """

    def __init__(
        self,
        url: str,
        *,
        evidence_provider: EvidenceProvider | None = None,
        token_provider: TokenProvider | None = None,
        ca: str | None = None,
        ca_pem: str | None = None,
        cert_sha256: str | None = None,
        insecure_http: bool = False,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.2,
        tee_key_type: str = "ec",
        refresh_margin: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(url, str):
            raise ResolverError("KBS URL must be a string")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ResolverError(f"KBS URL must be https://host[:port], got {url!r}")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ResolverError("KBS URL must not carry credentials, a query or a fragment")
        self.base_url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")
        )
        if ca is not None and ca_pem is not None:
            raise ResolverError("give the KBS trust anchors once: ca= or ca_pem, not both")
        if ca is not None:
            ca_pem = load_ca_pem(ca)
        elif ca_pem is not None:
            ca_pem = check_ca_pem(ca_pem, what="KBS certificate (kbs_cert)")
        fingerprint = _normalise_fingerprint(cert_sha256) if cert_sha256 else None
        if parts.scheme == "http":
            if not insecure_http:
                raise ResolverError(INSECURE_HTTP_REFUSED.format(url=self.base_url))
            if ca_pem is not None or fingerprint is not None:
                raise ResolverError("ca= and cert-sha256= need an https:// KBS URL")
            log.warning(
                "kbs INSECURE plain http url=%s: the KBS is not authenticated and any host "
                "on the path can inject keys (insecure-http=true; tests only)",
                self.base_url,
            )
            self._pool = urllib3.PoolManager(num_pools=2, maxsize=8)
        else:
            if insecure_http:
                raise ResolverError("insecure-http applies only to http:// KBS URLs")
            if ca_pem is None and fingerprint is None:
                raise ResolverError(NO_TRUST_ANCHOR.format(url=self.base_url))
            self._pool = urllib3.PoolManager(
                num_pools=2, maxsize=8, **_tls_options(ca_pem, fingerprint)
            )
        self.ca = ca
        self.trust = (
            "insecure-http"
            if parts.scheme == "http"
            else "+".join(n for n, v in (("ca", ca_pem), ("cert-sha256", fingerprint)) if v)
        )
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        self.tee_key_type = tee_key_type.lower()
        if self.tee_key_type not in ("ec", "rsa"):
            raise ResolverError(f"tee_key_type must be 'ec' or 'rsa', not {tee_key_type!r}")
        self.refresh_margin = refresh_margin
        if (evidence_provider is None) == (token_provider is None):
            raise ResolverError("KbsClient needs exactly one of evidence_provider, token_provider")
        self.evidence_provider = evidence_provider
        self.token_provider = token_provider
        self._clock = clock
        self._lock = threading.RLock()
        self._token: _Token | None = None
        self._session_id: str | None = None
        self.attestations = 0

    def __repr__(self) -> str:
        return f"KbsClient(url={self.base_url!r}, attested={self._token is not None})"

    def close(self) -> None:
        self._pool.clear()

    # --- HTTP plumbing -------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        """One request, no redirects, no proxies, no compression; body capped in size and time.

        urllib3 is used directly (not requests) so that nothing from the environment (proxy
        variables, netrc, the system CA store) can take part in reaching the KBS.
        """
        url = self.base_url + path
        hdrs = {"Accept": "application/json", "Accept-Encoding": "identity"}
        hdrs.update(headers or {})
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        deadline = time.monotonic() + 3 * self.timeout
        try:
            resp = self._pool.request(
                method,
                url,
                body=body,
                headers=hdrs,
                timeout=urllib3.Timeout(connect=self.timeout, read=self.timeout),
                retries=False,
                redirect=False,
                preload_content=False,
                decode_content=False,
            )
            try:
                encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise BadResponse(f"KBS response is compressed ({encoding[:20]!r})")
                chunks: list[bytes] = []
                size = 0
                while size <= MAX_RESPONSE_BYTES:
                    chunk = resp.read(_CHUNK, decode_content=False)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                    if time.monotonic() > deadline:
                        raise urllib3.exceptions.ReadTimeoutError(_NO_POOL, url, "body too slow")
            finally:
                resp.release_conn()
        except urllib3.exceptions.SSLError:
            log.warning("kbs tls verification failed url=%s trust=%s", url, self.trust)
            raise TlsError(f"KBS TLS verification failed for {url} (trust: {self.trust})") from None
        except urllib3.exceptions.NewConnectionError as exc:  # (a ConnectTimeoutError subclass)
            log.warning("kbs unreachable url=%s error=%s", url, type(exc).__name__)
            raise KbsUnavailable(f"KBS unreachable: {url} ({type(exc).__name__})") from None
        except urllib3.exceptions.TimeoutError:
            log.warning("kbs timeout method=%s url=%s timeout=%s", method, url, self.timeout)
            raise KbsUnavailable(f"KBS timed out: {method} {url}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("kbs unreachable url=%s error=%s", url, type(exc).__name__)
            raise KbsUnavailable(f"KBS unreachable: {url} ({type(exc).__name__})") from None
        if size > MAX_RESPONSE_BYTES:
            raise BadResponse(f"KBS response too large: {method} {path}")
        reply = _Reply(resp.status, b"".join(chunks), resp.headers)
        if reply.status >= 500:
            ptype, detail = _problem(reply)
            log.warning(
                "kbs server error method=%s path=%s status=%d type=%r",
                method,
                path,
                reply.status,
                _short_type(ptype),
            )
            raise KbsUnavailable(
                f"KBS server error {reply.status} on {path}: {detail or _short_type(ptype)}",
                status=reply.status,
                problem_type=ptype,
            )
        return reply

    @staticmethod
    def _json(resp: _Reply, what: str) -> Any:
        try:
            return _loads(resp.content)
        except ValueError:
            raise BadResponse(f"KBS {what} response is not JSON", status=resp.status) from None

    # --- RCAR handshake ------------------------------------------------------------------

    def _auth(self, tee: str) -> tuple[str, str, str]:
        """POST /auth → (session id, nonce, hash algorithm)."""
        body = {
            "version": PROTOCOL_VERSION,
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": list(SUPPORTED_HASHES)},
        }
        resp = self._request("POST", "/kbs/v0/auth", json_body=body)
        if resp.status != 200:
            ptype, detail = _problem(resp)
            raise AttestationError(
                f"KBS /auth rejected: status={resp.status} type={_short_type(ptype)} "
                f"detail={detail!r}",
                status=resp.status,
                problem_type=ptype,
            )
        challenge = self._json(resp, "/auth")
        nonce = challenge.get("nonce") if isinstance(challenge, dict) else None
        if not isinstance(nonce, str) or not nonce or len(nonce) > MAX_NONCE:
            raise BadResponse("KBS challenge lacks a nonce (or it is longer than 1024)")
        extra = challenge.get("extra-params")
        if isinstance(extra, str) and extra.strip():
            try:
                extra = _loads(extra)
            except ValueError:
                extra = None
        hash_alg = DEFAULT_HASH
        if isinstance(extra, dict) and extra.get("selected-hash-algorithm"):
            hash_alg = str(extra["selected-hash-algorithm"]).lower()
            if hash_alg not in SUPPORTED_HASHES:
                raise AttestationError(
                    f"KBS selected an unsupported hash algorithm: {hash_alg[:20]!r}"
                )
        session_id = None
        for header in resp.headers.getlist("Set-Cookie"):
            jar = http.cookies.SimpleCookie()
            try:
                jar.load(header)
            except http.cookies.CookieError:
                continue
            if SESSION_COOKIE in jar:
                session_id = jar[SESSION_COOKIE].value
        if not session_id or not _COOKIE_VALUE.fullmatch(session_id):
            raise BadResponse(f"KBS /auth response lacks a usable {SESSION_COOKIE} cookie")
        return session_id, nonce, hash_alg

    def _attest(self) -> _Token:
        if self.token_provider is not None:
            value, key = self.token_provider.get_token()
            if not _TOKEN_VALUE.fullmatch(value):
                raise AttestationError("attestation agent token has characters a JWT cannot")
            self.attestations += 1
            log.info("kbs token from provider url=%s key=%s", self.base_url, key.alg)
            return _Token(value, key, _token_expiry(value))
        started = time.monotonic()
        provider = self.evidence_provider
        assert provider is not None
        tee = provider.tee_type()
        session_id, nonce, hash_alg = self._auth(tee)
        key = TeeKeyPair(self.tee_key_type)
        pub = key.public_jwk()
        additional = provider.additional_evidence(report_data_binding(nonce, pub, None, hash_alg))
        report_data = report_data_binding(nonce, pub, additional, hash_alg)
        raw = provider.primary_evidence(report_data)
        try:
            primary = _loads(raw)
        except ValueError:
            raise AttestationError("TEE evidence from the attestation agent is not JSON") from None
        if not isinstance(primary, dict):
            # The protocol carries evidence as a JSON object; a string would make the verifier
            # parse it a second time, and a KBS that tolerates that is not what we talk to.
            raise AttestationError("TEE evidence from the attestation agent is not a JSON object")
        body = {
            "runtime-data": {"nonce": nonce, "tee-pubkey": pub},
            "tee-evidence": {"primary_evidence": primary, "additional_evidence": additional},
        }
        resp = self._request(
            "POST",
            "/kbs/v0/attest",
            json_body=body,
            headers={"Cookie": f"{SESSION_COOKIE}={session_id}"},
        )
        if resp.status != 200:
            ptype, detail = _problem(resp)
            log.warning(
                "kbs attestation rejected url=%s tee=%r status=%d type=%r",
                self.base_url,
                tee,
                resp.status,
                _short_type(ptype),
            )
            raise AttestationError(
                f"KBS rejected the attestation: status={resp.status} "
                f"type={_short_type(ptype)} detail={detail!r}",
                status=resp.status,
                problem_type=ptype,
            )
        doc = self._json(resp, "/attest")
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not _TOKEN_VALUE.fullmatch(token):
            raise BadResponse("KBS /attest response lacks a usable token")
        self._session_id = session_id
        self.attestations += 1
        tok = _Token(token, key, _token_expiry(token))
        log.info(
            "kbs attested url=%s tee=%s hash=%s key=%s ms=%d",
            self.base_url,
            tee,
            hash_alg,
            key.alg,
            int((time.monotonic() - started) * 1000),
        )
        return tok

    def _valid_token(self) -> _Token:
        tok = self._token
        if (
            tok is not None
            and tok.expires_at is not None
            and self._clock() >= tok.expires_at - self.refresh_margin
        ):
            log.info("kbs token expiring, re-attesting url=%s", self.base_url)
            tok = None
        if tok is None:
            tok = self._token = self._attest()
        return tok

    def attest(self) -> None:
        """Force a fresh RCAR handshake (normally done lazily)."""
        with self._lock:
            self._token = None
            self._valid_token()

    # --- resources -----------------------------------------------------------------------

    def _fetch(self, path: str, tok: _Token) -> bytes:
        headers = {"Authorization": f"Bearer {tok.value}"}
        if self._session_id:
            headers["Cookie"] = f"{SESSION_COOKIE}={self._session_id}"
        resp = self._request("GET", path, headers=headers)
        status = resp.status
        if status == 200:
            return tok.key.decrypt(self._json(resp, "resource"))
        ptype, detail = _problem(resp)
        if status == 401:
            raise _Reattest(ptype, detail)
        short = _short_type(ptype)
        if status == 403:
            raise PolicyDenied(
                f"KBS policy denied {path}: {detail or short}", status=status, problem_type=ptype
            )
        if status == 404:
            raise ResourceNotFound(
                f"KBS has no resource {path}: {detail or short}", status=status, problem_type=ptype
            )
        raise KbsError(
            f"KBS refused {path}: status={status} type={short} detail={detail!r}",
            status=status,
            problem_type=ptype,
        )

    def get_resource(self, uri: str) -> bytes:
        """Fetch and decrypt one resource; raise a KbsError subclass on failure."""
        parsed = parse_resource_uri(uri)
        path = parsed.kbs_path() + (f"?{parsed.query}" if parsed.query else "")
        attempt = 0
        reattested = False
        with self._lock:
            while True:
                try:
                    tok = self._valid_token()
                    value = self._fetch(path, tok)
                    log.info("kbs resource ok uri=%s bytes=%d", parsed, len(value))
                    return value
                except _Reattest as rej:
                    self._token = None
                    if reattested:
                        status_cls = (
                            PolicyDenied if _short_type(rej.ptype) == "PolicyDeny" else Unauthorized
                        )
                        raise status_cls(
                            f"KBS rejected a fresh token for {parsed}: "
                            f"type={_short_type(rej.ptype)} detail={rej.detail!r}",
                            status=401,
                            problem_type=rej.ptype,
                        ) from None
                    reattested = True
                    log.info(
                        "kbs token rejected, re-attesting uri=%s type=%s",
                        parsed,
                        _short_type(rej.ptype),
                    )
                except KbsUnavailable:
                    if attempt >= self.retries:
                        raise
                    attempt += 1
                    time.sleep(self.backoff * attempt)
                    log.info("kbs retry uri=%s attempt=%d", parsed, attempt)
