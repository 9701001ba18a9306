"""Protocol-level fake of Alibaba Cloud KMS (OpenAPI 2016-01-20, RPC style) for tests only.

Speaks what the official SDK speaks: HTTPS POST `/` with the action in `x-acs-action` and
parameters in the query string, signed with ACS3-HMAC-SHA256 (Alibaba Cloud "V3 signature":
canonical request = method, URI, sorted RFC 3986-encoded query, the headers named in
SignedHeaders, the list itself, hex SHA-256 of the body; HMAC-SHA256 with the AccessKey
secret). The signature is verified here, so a test passing means the SDK really signed a
request this server could authenticate. Like the real service, a request is also refused when
its signed ``x-acs-date`` is more than 15 minutes off (``InvalidTimeStamp.Expired``) or its
signed ``x-acs-signature-nonce`` was seen before in that window (``SignatureNonceUsed``), so
replayed or pre-signed requests fail here as they would in production. Responses and errors
use the documented JSON members (`CiphertextBlob`, `Plaintext`, `KeyId`, `KeyVersionId`,
`SecretData`, `SecretDataType`, `RequestId`; errors `Code`, `Message`, `RequestId`, `HostId`).

Supported actions: Encrypt, Decrypt, GetSecretValue. CiphertextBlob here is
base64(key-uuid ‖ nonce ‖ AES-256-GCM): opaque to clients, as in the real service.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.peers.tls import ServedHttp, make_server_tls

MAX_CLOCK_SKEW = 15 * 60  # seconds either way, as the real OpenAPI gateway allows
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # ISO 8601 UTC, what the SDK sends in x-acs-date


def _quote(s: str) -> str:
    return urllib.parse.quote(s, safe="~")


def make_tls(dirpath: str, ca_name: str = "PrivateKmsCA_kst-test.pem") -> tuple[str, str, str]:
    """A CA (named as the KMS instance CA file) + server cert → (ca_path, cert, key)."""
    return make_server_tls(
        dirpath,
        ca_cn="fake KMS CA",
        ca_file=ca_name,
        cert_file="kms-server.pem",
        key_file="kms-server.key",
        key_ids=False,
    )


class KmsError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code)
        self.status, self.code, self.message = status, code, message


@dataclass
class KmsState:
    """Keys, secrets and credentials of the fake account; requests are recorded."""

    # AccessKeyId -> (secret, required STS token or None)
    credentials: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)  # key_id -> AES-256 key
    key_uuid: dict[str, str] = field(default_factory=dict)  # uuid -> key_id
    secrets: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (data, type)
    requests: list[dict[str, Any]] = field(default_factory=list)
    raw_requests: list[bytes] = field(default_factory=list)
    nonces: dict[str, float] = field(default_factory=dict)  # nonce -> when first seen
    nonce_lock: threading.Lock = field(default_factory=threading.Lock)

    def fresh_nonce(self, nonce: str, now: float) -> bool:
        """Record ``nonce``; False if it was already used within the replay window."""
        with self.nonce_lock:
            for old in [n for n, t in self.nonces.items() if now - t > 2 * MAX_CLOCK_SKEW]:
                del self.nonces[old]
            if nonce in self.nonces:
                return False
            self.nonces[nonce] = now
            return True

    def add_key(self, key_id: str) -> None:
        self.keys[key_id] = AESGCM.generate_key(256)
        self.key_uuid[uuid.uuid5(uuid.NAMESPACE_URL, key_id).hex] = key_id


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json;charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        request_id = str(uuid.uuid4()).upper()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        st = self.server.state
        st.raw_requests.append(self.path.encode() + b"\n" + bytes(self.headers) + body)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if body and "x-www-form-urlencoded" in (self.headers.get("Content-Type") or ""):
            query.update(urllib.parse.parse_qsl(body.decode(), keep_blank_values=True))
        action = self.headers.get("x-acs-action", "")
        st.requests.append({"action": action, "query": dict(query)})
        try:
            self._authenticate(url, body)
            if self.headers.get("x-acs-version") != "2016-01-20":
                raise KmsError(400, "InvalidVersion", "Specified parameter Version is not valid.")
            handler = {
                "Encrypt": self._encrypt,
                "Decrypt": self._decrypt,
                "GetSecretValue": self._get_secret_value,
            }.get(action)
            if handler is None:
                raise KmsError(404, "InvalidAction.NotFound", "Specified api is not found.")
            result = handler(query)
        except KmsError as e:
            self._reply(
                e.status,
                {
                    "RequestId": request_id,
                    "HostId": "kms.fake",
                    "Code": e.code,
                    "Message": e.message,
                },
            )
            return
        result["RequestId"] = request_id
        self._reply(200, result)

    def _authenticate(self, url: urllib.parse.SplitResult, body: bytes) -> None:
        auth = self.headers.get("Authorization") or ""
        algo, _, rest = auth.partition(" ")
        if algo != "ACS3-HMAC-SHA256":
            raise KmsError(400, "IncompleteSignature", "The request signature is incomplete.")
        parts = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
        ak, signed, sig = (
            parts.get("Credential"),
            parts.get("SignedHeaders"),
            parts.get("Signature"),
        )
        if not ak or not signed or not sig:
            raise KmsError(400, "IncompleteSignature", "The request signature is incomplete.")
        if ak not in self.server.state.credentials:
            raise KmsError(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        secret, token = self.server.state.credentials[ak]
        if token is not None and self.headers.get("x-acs-security-token") != token:
            raise KmsError(400, "InvalidSecurityToken.Mismatch", "Security token mismatch.")
        names = signed.split(";")
        required = ("host", "x-acs-action", "x-acs-date", "x-acs-signature-nonce")
        if any(n not in names for n in required):
            raise KmsError(400, "IncompleteSignature", "Required headers are not signed.")
        payload_hash = hashlib.sha256(body).hexdigest()
        if self.headers.get("x-acs-content-sha256") != payload_hash:
            raise KmsError(400, "IncompleteSignature", "Content hash mismatch.")
        pairs = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
        canon_query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(pairs))
        canon_headers = "".join(
            f"{n}:{','.join(sorted(v.strip() for v in self.headers.get_all(n) or []))}\n"
            for n in names
        )
        canonical = "\n".join(
            ["POST", url.path or "/", canon_query, canon_headers, signed, payload_hash]
        )
        to_sign = "ACS3-HMAC-SHA256\n" + hashlib.sha256(canonical.encode()).hexdigest()
        want = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig):
            raise KmsError(
                400, "SignatureDoesNotMatch", "Specified signature is not matched with our calc."
            )
        self._check_freshness()

    def _check_freshness(self) -> None:
        """Date within 15 minutes of now, nonce never seen: what stops replays for real."""
        now = time.time()
        try:
            date = datetime.strptime(self.headers.get("x-acs-date") or "", DATE_FORMAT)
        except ValueError:
            raise KmsError(
                400,
                "InvalidTimeStamp.Format",
                "Specified time stamp or date value is not well formatted.",
            ) from None
        if abs(now - date.replace(tzinfo=UTC).timestamp()) > MAX_CLOCK_SKEW:
            raise KmsError(
                400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired."
            )
        nonce = self.headers.get("x-acs-signature-nonce") or ""
        if not nonce:
            raise KmsError(400, "MissingSignatureNonce", "SignatureNonce is mandatory.")
        if not self.server.state.fresh_nonce(nonce, now):
            raise KmsError(400, "SignatureNonceUsed", "Specified signature nonce was used already.")

    def _key(self, key_id: str | None) -> tuple[str, bytes]:
        st = self.server.state
        if not key_id or key_id not in st.keys:
            raise KmsError(404, "Forbidden.KeyNotFound", "The specified Key is not found.")
        return key_id, st.keys[key_id]

    def _encrypt(self, q: dict[str, str]) -> dict[str, Any]:
        key_id, key = self._key(q.get("KeyId"))
        if "Plaintext" not in q:
            raise KmsError(400, "MissingParameter", "Plaintext is mandatory for this action.")
        nonce = os.urandom(12)
        kid = uuid.uuid5(uuid.NAMESPACE_URL, key_id).bytes
        ct = AESGCM(key).encrypt(nonce, q["Plaintext"].encode(), kid)
        blob = base64.b64encode(kid + nonce + ct).decode()
        return {"CiphertextBlob": blob, "KeyId": key_id, "KeyVersionId": "v1"}

    def _decrypt(self, q: dict[str, str]) -> dict[str, Any]:
        try:
            raw = base64.b64decode(q.get("CiphertextBlob", ""), validate=True)
        except ValueError:
            raise KmsError(400, "InvalidParameter", "CiphertextBlob is invalid.") from None
        if len(raw) < 16 + 12 + 16:
            raise KmsError(400, "InvalidCiphertext", "The ciphertext is invalid.")
        key_id = self.server.state.key_uuid.get(raw[:16].hex())
        key_id, key = self._key(key_id)
        try:
            pt = AESGCM(key).decrypt(raw[16:28], raw[28:], raw[:16])
        except Exception:
            raise KmsError(400, "InvalidCiphertext", "The ciphertext is invalid.") from None
        return {"Plaintext": pt.decode(), "KeyId": key_id, "KeyVersionId": "v1"}

    def _get_secret_value(self, q: dict[str, str]) -> dict[str, Any]:
        name = q.get("SecretName", "")
        if name not in self.server.state.secrets:
            raise KmsError(404, "Forbidden.ResourceNotFound", "The resource is not found.")
        stage = q.get("VersionStage") or "ACSCurrent"
        if stage != "ACSCurrent":
            raise KmsError(404, "Forbidden.ResourceNotFound", "The version is not found.")
        data, kind = self.server.state.secrets[name]
        return {
            "SecretName": name,
            "VersionId": "v1",
            "CreateTime": "2026-01-01T00:00:00Z",
            "SecretData": data,
            "SecretDataType": kind,
            "VersionStages": {"VersionStage": ["ACSCurrent"]},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: KmsState


class FakeKms:
    """HTTPS server on 127.0.0.1:<random>; use as a context manager."""

    def __init__(self, tls_dir: str) -> None:
        self.ca_path, cert, key = make_tls(tls_dir)
        self.state = KmsState()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state
        self._served = ServedHttp(self._httpd, (cert, key))
        self.endpoint = f"127.0.0.1:{self._served.port}"

    def __enter__(self) -> FakeKms:
        self._served.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.stop()
