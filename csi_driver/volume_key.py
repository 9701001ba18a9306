"""The coco-csi volume root key format: a typed JWK, so no other secret can pass for one.

A KBS resource used as ``keyResource`` must be exactly this, by type and size::

    {"kty": "oct", "alg": "coco-csi-volume-key-v1", "k": "<base64url, no padding, 32 bytes>"}

(an optional string ``kid`` is allowed, nothing else). Without a type, any stored bytes
would do as the HKDF root, including public ones: the sealed-secret verification JWK in the
same KBS would derive volume keys that whoever holds that public key can compute.
``coco-csi volume-key new`` makes one.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re

from fuse_crypt import strictjson

ALG = "coco-csi-volume-key-v1"
KEY_BYTES = 32
MAX_JWK_BYTES = 1024
_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, no padding
_KID = re.compile(r"[\x21-\x7e]{1,128}")


class VolumeKeyFormatError(ValueError):
    """Not a coco-csi volume key (the message never contains key material)."""


def new_volume_key_jwk(kid: str | None = None) -> str:
    """A fresh 256-bit volume root key as its JWK text (one line, trailing newline)."""
    doc = {"kty": "oct", "alg": ALG, "k": _b64url(os.urandom(KEY_BYTES))}
    if kid is not None:
        if not _KID.fullmatch(kid):
            raise VolumeKeyFormatError("kid must be 1-128 printable ASCII characters")
        doc["kid"] = kid
    return json.dumps(doc, sort_keys=True) + "\n"


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def parse_volume_key(data: bytes) -> bytes:
    """The 32 key bytes of a coco-csi volume key JWK; VolumeKeyFormatError for anything else."""
    if len(data) > MAX_JWK_BYTES:
        raise VolumeKeyFormatError("too large")
    try:
        doc = strictjson.loads(data)  # a duplicate member is "not a JSON JWK" as before
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise VolumeKeyFormatError("not a JSON JWK") from None
    if not isinstance(doc, dict):
        raise VolumeKeyFormatError("not a JWK object")
    if not set(doc) <= {"kty", "alg", "k", "kid"}:
        raise VolumeKeyFormatError("JWK has members a volume key does not have")
    if doc.get("kty") != "oct" or doc.get("alg") != ALG:
        raise VolumeKeyFormatError(f'need kty "oct" and alg "{ALG}"')
    if "kid" in doc and not (isinstance(doc["kid"], str) and _KID.fullmatch(doc["kid"])):
        raise VolumeKeyFormatError("JWK has an invalid kid")
    k = doc.get("k")
    if not isinstance(k, str) or not _B64URL.fullmatch(k):
        raise VolumeKeyFormatError(f"k must be base64url (no padding) of exactly {KEY_BYTES} bytes")
    try:
        raw = base64.urlsafe_b64decode(k + "=")
    except (binascii.Error, ValueError):
        raise VolumeKeyFormatError("k is not base64url") from None
    if len(raw) != KEY_BYTES or _b64url(raw) != k:  # canonical: no stray low bits
        raise VolumeKeyFormatError(f"k must encode exactly {KEY_BYTES} bytes")
    return raw
