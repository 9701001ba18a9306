"""aes-xts-plain64 data sectors against cryptsetup 2.6 and an independent XTS.

The oracles (luks2.md §7/§8): cryptsetup encrypts plaintext in place (offline reencrypt with
a detached header) and we decrypt it; we encrypt and cryptsetup decrypts; and an attached
header with its 16 MiB data offset, re-keyed by cryptsetup, shows the IV counts from the
segment start, not the device start.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.luks2.segment import SegmentError, XtsSegment
from tests.fuse_crypt import luks2_helpers as lh
from tests.fuzzing import fuzz

SS = 4096


def _gf_double(t: bytes) -> bytes:
    n = int.from_bytes(t, "little") << 1
    if n >> 128:
        n = (n & ((1 << 128) - 1)) ^ 0x87
    return n.to_bytes(16, "little")


def reference_xts(key: bytes, iv_units: int, data: bytes, *, encrypt: bool) -> bytes:
    """IEEE 1619 XTS from AES-ECB alone (no ciphertext stealing: whole blocks)."""
    half = len(key) // 2
    k1 = Cipher(algorithms.AES(key[:half]), modes.ECB())
    t = (
        Cipher(algorithms.AES(key[half:]), modes.ECB())
        .encryptor()
        .update(iv_units.to_bytes(16, "little"))
    )
    ctx = k1.encryptor() if encrypt else k1.decryptor()
    out = bytearray()
    for i in range(0, len(data), 16):
        block = bytes(a ^ b for a, b in zip(data[i : i + 16], t, strict=True))
        out += bytes(a ^ b for a, b in zip(ctx.update(block), t, strict=True))
        t = _gf_double(t)
    return bytes(out)


def test_tweak_counts_512_byte_units() -> None:
    seg = XtsSegment(os.urandom(64))
    assert seg.tweak(0) == bytes(16)
    assert seg.tweak(1) == (8).to_bytes(8, "little") + bytes(8)
    assert XtsSegment(os.urandom(64), iv_tweak=3).tweak(2) == (19).to_bytes(16, "little")
    plain = XtsSegment(os.urandom(64), cipher="aes-xts-plain", iv_tweak=(1 << 32) - 8)
    assert plain.tweak(1) == bytes(16)  # the 32-bit counter wraps


@pytest.mark.parametrize("key_len", [64, 32])
def test_matches_independent_xts(key_len: int) -> None:
    key = os.urandom(key_len)
    seg = XtsSegment(key)
    data = os.urandom(3 * SS)
    ct = seg.encrypt(2 * SS, data)
    for i in range(3):
        sector = data[i * SS : (i + 1) * SS]
        want = reference_xts(key, (2 + i) * 8, sector, encrypt=True)
        assert ct[i * SS : (i + 1) * SS] == want
    assert seg.decrypt(2 * SS, ct) == data


@pytest.mark.parametrize("cipher", ["aes-xts-plain64", "aes-xts-plain"])
def test_fast_path_equals_public_api_and_reference(
    cipher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path (context constructor without Cipher's per-call checks, tweak computed
    inline) gives what the public API and an independent XTS give, across the 32-bit
    counter wrap of aes-xts-plain."""
    from fuse_crypt.luks2 import segment

    key, data = os.urandom(64), os.urandom(4 * SS)
    seg = XtsSegment(key, cipher=cipher, iv_tweak=(1 << 32) - 16)
    fast = seg.encrypt(SS, data)
    monkeypatch.setattr(segment, "_ENC_CTX", None)
    monkeypatch.setattr(segment, "_DEC_CTX", None)
    assert seg.encrypt(SS, data) == fast and seg.decrypt(SS, fast) == data
    monkeypatch.undo()
    assert seg.decrypt(SS, fast) == data
    for i in range(4):
        units = int.from_bytes(seg.tweak(1 + i), "little")
        want = reference_xts(key, units, data[i * SS : (i + 1) * SS], encrypt=True)
        assert fast[i * SS : (i + 1) * SS] == want


def test_in_place_and_into() -> None:
    seg = XtsSegment(os.urandom(64))
    data = os.urandom(2 * SS)
    buf = bytearray(data)
    seg.encrypt_into(SS, buf, buf)
    assert bytes(buf) == seg.encrypt(SS, data)
    seg.decrypt_into(SS, buf, buf)
    assert bytes(buf) == data


