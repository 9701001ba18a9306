"""ContentEnc boundaries and exact refusals a mutation run (tools/mutation.py) showed untested.

Each refusal is checked by its exact text and block number, so that a refusal for the wrong
reason (or at the wrong block) cannot pass; each boundary is checked on both sides.
"""

from __future__ import annotations

import os
import re

import pytest

from fuse_crypt.contentenc import (
    BLOCK_OVERHEAD,
    CIPHER_BS,
    HEADER_LEN,
    PLAIN_BS,
    ContentEnc,
)
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.errors import CorruptDataError
from tests.fuse_crypt.conftest import CONTENT_MK as MK

FID = bytes(range(100, 116))


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


# -- header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "text"),
    [
        (b"\x00\x02" + FID[:15], "file header has wrong length"),
        (b"\x00\x02" + FID + b"x", "file header has wrong length"),
        (b"", "file header has wrong length"),
        (b"\x00\x01" + FID, "file header: unsupported on-disk version"),
        (b"\x02\x00" + FID, "file header: unsupported on-disk version"),
        (b"\x00\x02" + bytes(16), "file header: all-zero file ID"),
    ],
)
def test_parse_header_refusals_are_exact(ce: ContentEnc, header: bytes, text: str) -> None:
    with pytest.raises(CorruptDataError, match=_exactly(text)):
        ce.parse_header(header)


def test_parse_header_accepts_any_buffer_and_returns_bytes(ce: ContentEnc) -> None:
    header = b"\x00\x02" + FID
    for buf in (header, bytearray(header), memoryview(header)):
        got = ce.parse_header(buf)  # type: ignore[arg-type]
        assert got == FID and type(got) is bytes
    assert ce.parse_header(b"\x00\x02" + bytes(15) + b"\x01") == bytes(15) + b"\x01"


def test_new_header_is_version_2_and_a_fresh_16_byte_id(ce: ContentEnc) -> None:
    header, fid = ce.new_header()
    assert header == b"\x00\x02" + fid and len(fid) == 16
    assert ce.parse_header(header) == fid


# -- argument checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "fid", "text"),
    [
        (-1, FID, "negative block number"),
        (0, FID[:15], "file ID must be 16 bytes"),
        (0, FID + b"x", "file ID must be 16 bytes"),
        (0, b"", "file ID must be 16 bytes"),
    ],
)
def test_block_argument_refusals_are_exact_both_ways(
    ce: ContentEnc, first: int, fid: bytes, text: str
) -> None:
    with pytest.raises(ValueError, match=_exactly(text)):
        ce.encrypt_blocks(first, b"x", fid)
    with pytest.raises(ValueError, match=_exactly(text)):
        ce.decrypt_blocks(first, bytes(CIPHER_BS), fid)


def test_block_zero_and_bytearray_file_id_are_accepted(ce: ContentEnc) -> None:
    ct = ce.encrypt_blocks(0, b"x", bytearray(FID))  # type: ignore[arg-type]
    assert ce.decrypt_blocks(0, ct, bytearray(FID)) == b"x"  # type: ignore[arg-type]
    assert ce.decrypt_blocks(0, ct, FID) == b"x"


# -- block layout and numbering -------------------------------------------------------


def test_every_block_is_sealed_under_its_own_number(ce: ContentEnc) -> None:
    """Blocks 9..12 each decrypt alone at their own number, and at no other."""
    plain = os.urandom(3 * PLAIN_BS + 5)
    ct = ce.encrypt_blocks(9, plain, FID)
    assert len(ct) == len(plain) + 4 * BLOCK_OVERHEAD
    for i in range(4):
        block = ct[i * CIPHER_BS : (i + 1) * CIPHER_BS]
        assert ce.decrypt_blocks(9 + i, block, FID) == plain[i * PLAIN_BS : (i + 1) * PLAIN_BS]
        with pytest.raises(
            CorruptDataError, match=_exactly(f"block {10 + i}: authentication failed")
        ):
            ce.decrypt_blocks(10 + i, block, FID)
    # a batch starting mid-file decrypts with the right numbers too
    assert ce.decrypt_blocks(10, ct[CIPHER_BS:], FID) == plain[PLAIN_BS:]


