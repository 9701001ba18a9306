"""Open a sealed string: verify the signature, then ask the provider for the value or key.

Order matters: the signature is checked before the payload is trusted for anything (which
provider to call, which KBS resource to fetch), so a forged string cannot make the guest
fetch arbitrary resources or talk to an attacker's KMS endpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealed_secrets import jws
from sealed_secrets import payload as pl
from sealed_secrets.errors import (
    MalformedSecret,
    SealedSecretError,
    TamperedCiphertext,
    UnsignedSecret,
)
from sealed_secrets.keys import load_verification_key
from sealed_secrets.providers import ProviderOptions, get_vault_value, unwrap_data_key

log = logging.getLogger(__name__)

GetResource = Callable[[str], bytes]


def decrypt_data(dek: bytes, secret: pl.EnvelopeSecret) -> bytes:
    iv = secret.iv_bytes()
    data = secret.encrypted_data_bytes()
    if secret.wrap_type == "A256GCM":
        if len(data) < 16:
            raise TamperedCiphertext("envelope encrypted_data is shorter than a GCM tag")
        try:
            return AESGCM(dek).decrypt(iv, data, None)
        except InvalidTag:
            raise TamperedCiphertext("envelope ciphertext failed authentication") from None
    # A256CTR has no integrity of its own; only the JWS signature protects it.
    dec = Cipher(algorithms.AES(dek), modes.CTR(iv)).decryptor()
    return dec.update(data) + dec.finalize()


def decode(
    sealed: str,
    *,
    get_resource: GetResource | None = None,
    verify: bool = True,
    allow_unsigned: bool = False,
    key_dir: str | None = None,
) -> tuple[jws.SealedString, pl.Secret]:
    """Parse and (unless told otherwise) verify; returns the structure without unsealing.

    ``verify=False`` is CoCo's skip mode for *signed-form* strings; the legacy unsigned
    `fakejwsheader` form additionally needs ``allow_unsigned=True``.
    """
    parsed = jws.parse(sealed)
    if parsed.legacy:
        if not allow_unsigned:
            raise UnsignedSecret("unsigned legacy sealed secret rejected (needs allow_unsigned)")
        log.warning("accepting unsigned legacy sealed secret (allow_unsigned)")
    elif verify:
        assert parsed.kid is not None
        key = load_verification_key(parsed.kid, get_resource=get_resource, key_dir=key_dir)
        jws.verify(parsed, key)
    else:
        log.warning("sealed secret signature not verified (verification disabled)")
    return parsed, pl.loads(parsed.payload)


def unseal_secret(
    sealed: str,
    *,
    get_resource: GetResource | None,
    verify: bool = True,
    allow_unsigned: bool = False,
    key_dir: str | None = None,
    provider_options: ProviderOptions | None = None,
) -> bytes:
    """The plaintext of ``sealed``; raises a SealedSecretError subclass on any failure."""
    parsed, secret = decode(
        sealed,
        get_resource=get_resource,
        verify=verify,
        allow_unsigned=allow_unsigned,
        key_dir=key_dir,
    )
    try:
        if isinstance(secret, pl.VaultSecret):
            value = get_vault_value(secret, get_resource=get_resource, options=provider_options)
        else:
            dek = unwrap_data_key(secret, get_resource=get_resource, options=provider_options)
            value = decrypt_data(dek, secret)
    except SealedSecretError as exc:
        log.info(
            "unseal failed kid=%s provider=%s error=%s",
            parsed.kid,
            secret.provider,
            type(exc).__name__,
        )
        raise
    if not isinstance(value, bytes):
        raise MalformedSecret("provider returned a non-bytes value")
    log.info("unsealed secret kid=%s type=%s provider=%s", parsed.kid, secret.type, secret.provider)
    return value
