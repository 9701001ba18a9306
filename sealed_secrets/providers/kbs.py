"""`kbs` vault provider: the sealed string names a KBS resource; the value is that resource.

Nothing secret is in the string at all; the broker (Trustee KBS after attestation, or the
offline-fs files in the guest image) decides whether this guest may have it.
"""

from __future__ import annotations

from collections.abc import Callable

from sealed_secrets.errors import MalformedSecret, ProviderError
from sealed_secrets.payload import VaultSecret


def get_vault_value(secret: VaultSecret, *, get_resource: Callable[[str], bytes] | None) -> bytes:
    if not secret.name.startswith(("kbs://", "kbs+")):
        raise MalformedSecret("kbs vault secret name must be a kbs:// resource URI")
    if get_resource is None:
        raise ProviderError("kbs vault secret needs a resolver (get_resource) to fetch it")
    return get_resource(secret.name)
