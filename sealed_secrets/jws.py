"""The `sealed.<header>.<payload>.<signature>` string: strict parsing, ES256 signing/verifying.

CoCo (guest-components >= v0.18.0) signs the secret JSON as a compact JWS and prefixes it with
`sealed.`. Parsing is deliberately stricter than a generic JOSE library: every section must be
*canonical* unpadded base64url, because base64 has spare bits in the last character and a
lenient decoder would accept a modified string that still verifies. So the header and payload
have exactly one spelling, and a one-character change of the string as given is detected.

ECDSA itself is malleable: if (r, s) verifies, so does (r, n - s), and anyone can compute that
twin without the key. It is accepted on purpose, because CoCo's signers may emit either form
and rejecting high-S would refuse genuine strings. The twin carries the same header and
payload, i.e. the same authenticated content, so nothing gains from it as long as nothing
uses the signature bytes (or the whole string) as an identity: caches are keyed by resource
URI, and no code here dedups, caches or compares sealed strings by their bytes. Strings this
module signs are low-S, so they are the canonical member of each pair.

The legacy unsigned form (`sealed.fakejwsheader.<payload>.fakesignature`, GC <= v0.17.0) is
recognised so that callers can decide (``allow_unsigned``) instead of failing with a confusing
base64 error.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from jwcrypto import jwk

from fuse_crypt import strictjson
from sealed_secrets.errors import (
    BadBase64,
    BadSignature,
    KeyFormatError,
    MalformedSecret,
    UnsignedSecret,
)

PREFIX = "sealed."
ALG = "ES256"
LEGACY_HEADER = "fakejwsheader"
LEGACY_SIGNATURE = "fakesignature"
# Generous but bounded: sealed strings travel in env vars and Secret values (1 MiB max).
MAX_SEALED_LEN = 1 << 20
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_SIG_LEN = 64  # P-256: 32-byte r ‖ 32-byte s
# Order of the P-256 group: (r, s) and (r, P256_ORDER - s) are both valid signatures.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, *, what: str) -> bytes:
    """Decode unpadded base64url, accepting only the canonical spelling.

    ``what`` names the section for the error message (never the data itself).
    """
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise BadBase64(f"{what} is not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise BadBase64(f"{what} is not unpadded base64url") from None
    if b64url_encode(raw) != text:
        raise BadBase64(f"{what} is not canonical base64url (non-zero trailing bits)")
    return raw


def json_object(raw: bytes, *, what: str) -> dict[str, Any]:
    """Parse a JSON object, rejecting duplicate member names (ambiguous to other parsers)."""
    try:
        obj = strictjson.loads(raw)
    except strictjson.DuplicateKeyError:
        raise MalformedSecret(f"{what} has a duplicate member") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MalformedSecret(f"{what} is not valid UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise MalformedSecret(f"{what} is not a JSON object")
    return obj


@dataclass(frozen=True)
class SealedString:
    """A structurally valid sealed string; the signature is *not* yet verified."""

    header_b64: str
    payload_b64: str
    signature_b64: str
    header: dict[str, Any] | None  # None for the legacy unsigned form
    payload: bytes
    signature: bytes | None

    @property
    def legacy(self) -> bool:
        return self.header is None

    @property
    def kid(self) -> str | None:
        return None if self.header is None else self.header["kid"]

    @property
    def signing_input(self) -> bytes:
        return f"{self.header_b64}.{self.payload_b64}".encode("ascii")

    def __repr__(self) -> str:  # payload may name secrets; keep reprs short and neutral
        return f"SealedString(kid={self.kid!r}, legacy={self.legacy})"


def is_sealed(value: str) -> bool:
    """Cheap prefix test used to decide whether a value needs unsealing (kata's rule)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def parse(sealed: str) -> SealedString:
    """Split and decode a sealed string; raises MalformedSecret/BadBase64/BadSignature."""
    if not isinstance(sealed, str):
        raise MalformedSecret("sealed secret must be a string")
    if len(sealed) > MAX_SEALED_LEN:
        raise MalformedSecret("sealed secret is too long")
    if not sealed.startswith(PREFIX):
        raise MalformedSecret("sealed secret must start with 'sealed.'")
    parts = sealed[len(PREFIX) :].split(".")
    if len(parts) != 3:
        raise MalformedSecret(
            f"sealed secret must have 4 '.'-separated sections, found {len(parts) + 1}"
        )
    header_b64, payload_b64, sig_b64 = parts
    if not payload_b64:
        raise MalformedSecret("sealed secret payload section is empty")
    payload = b64url_decode(payload_b64, what="payload section")
    if header_b64 == LEGACY_HEADER:
        if sig_b64 != LEGACY_SIGNATURE:
            raise MalformedSecret("legacy sealed secret must end with '.fakesignature'")
        return SealedString(header_b64, payload_b64, sig_b64, None, payload, None)
    header = json_object(b64url_decode(header_b64, what="header section"), what="JWS header")
    _check_header(header)
    if not sig_b64:
        raise BadSignature("JWS signature is missing")
    signature = b64url_decode(sig_b64, what="signature section")
    if len(signature) != _SIG_LEN:
        raise BadSignature("ES256 signature must be 64 bytes")
    return SealedString(header_b64, payload_b64, sig_b64, header, payload, signature)


def _check_header(header: dict[str, Any]) -> None:
    if header.get("alg") != ALG:
        raise BadSignature("JWS algorithm must be ES256")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise MalformedSecret("JWS header must carry a non-empty string 'kid'")
    if "b64" in header and header["b64"] is not True:
        raise MalformedSecret("JWS header 'b64' must be true (unencoded payloads unsupported)")
    if "crit" in header:
        raise MalformedSecret("JWS header 'crit' is not supported")


def _ec_public(key: jwk.JWK) -> ec.EllipticCurvePublicKey:
    if key.get("kty") != "EC" or key.get("crv") != "P-256":
        raise KeyFormatError("verification key must be an EC P-256 JWK")
    pub = key.get_op_key("verify")
    if not isinstance(pub, ec.EllipticCurvePublicKey):  # pragma: no cover - jwcrypto contract
        raise KeyFormatError("verification key is not an EC public key")
    return pub


def verify(parsed: SealedString, key: jwk.JWK) -> None:
    """Check the ES256 signature over `header_b64.payload_b64`; raises BadSignature."""
    if parsed.legacy or parsed.signature is None:
        raise UnsignedSecret("sealed secret is unsigned (legacy 'fakejwsheader' form)")
    pub = _ec_public(key)
    r = int.from_bytes(parsed.signature[:32], "big")
    s = int.from_bytes(parsed.signature[32:], "big")
    try:
        pub.verify(encode_dss_signature(r, s), parsed.signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BadSignature(f"signature does not verify with key for kid {parsed.kid!r}") from None


def build_header(kid: str) -> dict[str, Any]:
    """Header as written by CoCo's sealer (via jose_jws, which adds b64)."""
    return {"b64": True, "alg": ALG, "kid": kid}


def sign(payload: bytes, key: jwk.JWK, kid: str) -> str:
    """Return `sealed.<header>.<payload>.<signature>` signed with a private P-256 JWK."""
    if not kid:
        raise MalformedSecret("signing kid must not be empty")
    if key.get("kty") != "EC" or key.get("crv") != "P-256" or not key.has_private:
        raise KeyFormatError("signing key must be a private EC P-256 JWK")
    priv = key.get_op_key("sign")
    header_b64 = b64url_encode(json.dumps(build_header(kid), separators=(",", ":")).encode())
    payload_b64 = b64url_encode(payload)
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    r, s = decode_dss_signature(priv.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    if s > P256_ORDER // 2:  # emit the low-S twin (see the module docstring)
        s = P256_ORDER - s
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{PREFIX}{header_b64}.{payload_b64}.{b64url_encode(sig)}"


def legacy_unsigned(payload: bytes) -> str:
    """The pre-v0.18 unsigned form; only for interop tests and migration tooling."""
    return f"{PREFIX}{LEGACY_HEADER}.{b64url_encode(payload)}.{LEGACY_SIGNATURE}"
