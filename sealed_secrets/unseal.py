"""Open a sealed string: verify the signature, then ask the provider for the value or key.

Order matters: the signature is checked before the payload is trusted for anything (which
provider to call, which KBS resource to fetch), so a forged string cannot make the guest
fetch arbitrary resources or talk to an attacker's KMS endpoint. The one input used before
that check, the header's ``kid``, may name a KBS resource only if the caller's
``allowed_kids`` allow it, and every way the signature stage can fail ends in the same
``UnsealFailed`` message: the caller (kubelet, the host) learns "not verified", never whether
the kid was refused, the key resource missing or denied, or the signature wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealed_secrets import jws
from sealed_secrets import payload as pl
from sealed_secrets.errors import (
    KbsUnavailable,
    MalformedSecret,
    SealedSecretError,
    TamperedCiphertext,
    UnsealFailed,
    UnsignedSecret,
)
from sealed_secrets.keys import check_allowed_kids, load_verification_key
from sealed_secrets.providers import ProviderOptions, get_vault_value, unwrap_data_key

log = logging.getLogger(__name__)

GetResource = Callable[[str], bytes]

UNSEAL_FAILED = "sealed secret signature could not be verified"
KEY_UNAVAILABLE = "sealed secret verification key is temporarily unavailable; retry later"


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
    allowed_kids: Collection[str] = (),
) -> tuple[jws.SealedString, pl.Secret]:
    """Parse and (unless told otherwise) verify; returns the structure without unsealing.

    ``verify=False`` is CoCo's skip mode for *signed-form* strings; the legacy unsigned
    `fakejwsheader` form additionally needs ``allow_unsigned=True``. ``allowed_kids`` lists
    the KBS signing-key kids (exact ``kbs:///repo/type/tag`` or ``/``-ended prefixes) the
    caller's configuration trusts; the default trusts none, so only key-directory kids work.
    """
    allowed = check_allowed_kids(allowed_kids)
    parsed = jws.parse(sealed)
    if parsed.legacy:
        if not allow_unsigned:
            raise UnsignedSecret("unsigned legacy sealed secret rejected (needs allow_unsigned)")
        log.warning("accepting unsigned legacy sealed secret (allow_unsigned)")
    elif verify:
        assert parsed.kid is not None
        _verify(parsed, get_resource=get_resource, key_dir=key_dir, allowed_kids=allowed)
    else:
        log.warning("sealed secret signature not verified (verification disabled)")
    return parsed, pl.loads(parsed.payload)


def _verify(
    parsed: jws.SealedString,
    *,
    get_resource: GetResource | None,
    key_dir: str | None,
    allowed_kids: Collection[str],
) -> None:
    """Find the key and check the signature; every failure looks the same to the caller.

    A broker that cannot be reached is the one distinct outcome (kubelet should retry): it
    says nothing about the resource, and the host sees the network anyway.
    """
    assert parsed.kid is not None
    try:
        key = load_verification_key(
            parsed.kid, get_resource=get_resource, key_dir=key_dir, allowed_kids=allowed_kids
        )
        jws.verify(parsed, key)
    except KbsUnavailable:
        log.debug("sealed secret verification key unavailable")
        raise KbsUnavailable(KEY_UNAVAILABLE) from None
    except SealedSecretError as exc:
        log.debug("sealed secret verification failed cause=%s", type(exc).__name__)
        raise UnsealFailed(UNSEAL_FAILED) from None


def unseal_secret(
    sealed: str,
    *,
    get_resource: GetResource | None,
    verify: bool = True,
    allow_unsigned: bool = False,
    key_dir: str | None = None,
    provider_options: ProviderOptions | None = None,
    allowed_kids: Collection[str] = (),
) -> bytes:
    """The plaintext of ``sealed``; raises a SealedSecretError subclass on any failure.

    ``allowed_kids``: see ``decode``. Signature-stage failures are all ``UnsealFailed``.
    """
    parsed, secret = decode(
        sealed,
        get_resource=get_resource,
        verify=verify,
        allow_unsigned=allow_unsigned,
        key_dir=key_dir,
        allowed_kids=allowed_kids,
    )
    try:
        if isinstance(secret, pl.VaultSecret):
            value = get_vault_value(secret, get_resource=get_resource, options=provider_options)
        else:
            dek = unwrap_data_key(secret, get_resource=get_resource, options=provider_options)
            value = decrypt_data(dek, secret)
    except SealedSecretError as exc:
        log.info(
            "unseal failed kid=%r provider=%r error=%s",
            parsed.kid,
            secret.provider,
            type(exc).__name__,
        )
        raise
    if not isinstance(value, bytes):
        raise MalformedSecret("provider returned a non-bytes value")
    log.info("unsealed secret kid=%r type=%r provider=%r", parsed.kid, secret.type, secret.provider)
    return value
