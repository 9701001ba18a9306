"""header.py in process: every refusal by its exact text, every bound on both sides, the layout.

Why a separate file: the hostile-image tests reach these checks through open_volume and match
a fragment, and the fuzz tests only prove that nothing but HeaderError escapes. Here both
16 KiB copies are built in memory (build_copy), one field is changed at its byte offset
(luks2.md §1) with the checksum recomputed the way an attacker would, and the exact refusal
is asserted; the accepted side of every bound is checked next to the refused one. The byte
offsets are written out here rather than taken from the module's struct format, so a wrong
format string fails too.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import Any

import pytest

from fuse_crypt.luks2 import HeaderError
from fuse_crypt.luks2 import header as hdr

UUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
BINARY = hdr.BinaryHeader(seqid=7, label="vol-1", subsystem="coco", uuid=UUID)
META: dict[str, Any] = {"keyslots": {}, "tokens": {}, "config": {"json_size": "12288"}}
# byte offsets of one copy's fields (cryptsetup's struct luks2_hdr_disk)
MAGIC, VERSION, HDR_SIZE, SEQID, LABEL, CSUM_ALG, SALT = 0, 6, 8, 16, 24, 72, 104
UUID_AT, SUBSYSTEM, HDR_OFFSET, PAD, CSUM = 168, 208, 256, 264, 448


def _checksum(copy: bytes | bytearray) -> bytes:
    return hashlib.sha256(bytes(copy[:CSUM]) + bytes(64) + bytes(copy[CSUM + 64 :])).digest()


def _pair(binary: hdr.BinaryHeader = BINARY, meta: dict[str, Any] = META) -> bytearray:
    area = hdr.encode_json(meta)
    return bytearray(
        hdr.build_copy(binary, area, secondary=False) + hdr.build_copy(binary, area, secondary=True)
    )


def _patch(
    buf: bytearray, offset: int, data: bytes, *, copies: tuple[int, ...] = (0, 1)
) -> bytearray:
    """Write ``data`` at ``offset`` of each named copy and recompute its checksum."""
    for c in copies:
        base = c * hdr.HDR_SIZE
        buf[base + offset : base + offset + len(data)] = data
        buf[base + CSUM : base + CSUM + 32] = _checksum(buf[base : base + hdr.HDR_SIZE])
    return buf


def _refused(buf: bytes | bytearray, text: str) -> None:
    with pytest.raises(HeaderError) as err:
        hdr.read_pair(bytes(buf))
    assert str(err.value) == text


def _field(text: bytes, size: int) -> bytes:
    return text + bytes(size - len(text))


# --- the accepted pair and its layout -------------------------------------------------------


def test_pair_round_trips_every_field() -> None:
    pair = hdr.read_pair(bytes(_pair()))
    assert pair.binary == BINARY
    assert pair.metadata == META
    assert pair.json_area == hdr.encode_json(META)
    assert len(pair.json_area) == 12288


def test_build_copy_layout_byte_by_byte() -> None:
    area = hdr.encode_json(META)
    for secondary, magic, where in ((False, b"LUKS\xba\xbe", 0), (True, b"SKUL\xba\xbe", 16384)):
        copy = hdr.build_copy(BINARY, area, secondary=secondary)
        assert len(copy) == 16384
        assert copy[MAGIC:VERSION] == magic
        assert copy[VERSION:HDR_SIZE] == b"\x00\x02"
        assert copy[HDR_SIZE:SEQID] == (16384).to_bytes(8, "big")
        assert copy[SEQID:LABEL] == (7).to_bytes(8, "big")
        assert copy[LABEL:CSUM_ALG] == _field(b"vol-1", 48)
        assert copy[CSUM_ALG:SALT] == _field(b"sha256", 32)
        assert any(copy[SALT:UUID_AT])  # 64 random bytes
        assert copy[UUID_AT:SUBSYSTEM] == _field(UUID.encode(), 40)
        assert copy[SUBSYSTEM:HDR_OFFSET] == _field(b"coco", 48)
        assert copy[HDR_OFFSET:PAD] == where.to_bytes(8, "big")
        assert copy[PAD:CSUM] == bytes(184)
        assert copy[CSUM : CSUM + 32] == _checksum(copy)
        assert copy[CSUM + 32 : 4096] == bytes(4096 - CSUM - 32)
        assert copy[4096:] == area


def test_each_copy_gets_a_fresh_salt() -> None:
    area = hdr.encode_json(META)
    a = hdr.build_copy(BINARY, area, secondary=False)
    b = hdr.build_copy(BINARY, area, secondary=False)
    assert a[SALT:UUID_AT] != b[SALT:UUID_AT]
    assert a[:SALT] == b[:SALT] and a[UUID_AT:CSUM] == b[UUID_AT:CSUM]


def test_checksum_is_sha256_with_the_csum_field_zeroed() -> None:
    copy = bytearray(_pair()[: hdr.HDR_SIZE])
    assert hdr.checksum(bytes(copy)) == _checksum(copy)
    copy[CSUM : CSUM + 64] = b"\xff" * 64
    assert hdr.checksum(bytes(copy)) == _checksum(copy)  # the stored value is not hashed
    copy[100] ^= 1
    assert hdr.checksum(bytes(copy)) != _checksum(_pair()[: hdr.HDR_SIZE])


def test_constants() -> None:
    assert (hdr.HDR_SIZE, hdr.BIN_SIZE, hdr.JSON_SIZE, hdr.BOTH_COPIES) == (
        16384,
        4096,
        12288,
        32768,
    )
    assert (hdr.MAGIC_PRIMARY, hdr.MAGIC_SECONDARY) == (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
    assert hdr.MAX_JSON_DEPTH == 6


# --- sizes ----------------------------------------------------------------------------------


def test_pair_size_is_exactly_32_kib() -> None:
    buf = bytes(_pair())
    _refused(buf[:-1], "LUKS2 header: short read")
    _refused(buf + b"\0", "LUKS2 header: short read")
    _refused(b"", "LUKS2 header: short read")


@pytest.mark.parametrize(("secondary", "which"), [(False, "primary"), (True, "secondary")])
def test_copy_size_is_exactly_16_kib(secondary: bool, which: str) -> None:
    copy = bytes(_pair()[: hdr.HDR_SIZE])
    for bad in (copy[:-1], copy + b"\0", b""):
        with pytest.raises(HeaderError) as err:
            hdr.parse_copy(bad, secondary=secondary)
        assert str(err.value) == f"LUKS2 {which} header: short read"


# --- fixed binary fields, per copy ----------------------------------------------------------

FIXED: list[tuple[int, bytes, str]] = [
    (VERSION, (1).to_bytes(2, "big"), "version is not 2"),
    (VERSION, (3).to_bytes(2, "big"), "version is not 2"),
    (HDR_SIZE, (16383).to_bytes(8, "big"), "hdr_size is not 16384"),
    (HDR_SIZE, (16385).to_bytes(8, "big"), "hdr_size is not 16384"),
    (HDR_SIZE, (4096).to_bytes(8, "big"), "hdr_size is not 16384"),
    (CSUM_ALG, _field(b"sha1", 32), "checksum_alg is not sha256"),
    (CSUM_ALG, _field(b"sha2567", 32), "checksum_alg is not sha256"),
    (
        CSUM_ALG,
        b"sha256\0x" + bytes(24),
        "LUKS2 binary header: checksum_alg has bytes after its NUL",
    ),
    (CSUM_ALG, b"sha256" + b"x" * 26, "LUKS2 binary header: checksum_alg is not NUL-terminated"),
    (CSUM_ALG, _field(b"sha\xff", 32), "LUKS2 binary header: checksum_alg is not UTF-8"),
    (PAD, b"\x01", "non-zero padding"),
    (CSUM - 1, b"\x01", "non-zero padding"),
    (512, b"\x01", "non-zero padding"),
    (4095, b"\x01", "non-zero padding"),
    (UUID_AT, bytes(40), "LUKS2 binary header: uuid is not printable text"),
    (UUID_AT, _field(UUID.upper().encode(), 40), "uuid is not a lower-case UUID"),
    (UUID_AT, _field(UUID[:-1].encode(), 40), "uuid is not a lower-case UUID"),
    (UUID_AT, _field(UUID.replace("-", "_").encode(), 40), "uuid is not a lower-case UUID"),
    (UUID_AT, _field(b"x" + UUID.encode(), 40), "uuid is not a lower-case UUID"),
    (UUID_AT, _field(UUID.encode() + b"0", 40), "uuid is not a lower-case UUID"),
    (
        UUID_AT,
        _field(UUID.encode(), 39) + b"x",
        "LUKS2 binary header: uuid has bytes after its NUL",
    ),
    (
        UUID_AT,
        _field(UUID[:-1].encode() + b"\x01", 40),
        "LUKS2 binary header: uuid is not printable text",
    ),
    (LABEL, _field(b"vol\n", 48), "LUKS2 binary header: label is not printable text"),
    (LABEL, _field(b"vol\xc3", 48), "LUKS2 binary header: label is not UTF-8"),
    (LABEL, b"v" * 48, "LUKS2 binary header: label is not NUL-terminated"),
    (SUBSYSTEM, _field(b"a\tb", 48), "LUKS2 binary header: subsystem is not printable text"),
    (SUBSYSTEM, b"s\0s" + bytes(45), "LUKS2 binary header: subsystem has bytes after its NUL"),
]


@pytest.mark.parametrize(("offset", "data", "text"), FIXED)
@pytest.mark.parametrize(("copy", "which"), [(0, "primary"), (1, "secondary")])
def test_binary_field_refused_in_either_copy(
    offset: int, data: bytes, text: str, copy: int, which: str
) -> None:
    expected = text if text.startswith("LUKS2 ") else f"LUKS2 {which} header: {text}"
    _refused(_patch(_pair(), offset, data, copies=(copy,)), expected)


def test_magic_and_position_belong_to_each_copy() -> None:
    swapped = bytearray(_pair())
    _patch(swapped, MAGIC, b"SKUL\xba\xbe", copies=(0,))
    _refused(swapped, "LUKS2 primary header: bad magic")
    _refused(
        _patch(_pair(), MAGIC, b"LUKS\xba\xbe", copies=(1,)), "LUKS2 secondary header: bad magic"
    )
    _refused(
        _patch(_pair(), MAGIC, b"LUKS\xba\xbf", copies=(0,)), "LUKS2 primary header: bad magic"
    )
    text = "hdr_offset does not match its position"
    _refused(
        _patch(_pair(), HDR_OFFSET, (16384).to_bytes(8, "big"), copies=(0,)),
        f"LUKS2 primary header: {text}",
    )
    _refused(_patch(_pair(), HDR_OFFSET, bytes(8), copies=(1,)), f"LUKS2 secondary header: {text}")
    _refused(
        _patch(_pair(), HDR_OFFSET, (32768).to_bytes(8, "big"), copies=(1,)),
        f"LUKS2 secondary header: {text}",
    )


@pytest.mark.parametrize(("copy", "which"), [(0, "primary"), (1, "secondary")])
def test_checksum_mismatch(copy: int, which: str) -> None:
    text = f"LUKS2 {which} header: checksum mismatch"
    base = copy * hdr.HDR_SIZE
    for at in (CSUM, CSUM + 31, 4096, hdr.HDR_SIZE - 1, LABEL):  # csum, JSON area, fields
        buf = _pair()
        buf[base + at] ^= 1
        _refused(buf, text)
    for at in (CSUM + 32, CSUM + 63):  # the unused half of the 64-byte field must stay zero
        buf = _pair()
        buf[base + at] = 1
        _refused(buf, text)


def test_empty_label_and_subsystem_are_accepted() -> None:
    binary = hdr.BinaryHeader(seqid=1, label="", subsystem="", uuid=UUID)
    assert hdr.read_pair(bytes(_pair(binary))).binary == binary
    longest = hdr.BinaryHeader(seqid=2**64 - 1, label="l" * 47, subsystem="s" * 47, uuid=UUID)
    assert hdr.read_pair(bytes(_pair(longest))).binary == longest


def test_label_is_checked_as_text_after_the_checksum() -> None:
    """A printable non-ASCII label (cryptsetup allows UTF-8) is accepted as written."""
    binary = hdr.BinaryHeader(seqid=1, label="vôl", subsystem="", uuid=UUID)
    assert hdr.read_pair(bytes(_pair(binary))).binary.label == "vôl"


# --- the two copies must agree ----------------------------------------------------------------


def test_copies_must_agree() -> None:
    seq = "LUKS2 header: the two copies have different seqids (refused, not repaired)"
    _refused(_patch(_pair(), SEQID, (8).to_bytes(8, "big"), copies=(1,)), seq)
    _refused(_patch(_pair(), SEQID, (6).to_bytes(8, "big"), copies=(1,)), seq)
    _refused(_patch(_pair(), SEQID, (8).to_bytes(8, "big"), copies=(0,)), seq)
    fields = "LUKS2 header: the two copies' label, uuid or subsystem differ"
    _refused(_patch(_pair(), LABEL, _field(b"vol-2", 48), copies=(1,)), fields)
    _refused(_patch(_pair(), SUBSYSTEM, _field(b"cocO", 48), copies=(1,)), fields)
    _refused(
        _patch(_pair(), UUID_AT, _field(UUID.replace("0f1e", "0f1f").encode(), 40), copies=(1,)),
        fields,
    )
    areas = "LUKS2 header: the two copies' JSON areas differ"
    _refused(_patch(_pair(), 4096 + 2, b"X", copies=(1,)), areas)
    _refused(_patch(_pair(), hdr.HDR_SIZE - 1, b"\x01", copies=(0,)), areas)
    # the same change in both copies is one consistent header again
    assert hdr.read_pair(bytes(_patch(_pair(), SEQID, (9).to_bytes(8, "big")))).binary.seqid == 9


def test_salts_may_differ_between_copies() -> None:
    buf = _patch(_pair(), SALT, b"\x55" * 64, copies=(1,))
    assert hdr.read_pair(bytes(buf)).binary == BINARY


def test_primary_is_checked_before_the_secondary() -> None:
    buf = _patch(_pair(), VERSION, (1).to_bytes(2, "big"))
    _refused(buf, "LUKS2 primary header: version is not 2")


# --- the JSON area --------------------------------------------------------------------------


def _area(text: bytes) -> bytes:
    return text + bytes(hdr.JSON_SIZE - len(text))


def _json_refused(area: bytes, text: str) -> None:
    with pytest.raises(HeaderError) as err:
        hdr.decode_json(area)
    assert str(err.value) == "LUKS2 JSON area: " + text


def test_json_area_shape() -> None:
    assert hdr.decode_json(_area(b'{"a":1}')) == {"a": 1}
    _json_refused(_area(b'{"a":1}')[:-1], "wrong size")
    _json_refused(_area(b'{"a":1}') + b"\0", "wrong size")
    _json_refused(_area(b' {"a":1}'), "does not start with '{'")
    _json_refused(_area(b'[{"a":1}]'), "does not start with '{'")
    _json_refused(bytes(hdr.JSON_SIZE), "does not start with '{'")
    _json_refused(b"{" + b" " * (hdr.JSON_SIZE - 1), "no NUL terminator")
    _json_refused(_area(b'{"a":1}\0\0x'), "bytes after the JSON text")
    _json_refused(_area(b"{}")[:-1] + b"\x01", "bytes after the JSON text")
    # text filling the area but its last byte: the one NUL required
    full = b'{"a":"' + b"x" * (hdr.JSON_SIZE - 9) + b'"}'
    assert len(full) == hdr.JSON_SIZE - 1
    assert hdr.decode_json(full + b"\0") == {"a": "x" * (hdr.JSON_SIZE - 9)}


def test_json_text_is_strict() -> None:
    _json_refused(_area(b'{"a":1,"a":2}'), "duplicate member")
    for bad in (b"{a:1}", b'{"a":1,}', b'{"\xff":1}', b'{"a":1} {}', b"{"):
        _json_refused(_area(bad), "not valid JSON")


def _nest(depth: int, left: bytes = b"[", right: bytes = b"]") -> bytes:
    """An object whose brackets reach ``depth`` levels, the outer object included."""
    return b'{"a":' + left * (depth - 1) + right * (depth - 1) + b"}"


def test_json_depth_bound_both_sides() -> None:
    assert hdr.decode_json(_area(_nest(6)))["a"] == [[[[[]]]]]
    _json_refused(_area(_nest(7)), "nested too deep")
    inner = b'{"b":' * 5 + b"1" + b"}" * 5
    assert hdr.decode_json(_area(b'{"a":' + inner + b"}"))  # six objects deep
    _json_refused(_area(b'{"a":{"c":' + inner + b"}}"), "nested too deep")


def test_json_depth_counts_levels_not_brackets() -> None:
    siblings = b'{"a":[[[[[]]]]],"b":[[[[[]]]]],"c":{"d":{"e":{"f":{"g":1}}}}}'
    assert hdr.decode_json(_area(siblings))["b"] == [[[[[]]]]]


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert hdr.decode_json(_area(b'{"a":"[[[[[[[[{{{{{{{{"}'))["a"] == "[[[[[[[[{{{{{{{{"
    assert hdr.decode_json(_area(b'{"a":"\\"[[[[[[[[[["}'))["a"] == '"[[[[[[[[[['
    assert hdr.decode_json(_area(b'{"a":"]]]]]]]]]]","b":[[[[[]]]]]}'))["a"] == "]" * 10
    # an escaped backslash ends the escape: the quote after it closes the string
    _json_refused(_area(b'{"a":"\\\\","b":[[[[[[[]]]]]]]}'), "nested too deep")
    _json_refused(_area(b'{"[[[[[[":[[[[[[[]]]]]]]}'), "nested too deep")


def test_depth_scan_directly() -> None:
    assert hdr._json_depth_ok(b"[" * 6 + b"]" * 6)
    assert not hdr._json_depth_ok(b"[" * 7)
    assert not hdr._json_depth_ok(b"{" * 7)
    assert hdr._json_depth_ok(b"[]" * 100)
    assert hdr._json_depth_ok(b"{}" * 100)
    assert hdr._json_depth_ok(b'"' + b"[" * 10 + b'"')
    assert not hdr._json_depth_ok(b'"\\\\"' + b"[" * 7)
    assert hdr._json_depth_ok(b'"\\"' + b"[" * 7 + b'"')
    assert not hdr._json_depth_ok(b'"x"' + b"{" * 7)
    # a closing bracket goes back exactly one level: 6, 5, then 7 is too deep
    assert not hdr._json_depth_ok(b"[[[[[[]" + b"[[")
    assert hdr._json_depth_ok(b"[[[[[[]" + b"[")
    _json_refused(_area(b'{"a":[[[[[],[[]]]]]]}'), "nested too deep")


# --- encoding -------------------------------------------------------------------------------


def test_encode_json_is_compact_ordered_ascii_and_padded() -> None:
    area = hdr.encode_json({"b": [1, 2], "a": "é"})
    assert area == _area(b'{"b":[1,2],"a":"\\u00e9"}')
    assert hdr.decode_json(area) == {"b": [1, 2], "a": "é"}
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError):
            hdr.encode_json({"a": value})


def test_encode_json_size_bound_both_sides() -> None:
    fits = {"a": "x" * (hdr.JSON_SIZE - 9)}  # 12287 bytes of text, then one NUL
    assert hdr.encode_json(fits)[-2:] == b"}\0"
    with pytest.raises(HeaderError) as err:
        hdr.encode_json({"a": "x" * (hdr.JSON_SIZE - 8)})
    assert str(err.value) == "LUKS2 JSON metadata does not fit the 12 KiB JSON area"


def test_build_copy_refuses_a_wrong_area_and_bad_text() -> None:
    area = hdr.encode_json(META)
    for bad in (area[:-1], area + b"\0"):
        with pytest.raises(HeaderError) as err:
            hdr.build_copy(BINARY, bad, secondary=False)
        assert str(err.value) == "LUKS2 JSON area: wrong size"
    for field, limit in (("label", 48), ("subsystem", 48)):
        ok = hdr.BinaryHeader(**{**BINARY.__dict__, field: "x" * (limit - 1)})
        assert len(hdr.build_copy(ok, area, secondary=True)) == hdr.HDR_SIZE
        for value in ("x" * limit, "a\0b", "é" * (limit // 2)):
            bad_binary = hdr.BinaryHeader(**{**BINARY.__dict__, field: value})
            with pytest.raises(HeaderError) as err:
                hdr.build_copy(bad_binary, area, secondary=False)
            assert str(err.value) == f"LUKS2 binary header: {field} too long or contains NUL"
    with pytest.raises(HeaderError) as err:
        hdr.build_copy(hdr.BinaryHeader(1, "", "", "u" * 40), area, secondary=False)
    assert str(err.value) == "LUKS2 binary header: uuid too long or contains NUL"
    assert hdr.build_copy(hdr.BinaryHeader(1, "", "", "u" * 39), area, secondary=False)


def test_metadata_round_trip_keeps_insertion_order() -> None:
    meta = {"z": 1, "a": {"y": [1, "2"], "b": None}}
    pair = hdr.read_pair(bytes(_pair(meta=meta)))
    assert json.dumps(pair.metadata) == json.dumps(meta)
    assert struct.unpack(">Q", bytes(_pair())[SEQID:LABEL])[0] == 7
