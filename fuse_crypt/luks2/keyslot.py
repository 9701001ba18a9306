"""Keyslots: KDF (PBKDF2, Argon2id), the LUKS1 anti-forensic splitter, area crypto, digest.

Pure functions over bytes, following cryptsetup 2.6 (luks2.md §3): KEK = KDF(passphrase),
the AF-split volume key is encrypted with aes-xts-plain64 in 512-byte units counted from
the start of the area, and the merged candidate is accepted only if its PBKDF2 digest
matches (constant-time). KDF parameters reach here only after profile.py bounded them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .errors import Luks2Error

__all__ = [
    "AF_HASH",
    "AF_STRIPES",
    "AREA_UNIT",
    "Kdf",
    "KdfCost",
    "af_merge",
    "af_split",
    "area_decrypt",
    "area_encrypt",
    "compute_digest",
    "derive_kek",
    "digest_matches",
    "material_length",
]

AF_STRIPES = 4000
AF_HASH = "sha256"
AREA_UNIT = 512  # keyslot areas are encrypted in 512-byte units whatever the data sector size
SALT_LEN = 32


@dataclass(frozen=True)
class KdfCost:
    """KDF cost for keyslots we create (Argon2id: time, memory_kib, cpus; PBKDF2: iterations).

    The defaults are moderate on purpose: coco-csi passphrases are random KBS keys, so the
    cost buys little, and staging must stay well under a second (cryptsetup's 1 GiB Argon2
    default would be a quarter of a small guest's RAM). Tests pass tiny costs.
    """

    time: int = 4
    memory_kib: int = 65536
    cpus: int = 1
    iterations: int = 600_000


@dataclass(frozen=True)
class Kdf:
    """One keyslot's KDF as validated by profile.py: ``type`` "argon2id" or "pbkdf2"."""

    type: str
    salt: bytes
    time: int = 0
    memory_kib: int = 0
    cpus: int = 0
    iterations: int = 0


def derive_kek(passphrase: bytes, kdf: Kdf, length: int) -> bytes:
    """The key-encryption key of a keyslot (cryptsetup: no Argon2 secret, no AD, v0x13)."""
    if kdf.type == "pbkdf2":
        return hashlib.pbkdf2_hmac("sha256", passphrase, kdf.salt, kdf.iterations, length)
    if kdf.type == "argon2id":
        try:
            return Argon2id(
                salt=kdf.salt,
                length=length,
                iterations=kdf.time,
                lanes=kdf.cpus,
                memory_cost=kdf.memory_kib,
            ).derive(passphrase)
        except (ValueError, MemoryError):
            raise Luks2Error("Argon2id refused the keyslot parameters") from None
    raise Luks2Error("unsupported keyslot KDF")


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _diffuse(buf: bytes, hname: str) -> bytes:
    """Hash each digest-sized chunk with its big-endian index (short last chunk truncated)."""
    size = hashlib.new(hname).digest_size
    out = bytearray()
    for i in range(0, len(buf), size):
        chunk = buf[i : i + size]
        out += hashlib.new(hname, (i // size).to_bytes(4, "big") + chunk).digest()[: len(chunk)]
    return bytes(out)


def af_merge(
    material: bytes, key_size: int, stripes: int = AF_STRIPES, hname: str = AF_HASH
) -> bytes:
    """Recover the key from ``stripes`` stripes of ``key_size`` bytes (LUKS1 AF)."""
    if len(material) < key_size * stripes:
        raise Luks2Error("keyslot material is too short")
    d = bytes(key_size)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, material[i * key_size : (i + 1) * key_size]), hname)
    return _xor(d, material[(stripes - 1) * key_size : stripes * key_size])


def af_split(key: bytes, stripes: int = AF_STRIPES, hname: str = AF_HASH) -> bytes:
    """Fresh random stripes 0..n-2 and a last stripe that makes af_merge return ``key``."""
    key_size = len(key)
    rand = os.urandom(key_size * (stripes - 1))
    d = bytes(key_size)
    for i in range(stripes - 1):
        d = _diffuse(_xor(d, rand[i * key_size : (i + 1) * key_size]), hname)
    return rand + _xor(d, key)


def material_length(key_size: int, stripes: int = AF_STRIPES) -> int:
    """Bytes of AF material as stored: key_size x stripes rounded up to 512."""
    return -(-key_size * stripes // AREA_UNIT) * AREA_UNIT


def _area_crypt(key: bytes, data: bytes, *, encrypt: bool) -> bytes:
    if len(key) != 64:
        raise Luks2Error("keyslot area key must be 64 bytes (AES-256-XTS)")
    if len(data) % AREA_UNIT:
        raise Luks2Error("keyslot area length is not a multiple of 512")
    out = bytearray(len(data))
    algo = algorithms.AES(key)  # ValueError if the halves are equal: caller treats as failure
    for unit, pos in enumerate(range(0, len(data), AREA_UNIT)):
        tweak = unit.to_bytes(8, "little") + bytes(8)
        ctx = Cipher(algo, modes.XTS(tweak))
        op = ctx.encryptor() if encrypt else ctx.decryptor()
        out[pos : pos + AREA_UNIT] = op.update(data[pos : pos + AREA_UNIT]) + op.finalize()
    return bytes(out)


def area_decrypt(kek: bytes, data: bytes) -> bytes:
    """aes-xts-plain64 decryption, 512-byte units, tweak counted from the area start."""
    return _area_crypt(kek, data, encrypt=False)


def area_encrypt(kek: bytes, data: bytes) -> bytes:
    """Inverse of :func:`area_decrypt`."""
    return _area_crypt(kek, data, encrypt=True)


def compute_digest(volume_key: bytes, salt: bytes, iterations: int) -> bytes:
    """The segment digest: PBKDF2-HMAC-sha256(VK, salt, iterations, 32)."""
    return hashlib.pbkdf2_hmac("sha256", volume_key, salt, iterations, 32)


def digest_matches(volume_key: bytes, salt: bytes, iterations: int, expected: bytes) -> bool:
    """Constant-time comparison of a candidate VK's digest with the header's."""
    return hmac.compare_digest(compute_digest(volume_key, salt, iterations), expected)
