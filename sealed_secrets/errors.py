"""Typed failures of the sealed_secrets package.

Every class here is raised with a message that names *what* went wrong and *where*
(section of the sealed string, provider name, key id) but never carries plaintext,
keys, tokens or raw ciphertext: callers log these messages verbatim, and a sealed
secret is typically handled in environments (CI logs, kubelet events) that must not
learn anything from a failure.
"""

from __future__ import annotations


class SealedSecretError(Exception):
    """Base of every sealed-secret failure; message is always safe to log."""


# --- format / signature (sealed_secrets.jws, .payload, .keys) ---------------------------


class MalformedSecret(SealedSecretError):
    """The string is not `sealed.<header>.<payload>.<signature>` or a part is not valid JSON."""


class BadBase64(MalformedSecret):
    """A section is not URL-safe base64 without padding (or a payload field not std base64)."""


class UnsupportedVersion(SealedSecretError):
    """Payload `version` is not "0.1.0"."""


class UnsupportedType(SealedSecretError):
    """Payload `type` is neither "envelope" nor "vault" (or the provider lacks that type)."""


class UnknownProvider(SealedSecretError):
    """Payload names a provider this build does not know."""


class BadSignature(SealedSecretError):
    """JWS signature missing, not ES256, or not valid for the header and payload."""


class UnsignedSecret(BadSignature):
    """Legacy `fakejwsheader` form met while verification is required."""


class UnknownKid(SealedSecretError):
    """No verification key could be found for the header's `kid`."""


class KeyFormatError(SealedSecretError):
    """A key file or KBS key resource is not a usable JWK/PEM of the expected kind."""


# --- unsealing (sealed_secrets.providers) -------------------------------------------------


class WrongKey(SealedSecretError):
    """The unwrapping key does not match the one the data key was sealed to."""


class TamperedCiphertext(SealedSecretError):
    """Authenticated decryption failed: ciphertext, IV or tag were modified."""


class ProviderError(SealedSecretError):
    """The provider backend (KMS, KBS) failed for a reason other than the above."""
