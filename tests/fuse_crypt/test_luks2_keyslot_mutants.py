"""keyslot.py against references written or checked outside the module, each case in milliseconds.

Why: a keyslot primitive that is wrong in the same way on both sides (split and merge,
encrypt and decrypt) still round-trips, so the round-trip tests in test_luks2_keyslot.py
cannot see it; only cryptsetup interop (slow) could. Here: the LUKS1 anti-forensic merge
re-implemented from the specification in a few lines, Argon2id outputs checked once against
the reference implementation (Debian's ``argon2`` CLI, 0~20171227: ``printf pw | argon2
saltsaltsaltsaltsaltsaltsaltsalt -id -t 2 -k 64 -p 2 -l 64 -r``), PBKDF2 against hashlib,
the area cipher against AES-XTS unit by unit, and every refusal by its exact text.
"""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fuse_crypt.luks2 import Luks2Error
from fuse_crypt.luks2 import keyslot as ks

SALT = b"saltsaltsaltsaltsaltsaltsaltsalt"
# argon2 CLI output (see the module docstring) for password "pw", 64 bytes
ARGON2_T2_M64_P2 = bytes.fromhex(
    "a0545eedc4ce425742eb1bdf90711ee3735c1e97cb1c9bcb0ae71a1fade7fa0c"
    "b3dda843eead2dc80091225a288a46b937f141cff9dc664cbd59ead51dba1f3c"
)
ARGON2_T3_M256_P4 = bytes.fromhex(
    "0f54206c0c3d1c0c3ca5855335957e6c8ab882e15ad7b538152fb702bbb68437"
    "7686d3e5f720287302502dc3c073128333a48c6397770c1bd5ca1f75f659d141"
)


