"""Provider registry: who holds the data key (envelope) or the value itself (vault).

Names are matched ASCII case-insensitively, as CDH does. Providers that exist in CoCo but not
in this build (aws, ehsm) fail with UnknownProvider naming the gap, rather than a generic
error, so an operator can tell "wrong cluster config" from "typo".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sealed_secrets.errors import UnknownProvider, UnsupportedType
from sealed_secrets.payload import EnvelopeSecret, VaultSecret

# What the rest of sealed_secrets may import (tests/test_public_surfaces.py guards it); the
# provider submodules ``aliyun`` and ``asym`` are public for sealing, ``kbs`` is internal.
__all__ = [
    "ASYM",
    "ENVELOPE_PROVIDERS",
    "VAULT_PROVIDERS",
    "ProviderOptions",
    "aliyun",
    "asym",
    "get_vault_value",
    "normalise",
    "unwrap_data_key",
]

GetResource = Callable[[str], bytes]
ProviderOptions = Mapping[str, Mapping[str, Any]]  # provider name -> guest-side options

ASYM = "coco-csi-asym"
ENVELOPE_PROVIDERS = ("aliyun", ASYM)
VAULT_PROVIDERS = ("kbs", "aliyun")
_UPSTREAM_ONLY = ("aws", "ehsm")


def normalise(name: str) -> str:
    low = name.lower() if name.isascii() else name
    if low in ENVELOPE_PROVIDERS or low in VAULT_PROVIDERS:
        return low
    if low in _UPSTREAM_ONLY:
        raise UnknownProvider(f"provider {low!r} exists in CoCo but is not supported here")
    raise UnknownProvider("unknown sealed secret provider")


def _opts(options: ProviderOptions | None, name: str) -> Mapping[str, Any]:
    return (options or {}).get(name, {})


def unwrap_data_key(
    secret: EnvelopeSecret,
    *,
    get_resource: GetResource | None,
    options: ProviderOptions | None = None,
) -> bytes:
    """Ask the envelope's provider to unwrap the data key (raises WrongKey, ProviderError…)."""
    name = normalise(secret.provider)
    if name == ASYM:
        from sealed_secrets.providers import asym

        return asym.unwrap_data_key(secret, get_resource=get_resource)
    if name == "aliyun":
        from sealed_secrets.providers import aliyun

        return aliyun.unwrap_data_key(secret, **_opts(options, name))
    raise UnsupportedType(f"provider {name!r} does not support envelope secrets")


def get_vault_value(
    secret: VaultSecret,
    *,
    get_resource: GetResource | None,
    options: ProviderOptions | None = None,
) -> bytes:
    """Fetch the value a vault secret refers to."""
    name = normalise(secret.provider)
    if name == "kbs":
        from sealed_secrets.providers import kbs

        return kbs.get_vault_value(secret, get_resource=get_resource)
    if name == "aliyun":
        from sealed_secrets.providers import aliyun

        return aliyun.get_vault_value(secret, **_opts(options, name))
    raise UnsupportedType(f"provider {name!r} does not support vault secrets")
