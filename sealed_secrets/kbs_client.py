"""KBS protocol v0.4.0 client (RCAR: Request, Challenge, Attestation, Response).

One client holds at most one attestation token and the TEE key pair it is bound to; the
token is reused for every resource until the KBS rejects it (401) or it nears its ``exp``,
then the client re-attests once. Resources arrive as JWE encrypted to the TEE key, so the
plaintext exists only in this process, even if TLS were terminated elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import http.cookies
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Protocol

import requests
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
from sealed_secrets.jwe import TeeKeyPair
from sealed_secrets.resource_uri import parse_resource_uri

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "0.4.0"
SESSION_COOKIE = "kbs-session-id"
MAX_RESPONSE_BYTES = 8 * 1024 * 1024
_DETAIL_MAX = 200


def _problem(resp: requests.Response) -> tuple[str | None, str]:
    """RFC 7807 ``type`` and a short printable ``detail`` (server-written, no secrets)."""
    try:
        doc = json.loads(resp.content[:65536])
    except (ValueError, UnicodeDecodeError):
        return None, ""
    if not isinstance(doc, dict):
        return None, ""
    ptype = doc.get("type") if isinstance(doc.get("type"), str) else None
    detail = doc.get("detail") if isinstance(doc.get("detail"), str) else ""
    detail = "".join(c for c in detail if c.isprintable())[:_DETAIL_MAX]
    return ptype, detail


def _short_type(ptype: str | None) -> str:
    return ptype.rsplit("/", 1)[-1] if ptype else "-"


def _token_expiry(token: str) -> float | None:
    """``exp`` of a JWT, read without verification: used only to schedule re-attestation."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, binascii.Error, UnicodeDecodeError):
        return None


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
    """

    def __init__(
        self,
        url: str,
        *,
        evidence_provider: EvidenceProvider | None = None,
        token_provider: TokenProvider | None = None,
        ca: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 0.2,
        tee_key_type: str = "ec",
        refresh_margin: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ResolverError(f"KBS URL must be http(s)://host[:port], got {url!r}")
        if parts.query or parts.fragment:
            raise ResolverError("KBS URL must not carry a query or fragment")
        self.base_url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, parts.path.rstrip("/"), "", "")
        )
        if ca is not None and not os.path.isfile(ca):
            raise ResolverError(f"KBS CA file not found: {ca}")
        if parts.scheme == "http":
            log.warning("kbs plain http url=%s (resources stay JWE-encrypted)", self.base_url)
        self.ca = ca
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
        self._http = requests.Session()
        self._http.trust_env = False  # no proxies or netrc credentials from the environment
        self._lock = threading.RLock()
        self._token: _Token | None = None
        self._session_id: str | None = None
        self.attestations = 0

    def __repr__(self) -> str:
        return f"KbsClient(url={self.base_url!r}, attested={self._token is not None})"

    def close(self) -> None:
        self._http.close()

    # --- HTTP plumbing -------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        verify: bool | str = self.ca if self.ca else True
        try:
            resp = self._http.request(
                method,
                url,
                timeout=self.timeout,
                verify=verify,
                allow_redirects=False,
                stream=True,
                **kwargs,
            )
            try:
                body = resp.raw.read(MAX_RESPONSE_BYTES + 1, decode_content=True)
            finally:
                resp.close()
        except requests.exceptions.SSLError:
            log.warning("kbs tls verification failed url=%s ca=%s", url, self.ca or "default")
            raise TlsError(f"KBS TLS verification failed for {url}") from None
        except (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError):
            log.warning("kbs timeout method=%s url=%s timeout=%s", method, url, self.timeout)
            raise KbsUnavailable(f"KBS timed out: {method} {url}") from None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            log.warning("kbs unreachable url=%s error=%s", url, type(exc).__name__)
            raise KbsUnavailable(f"KBS unreachable: {url} ({type(exc).__name__})") from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise BadResponse(f"KBS response too large: {method} {path}")
        resp._content = body  # type: ignore[attr-defined]
        if resp.status_code >= 500:
            ptype, detail = _problem(resp)
            log.warning(
                "kbs server error method=%s path=%s status=%d type=%s",
                method,
                path,
                resp.status_code,
                _short_type(ptype),
            )
            raise KbsUnavailable(
                f"KBS server error {resp.status_code} on {path}: {detail or _short_type(ptype)}",
                status=resp.status_code,
                problem_type=ptype,
            )
        return resp

    @staticmethod
    def _json(resp: requests.Response, what: str) -> Any:
        try:
            return json.loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise BadResponse(f"KBS {what} response is not JSON", status=resp.status_code) from None

    # --- RCAR handshake ------------------------------------------------------------------

    def _auth(self, tee: str) -> tuple[str, str, str]:
        """POST /auth → (session id, nonce, hash algorithm)."""
        body = {
            "version": PROTOCOL_VERSION,
            "tee": tee,
            "extra-params": {"supported-hash-algorithms": list(SUPPORTED_HASHES)},
        }
        resp = self._request("POST", "/kbs/v0/auth", json=body)
        if resp.status_code != 200:
            ptype, detail = _problem(resp)
            raise AttestationError(
                f"KBS /auth rejected: status={resp.status_code} type={_short_type(ptype)} "
                f"detail={detail!r}",
                status=resp.status_code,
                problem_type=ptype,
            )
        challenge = self._json(resp, "/auth")
        nonce = challenge.get("nonce") if isinstance(challenge, dict) else None
        if not isinstance(nonce, str) or not nonce:
            raise BadResponse("KBS challenge lacks a nonce")
        extra = challenge.get("extra-params")
        if isinstance(extra, str) and extra.strip():
            try:
                extra = json.loads(extra)
            except ValueError:
                extra = None
        hash_alg = DEFAULT_HASH
        if isinstance(extra, dict) and extra.get("selected-hash-algorithm"):
            hash_alg = str(extra["selected-hash-algorithm"]).lower()
            if hash_alg not in SUPPORTED_HASHES:
                raise AttestationError(f"KBS selected an unsupported hash algorithm: {hash_alg}")
        session_id = None
        for header in resp.raw.headers.getlist("Set-Cookie") if resp.raw else []:
            jar = http.cookies.SimpleCookie()
            try:
                jar.load(header)
            except http.cookies.CookieError:
                continue
            if SESSION_COOKIE in jar:
                session_id = jar[SESSION_COOKIE].value
        if not session_id:
            raise BadResponse(f"KBS /auth response lacks the {SESSION_COOKIE} cookie")
        return session_id, nonce, hash_alg

    def _attest(self) -> _Token:
        if self.token_provider is not None:
            value, key = self.token_provider.get_token()
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
            primary = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise AttestationError("TEE evidence from the attestation agent is not JSON") from None
        body = {
            "runtime-data": {"nonce": nonce, "tee-pubkey": pub},
            "tee-evidence": {"primary_evidence": primary, "additional_evidence": additional},
        }
        resp = self._request(
            "POST",
            "/kbs/v0/attest",
            json=body,
            headers={"Cookie": f"{SESSION_COOKIE}={session_id}"},
        )
        if resp.status_code != 200:
            ptype, detail = _problem(resp)
            log.warning(
                "kbs attestation rejected url=%s tee=%s status=%d type=%s",
                self.base_url,
                tee,
                resp.status_code,
                _short_type(ptype),
            )
            raise AttestationError(
                f"KBS rejected the attestation: status={resp.status_code} "
                f"type={_short_type(ptype)} detail={detail!r}",
                status=resp.status_code,
                problem_type=ptype,
            )
        doc = self._json(resp, "/attest")
        token = doc.get("token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise BadResponse("KBS /attest response lacks a token")
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
        status = resp.status_code
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