def _merge_reference(material: bytes, key_size: int, stripes: int, hname: str) -> bytes:
    """LUKS1 AF-merge as the LUKS1 on-disk format specification describes it."""

    def xor(a: bytes, b: bytes) -> bytes:
        return bytes(x ^ y for x, y in zip(a, b, strict=True))

    def diffuse(block: bytes) -> bytes:
        size = hashlib.new(hname).digest_size
        out = b""
        for i in range(-(-len(block) // size)):
            chunk = block[i * size : (i + 1) * size]
            out += hashlib.new(hname, i.to_bytes(4, "big") + chunk).digest()[: len(chunk)]
        return out

    d = bytes(key_size)
    for i in range(stripes - 1):
        d = diffuse(xor(d, material[i * key_size : (i + 1) * key_size]))
    return xor(d, material[(stripes - 1) * key_size : stripes * key_size])


@pytest.mark.parametrize(
    ("key_size", "stripes", "hname"),
    [
        (64, 4000, "sha256"),
        (64, 3, "sha256"),
        (40, 5, "sha256"),
        (33, 7, "sha512"),
        (20, 2, "sha1"),
    ],
)
def test_af_merge_matches_the_specification(key_size: int, stripes: int, hname: str) -> None:
    material = os.urandom(key_size * stripes)
    expected = _merge_reference(material, key_size, stripes, hname)
    assert ks.af_merge(material, key_size, stripes, hname) == expected
    assert ks.af_merge(material + b"extra", key_size, stripes, hname) == expected  # tail ignored
    key = os.urandom(key_size)
    split = ks.af_split(key, stripes, hname)
    assert len(split) == key_size * stripes
    assert _merge_reference(split, key_size, stripes, hname) == key


def test_af_defaults_are_luks2s() -> None:
    material = os.urandom(64 * 4000)
    assert ks.af_merge(material, 64) == _merge_reference(material, 64, 4000, "sha256")
    key = os.urandom(64)
    split = ks.af_split(key)
    assert len(split) == 256000
    assert _merge_reference(split, 64, 4000, "sha256") == key
    assert (ks.AF_STRIPES, ks.AF_HASH, ks.AREA_UNIT) == (4000, "sha256", 512)


def test_af_merge_length_bound_both_sides() -> None:
    assert len(ks.af_merge(bytes(64 * 3), 64, 3)) == 64
    with pytest.raises(Luks2Error) as err:
        ks.af_merge(bytes(64 * 3 - 1), 64, 3)
    assert str(err.value) == "keyslot material is too short"


def test_af_split_stripes_are_random_except_the_last() -> None:
    key = bytes(64)
    a, b = ks.af_split(key, 3), ks.af_split(key, 3)
    assert a[:128] != b[:128] and len(a) == len(b) == 192


def test_material_length_rounds_up_to_512() -> None:
    assert ks.material_length(64) == 256000
    assert ks.material_length(64, 8) == 512
    assert ks.material_length(64, 9) == 1024
    assert ks.material_length(1, 512) == 512
    assert ks.material_length(1, 513) == 1024
    assert ks.material_length(1, 511) == 512


def test_argon2id_matches_the_reference_implementation() -> None:
    two = ks.Kdf("argon2id", SALT, time=2, memory_kib=64, cpus=2)
    assert ks.derive_kek(b"pw", two, 64) == ARGON2_T2_M64_P2
    four = ks.Kdf("argon2id", SALT, time=3, memory_kib=256, cpus=4)
    assert ks.derive_kek(b"pw", four, 64) == ARGON2_T3_M256_P4
    assert ks.derive_kek(b"pw", two, 32) != ARGON2_T2_M64_P2[:32]  # length is an input


def test_argon2id_refusal_is_typed_and_fixed() -> None:
    for kdf in (
        ks.Kdf("argon2id", SALT, time=1, memory_kib=8, cpus=4),  # memory < 8 x lanes
        ks.Kdf("argon2id", SALT, time=0, memory_kib=32, cpus=1),
        ks.Kdf("argon2id", b"short", time=1, memory_kib=32, cpus=1),
    ):
        with pytest.raises(Luks2Error) as err:
            ks.derive_kek(b"pw", kdf, 64)
        assert str(err.value) == "Argon2id refused the keyslot parameters"


def test_pbkdf2_and_unknown_kdfs() -> None:
    kdf = ks.Kdf("pbkdf2", SALT, iterations=1001)
    assert ks.derive_kek(b"pw", kdf, 64) == hashlib.pbkdf2_hmac("sha256", b"pw", SALT, 1001, 64)
    assert len(ks.derive_kek(b"pw", kdf, 32)) == 32
    for kind in ("scrypt", "PBKDF2", "argon2i", ""):
        with pytest.raises(Luks2Error) as err:
            ks.derive_kek(b"pw", ks.Kdf(kind, SALT, 1, 32, 1, 1000), 64)
        assert str(err.value) == "unsupported keyslot KDF"


def test_area_cipher_is_xts_per_512_byte_unit() -> None:
    kek = bytes(range(64))
    data = os.urandom(512 * 300)
    enc = ks.area_encrypt(kek, data)
    for unit in (0, 1, 255, 256, 299):
        tweak = unit.to_bytes(8, "little") + bytes(8)
        part = Cipher(algorithms.AES(kek), modes.XTS(tweak)).encryptor()
        expected = part.update(data[unit * 512 : (unit + 1) * 512]) + part.finalize()
        assert enc[unit * 512 : (unit + 1) * 512] == expected
    assert ks.area_decrypt(kek, enc) == data
    assert ks.area_decrypt(kek, data) != data
    assert ks.area_encrypt(kek, b"") == b""


def test_area_cipher_refusals() -> None:
    kek = bytes(range(64))
    for bad_kek in (kek[:32], kek + b"\0", kek[:63]):
        for op in (ks.area_encrypt, ks.area_decrypt):
            with pytest.raises(Luks2Error) as err:
                op(bad_kek, bytes(512))
            assert str(err.value) == "keyslot area key must be 64 bytes (AES-256-XTS)"
    for length in (1, 511, 513, 1000):
        for op in (ks.area_encrypt, ks.area_decrypt):
            with pytest.raises(Luks2Error) as err:
                op(kek, bytes(length))
            assert str(err.value) == "keyslot area length is not a multiple of 512"


def test_digest_is_pbkdf2_sha256_of_32_bytes() -> None:
    vk = bytes(range(64))
    value = ks.compute_digest(vk, SALT, 1000)
    assert value == hashlib.pbkdf2_hmac("sha256", vk, SALT, 1000, 32)
    assert ks.digest_matches(vk, SALT, 1000, value)
    assert not ks.digest_matches(vk, SALT, 1001, value)
    assert not ks.digest_matches(vk, SALT[:-1] + b"x", 1000, value)
    assert not ks.digest_matches(vk, SALT, 1000, value[:-1] + bytes([value[-1] ^ 1]))
    assert not ks.digest_matches(vk, SALT, 1000, value[:31])


def test_kdf_cost_defaults() -> None:
    """What format_volume uses unless told otherwise (docs/block.md): changing it is a decision."""
    assert ks.KdfCost() == ks.KdfCost(time=4, memory_kib=65536, cpus=1, iterations=600_000)
