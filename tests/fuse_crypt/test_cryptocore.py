"""CryptoCore (sub-keys, AEAD seal/open) and the EME wide-block cipher."""

from __future__ import annotations

import hashlib
import os
import pickle

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_crypt.cryptocore import INFO_EME, INFO_GCM, INFO_SIV, CryptoCore, hkdf_sha256
from fuse_crypt.eme import EME
from fuse_crypt.errors import CorruptDataError

MK = bytes(range(32))


# -- an independent, byte-wise EME written straight from the fact sheet ------------


def _ref_mul2(x: bytes) -> bytes:
    out = bytearray(16)
    out[0] = ((x[0] << 1) & 0xFF) ^ (0x87 if x[15] & 0x80 else 0)
    for j in range(1, 16):
        out[j] = ((x[j] << 1) & 0xFF) | (x[j - 1] >> 7)
    return bytes(out)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _ref_eme(key: bytes, tweak: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.ECB())

    def aes_enc(b: bytes) -> bytes:
        return cipher.encryptor().update(b)

    tk = aes_enc if encrypt else (lambda b: cipher.decryptor().update(b))
    m = len(data) // 16
    p = [data[16 * j : 16 * j + 16] for j in range(m)]
    lt = [_ref_mul2(aes_enc(bytes(16)))]
    for _ in range(1, m):
        lt.append(_ref_mul2(lt[-1]))
    ppp = [tk(_xor(p[j], lt[j])) for j in range(m)]
    mp = tweak
    for v in ppp:
        mp = _xor(mp, v)
    mc = tk(mp)
    mm = _xor(mp, mc)
    ccc = [b""] * m
    for j in range(1, m):
        mm = _ref_mul2(mm)
        ccc[j] = _xor(ppp[j], mm)
    c0 = _xor(mc, tweak)
    for j in range(1, m):
        c0 = _xor(c0, ccc[j])
    ccc[0] = c0
    return b"".join(_xor(tk(ccc[j]), lt[j]) for j in range(m))


def test_mul2_is_little_endian_not_cmac_dbl() -> None:
    # Top bit of the *last* byte carries into 0x87 at byte 0.
    x = bytes(15) + b"\x80"
    assert _ref_mul2(x) == b"\x87" + bytes(15)
    key, tweak = os.urandom(32), os.urandom(16)
    data = bytes(16)
    assert EME(key).encrypt(tweak, data) == _ref_eme(key, tweak, data, True)


@pytest.mark.parametrize("m", list(range(1, 17)) + [127, 128])
def test_eme_matches_reference_and_round_trips(m: int) -> None:
    key, tweak = os.urandom(32), os.urandom(16)
    eme = EME(key)
    data = os.urandom(16 * m)
    ct = eme.encrypt(tweak, data)
    assert len(ct) == len(data)
    assert ct == _ref_eme(key, tweak, data, True)
    assert eme.decrypt(tweak, ct) == data
    assert _ref_eme(key, tweak, ct, False) == data


def test_eme_is_wide_block_and_tweaked() -> None:
    eme = EME(os.urandom(32))
    tweak = os.urandom(16)
    a = bytes(64)
    b = bytes(63) + b"\x01"
    ca, cb = eme.encrypt(tweak, a), eme.encrypt(tweak, b)
    # a change in the last block changes every block
    assert all(ca[i : i + 16] != cb[i : i + 16] for i in range(0, 64, 16))
    assert eme.encrypt(os.urandom(16), a) != ca


@pytest.mark.parametrize("n", [0, 15, 17, 16 * 129])
def test_eme_rejects_bad_lengths(n: int) -> None:
    with pytest.raises(ValueError):
        EME(os.urandom(32)).encrypt(bytes(16), bytes(n))


def test_eme_rejects_bad_tweak_and_key() -> None:
    with pytest.raises(ValueError):
        EME(os.urandom(32)).encrypt(bytes(15), bytes(16))
    with pytest.raises(ValueError):
        EME(os.urandom(16))


@settings(max_examples=50, deadline=None)
@given(
    data=st.integers(1, 32).flatmap(lambda m: st.binary(min_size=16 * m, max_size=16 * m)),
    tweak=st.binary(min_size=16, max_size=16),
)
def test_eme_round_trip_property(data: bytes, tweak: bytes) -> None:
    eme = EME(MK)
    assert eme.decrypt(tweak, eme.encrypt(tweak, data)) == data


# -- CryptoCore --------------------------------------------------------------------