def test_nonces_are_fresh_and_distinct_per_block(ce: ContentEnc) -> None:
    ct = ce.encrypt_blocks(0, bytes(4 * PLAIN_BS), FID)
    nonces = {ct[i * CIPHER_BS : i * CIPHER_BS + 16] for i in range(4)}
    assert len(nonces) == 4 and bytes(16) not in nonces


def test_encrypt_into_writes_exactly_the_ciphertext(ce: ContentEnc) -> None:
    plain = os.urandom(PLAIN_BS + 1)
    total = len(plain) + 2 * BLOCK_OVERHEAD
    out = bytearray(b"\xcc" * total)  # exactly big enough
    assert ce.encrypt_blocks_into(3, plain, FID, out) == total
    assert ce.decrypt_blocks(3, bytes(out), FID) == plain
    with pytest.raises(ValueError, match=_exactly("output buffer too small")):
        ce.encrypt_blocks_into(3, plain, FID, bytearray(total - 1))
    # nothing to do: no checks, nothing written
    assert ce.encrypt_blocks_into(-1, b"", b"", bytearray()) == 0


def test_decrypt_into_exact_buffer_and_refusals(ce: ContentEnc) -> None:
    plain = os.urandom(PLAIN_BS + 7)
    ct = ce.encrypt_blocks(0, plain, FID)
    out = bytearray(len(plain))  # exactly big enough
    assert ce.decrypt_blocks_into(0, ct, FID, out) == len(plain) and bytes(out) == plain
    with pytest.raises(ValueError, match=_exactly("output buffer too small")):
        ce.decrypt_blocks_into(0, ct, FID, bytearray(len(plain) - 1))
    assert ce.decrypt_blocks_into(-1, b"", b"", bytearray()) == 0


@pytest.mark.parametrize("first", [0, 4])
@pytest.mark.parametrize("tail", [1, 16, 31, 32])
def test_truncated_tail_is_named_by_its_block(ce: ContentEnc, first: int, tail: int) -> None:
    """A last block with room for no plaintext byte (1..32 bytes) is refused up front."""
    ct = ce.encrypt_blocks(first, os.urandom(2 * PLAIN_BS), FID)
    cut = ct[: CIPHER_BS + tail]
    text = f"block {first + 1}: truncated cipher block"
    with pytest.raises(CorruptDataError, match=_exactly(text)):
        ce.decrypt_blocks(first, cut, FID)
    with pytest.raises(CorruptDataError, match=_exactly(text)):
        ce.decrypt_blocks_into(first, cut, FID, bytearray(2 * PLAIN_BS))
    if first == 0:
        with pytest.raises(CorruptDataError, match=_exactly("block 0: truncated cipher block")):
            ce.decrypt_blocks(0, ct[:tail], FID)


def test_one_plaintext_byte_block_decrypts(ce: ContentEnc) -> None:
    ct = ce.encrypt_blocks(2, b"z", FID)
    assert len(ct) == BLOCK_OVERHEAD + 1
    assert ce.decrypt_blocks(2, ct, FID) == b"z"
    out = bytearray(1)
    assert ce.decrypt_blocks_into(2, ct, FID, out) == 1 and out == b"z"


def test_tampered_block_is_named_by_its_number(ce: ContentEnc) -> None:
    ct = bytearray(ce.encrypt_blocks(5, os.urandom(3 * PLAIN_BS), FID))
    ct[CIPHER_BS + 100] ^= 1
    with pytest.raises(CorruptDataError, match=_exactly("block 6: authentication failed")):
        ce.decrypt_blocks(5, bytes(ct), FID)
    with pytest.raises(CorruptDataError, match=_exactly("block 6: authentication failed")):
        ce.decrypt_blocks_into(5, ct, FID, bytearray(3 * PLAIN_BS))


