"""`coco-csi-asym` envelope provider: seal offline to a public key, unseal only after attestation.

CoCo's envelope providers need a cloud KMS call to *seal*, so whoever seals needs KMS
credentials. Here the data key is wrapped to a public key (JOSE key management, RFC 7518:
`ECDH-ES+A256KW` or `RSA-OAEP-256`) whose private half is stored only as a KBS resource named
by `key_id`. Anyone holding the public key can seal (CI, a laptop, `kubectl create
sealedsecret`); only a guest that passes the KBS resource policy can fetch the private key.

Payload fields (envelope, see docs/sealed_secrets.md):
  key_id            KBS resource URI of the private JWK, e.g. kbs:///default/sealing-key/asym
  encrypted_key     std base64 of the wrapped 32-byte data key (AES-KW output / RSA-OAEP ct)
  provider_settings {"alg": "ECDH-ES+A256KW"|"RSA-OAEP-256", "kid": RFC 7638 thumbprint}
  annotations       {"epk": <ephemeral public JWK>} for ECDH-ES, {} for RSA-OAEP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from jwcrypto import jwa, jwk

from sealed_secrets.errors import (
    KeyFormatError,
    MalformedSecret,
    ProviderError,
    ResourceNotFound,
    UnknownKid,
    WrongKey,
)
from sealed_secrets.keys import parse_jwk
from sealed_secrets.payload import EnvelopeSecret, b64std_encode
from sealed_secrets.resource_uri import is_resource_uri

NAME = "coco-csi-asym"
ALGS = ("ECDH-ES+A256KW", "RSA-OAEP-256")
_EC_CURVES = ("P-256", "P-384", "P-521")
_MIN_RSA_BITS = 2048
DEK_LEN = 32


def _alg_for(key: jwk.JWK) -> str:
    kty = key.get("kty")
    if kty == "EC" and key.get("crv") in _EC_CURVES:
        return "ECDH-ES+A256KW"
    if kty == "RSA":
        n = key.get_op_key("encrypt" if not key.has_private else "decrypt")
        if n.key_size < _MIN_RSA_BITS:
            raise KeyFormatError(f"RSA sealing key must have at least {_MIN_RSA_BITS} bits")
        return "RSA-OAEP-256"
    raise KeyFormatError("sealing key must be EC (P-256/384/521) or RSA")


def thumbprint(key: jwk.JWK) -> str:
    """RFC 7638 SHA-256 thumbprint of the public key: lets unseal say 'wrong key' precisely."""
    digest: str = key.thumbprint()
    return digest


def generate_keypair(kind: str = "EC") -> jwk.JWK:
    """New sealing key pair; the private JWK goes to KBS, the public JWK to sealers."""
    if kind.upper() == "EC":
        key = jwk.JWK.generate(kty="EC", crv="P-256", use="enc", alg="ECDH-ES+A256KW")
    elif kind.upper() == "RSA":
        key = jwk.JWK.generate(kty="RSA", size=3072, use="enc", alg="RSA-OAEP-256")
    else:
        raise KeyFormatError("sealing key kind must be EC or RSA")
    key.update(kid=key.thumbprint())
    return key


def load_public_key(data: bytes, *, what: str = "sealing public key") -> jwk.JWK:
    key = parse_jwk(data, what=what)
    _alg_for(key)
    return jwk.JWK(**key.export_public(as_dict=True))


def wrap_data_key(
    dek: bytes, public_key: jwk.JWK, key_id: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Wrap ``dek`` → (encrypted_key b64, provider_settings, annotations)."""
    if len(dek) != DEK_LEN:
        raise ProviderError("data key must be 32 bytes")
    if not is_resource_uri(key_id):
        raise MalformedSecret(f"{NAME} key_id must be the kbs:// URI of the private key")
    alg = _alg_for(public_key)
    pub = jwk.JWK(**public_key.export_public(as_dict=True))
    try:
        out = jwa.JWA.keymgmt_alg(alg).wrap(pub, 256, dek, {"alg": alg, "enc": "A256GCM"})
    except Exception:  # jwcrypto raises assorted types; the message may not be ours to show
        raise ProviderError(f"{NAME}: wrapping the data key failed") from None
    settings = {"alg": alg, "kid": thumbprint(pub)}
    annotations: dict[str, Any] = {}
    if "header" in out and "epk" in out["header"]:
        epk = out["header"]["epk"]
        annotations["epk"] = epk if isinstance(epk, dict) else json.loads(epk.export_public())
    return b64std_encode(out["ek"]), settings, annotations


def _private_key(secret: EnvelopeSecret, get_resource: Callable[[str], bytes] | None) -> jwk.JWK:
    if not is_resource_uri(secret.key_id):
        raise MalformedSecret(f"{NAME} key_id must be a kbs:// resource URI")
    if get_resource is None:
        raise ProviderError(f"{NAME} needs a resolver to fetch the private key")
    try:
        data = get_resource(secret.key_id)
    except ResourceNotFound:
        raise UnknownKid(f"no sealing private key at {secret.key_id!r}") from None
    return parse_jwk(data, what=f"sealing private key {secret.key_id!r}", private=True)


def unwrap_data_key(
    secret: EnvelopeSecret, *, get_resource: Callable[[str], bytes] | None
) -> bytes:
    settings = secret.provider_settings
    alg = settings.get("alg")
    if alg not in ALGS:
        raise MalformedSecret(f"{NAME} provider_settings.alg must be one of {', '.join(ALGS)}")
    ek = secret.encrypted_key_bytes()
    header: dict[str, Any] = {"alg": alg, "enc": "A256GCM"}
    if alg == "ECDH-ES+A256KW":
        epk = secret.annotations.get("epk")
        if not isinstance(epk, dict):
            raise MalformedSecret(f"{NAME} ECDH-ES envelope lacks annotations.epk")
        try:
            epk_key = jwk.JWK(**epk)
        except Exception:
            raise MalformedSecret(f"{NAME} annotations.epk is not a valid EC JWK") from None
        if epk_key.get("kty") != "EC" or epk_key.has_private:
            raise MalformedSecret(f"{NAME} annotations.epk must be a public EC JWK")
        header["epk"] = epk_key
    key = _private_key(secret, get_resource)
    if _alg_for(key) != alg:
        raise WrongKey(f"{NAME}: private key type does not match {alg}")
    want = settings.get("kid")
    if isinstance(want, str) and want and thumbprint(key) != want:
        raise WrongKey(f"{NAME}: private key at {secret.key_id!r} is not the sealing key")
    try:
        dek: bytes = jwa.JWA.keymgmt_alg(alg).unwrap(key, 256, ek, header)
    except Exception:
        # AES-KW integrity failure (ECDH-ES) or OAEP padding failure (RSA): either the key
        # is wrong or encrypted_key was altered; the two are cryptographically indistinguishable.
        raise WrongKey(f"{NAME}: data key does not unwrap with the sealing key") from None
    if len(dek) != DEK_LEN:
        raise WrongKey(f"{NAME}: unwrapped data key has the wrong length")
    return dek
