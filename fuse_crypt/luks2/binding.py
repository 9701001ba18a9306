"""The header binding: a MAC that ties the security-relevant header fields to the volume key.

Why: the LUKS2 digest is unkeyed and the checksum is not a MAC, so a host can rewrite any
parameter and recompute both. We store HMAC-SHA256 over a canonical encoding of the fields
that decide how data is encrypted (uuid, segment 0, digest 0 without its keyslot list, config)
in a LUKS2 token cryptsetup ignores (``coco-csi-binding-v1``), and refuse to open when it does
not verify, before anything is written to the device.

Keyed from the volume key (HKDF-SHA256, own info string), not from the passphrase directly:
- the host knows neither (it would need a keyslot that yields the real VK, and the profile
  forbids the null-cipher keyslot that would give it one);
- one MAC serves every keyslot, so add/remove passphrase (ours or cryptsetup's luksAddKey /
  luksKillSlot, which only touch keyslots and the digest's keyslot list) keep it valid;
- a MAC keyed from the passphrase alone would be an offline guessing oracle that skips Argon2.
Keyslots need no MAC: a keyslot only counts if its output matches the bound digest.

Not covered: rollback of the whole disk to an older state, and the data sectors (XTS has no
integrity). A disk without the token (made by CDH or cryptsetup) opens only with
``require_binding=False``: the profile still applies, but a parameter change the profile
allows (label, keyslot KDF costs within the caps) goes unnoticed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .profile import BINDING_TOKEN_TYPE

__all__ = ["compute_mac", "mac_matches", "token"]

_INFO = b"coco-csi luks2 header binding v1"


def _bound_fields(metadata: dict[str, Any], uuid: str) -> bytes:
    """Canonical bytes of what the MAC covers (the profile has already fixed every type)."""
    digest = {k: v for k, v in metadata["digests"]["0"].items() if k != "keyslots"}
    covered = {
        "v": 1,
        "uuid": uuid,
        "segments": metadata["segments"],
        "digest": digest,
        "config": metadata["config"],
    }
    return json.dumps(covered, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def compute_mac(volume_key: bytes, metadata: dict[str, Any], uuid: str) -> bytes:
    """HMAC-SHA256 under HKDF(VK) of the bound fields."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(volume_key)
    return hmac.new(key, _bound_fields(metadata, uuid), hashlib.sha256).digest()


def mac_matches(volume_key: bytes, metadata: dict[str, Any], uuid: str, mac: bytes) -> bool:
    """Constant-time check of a stored MAC."""
    return hmac.compare_digest(compute_mac(volume_key, metadata, uuid), mac)


def token(mac: bytes) -> dict[str, Any]:
    """The LUKS2 token object that carries the MAC (no keyslots: it unlocks nothing)."""
    return {"type": BINDING_TOKEN_TYPE, "keyslots": [], "mac": base64.b64encode(mac).decode()}
