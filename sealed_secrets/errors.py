"""Typed failures of the sealed_secrets package.

Every class here is raised with a message that names *what* went wrong and *where*
(section of the sealed string, provider name, key id) but never carries plaintext,
keys, tokens or raw ciphertext: callers log these messages verbatim, and a sealed
secret is typically handled in environments (CI logs, kubelet events) that must not
learn anything from a failure.
"""

from __future__ import annotations

from typing import Any


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


class UnsealFailed(BadSignature):
    """The signature stage failed: one class and one message for every cause.

    Raised for a kid the guest does not allow, a key resource that is missing or denied by
    the KBS policy, a key of the wrong kind and a signature that does not verify, so that
    whoever hands the guest a sealed string (the host, kubelet, the API server) cannot use
    the answer to probe which resources exist or what the broker's policy releases.
    """


class KeyFormatError(SealedSecretError):
    """A key file or KBS key resource is not a usable JWK/PEM of the expected kind."""


# --- unsealing (sealed_secrets.providers) -------------------------------------------------


class WrongKey(SealedSecretError):
    """The unwrapping key does not match the one the data key was sealed to."""


class TamperedCiphertext(SealedSecretError):
    """Authenticated decryption failed: ciphertext, IV or tag were modified."""


class ProviderError(SealedSecretError):
    """The provider backend (KMS, KBS) failed for a reason other than the above."""


# --- resolver and transport (sealed_secrets.resolver, .kbs_client, .evidence, .cdh_client) ---
# Callers branch on the class, never on the text. KbsError carries the HTTP status and the
# RFC 7807 problem type the broker sent (both safe to log).


class ResolverError(SealedSecretError):
    """Bad resolver spec, bad resource URI or unreadable/corrupt offline-fs file."""


class TransportMismatch(ResolverError):
    """The AA/CDH socket speaks another RPC transport (ttrpc vs gRPC) than the spec names.

    A deployment mistake, not a transient failure: the message says which transport the
    socket seems to speak and the spec form to use instead.
    """


class KbsError(SealedSecretError):
    """A resource could not be obtained from the key broker (KBS, offline-fs or CDH)."""

    def __init__(
        self, message: str, *, status: int | None = None, problem_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem_type = problem_type


class Unauthorized(KbsError):
    """401: the broker did not accept our session or token, even after re-attesting."""


class PolicyDenied(KbsError):
    """403: attestation succeeded but the resource policy refused this resource."""


class ResourceNotFound(KbsError):
    """404: the broker (or the offline-fs file set) holds no such resource."""


class KbsUnavailable(KbsError):
    """5xx, timeout or connection failure: retrying later may succeed."""


class BadResponse(KbsError):
    """The broker answered, but the answer is malformed (bad JSON, bad or tampered JWE)."""


class AttestationError(KbsError):
    """Evidence could not be produced (AA) or the broker rejected it during /attest."""

    grpc_code: Any  # only when an AA call failed: its grpc.StatusCode (or None if unknown)


class TlsError(KbsError):
    """The broker's TLS certificate did not verify against the configured CA."""
