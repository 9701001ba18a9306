"""The signed JSON inside a sealed string: CoCo's `Secret { version, type: vault|envelope }`.

Field names and serialisation order follow guest-components (`hub/src/secret/layout/`) so that
strings sealed here unseal in CoCo's CDH and vice versa. Binary envelope fields stay as the
original strings in the model and are decoded only when used: CoCo's own fixtures carry
placeholder values ("yyy"), and a model that refused them could not round-trip real files.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from sealed_secrets.errors import (
    BadBase64,
    MalformedSecret,
    UnsupportedType,
    UnsupportedVersion,
)
from sealed_secrets.jws import json_object

VERSION = "0.1.0"
WRAP_TYPES = {"A256GCM": 12, "A256CTR": 16}  # wrap_type -> IV length in bytes
TYPE_VAULT = "vault"
TYPE_ENVELOPE = "envelope"


def b64std_encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64std_decode(text: str, *, what: str) -> bytes:
    """Strict standard base64 with padding (what CoCo writes for envelope fields)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise BadBase64(f"{what} is not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise BadBase64(f"{what} is not canonical standard base64")
    return raw


@dataclass(frozen=True, repr=False)
class VaultSecret:
    """The value lives at a provider under `name`; only the reference is sealed."""

    name: str
    provider: str
    provider_settings: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    version: str = VERSION
    type: str = TYPE_VAULT

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "type": self.type,
            "name": self.name,
            "provider": self.provider,
            "provider_settings": self.provider_settings,
            "annotations": self.annotations,
        }

    def __repr__(self) -> str:
        return f"VaultSecret(provider={self.provider!r}, name={self.name!r})"


@dataclass(frozen=True, repr=False)
class EnvelopeSecret:
    """The value itself is sealed: AES-256 data key wrapped by the provider's key `key_id`."""

    provider: str
    key_id: str
    encrypted_key: str
    encrypted_data: str
    wrap_type: str
    iv: str
    provider_settings: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, Any] = field(default_factory=dict)
    version: str = VERSION
    type: str = TYPE_ENVELOPE

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "type": self.type,
            "key_id": self.key_id,
            "encrypted_key": self.encrypted_key,
            "encrypted_data": self.encrypted_data,
            "wrap_type": self.wrap_type,
            "iv": self.iv,
            "provider": self.provider,
            "provider_settings": self.provider_settings,
            "annotations": self.annotations,
        }

    def encrypted_key_bytes(self) -> bytes:
        return b64std_decode(self.encrypted_key, what="envelope encrypted_key")

    def encrypted_data_bytes(self) -> bytes:
        return b64std_decode(self.encrypted_data, what="envelope encrypted_data")

    def iv_bytes(self) -> bytes:
        iv = b64std_decode(self.iv, what="envelope iv")
        if len(iv) != WRAP_TYPES[self.wrap_type]:
            raise MalformedSecret(
                f"envelope iv must be {WRAP_TYPES[self.wrap_type]} bytes for {self.wrap_type}"
            )
        return iv

    def __repr__(self) -> str:
        return (
            f"EnvelopeSecret(provider={self.provider!r}, key_id={self.key_id!r}, "
            f"wrap_type={self.wrap_type!r})"
        )


Secret = VaultSecret | EnvelopeSecret


def _str(obj: dict[str, Any], name: str, what: str) -> str:
    if name not in obj:
        raise MalformedSecret(f"{what} payload lacks required field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise MalformedSecret(f"{what} payload field {name!r} must be a string")
    return value


def _obj(obj: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    if name not in obj:
        raise MalformedSecret(f"{what} payload lacks required field {name!r}")
    value = obj[name]
    if not isinstance(value, dict):
        raise MalformedSecret(f"{what} payload field {name!r} must be a JSON object")
    return value


def from_json(obj: dict[str, Any]) -> Secret:
    """Validate a decoded payload object (unknown extra members are ignored, as serde does)."""
    version = obj.get("version")
    if not isinstance(version, str):
        raise MalformedSecret("payload lacks a string 'version'")
    if version != VERSION:
        raise UnsupportedVersion(f"unsupported sealed secret version (want {VERSION})")
    kind = obj.get("type")
    if kind == TYPE_VAULT:
        return VaultSecret(
            name=_str(obj, "name", kind),
            provider=_str(obj, "provider", kind),
            provider_settings=_obj(obj, "provider_settings", kind),
            annotations=_obj(obj, "annotations", kind),
        )
    if kind == TYPE_ENVELOPE:
        wrap_type = _str(obj, "wrap_type", kind)
        if wrap_type not in WRAP_TYPES:
            raise MalformedSecret("envelope wrap_type must be A256GCM or A256CTR")
        return EnvelopeSecret(
            provider=_str(obj, "provider", kind),
            key_id=_str(obj, "key_id", kind),
            encrypted_key=_str(obj, "encrypted_key", kind),
            encrypted_data=_str(obj, "encrypted_data", kind),
            wrap_type=wrap_type,
            iv=_str(obj, "iv", kind),
            provider_settings=_obj(obj, "provider_settings", kind),
            annotations=_obj(obj, "annotations", kind),
        )
    if not isinstance(kind, str):
        raise MalformedSecret("payload lacks a string 'type'")
    raise UnsupportedType("unsupported sealed secret type (want 'vault' or 'envelope')")


def loads(data: bytes) -> Secret:
    """Parse payload bytes (compact or pretty JSON)."""
    return from_json(json_object(data, what="payload"))


def dumps(secret: Secret) -> bytes:
    """Compact JSON in CoCo's member order (byte-identical to CoCo's sealer output)."""
    return json.dumps(secret.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
