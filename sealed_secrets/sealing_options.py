"""Sealing-side setup shared by the `sealed-secret` CLI and the kubectl plugin.

Why here: both CLIs offer the same Alibaba Cloud KMS envelope sealing under different flag
names, and the subtle part must not drift between them: the guest's token path (not the
sealer's credentials) is what goes into the sealed provider_settings, because unsealing
happens inside the TEE with the guest's own credentials.
"""

from __future__ import annotations

from typing import Any


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