def test_refusals() -> None:
    key = os.urandom(64)
    with pytest.raises(SegmentError, match="unsupported segment cipher"):
        XtsSegment(key, cipher="cipher_null-ecb")
    with pytest.raises(SegmentError, match="key of"):
        XtsSegment(key[:48])
    with pytest.raises(SegmentError, match="halves are equal"):
        XtsSegment(key[:32] * 2)
    with pytest.raises(SegmentError, match="sector size"):
        XtsSegment(key, sector_size=8192)
    with pytest.raises(SegmentError, match="iv_tweak"):
        XtsSegment(key, iv_tweak=-1)
    seg = XtsSegment(key)
    with pytest.raises(ValueError, match="whole sectors"):
        seg.encrypt(1, bytes(SS))
    with pytest.raises(ValueError, match="whole sectors"):
        seg.decrypt(0, bytes(100))
    with pytest.raises(ValueError, match="too small"):
        seg.encrypt_into(0, bytes(SS), bytearray(10))
    seg.wipe()
    with pytest.raises(SegmentError, match="wiped"):
        seg.encrypt(0, bytes(SS))
    assert "key" not in repr(seg).lower() or key.hex() not in repr(seg)


@fuzz(quick=50)
@given(
    sectors=st.integers(min_value=0, max_value=4),
    first=st.integers(min_value=0, max_value=1 << 40),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    iv_tweak=st.integers(min_value=0, max_value=1 << 62),
    cipher=st.sampled_from(["aes-xts-plain64", "aes-xts-plain"]),
)
def test_round_trip(sectors: int, first: int, sector_size: int, iv_tweak: int, cipher: str) -> None:
    seg = XtsSegment(os.urandom(64), sector_size=sector_size, iv_tweak=iv_tweak, cipher=cipher)
    data = os.urandom(sectors * sector_size)
    off = first * sector_size
    ct = seg.encrypt(off, data)
    assert len(ct) == len(data)
    assert seg.decrypt(off, ct) == data


# -- cryptsetup oracles --------------------------------------------------------------------


def test_reads_what_cryptsetup_encrypted(tmp_path: Path) -> None:
    lh.skip_without_cryptsetup()
    plain = os.urandom(16 * SS)
    data = tmp_path / "data.img"
    data.write_bytes(plain)
    header = tmp_path / "h.img"
    header.write_bytes(bytes(16 << 20))
    lh.cryptsetup(
        "--batch-mode", "reencrypt", "--encrypt", "--force-offline-reencrypt", *lh.CDH_FORMAT,
        *lh.FAST_KDF, "--header", str(header), str(data), "--key-file", "-", stdin=b"pw",
    )  # fmt: skip
    seg_json = lh.cs_json(header)["segments"]["0"]
    assert seg_json["offset"] == "0" and seg_json["sector_size"] == SS
    ct = data.read_bytes()
    assert ct != plain
    seg = XtsSegment(lh.cs_volume_key(header), sector_size=SS)
    assert seg.decrypt(0, ct) == plain


def test_cryptsetup_reads_what_we_encrypted(tmp_path: Path) -> None:
    lh.skip_without_cryptsetup()
    vk = os.urandom(64)
    plain = os.urandom(16 * SS)
    data = tmp_path / "data.img"
    data.write_bytes(bytes(len(plain)))
    header = tmp_path / "h.img"
    lh.cs_luks_format(data, header=header, volume_key=vk)
    data.write_bytes(XtsSegment(vk).encrypt(0, plain))
    lh.cryptsetup(
        "--batch-mode", "reencrypt", "--decrypt", "--force-offline-reencrypt",
        "--header", str(header), str(data), "--key-file", "-", stdin=b"pw",
    )  # fmt: skip
    assert data.read_bytes() == plain


def test_attached_header_iv_counts_from_segment_start(tmp_path: Path) -> None:
    """Our ciphertext at the 16 MiB data offset, re-keyed by cryptsetup (which must
    decrypt it first), decrypts back to the plaintext under the new volume key."""
    lh.skip_without_cryptsetup()
    vk = os.urandom(64)
    img = tmp_path / "x.img"
    with img.open("wb") as f:
        f.truncate((16 << 20) + 8 * SS)
    lh.cs_luks_format(img, volume_key=vk)
    offset = int(lh.cs_json(img)["segments"]["0"]["offset"])
    assert offset == 16 << 20
    plain = os.urandom(8 * SS)
    with img.open("r+b") as f:
        f.seek(offset)
        f.write(XtsSegment(vk).encrypt(0, plain))
    lh.cryptsetup("--batch-mode", "reencrypt", "--force-offline-reencrypt", *lh.FAST_KDF,
                  str(img), "--key-file", "-", stdin=b"pw")  # fmt: skip
    new_vk = lh.cs_volume_key(img)
    assert new_vk != vk
    with img.open("rb") as f:
        f.seek(offset)
        ct = f.read(8 * SS)
    assert XtsSegment(new_vk).decrypt(0, ct) == plain
