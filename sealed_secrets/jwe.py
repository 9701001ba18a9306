"""The TEE key pair of one KBS session and decryption of KBS resource responses.

The KBS encrypts each resource to the ``tee-pubkey`` bound into the attestation evidence, as
a flattened JWE (coco-interfaces.md 6.5). The private key is created per attestation, lives
only in this object and never leaves the guest; only the public JWK is sent.
"""

from __future__ import annotations

import json
from typing import Any

from jwcrypto import jwe, jwk
from jwcrypto.common import JWException

from sealed_secrets.errors import BadResponse, ResolverError, SealedSecretError
from sealed_secrets.jws import b64url_decode

EC_ALG = "ECDH-ES+A256KW"
RSA_ALG = "RSA-OAEP-256"
ENC = "A256GCM"
_MEMBERS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")
MAX_PROTECTED = 4096  # an ECDH-ES header with its epk is ~250 characters


class TeeKeyPair:
    """Ephemeral key pair whose public half is the KBS ``tee-pubkey``."""

    def __init__(self, key_type: str = "ec", *, rsa_bits: int = 2048) -> None:
        key_type = key_type.lower()
        if key_type == "ec":
            self._key = jwk.JWK.generate(kty="EC", crv="P-256")
            self.alg = EC_ALG
        elif key_type == "rsa":
            self._key = jwk.JWK.generate(kty="RSA", size=rsa_bits)
            self.alg = RSA_ALG
        else:
            raise ResolverError(f"tee key type must be 'ec' or 'rsa', not {key_type!r}")
        self.key_type = key_type

    @classmethod
    def from_pem(cls, pem: bytes | str) -> TeeKeyPair:
        """Adopt a private key handed over in PEM (the AA's ``tee_keypair``)."""
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        try:
            key = jwk.JWK.from_pem(data)
        except (ValueError, TypeError, JWException):
            raise BadResponse("TEE key pair is not a PEM private key") from None
        if not key.has_private:
            raise BadResponse("TEE key pair PEM holds no private key")
        self = cls.__new__(cls)
        self._key = key
        kty = json.loads(key.export_public()).get("kty")
        if kty == "EC":
            self.key_type, self.alg = "ec", EC_ALG
        elif kty == "RSA":
            self.key_type, self.alg = "rsa", RSA_ALG
        else:
            raise BadResponse(f"TEE key pair has unsupported type {kty}")
        return self

    def __repr__(self) -> str:
        return f"TeeKeyPair(key_type={self.key_type!r}, alg={self.alg!r})"

    def public_jwk(self) -> dict[str, Any]:
        """The JWK sent as ``tee-pubkey`` (public members plus ``alg``)."""
        pub: dict[str, Any] = json.loads(self._key.export_public())
        pub.pop("kid", None)
        pub["alg"] = self.alg
        return pub

    def decrypt(self, response: Any) -> bytes:
        """Open a KBS flattened-JSON JWE; raise BadResponse on any deviation or tampering."""
        if not isinstance(response, dict):
            raise BadResponse("KBS resource response is not a JSON object")
        for member in _MEMBERS:
            if not isinstance(response.get(member), str):
                raise BadResponse(f"KBS resource response lacks JWE member {member!r}")
            try:  # one spelling only, as for sealed strings: no padding, no spare bits
                b64url_decode(response[member], what=f"JWE member {member}")
            except SealedSecretError as exc:
                raise BadResponse(f"KBS resource response: {exc}") from None
        if "aad" in response:
            raise BadResponse("KBS resource response must not carry JWE aad")
        if len(response["protected"]) > MAX_PROTECTED:
            raise BadResponse("KBS resource response has an oversized protected header")
        try:
            header = json.loads(jwe.base64url_decode(response["protected"]))
        except (ValueError, TypeError, RecursionError):
            raise BadResponse("KBS resource response has an unreadable protected header") from None
        if not isinstance(header, dict):
            raise BadResponse("KBS resource response has an unreadable protected header")
        if header.get("alg") != self.alg or header.get("enc") != ENC:
            raise BadResponse(
                f"KBS resource response uses alg={str(header.get('alg'))[:40]!r} "
                f"enc={str(header.get('enc'))[:40]!r}, expected alg={self.alg!r} enc={ENC!r}"
            )
        if "zip" in header:
            raise BadResponse("KBS resource response must not be compressed")
        flat = {m: response[m] for m in _MEMBERS}
        try:
            token = jwe.JWE(algs=[self.alg, ENC])
            token.deserialize(json.dumps(flat), key=self._key)
            return bytes(token.payload)
        except (JWException, ValueError, TypeError, KeyError, RecursionError) as exc:
            raise BadResponse(
                f"KBS resource response failed to decrypt ({type(exc).__name__})"
            ) from None
