"""binding.py pinned: the MAC's exact input bytes, its key derivation, what it covers and not.

Why: the MAC is a format. A volume bound by one release must open under the next, so the
canonical encoding (member names, ``"v":1``, sorted keys, compact separators, the digest
without its keyslot list) and the key derivation (HKDF-SHA256, no salt, our info string) are
checked against a derivation written out here by hand (RFC 5869 with the stdlib's hmac), not
against the module's own code. And what the MAC leaves out on purpose (keyslots, the
digest's keyslot list, tokens) is checked too: cryptsetup's luksAddKey/luksKillSlot edit
exactly those and must keep a bound volume openable.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import math
from typing import Any

import pytest

from fuse_crypt.luks2 import binding

VK = bytes(range(64))
UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def _meta() -> dict[str, Any]:
    return {
        "keyslots": {"0": {"type": "luks2"}},
        "tokens": {"0": {"type": "coco-csi-binding-v1", "keyslots": [], "mac": "x"}},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64",
                           "sector_size": 4096}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                          "hash": "sha256", "iterations": 1000, "salt": "c2FsdA==",
                          "digest": "ZGlnZXN0"}},
        "config": {"json_size": "12288", "keyslots_size": "16744448"},
    }  # fmt: skip


# The bytes the MAC covers for _meta() and UUID, written out: sorted keys at every level,
# no spaces, version 1, the digest without "keyslots", neither keyslots nor tokens.
CANONICAL = (
    b'{"config":{"json_size":"12288","keyslots_size":"16744448"},'
    b'"digest":{"digest":"ZGlnZXN0","hash":"sha256","iterations":1000,"salt":"c2FsdA==",'
    b'"segments":["0"],"type":"pbkdf2"},'
    b'"segments":{"0":{"encryption":"aes-xts-plain64","iv_tweak":"0","offset":"16777216",'
    b'"sector_size":4096,"size":"dynamic","type":"crypt"}},'
    b'"uuid":"0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0","v":1}'
)


def _expected_mac(vk: bytes, covered: bytes) -> bytes:
    """RFC 5869 HKDF-SHA256 (salt absent = 32 zero bytes, one output block), then HMAC."""
    prk = hmac.new(bytes(32), vk, hashlib.sha256).digest()
    key = hmac.new(prk, b"coco-csi luks2 header binding v1" + b"\x01", hashlib.sha256).digest()
    return hmac.new(key, covered, hashlib.sha256).digest()


def test_mac_is_hmac_under_hkdf_of_the_canonical_bytes() -> None:
    mac = binding.compute_mac(VK, _meta(), UUID)
    assert mac == _expected_mac(VK, CANONICAL)
    assert len(mac) == 32
    assert binding.mac_matches(VK, _meta(), UUID, mac)


def test_mac_does_not_edit_the_metadata() -> None:
    meta = _meta()
    binding.compute_mac(VK, meta, UUID)
    assert meta == _meta()


def test_mac_matches_refuses_any_other_mac_key_or_uuid() -> None:
    mac = binding.compute_mac(VK, _meta(), UUID)
    for i in (0, 31):
        bad = bytearray(mac)
        bad[i] ^= 1
        assert not binding.mac_matches(VK, _meta(), UUID, bytes(bad))
    assert not binding.mac_matches(VK, _meta(), UUID, mac[:31])
    assert not binding.mac_matches(VK[:63] + b"\xff", _meta(), UUID, mac)
    assert not binding.mac_matches(VK, _meta(), UUID.replace("0f1e", "0f1f"), mac)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("segments.0.sector_size", 512),
        ("segments.0.encryption", "cipher_null-ecb"),
        ("segments.0.offset", "0"),
        ("digests.0.salt", "c2FsdQ=="),
        ("digests.0.digest", "ZGlnZXN1"),
        ("digests.0.iterations", 1001),
        ("digests.0.segments", ["1"]),
        ("config.flags", ["allow-discards"]),
        ("config.json_size", "4182016"),
    ],
)
def test_every_covered_field_changes_the_mac(path: str, value: Any) -> None:
    mac = binding.compute_mac(VK, _meta(), UUID)
    meta = _meta()
    *parents, last = path.split(".")
    node = meta
    for part in parents:
        node = node[part]
    node[last] = value
    assert not binding.mac_matches(VK, meta, UUID, mac)


def test_keyslots_digest_keyslot_list_and_tokens_are_not_covered() -> None:
    """What cryptsetup's luksAddKey/luksKillSlot touch: the MAC must stay valid."""
    mac = binding.compute_mac(VK, _meta(), UUID)
    meta = copy.deepcopy(_meta())
    meta["keyslots"]["1"] = {"type": "luks2", "priority": 2}
    meta["digests"]["0"]["keyslots"] = ["0", "1"]
    meta["tokens"]["0"]["mac"] = "y"
    assert binding.compute_mac(VK, meta, UUID) == mac
    del meta["keyslots"]["0"]
    meta["digests"]["0"]["keyslots"] = ["1"]
    assert binding.mac_matches(VK, meta, UUID, mac)


def test_non_finite_numbers_are_not_encoded() -> None:
    """The canonical encoding is JSON only: NaN/Infinity would make two encoders disagree."""
    for value in (math.nan, math.inf):
        meta = _meta()
        meta["config"]["x"] = value
        with pytest.raises(ValueError):
            binding.compute_mac(VK, meta, UUID)


def test_token_carries_the_mac_and_no_keyslots() -> None:
    mac = bytes(range(100, 132))
    assert binding.token(mac) == {
        "type": "coco-csi-binding-v1",
        "keyslots": [],
        "mac": "ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=",
    }
