"""Sealing-side setup shared by the `sealed-secret` CLI and the kubectl plugin.

Both CLIs report bad input as one line (:class:`CliError`) and seal many values with one
envelope sealer (:func:`envelope_sealer`: keys loaded and KMS client made once).

Why here: both CLIs offer the same Alibaba Cloud KMS envelope sealing under different flag
names, and the subtle part must not drift between them: the guest's token path (not the
sealer's credentials) is what goes into the sealed provider_settings, because unsealing
happens inside the TEE with the guest's own credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


class CliError(Exception):
    """A user-facing failure with a one-line message (both sealing CLIs)."""


def aliyun_envelope_options(
    *,
    region_id: str,
    guest_token_path: str,
    kms_instance_id: str | None,
    endpoint: str | None,
    credential_file: str | None,
    ca: str | None,
) -> dict[str, Any] | None:
    """``kms_client`` and ``provider_settings`` for ``seal_envelope`` with Alibaba KMS.

    The sealer authenticates with ``credential_file`` or the ALIBABA_CLOUD_* environment;
    None when neither is there, so each CLI can name its own flag in the error.
    """
    from sealed_secrets.providers import aliyun

    settings = {
        "client_type": "sts_token",
        "token_path": guest_token_path,
        "region_id": region_id,
    }
    if kms_instance_id:
        settings["kms_instance_id"] = kms_instance_id
    if endpoint:
        settings["endpoint"] = endpoint
    creds = (
        aliyun.Credentials.from_file(credential_file)
        if credential_file
        else aliyun.Credentials.from_env()
    )
    if creds is None:
        return None
    return {
        "kms_client": aliyun.make_client(settings, credentials=creds, ca=ca),
        "provider_settings": settings,
    }


def envelope_sealer(
    provider: str,
    *,
    key_id: str,
    signing_key: Any,
    signing_kid: str,
    public_key_pem: bytes | None = None,
    kms_options: Mapping[str, Any] | None = None,
    **seal_options: Any,
) -> Callable[[bytes], str]:
    """Build ``plaintext -> sealed string`` once for many values.

    ``public_key_pem`` is the coco-csi-asym sealing public key; ``kms_options`` what
    :func:`aliyun_envelope_options` gave (each CLI checks its own flags and names them in its
    errors before calling this). ``seal_options`` go to ``seal_envelope`` as they are.
    """
    from sealed_secrets.providers import asym
    from sealed_secrets.seal import seal_envelope

    common: dict[str, Any] = {
        "provider": provider,
        "key_id": key_id,
        "signing_key": signing_key,
        "signing_kid": signing_kid,
        **seal_options,
    }
    if provider == asym.NAME:
        if public_key_pem is None:
            raise CliError(f"a public key is required for provider {asym.NAME}")
        common["public_key"] = asym.load_public_key(public_key_pem)
    elif kms_options is not None:
        common.update(kms_options)
    return lambda plaintext: seal_envelope(plaintext, **common)