def test_zero_nonce_blocks_are_named_by_their_number(ce: ContentEnc) -> None:
    """A zero nonce is a hole only in a whole all-zero block; otherwise it is refused."""
    good = ce.encrypt_blocks(3, os.urandom(2 * PLAIN_BS), FID)
    zero_nonce = good[:CIPHER_BS] + bytes(16) + good[CIPHER_BS + 16 :]
    with pytest.raises(CorruptDataError, match=_exactly("block 4: all-zero nonce")):
        ce.decrypt_blocks(3, zero_nonce, FID)
    short_zero = good[:CIPHER_BS] + bytes(100)
    with pytest.raises(CorruptDataError, match=_exactly("block 4: all-zero nonce")):
        ce.decrypt_blocks(3, short_zero, FID)
    # all zero but the last byte: not a hole either
    almost = good[:CIPHER_BS] + bytes(CIPHER_BS - 1) + b"\x01"
    with pytest.raises(CorruptDataError, match=_exactly("block 4: all-zero nonce")):
        ce.decrypt_blocks(3, almost, FID)


def test_holes_at_any_position_in_a_dirty_buffer(ce: ContentEnc) -> None:
    a = ce.encrypt_blocks(0, b"a" * PLAIN_BS, FID)
    d = ce.encrypt_blocks(3, b"d" * 10, FID)
    ct = a + bytes(2 * CIPHER_BS) + d
    out = bytearray(b"\xee" * (3 * PLAIN_BS + 10))
    n = ce.decrypt_blocks_into(0, ct, FID, out)
    assert n == 3 * PLAIN_BS + 10
    assert bytes(out) == b"a" * PLAIN_BS + bytes(2 * PLAIN_BS) + b"d" * 10
    assert ce.decrypt_blocks(1, bytes(CIPHER_BS), FID) == bytes(PLAIN_BS)
    assert ce.decrypt_blocks(1, bytes(CIPHER_BS) + d[:0], FID) == bytes(PLAIN_BS)


def test_gcm_batches_use_the_in_place_calls_not_the_raw_ones() -> None:
    """The hot path (module docstring): AES-GCM writes straight into the buffer through
    ``encrypt_into``/``decrypt_into``; the per-block raw calls are for AES-SIV only."""
    core = CryptoCore(MK)
    ce = ContentEnc(core)

    def _raw(*_args: object) -> bytes:
        raise AssertionError("raw AEAD call on the GCM hot path")

    core.encrypt_raw = _raw  # type: ignore[method-assign]
    core.decrypt_raw = _raw  # type: ignore[method-assign]
    plain = os.urandom(2 * PLAIN_BS + 3)
    ct = ce.encrypt_blocks(1, plain, FID)
    assert ce.decrypt_blocks(1, ct, FID) == plain


# -- size maths -----------------------------------------------------------------------


def test_size_refusals_are_exact(ce: ContentEnc) -> None:
    with pytest.raises(ValueError, match=_exactly("negative size")):
        ce.cipher_size(-1)
    with pytest.raises(ValueError, match=_exactly("negative size")):
        ce.plain_size(-1)
    with pytest.raises(ValueError, match=_exactly("negative size")):
        ce.plain_size(-1, strict=False)
    for c in (1, HEADER_LEN - 1):
        with pytest.raises(CorruptDataError, match=_exactly("file shorter than its header")):
            ce.plain_size(c)
    for rem in (1, 2, 31, 32):
        for blocks in (0, 1, 2):
            c = HEADER_LEN + blocks * CIPHER_BS + rem
            with pytest.raises(CorruptDataError, match=_exactly("truncated last cipher block")):
                ce.plain_size(c)
            assert ce.plain_size(c, strict=False) == blocks * PLAIN_BS + 1


