"""ContentEnc: header, block batches, tamper detection, holes and size maths."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_crypt.contentenc import (
    BLOCK_OVERHEAD,
    CIPHER_BS,
    HEADER_LEN,
    PLAIN_BS,
    ContentEnc,
)
from fuse_crypt.cryptocore import INFO_GCM, CryptoCore, hkdf_sha256
from fuse_crypt.errors import CorruptDataError
from tests.fuse_crypt.conftest import CONTENT_MK as MK


@pytest.fixture
def gcm_ce() -> ContentEnc:
    return ContentEnc(CryptoCore(MK))


def test_constants() -> None:
    assert (HEADER_LEN, PLAIN_BS, CIPHER_BS, BLOCK_OVERHEAD) == (18, 4096, 4128, 32)


def test_header(ce: ContentEnc) -> None:
    header, fid = ce.new_header()
    assert len(header) == 18 and header[:2] == b"\x00\x02" and header[2:] == fid
    assert ce.new_header()[1] != fid
    assert ce.parse_header(header) == fid
    for bad in (
        header[:17],
        header + b"x",
        b"\x00\x01" + fid,
        b"\x00\x03" + fid,
        b"\x00\x02" + bytes(16),
        bytes(18),
    ):
        with pytest.raises(CorruptDataError):
            ce.parse_header(bad)


def test_block_layout_matches_gocryptfs(gcm_ce: ContentEnc) -> None:
    """nonce(16) || AES-GCM(ct || tag) with AAD = uint64_BE(blockNo) || fileID."""
    _, fid = gcm_ce.new_header()
    data = os.urandom(PLAIN_BS + 10)
    ct = gcm_ce.encrypt_blocks(7, data, fid)
    aead = AESGCM(hkdf_sha256(MK, INFO_GCM))
    b0, b1 = ct[:CIPHER_BS], ct[CIPHER_BS:]
    assert aead.decrypt(b0[:16], b0[16:], struct.pack(">Q", 7) + fid) == data[:PLAIN_BS]
    assert aead.decrypt(b1[:16], b1[16:], struct.pack(">Q", 8) + fid) == data[PLAIN_BS:]


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096, (1 << 20) + 1])
def test_round_trip_and_sizes(ce: ContentEnc, n: int) -> None:
    _, fid = ce.new_header()
    data = os.urandom(n)
    ct = ce.encrypt_blocks(0, data, fid)
    blocks = -(-n // PLAIN_BS)
    assert len(ct) == n + 32 * blocks
    assert ce.cipher_size(n) == (0 if n == 0 else HEADER_LEN + len(ct))
    assert ce.plain_size(ce.cipher_size(n)) == n
    assert ce.decrypt_blocks(0, ct, fid) == data
    assert ce.encrypt_blocks(0, data, fid) != ct or n == 0  # fresh nonces every time


def test_size_examples(gcm_ce: ContentEnc) -> None:
    cs = gcm_ce.cipher_size
    assert [cs(n) for n in (0, 1, 18, 4095, 4096, 4097, 5000, 10000, 1_000_000)] == [
        0,
        51,
        68,
        18 + 4095 + 32,
        18 + 4128,
        18 + 4128 + 33,
        5082,
        10114,
        1_007_858,
    ]
    assert cs((1 << 20) + 1) == 18 + 256 * 4128 + 33
    ps = gcm_ce.plain_size
    assert ps(0) == 0 and ps(18) == 0 and ps(51) == 1 and ps(18 + 4128) == 4096


def test_plain_size_rejects_impossible_sizes(gcm_ce: ContentEnc) -> None:
    for c in (1, 17, 18 + 1, 18 + 32, 18 + 4128 + 5, 18 + 4128 + 32):
        with pytest.raises(CorruptDataError):
            gcm_ce.plain_size(c)
    # lenient mode mirrors gocryptfs: torn tail counted as one byte, short file empty
    assert gcm_ce.plain_size(17, strict=False) == 0
    assert gcm_ce.plain_size(18 + 4128 + 5, strict=False) == 4097
    for c in range(19, 18 + 3 * 4128):
        try:
            p = gcm_ce.plain_size(c)
        except CorruptDataError:
            continue
        assert gcm_ce.cipher_size(p) == c


def test_block_range_and_offsets() -> None:
    br = ContentEnc.block_range
    assert br(0, 0) == (0, 0)
    assert br(0, 1) == (0, 1)
    assert br(0, 4096) == (0, 1)
    assert br(0, 4097) == (0, 2)
    assert br(4095, 2) == (0, 2)
    assert br(4096, 4096) == (1, 2)
    assert br(10, 0) == (0, 0)
    assert br(12293, 1) == (3, 4)
    assert ContentEnc.cipher_offset(0) == 18
    assert ContentEnc.cipher_offset(3) == 18 + 3 * 4128
    with pytest.raises(ValueError):
        br(-1, 1)


def test_holes(ce: ContentEnc) -> None:
    _, fid = ce.new_header()
    tail = ce.encrypt_blocks(3, b"tail", fid)
    ct = bytes(3 * CIPHER_BS) + tail
    assert ce.decrypt_blocks(0, ct, fid) == bytes(3 * PLAIN_BS) + b"tail"
    # a hole in the middle of a batch
    a = ce.encrypt_blocks(0, b"a" * PLAIN_BS, fid)
    c = ce.encrypt_blocks(2, b"c" * PLAIN_BS, fid)
    out = ce.decrypt_blocks(0, a + bytes(CIPHER_BS) + c, fid)
    assert out == b"a" * PLAIN_BS + bytes(PLAIN_BS) + b"c" * PLAIN_BS
    # a short all-zero block is not a hole, nor a full block with a zero nonce
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, bytes(100), fid)
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, bytes(16) + a[16:], fid)


def test_zero_plaintext_is_not_stored_as_hole(ce: ContentEnc) -> None:
    _, fid = ce.new_header()
    ct = ce.encrypt_blocks(0, bytes(PLAIN_BS), fid)
    assert ct != bytes(CIPHER_BS)


def test_tamper_any_bit_is_detected(gcm_ce: ContentEnc) -> None:
    _, fid = gcm_ce.new_header()
    ct = gcm_ce.encrypt_blocks(0, os.urandom(PLAIN_BS + 100), fid)
    positions = [0, 15, 16, 17, 2000, CIPHER_BS - 17, CIPHER_BS - 1]  # nonce, ct, tag
    positions += [CIPHER_BS + p for p in (0, 16, 50, len(ct) - CIPHER_BS - 1)]
    for pos in positions:
        for bit in (0x01, 0x80):
            bad = bytearray(ct)
            bad[pos] ^= bit
            with pytest.raises(CorruptDataError):
                gcm_ce.decrypt_blocks(0, bytes(bad), fid)


def test_tamper_siv_block(ce: ContentEnc) -> None:
    _, fid = ce.new_header()
    ct = bytearray(ce.encrypt_blocks(0, b"x" * 300, fid))
    for pos in (0, 16, 31, 32, len(ct) - 1):
        bad = bytearray(ct)
        bad[pos] ^= 0x40
        with pytest.raises(CorruptDataError):
            ce.decrypt_blocks(0, bytes(bad), fid)


def test_blocks_bound_to_position_and_file(ce: ContentEnc) -> None:
    _, fid = ce.new_header()
    _, other = ce.new_header()
    ct = ce.encrypt_blocks(0, b"A" * PLAIN_BS + b"B" * PLAIN_BS, fid)
    b0, b1 = ct[:CIPHER_BS], ct[CIPHER_BS:]
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, b1 + b0, fid)  # swapped positions
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(1, b0, fid)  # moved
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, ct, other)  # other file's header
    foreign = ce.encrypt_blocks(1, b"C" * PLAIN_BS, other)
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, b0 + foreign, fid)  # block from another file, same position
    with pytest.raises(CorruptDataError):
        ContentEnc(CryptoCore(os.urandom(32))).decrypt_blocks(0, ct, fid)  # wrong key


def test_truncated_blocks(ce: ContentEnc) -> None:
    _, fid = ce.new_header()
    ct = ce.encrypt_blocks(0, os.urandom(PLAIN_BS * 2), fid)
    for cut in (1, 16, 32, CIPHER_BS - 1):
        with pytest.raises(CorruptDataError):
            ce.decrypt_blocks(0, ct[: CIPHER_BS + cut], fid)
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, ct[: CIPHER_BS + 40], fid)  # cut mid-block: tag no longer fits


def test_accepts_memoryview_and_bytearray(ce: ContentEnc) -> None:
    _, fid = ce.new_header()
    data = bytearray(os.urandom(9000))
    ct = ce.encrypt_blocks(2, memoryview(data), fid)
    assert ce.decrypt_blocks(2, memoryview(bytearray(ct)), fid) == bytes(data)
    assert ce.decrypt_blocks(0, b"", fid) == b"" and ce.encrypt_blocks(0, b"", fid) == b""


def test_rejects_bad_arguments(ce: ContentEnc) -> None:
    with pytest.raises(ValueError):
        ce.encrypt_blocks(0, b"x", b"short")
    with pytest.raises(ValueError):
        ce.encrypt_blocks(-1, b"x", bytes(16))
    with pytest.raises(ValueError):
        ce.cipher_size(-1)


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=3 * PLAIN_BS + 7),
    first=st.integers(min_value=0, max_value=2**40),
)
def test_round_trip_property(data: bytes, first: int) -> None:
    ce = ContentEnc(CryptoCore(MK))
    fid = os.urandom(16)
    ct = ce.encrypt_blocks(first, data, fid)
    assert len(ct) == (ce.cipher_size(len(data)) - HEADER_LEN if data else 0)
    assert ce.decrypt_blocks(first, ct, fid) == data


def test_batch_equals_blockwise(gcm_ce: ContentEnc) -> None:
    """Decrypting a batch equals decrypting each block alone (the frontend mixes both)."""
    _, fid = gcm_ce.new_header()
    data = os.urandom(5 * PLAIN_BS + 1)
    ct = gcm_ce.encrypt_blocks(0, data, fid)
    pieces = [
        gcm_ce.decrypt_blocks(i, ct[i * CIPHER_BS : (i + 1) * CIPHER_BS], fid) for i in range(6)
    ]
    assert b"".join(pieces) == data


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=2 * CIPHER_BS + 50), first=st.integers(0, 10))
def test_garbage_ciphertext_only_raises_corrupt(blob: bytes, first: int) -> None:
    ce = ContentEnc(CryptoCore(MK))
    try:
        out = ce.decrypt_blocks(first, blob, bytes(range(16)))
    except CorruptDataError:
        return
    # only holes (or nothing) can "decrypt" without the key
    assert out == bytes(len(out))
    with contextlib.suppress(CorruptDataError):
        ce.parse_header(blob[:HEADER_LEN])


def test_wipe_of_core_disables_content_crypto() -> None:
    core = CryptoCore(os.urandom(32))
    ce = ContentEnc(core)
    fid = os.urandom(16)
    ct = ce.encrypt_blocks(0, b"data", fid)
    core.wipe()
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, ct, fid)
    with pytest.raises(CorruptDataError):
        ce.encrypt_blocks(0, b"data", fid)


def test_into_variants_match_and_overwrite_dirty_buffers(ce: ContentEnc) -> None:
    """The *_into forms the FUSE hot path uses: same result as the bytes forms, and a
    recycled buffer's old contents never leak into the output (holes included)."""
    fid = os.urandom(16)
    plain = os.urandom(2 * PLAIN_BS + 100)
    cbuf = bytearray(b"\xaa" * (len(plain) + 3 * BLOCK_OVERHEAD + 7))
    n = ce.encrypt_blocks_into(5, memoryview(plain), fid, cbuf)
    assert n == len(plain) + 3 * BLOCK_OVERHEAD
    assert cbuf[n:] == b"\xaa" * 7
    assert ce.decrypt_blocks(5, bytes(cbuf[:n]), fid) == plain
    # A hole in the middle must come out as zeros even in a dirty buffer.
    ct = bytearray(cbuf[:n])
    ct[CIPHER_BS : 2 * CIPHER_BS] = bytes(CIPHER_BS)
    pbuf = bytearray(b"\xbb" * (len(plain) + 5))
    m = ce.decrypt_blocks_into(5, memoryview(ct), fid, memoryview(pbuf))
    assert m == len(plain)
    expect = plain[:PLAIN_BS] + bytes(PLAIN_BS) + plain[2 * PLAIN_BS :]
    assert bytes(pbuf[:m]) == expect == ce.decrypt_blocks(5, bytes(ct), fid)
    assert ce.encrypt_blocks_into(0, b"", fid, bytearray()) == 0
    assert ce.decrypt_blocks_into(0, b"", fid, bytearray()) == 0


def test_into_variants_reject_small_buffers_and_tampering(ce: ContentEnc) -> None:
    fid = os.urandom(16)
    ct = ce.encrypt_blocks(0, os.urandom(PLAIN_BS), fid)
    with pytest.raises(ValueError):
        ce.encrypt_blocks_into(0, os.urandom(PLAIN_BS), fid, bytearray(CIPHER_BS - 1))
    with pytest.raises(ValueError):
        ce.decrypt_blocks_into(0, ct, fid, bytearray(PLAIN_BS - 1))
    bad = bytearray(ct)
    bad[-1] ^= 1
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks_into(0, bad, fid, bytearray(PLAIN_BS))
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks_into(1, ct, fid, bytearray(PLAIN_BS))
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks_into(0, ct[:BLOCK_OVERHEAD], fid, bytearray(PLAIN_BS))
