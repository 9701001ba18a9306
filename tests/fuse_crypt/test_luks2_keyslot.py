"""Keyslot primitives: the AF splitter, the 512-byte-unit area cipher, KDFs, digest."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fuse_crypt.luks2 import Luks2Error
from fuse_crypt.luks2 import keyslot as ks


@pytest.mark.parametrize(("key_size", "hname"), [(64, "sha256"), (32, "sha256"), (64, "sha1"),
                                                 (96, "sha512"), (33, "sha256")])  # fmt: skip
def test_af_round_trip(key_size: int, hname: str) -> None:
    key = os.urandom(key_size)
    material = ks.af_split(key, 4000, hname)
    assert len(material) == key_size * 4000
    assert ks.af_merge(material, key_size, 4000, hname) == key
    broken = bytearray(material)
    broken[5] ^= 1  # any stripe bit changes the key: the anti-forensic property
    assert ks.af_merge(bytes(broken), key_size, 4000, hname) != key


def test_af_split_is_randomised() -> None:
    key = bytes(64)
    assert ks.af_split(key) != ks.af_split(key)


def test_af_merge_refuses_short_material() -> None:
    with pytest.raises(Luks2Error):
        ks.af_merge(bytes(100), 64)


def test_material_length() -> None:
    assert ks.material_length(64) == 256000  # luks2.md §3.1
    assert ks.material_length(96) == 384000
    assert ks.material_length(33) == 132096


def test_area_units_use_their_own_tweak() -> None:
    """Unit j of the area uses tweak LE64(j) || 0^8, counted from the area start."""
    kek = bytes(range(64))
    data = os.urandom(1024)
    enc = ks.area_encrypt(kek, data)
    second = Cipher(algorithms.AES(kek), modes.XTS((1).to_bytes(8, "little") + bytes(8)))
    assert enc[512:] == second.encryptor().update(data[512:])
    assert ks.area_decrypt(kek, enc) == data
    with pytest.raises(Luks2Error):
        ks.area_encrypt(kek, data[:100])
    with pytest.raises(Luks2Error):
        ks.area_encrypt(kek[:32], data)
    with pytest.raises(ValueError):  # OpenSSL refuses equal XTS halves when encrypting
        ks.area_encrypt(bytes(64), data)


def test_kdfs() -> None:
    salt = bytes(32)
    pb = ks.Kdf("pbkdf2", salt, iterations=1000)
    assert ks.derive_kek(b"pw", pb, 64) == hashlib.pbkdf2_hmac("sha256", b"pw", salt, 1000, 64)
    ar = ks.Kdf("argon2id", salt, time=1, memory_kib=32, cpus=1)
    assert len(ks.derive_kek(b"pw", ar, 64)) == 64
    with pytest.raises(Luks2Error):
        ks.derive_kek(b"pw", ks.Kdf("argon2id", salt, time=1, memory_kib=8, cpus=4), 64)
    with pytest.raises(Luks2Error):
        ks.derive_kek(b"pw", ks.Kdf("scrypt", salt), 64)


def test_digest() -> None:
    vk = os.urandom(64)
    salt = os.urandom(32)
    value = ks.compute_digest(vk, salt, 1000)
    assert ks.digest_matches(vk, salt, 1000, value)
    # Flip a bit: writing a fixed last byte would leave a random key unchanged 1 time in 256.
    assert not ks.digest_matches(vk[:-1] + bytes([vk[-1] ^ 1]), salt, 1000, value)