def test_plain_size_on_both_sides_of_every_boundary(ce: ContentEnc) -> None:
    ps = ce.plain_size
    assert ps(0) == 0 and ps(0, strict=False) == 0
    assert ps(HEADER_LEN) == 0 and ps(HEADER_LEN, strict=False) == 0
    assert ps(HEADER_LEN - 1, strict=False) == 0 and ps(1, strict=False) == 0
    assert ps(HEADER_LEN + 33) == 1 and ps(HEADER_LEN + 33, strict=False) == 1
    assert ps(HEADER_LEN + CIPHER_BS) == PLAIN_BS
    assert ps(HEADER_LEN + CIPHER_BS, strict=False) == PLAIN_BS
    assert ps(HEADER_LEN + CIPHER_BS + 33) == PLAIN_BS + 1
    assert ps(HEADER_LEN + 2 * CIPHER_BS) == 2 * PLAIN_BS
    assert ps(HEADER_LEN + CIPHER_BS - 1) == PLAIN_BS - 1
    assert ps(HEADER_LEN + 2 * CIPHER_BS - 1) == 2 * PLAIN_BS - 1


def test_cipher_size_and_offsets() -> None:
    ce = ContentEnc(CryptoCore(MK))
    assert ce.cipher_size(0) == 0
    assert ce.cipher_size(1) == HEADER_LEN + 1 + BLOCK_OVERHEAD
    assert ce.cipher_size(PLAIN_BS) == HEADER_LEN + CIPHER_BS
    assert ce.cipher_size(PLAIN_BS + 1) == HEADER_LEN + CIPHER_BS + 1 + BLOCK_OVERHEAD
    assert ContentEnc.cipher_offset(1) == HEADER_LEN + CIPHER_BS
    assert ContentEnc.block_range(4096, 0) == (1, 1)
    assert ContentEnc.block_range(4097, 4095) == (1, 2)
    assert ContentEnc.block_range(4097, 4096) == (1, 3)
    for off, length in ((-1, 0), (0, -1), (-5, -5)):
        with pytest.raises(ValueError, match=_exactly("negative offset or length")):
            ContentEnc.block_range(off, length)


def test_repr_names_the_core_not_the_key() -> None:
    core = CryptoCore(MK)
    assert repr(ContentEnc(core)) == f"ContentEnc({core!r})"
    assert MK.hex() not in repr(ContentEnc(core))


# -- the BlockObserver hook (the mount's metrics): same results, exact counts ---------------


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def encrypted(self, blocks: int, plain_bytes: int) -> None:
        self.calls.append(("encrypted", blocks, plain_bytes))

    def decrypted(self, blocks: int, plain_bytes: int) -> None:
        self.calls.append(("decrypted", blocks, plain_bytes))

    def auth_failed(self) -> None:
        self.calls.append(("auth_failed", 0, 0))


@pytest.mark.parametrize("aessiv", [False, True])
def test_observer_sees_exact_counts_and_changes_no_result(aessiv: bool) -> None:
    core = CryptoCore(bytes(range(1, 33)), aessiv=aessiv)
    rec = _Recorder()
    watched, plain = ContentEnc(core, rec), ContentEnc(core)
    data = os.urandom(2 * PLAIN_BS + 5)  # three blocks, the last short
    ct = watched.encrypt_blocks(7, data, FID)
    assert plain.decrypt_blocks(7, ct, FID) == data
    assert rec.calls == [("encrypted", 3, len(data))]
    out = bytearray(len(data) + 3)
    assert watched.decrypt_blocks_into(7, ct, FID, out) == len(data)
    assert bytes(out[: len(data)]) == data
    assert rec.calls[-1] == ("decrypted", 3, len(data))
    assert watched.decrypt_blocks(7, ct, FID) == data
    assert rec.calls[-1] == ("decrypted", 3, len(data))
    # a tampered batch: counted as one auth failure, nothing counted as decrypted
    bad = bytearray(ct)
    bad[-1] ^= 1
    before = len(rec.calls)
    with pytest.raises(CorruptDataError):
        watched.decrypt_blocks_into(7, bytes(bad), FID, bytearray(len(data)))
    assert rec.calls[before:] == [("auth_failed", 0, 0)]
    assert watched.encrypt_blocks_into(0, b"", FID, bytearray(0)) == 0
    assert rec.calls[before:] == [("auth_failed", 0, 0)]  # an empty batch is no batch