def test_repr_hides_keys() -> None:
    core = CryptoCore(MK)
    text = repr(core) + str(core) + repr(core._eme)
    for secret in (MK, hkdf_sha256(MK, INFO_GCM), hkdf_sha256(MK, INFO_EME)):
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert "AES-GCM-256" in text
    with pytest.raises(TypeError):
        pickle.dumps(core)


def test_sub_keys_follow_hkdf_flag() -> None:
    mk = os.urandom(32)
    tweak = os.urandom(16)
    hk = CryptoCore(mk)
    raw = CryptoCore(mk, use_hkdf=False)
    assert hk.eme_encrypt(tweak, bytes(32)) == EME(hkdf_sha256(mk, INFO_EME)).encrypt(
        tweak, bytes(32)
    )
    assert raw.eme_encrypt(tweak, bytes(32)) == EME(mk).encrypt(tweak, bytes(32))
    # GCM content key
    sealed = hk.seal(b"data", b"aad")
    assert AESGCM(hkdf_sha256(mk, INFO_GCM)).decrypt(sealed[:16], sealed[16:], b"aad") == b"data"
    sealed = raw.seal(b"data", b"aad")
    assert AESGCM(mk).decrypt(sealed[:16], sealed[16:], b"aad") == b"data"


def test_aessiv_layout_and_keys() -> None:
    mk = os.urandom(32)
    core = CryptoCore(mk, aessiv=True)
    assert core.algorithm == "AES-SIV-512"
    sealed = core.seal(b"hello", b"ad")
    assert len(sealed) == 16 + 16 + 5
    nonce = sealed[:16]
    # nonce is the last associated-data component, output is SIV || CT
    siv = AESSIV(hkdf_sha256(mk, INFO_SIV, 64))
    assert siv.decrypt(sealed[16:], [b"ad", nonce]) == b"hello"
    assert core.open(sealed, b"ad") == b"hello"
    legacy = CryptoCore(mk, use_hkdf=False, aessiv=True)
    s2 = legacy.seal(b"x", b"")
    assert AESSIV(hashlib.sha512(mk).digest()).decrypt(s2[16:], [b"", s2[:16]]) == b"x"


@pytest.mark.parametrize("aessiv", [False, True])
def test_seal_open_and_tamper(aessiv: bool) -> None:
    core = CryptoCore(MK, aessiv=aessiv)
    sealed = core.seal(b"some plaintext", b"aad")
    assert core.seal(b"some plaintext", b"aad") != sealed  # fresh nonce
    assert core.open(sealed, b"aad") == b"some plaintext"
    with pytest.raises(CorruptDataError):
        core.open(sealed, b"other aad")
    for i in range(len(sealed)):
        for bit in (0x01, 0x80):
            bad = bytearray(sealed)
            bad[i] ^= bit
            with pytest.raises(CorruptDataError):
                core.open(bytes(bad), b"aad")
    with pytest.raises(CorruptDataError):
        core.open(sealed[:31], b"aad")
    with pytest.raises(CorruptDataError):
        core.open(bytes(16) + sealed[16:], b"aad")
    with pytest.raises(CorruptDataError):
        CryptoCore(bytes(32), aessiv=aessiv).open(sealed, b"aad")


def test_wipe_drops_keys() -> None:
    core = CryptoCore(MK)
    sealed = core.seal(b"x", b"")
    core.wipe()
    with pytest.raises(CorruptDataError):
        core.open(sealed, b"")
    with pytest.raises(CorruptDataError):
        core.seal(b"x", b"")
    with pytest.raises(CorruptDataError):
        core.eme_encrypt(bytes(16), bytes(16))
    assert core.gcm is None


def test_rejects_wrong_key_length() -> None:
    with pytest.raises(ValueError):
        CryptoCore(bytes(16))


def test_eme_is_thread_safe() -> None:
    """FUSE serves requests from several threads; one EME instance serves them all."""
    import threading

    key = os.urandom(32)
    eme = EME(key)
    inputs = [(os.urandom(16), os.urandom(16 * (1 + i % 8))) for i in range(64)]
    expected = [_ref_eme(key, t, d, True) for t, d in inputs]
    errors: list[str] = []

    def worker() -> None:
        for _ in range(20):
            for (t, d), want in zip(inputs, expected, strict=True):
                if eme.encrypt(t, d) != want or eme.decrypt(t, want) != d:
                    errors.append("mismatch")
                    return

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
