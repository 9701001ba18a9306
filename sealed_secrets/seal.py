"""Build sealed strings: vault references and envelopes, always signed (ES256).

Signing is not optional here (as in CoCo's `secret` CLI): an unsigned string can be swapped
for another by anyone who can edit the pod spec, and the guest would happily unseal it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from jwcrypto import jwk

from sealed_secrets import jws
from sealed_secrets import payload as pl
from sealed_secrets.errors import MalformedSecret, ProviderError, UnsupportedType
from sealed_secrets.providers import ASYM, ENVELOPE_PROVIDERS, VAULT_PROVIDERS, normalise

DEK_LEN = 32


def encrypt_data(dek: bytes, plaintext: bytes, wrap_type: str = "A256GCM") -> tuple[bytes, bytes]:
    """→ (iv, ciphertext); A256GCM output is ciphertext ‖ 16-byte tag, no AAD (CoCo layout)."""
    if wrap_type == "A256GCM":
        iv = os.urandom(12)
        return iv, AESGCM(dek).encrypt(iv, plaintext, None)
    if wrap_type == "A256CTR":
        iv = os.urandom(16)
        enc = Cipher(algorithms.AES(dek), modes.CTR(iv)).encryptor()
        return iv, enc.update(plaintext) + enc.finalize()
    raise MalformedSecret("wrap_type must be A256GCM or A256CTR")


def sign_secret(secret: pl.Secret, *, signing_key: jwk.JWK, signing_kid: str) -> str:
    return jws.sign(pl.dumps(secret), signing_key, signing_kid)


def seal_vault(
    name: str,
    provider: str,
    *,
    signing_key: jwk.JWK,
    signing_kid: str,
    provider_settings: Mapping[str, Any] | None = None,
    annotations: Mapping[str, Any] | None = None,
) -> str:
    """Seal a *reference*; the value must be provisioned at the provider separately."""
    prov = normalise(provider)
    if prov not in VAULT_PROVIDERS:
        raise UnsupportedType(f"provider {prov!r} does not support vault secrets")
    if not name:
        raise MalformedSecret("vault secret name must not be empty")
    if prov == "kbs":
        from sealed_secrets.resource_uri import parse_resource_uri

        parse_resource_uri(name)
    secret = pl.VaultSecret(
        name=name,
        provider=prov,
        provider_settings=dict(provider_settings or {}),
        annotations=dict(annotations or {}),
    )
    return sign_secret(secret, signing_key=signing_key, signing_kid=signing_kid)


def seal_envelope(
    plaintext: bytes,
    *,
    provider: str,
    key_id: str,
    signing_key: jwk.JWK,
    signing_kid: str,
    public_key: jwk.JWK | None = None,
    kms_client: Any = None,
    provider_settings: Mapping[str, Any] | None = None,
    annotations: Mapping[str, Any] | None = None,
    wrap_type: str = "A256GCM",
) -> str:
    """Encrypt ``plaintext`` under a fresh data key and have ``provider`` wrap that key.

    coco-csi-asym needs ``public_key`` (no network); aliyun needs ``kms_client`` (a
    kms20160120 client with sealing credentials) and ``provider_settings`` telling the
    guest how to reach KMS.
    """
    prov = normalise(provider)
    if prov not in ENVELOPE_PROVIDERS:
        raise UnsupportedType(f"provider {prov!r} does not support envelope secrets")
    if not key_id:
        raise MalformedSecret("envelope key_id must not be empty")
    dek = os.urandom(DEK_LEN)
    settings = dict(provider_settings or {})
    notes = dict(annotations or {})
    if prov == ASYM:
        from sealed_secrets.providers import asym

        if public_key is None:
            raise ProviderError(f"{ASYM} sealing needs the recipient public key")
        encrypted_key, wrap_settings, wrap_notes = asym.wrap_data_key(dek, public_key, key_id)
        settings.update(wrap_settings)
        notes.update(wrap_notes)
    else:
        from sealed_secrets.providers import aliyun

        if kms_client is None:
            raise ProviderError("aliyun sealing needs a KMS client with sealing credentials")
        aliyun.endpoint_for(settings)  # the guest must be able to find KMS: fail early
        encrypted_key = aliyun.wrap_data_key(dek, key_id, kms_client)
    iv, ciphertext = encrypt_data(dek, plaintext, wrap_type)
    secret = pl.EnvelopeSecret(
        provider=prov,
        key_id=key_id,
        encrypted_key=encrypted_key,
        encrypted_data=pl.b64std_encode(ciphertext),
        wrap_type=wrap_type,
        iv=pl.b64std_encode(iv),
        provider_settings=settings,
        annotations=notes,
    )
    return sign_secret(secret, signing_key=signing_key, signing_kid=signing_kid)
