"""A KBS (Trustee) test peer speaking KBS protocol v0.4.0 over HTTP(S) on 127.0.0.1.

Implements /kbs/v0/auth, /attest and GET /resource/<repo>/<type>/<tag> with:
- sessions keyed by the ``kbs-session-id`` cookie and a configurable timeout;
- the sample-TEE verifier: base64-decoded ``report_data`` must equal
  HASH(JCS({"additional-evidence", "nonce", "tee-pubkey"})) for the nonce it issued, and
  every additional device's ``report_data`` must equal HASH(JCS({"nonce", "tee-pubkey"}));
- strictness a lenient peer would hide client bugs behind: evidence must be a JSON object
  (not a JSON string of one), ``additional_evidence`` a string, and each nonce is good for
  one /attest only (a replayed nonce, in its own session or another, is refused);
- a request log (method and full path, query included) for "nothing was sent" assertions,
  and the attestation bodies it received;
- an impostor mode (``impostor=<key>``): the attack of a host that answers as the KBS. It
  skips every attestation check and returns its own key, encrypted to whatever tee-pubkey
  the guest sent, for any resource;
- ES256 attestation tokens (JWT) carrying the tee-pubkey, accepted as Bearer tokens;
- per-resource policy (fnmatch patterns on ``repo/type/tag``);
- resources encrypted to the tee-pubkey as flattened JWE (ECDH-ES+A256KW or RSA-OAEP-256,
  A256GCM, AAD = the protected b64url string). The JWE is built here directly with
  ``cryptography`` (not jwcrypto), so the client's JOSE library is checked against an
  independent implementation of RFC 7516/7518;
- RFC 7807 problem bodies; fault injection (status codes, delays, corrupt JWE).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import http.server
import json
import os
import secrets
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from tests.peers.tls import ServedHttp, make_server_tls

ERROR_PREFIX = "https://github.com/confidential-containers/kbs/errors/"
COOKIE = "kbs-session-id"
HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_dec(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- JWE (RFC 7516 flattened JSON, RFC 7518 algorithms) -----------------------------------


def _concat_kdf_otherinfo(alg: str, bits: int) -> bytes:
    alg_id = alg.encode()
    return (
        struct.pack(">I", len(alg_id))
        + alg_id
        + struct.pack(">I", 0)  # PartyUInfo (apu) empty
        + struct.pack(">I", 0)  # PartyVInfo (apv) empty
        + struct.pack(">I", bits)  # SuppPubInfo: keydatalen
    )


def jwe_encrypt(plaintext: bytes, tee_pubkey: dict[str, Any]) -> dict[str, str]:
    """Encrypt to a tee-pubkey JWK exactly as the KBS resource response does."""
    alg = tee_pubkey.get("alg")
    cek = AESGCM.generate_key(bit_length=256)
    header: dict[str, Any] = {"alg": alg, "enc": "A256GCM"}
    if tee_pubkey.get("kty") == "EC" and alg == "ECDH-ES+A256KW":
        curves = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}
        curve = curves[tee_pubkey["crv"]]
        size = (curve.key_size + 7) // 8
        peer = ec.EllipticCurvePublicNumbers(
            int.from_bytes(b64u_dec(tee_pubkey["x"]), "big"),
            int.from_bytes(b64u_dec(tee_pubkey["y"]), "big"),
            curve,
        ).public_key()
        eph = ec.generate_private_key(curve)
        z = eph.exchange(ec.ECDH(), peer)
        kek = ConcatKDFHash(hashes.SHA256(), 32, _concat_kdf_otherinfo(alg, 256)).derive(z)
        encrypted_key = aes_key_wrap(kek, cek)
        nums = eph.public_key().public_numbers()
        header["epk"] = {
            "crv": tee_pubkey["crv"],
            "kty": "EC",
            "x": b64u(nums.x.to_bytes(size, "big")),
            "y": b64u(nums.y.to_bytes(size, "big")),
        }
    elif tee_pubkey.get("kty") == "RSA" and alg == "RSA-OAEP-256":
        pub = rsa.RSAPublicNumbers(
            int.from_bytes(b64u_dec(tee_pubkey["e"]), "big"),
            int.from_bytes(b64u_dec(tee_pubkey["n"]), "big"),
        ).public_key()
        encrypted_key = pub.encrypt(
            cek,
            padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
        )
    else:
        raise ValueError(f"unsupported tee-pubkey kty={tee_pubkey.get('kty')} alg={alg}")
    protected = b64u(json.dumps(header, separators=(",", ":")).encode())
    iv = os.urandom(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {
        "protected": protected,
        "encrypted_key": b64u(encrypted_key),
        "iv": b64u(iv),
        "ciphertext": b64u(sealed[:-16]),
        "tag": b64u(sealed[-16:]),
    }


# --- TLS material -------------------------------------------------------------------------


def make_tls_material(directory: str) -> tuple[str, str, str]:
    """Create a CA and a server cert for 127.0.0.1/localhost; returns (ca, cert, key) paths."""
    return make_server_tls(directory, ca_cn="test-kbs-ca")


# --- the server ---------------------------------------------------------------------------


@dataclass
class Session:
    nonce: str
    tee: str
    hash_alg: str
    expires: float
    attested: bool = False
    tee_pubkey: dict[str, Any] | None = None


@dataclass
class Fault:
    kind: str  # "status" | "delay" | "slow_body" | "bad_jwe" | "not_json"
    value: Any = None


class KbsError(Exception):
    def __init__(self, status: int, etype: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.etype, self.detail = status, etype, detail


@dataclass
class KbsState:
    resources: dict[str, bytes]
    session_timeout: float
    token_ttl: float
    deny: list[str]
    allow: list[str] | None
    selected_hash: str | None
    tees: tuple[str, ...]
    sessions: dict[str, Session] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    seen_auth_headers: list[str] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    attestations: list[Any] = field(default_factory=list)
    impostor: bytes | None = None
    used_nonces: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    signing_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )


def _jwt_sign(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any]) -> str:
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    head = b64u(json.dumps({"alg": "ES256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = b64u(json.dumps(claims, separators=(",", ":")).encode())
    der = key.sign(f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{head}.{body}.{b64u(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def _jwt_verify(key: ec.EllipticCurvePrivateKey, token: str) -> dict[str, Any] | None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    try:
        head, body, sig = token.split(".")
        raw = b64u_dec(sig)
        der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
        key.public_key().verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
        claims = json.loads(b64u_dec(body))
    except (ValueError, InvalidSignature):
        return None
    if not isinstance(claims, dict) or claims.get("exp", 0) <= time.time():
        return None
    return claims


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass

    # plumbing
    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json", headers)

    def _problem(self, err: KbsError) -> None:
        self._json(err.status, {"type": ERROR_PREFIX + err.etype, "detail": err.detail})

    def _body(self) -> Any:
        try:
            return json.loads(self._raw)
        except ValueError:
            raise KbsError(400, "InvalidRequest", "request body is not JSON") from None

    def _session(self, state: KbsState) -> tuple[str, Session]:
        cookie = self.headers.get("Cookie") or ""
        sid = None
        for part in cookie.split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                sid = value
        if not sid:
            raise KbsError(401, "MissingCookie", "missing kbs-session-id cookie")
        sess = state.sessions.get(sid)
        if sess is None:
            raise KbsError(401, "InvalidCookie", "unknown session")
        if sess.expires <= time.time():
            del state.sessions[sid]
            raise KbsError(401, "ExpiredCookie", "session expired")
        return sid, sess

    def _fault(self, endpoint: str) -> Fault | None:
        state = self.server.state
        with state.lock:
            for key in (endpoint, "*"):
                queue = state.faults.get(key)
                if queue:
                    return queue.pop(0)
        return None

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length") or 0)
        self._raw = self.rfile.read(length) if length else b""  # keep the connection in sync
        with state.lock:
            state.requests.append((method, self.path))
        path = self.path.split("?", 1)[0]
        if path == "/kbs/v0/auth" and method == "POST":
            endpoint = "auth"
        elif path == "/kbs/v0/attest" and method == "POST":
            endpoint = "attest"
        elif path.startswith("/kbs/v0/resource/") and method == "GET":
            endpoint = "resource"
        else:
            self._problem(KbsError(404, "NotFound", f"no route {method} {path}"))
            return
        with state.lock:
            state.calls[endpoint] += 1
        fault = self._fault(endpoint)
        if fault is not None and fault.kind == "delay":
            time.sleep(float(fault.value))
            fault = None
        if fault is not None and fault.kind == "status":
            self._problem(KbsError(int(fault.value), "InternalError", "injected fault"))
            return
        try:
            if endpoint == "auth":
                self._auth(state)
            elif endpoint == "attest":
                self._attest(state)
            else:
                self._resource(state, path[len("/kbs/v0/resource/") :], fault)
        except KbsError as err:
            self._problem(err)

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_GET(self) -> None:
        self._dispatch("GET")

    # protocol
    def _auth(self, state: KbsState) -> None:
        req = self._body()
        if not isinstance(req, dict) or req.get("version") != "0.4.0":
            raise KbsError(400, "InvalidRequest", "protocol version must be 0.4.0")
        tee = req.get("tee")
        if tee not in state.tees:
            raise KbsError(400, "InvalidRequest", f"unsupported tee {tee!r}")
        supported = (req.get("extra-params") or {}).get("supported-hash-algorithms") or []
        hash_alg = state.selected_hash or "sha384"
        extra: Any = ""
        if state.selected_hash:
            if state.selected_hash not in supported:
                raise KbsError(400, "InvalidRequest", "client lacks the selected hash")
            extra = {"selected-hash-algorithm": state.selected_hash}
        nonce = base64.b64encode(secrets.token_bytes(32)).decode()
        sid = uuid.uuid4().hex
        expires = time.time() + state.session_timeout
        with state.lock:
            state.sessions[sid] = Session(nonce, tee, hash_alg, expires)
        cookie_expiry = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(expires))
        self._json(
            200,
            {"nonce": nonce, "extra-params": extra},
            {"Set-Cookie": f"{COOKIE}={sid}; Expires={cookie_expiry}; Path=/kbs/v0"},
        )

    def _attest(self, state: KbsState) -> None:
        sid, sess = self._session(state)
        att = self._body()
        try:
            runtime = att["runtime-data"]
            nonce = runtime["nonce"]
            pubkey = runtime["tee-pubkey"]
            evidence = att["tee-evidence"]
            primary = evidence["primary_evidence"]
            additional = evidence.get("additional_evidence", "")
        except (KeyError, TypeError):
            raise KbsError(400, "InvalidRequest", "malformed attestation") from None
        with state.lock:
            state.attestations.append(att)
        if state.impostor is not None:  # the attacker verifies nothing
            self._issue_token(state, sid, sess, pubkey)
            return
        if not isinstance(nonce, str):
            raise KbsError(400, "InvalidRequest", "nonce must be a string")
        with state.lock:
            replayed = nonce in state.used_nonces
            state.used_nonces.add(nonce)
        if replayed:
            raise KbsError(401, "VerificationFailed", "nonce already used")
        if nonce != sess.nonce:
            raise KbsError(401, "VerificationFailed", "nonce mismatch")
        if not isinstance(pubkey, dict) or pubkey.get("alg") not in (
            "ECDH-ES+A256KW",
            "RSA-OAEP-256",
        ):
            raise KbsError(400, "InvalidRequest", "unsupported tee-pubkey")
        if not isinstance(primary, dict):  # kbs-types: a JSON value the verifier reads as-is
            raise KbsError(401, "VerificationFailed", "evidence is not a JSON object")
        if not isinstance(additional, str):  # kbs-types: additional_evidence is a String
            raise KbsError(400, "InvalidRequest", "additional_evidence must be a string")
        # sample verifier: report_data must equal the binding of this nonce and key
        binding = rfc8785.dumps(
            {"additional-evidence": additional, "nonce": nonce, "tee-pubkey": pubkey}
        )
        expected = HASHES[sess.hash_alg](binding).digest()
        try:
            got = base64.b64decode(primary["report_data"], validate=True)
            svn = primary["svn"]
        except (KeyError, TypeError, ValueError):
            raise KbsError(401, "VerificationFailed", "malformed sample evidence") from None
        if got != expected or not isinstance(svn, str):
            raise KbsError(401, "VerificationFailed", "report data does not bind nonce and key")
        self._check_additional(additional, nonce, pubkey, sess.hash_alg)
        self._issue_token(state, sid, sess, pubkey)

    def _issue_token(
        self, state: KbsState, sid: str, sess: Session, pubkey: dict[str, Any]
    ) -> None:
        with state.lock:
            sess.attested = True
            sess.tee_pubkey = pubkey
            state.calls["attest_ok"] += 1
        now = time.time()
        token = _jwt_sign(
            state.signing_key,
            {
                "iss": "test-kbs",
                "iat": int(now),
                "exp": now + state.token_ttl,
                "tee": sess.tee,
                "tee-pubkey": pubkey,
                "jti": sid,
            },
        )
        self._json(200, {"token": token})

    @staticmethod
    def _check_additional(
        additional: str, nonce: str, pubkey: dict[str, Any], hash_alg: str
    ) -> None:
        """Each additional device's report data must bind HASH(JCS({nonce, tee-pubkey}))."""
        if not additional:
            return
        try:
            devices = json.loads(additional)
        except ValueError:
            raise KbsError(401, "VerificationFailed", "additional evidence is not JSON") from None
        if not isinstance(devices, dict) or not devices:
            raise KbsError(401, "VerificationFailed", "additional evidence is not an object")
        expected = HASHES[hash_alg](rfc8785.dumps({"nonce": nonce, "tee-pubkey": pubkey}))
        for evidence in devices.values():
            try:
                got = base64.b64decode(evidence["report_data"], validate=True)
            except (KeyError, TypeError, ValueError):
                raise KbsError(401, "VerificationFailed", "malformed device evidence") from None
            if got != expected.digest():
                raise KbsError(401, "VerificationFailed", "device evidence does not bind")

    def _resource(self, state: KbsState, rpath: str, fault: Fault | None) -> None:
        auth = self.headers.get("Authorization") or ""
        with state.lock:
            state.seen_auth_headers.append(auth)
        pubkey = None
        if auth.startswith("Bearer "):
            claims = _jwt_verify(state.signing_key, auth[7:])
            if claims is None:
                raise KbsError(401, "TokenInvalid", "attestation token invalid or expired")
            pubkey = claims.get("tee-pubkey")
        else:
            _, sess = self._session(state)
            if not sess.attested:
                raise KbsError(401, "UnAuthenticatedCookie", "session not attested")
            pubkey = sess.tee_pubkey
        if rpath.count("/") != 2:
            raise KbsError(400, "InvalidRequest", "resource path must be repo/type/tag")
        if any(fnmatch.fnmatchcase(rpath, p) for p in state.deny) or (
            state.allow is not None and not any(fnmatch.fnmatchcase(rpath, p) for p in state.allow)
        ):
            raise KbsError(403, "PolicyDeny", "Access denied by policy")
        value = state.impostor if state.impostor is not None else state.resources.get(rpath)
        if value is None:
            raise KbsError(404, "ResourceNotFound", f"resource {rpath} not found")
        if fault is not None and fault.kind == "slow_body":  # headers now, body too late
            body = json.dumps(jwe_encrypt(value, pubkey)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(float(fault.value))
            self.wfile.write(body)
            return
        if fault is not None and fault.kind == "not_json":
            self._send(200, b"<html>oops</html>", "text/html")
            return
        jwe = jwe_encrypt(value, pubkey)
        if fault is not None and fault.kind == "bad_jwe":
            kind = fault.value or "tag"
            if kind == "tag":
                tag = bytearray(b64u_dec(jwe["tag"]))
                tag[0] ^= 1
                jwe["tag"] = b64u(bytes(tag))
            elif kind == "ciphertext":
                ct = bytearray(b64u_dec(jwe["ciphertext"]) or b"\0")
                ct[-1] ^= 0x80
                jwe["ciphertext"] = b64u(bytes(ct))
            elif kind == "protected":
                hdr = json.loads(b64u_dec(jwe["protected"]))
                hdr["kid"] = "x"  # header changed after encryption: AAD mismatch
                jwe["protected"] = b64u(json.dumps(hdr).encode())
            elif kind == "alg":
                hdr = json.loads(b64u_dec(jwe["protected"]))
                hdr["alg"] = "RSA1_5"
                jwe["protected"] = b64u(json.dumps(hdr).encode())
            elif kind == "missing":
                del jwe["tag"]
        self._json(200, jwe)


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state: KbsState

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out or reject our certificate are expected in tests


class KbsServer:
    """Run the KBS peer in a background thread; use as a context manager."""

    def __init__(
        self,
        resources: dict[str, bytes] | None = None,
        *,
        tls_dir: str | None = None,
        session_timeout: float = 300.0,
        token_ttl: float = 300.0,
        deny: list[str] | None = None,
        allow: list[str] | None = None,
        selected_hash: str | None = None,
        tees: tuple[str, ...] = ("sample",),
        impostor: bytes | None = None,
    ) -> None:
        self.state = KbsState(
            resources=dict(resources or {}),
            session_timeout=session_timeout,
            token_ttl=token_ttl,
            deny=list(deny or []),
            allow=allow,
            selected_hash=selected_hash,
            tees=tees,
            impostor=impostor,
        )
        self.tls_dir = tls_dir
        self.ca_path: str | None = None
        self._served: ServedHttp | None = None

    @property
    def calls(self) -> Counter:
        return self.state.calls

    @property
    def url(self) -> str:
        assert self._served is not None
        scheme = "https" if self.tls_dir else "http"
        return f"{scheme}://127.0.0.1:{self._served.port}"

    def inject(self, endpoint: str, kind: str, value: Any = None, count: int = 1) -> None:
        """Queue ``count`` faults for an endpoint (auth, attest, resource or *)."""
        with self.state.lock:
            self.state.faults.setdefault(endpoint, []).extend(
                Fault(kind, value) for _ in range(count)
            )

    def expire_all(self) -> None:
        """Invalidate every session and token (as a KBS restart would)."""
        with self.state.lock:
            self.state.sessions.clear()
            self.state.signing_key = ec.generate_private_key(ec.SECP256R1())

    def start(self) -> KbsServer:
        httpd = _HttpServer(("127.0.0.1", 0), _Handler)
        httpd.state = self.state
        tls = None
        if self.tls_dir:
            self.ca_path, cert, key = make_tls_material(self.tls_dir)
            tls = (cert, key)
        self._served = ServedHttp(httpd, tls, lazy_handshake=True, poll_interval=0.05)
        self._served.start()
        return self

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
        self._served = None

    def __enter__(self) -> KbsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
