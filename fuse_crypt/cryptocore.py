"""Master key -> sub-keys and the AEAD used for contents, symlinks and xattr values.

Keeping every key inside one object (and deriving sub-keys once) means the rest of
fuse_crypt only ever handles opaque cipher objects, never raw key bytes.  Sub-keys
follow gocryptfs: HKDF-SHA256 with no salt and fixed ASCII info strings, or the master
key itself on pre-v1.3 volumes without the ``HKDF`` flag.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .eme import EME
from .errors import CorruptDataError

KEY_LEN = 32
NONCE_SIZE = 16
TAG_SIZE = 16

INFO_GCM = b"AES-GCM file content encryption"
INFO_SIV = b"AES-SIV file content encryption"
INFO_EME = b"EME filename encryption"

ALGO_GCM = "AES-GCM-256"
ALGO_SIV = "AES-SIV-512"


def hkdf_sha256(ikm: bytes, info: bytes, length: int = KEY_LEN) -> bytes:
    """gocryptfs' ``hkdf.Key(sha256.New, ikm, nil, info, length)``."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(ikm)


class CryptoCore:
    """AEAD + EME for one master key.

    ``encrypt_raw(nonce, plaintext, aad)`` returns the on-disk body that follows the
    nonce (GCM: ``ct || tag``; SIV: ``siv || ct``) and ``decrypt_raw`` reverses it,
    raising ``cryptography.exceptions.InvalidTag``.  They are exposed (bound methods of
    the library object for GCM, so no Python wrapper frame) for the block loop in
    :mod:`fuse_crypt.contentenc`, where per-call overhead dominates throughput.
    """

    nonce_size: int = NONCE_SIZE
    tag_size: int = TAG_SIZE

    def __init__(self, master_key: bytes, *, use_hkdf: bool = True, aessiv: bool = False) -> None:
        if len(master_key) != KEY_LEN:
            raise ValueError("master key must be 32 bytes")
        self.use_hkdf = use_hkdf
        self.algorithm = ALGO_SIV if aessiv else ALGO_GCM
        eme_key = hkdf_sha256(master_key, INFO_EME) if use_hkdf else bytes(master_key)
        self._eme: EME | None = EME(eme_key)
        self.encrypt_raw: Callable[[bytes, bytes, bytes], bytes]
        self.decrypt_raw: Callable[[bytes, bytes, bytes], bytes]
        if aessiv:
            siv_key = (
                hkdf_sha256(master_key, INFO_SIV, 64)
                if use_hkdf
                else hashlib.sha512(master_key).digest()
            )
            siv = AESSIV(siv_key)
            siv_enc, siv_dec = siv.encrypt, siv.decrypt
            # gocryptfs passes the nonce as the *last* associated-data component.
            self.encrypt_raw = lambda nonce, data, aad: siv_enc(data, [aad, nonce])
            self.decrypt_raw = lambda nonce, data, aad: siv_dec(data, [aad, nonce])
            self._aead: object | None = siv
            self.gcm: AESGCM | None = None
        else:
            gcm_key = hkdf_sha256(master_key, INFO_GCM) if use_hkdf else bytes(master_key)
            gcm = AESGCM(gcm_key)
            self.encrypt_raw = gcm.encrypt
            self.decrypt_raw = gcm.decrypt
            self._aead = gcm
            self.gcm = gcm

    def __repr__(self) -> str:
        return f"CryptoCore(algorithm={self.algorithm!r}, hkdf={self.use_hkdf}, keys=<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("CryptoCore holds keys and cannot be pickled")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        """nonce || body with a fresh random nonce (symlinks, xattr values)."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self.encrypt_raw(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise CorruptDataError("sealed data too short")
        nonce = bytes(sealed[:NONCE_SIZE])
        if nonce == bytes(NONCE_SIZE):
            raise CorruptDataError("all-zero nonce")
        try:
            return self.decrypt_raw(nonce, sealed[NONCE_SIZE:], aad)
        except InvalidTag:
            raise CorruptDataError("authentication failed") from None

    def eme_encrypt(self, tweak: bytes, data: bytes) -> bytes:
        if self._eme is None:
            raise CorruptDataError("crypto core was wiped")
        return self._eme.encrypt(tweak, data)

    def eme_decrypt(self, tweak: bytes, data: bytes) -> bytes:
        if self._eme is None:
            raise CorruptDataError("crypto core was wiped")
        return self._eme.decrypt(tweak, data)

    def wipe(self) -> None:
        """Drop every reference to key-holding objects (best effort: Python cannot
        scrub the library's internal copies, but they become unreachable)."""
        self._eme = None
        self._aead = None
        self.gcm = None

        def _gone(*_args: object) -> bytes:
            raise CorruptDataError("crypto core was wiped")

        self.encrypt_raw = _gone
        self.decrypt_raw = _gone
