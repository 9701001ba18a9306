"""Fuzz the LUKS2 header parser and profile: whatever the host writes, only HeaderError.

Three depths: raw bytes (fail at the binary checks), bit flips in a valid header with the
checksums recomputed (reach the field and JSON checks), and structural JSON edits re-encoded
with valid checksums (reach every profile check). The parse is pure (no KDF), so it is fast.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.errors import WrongKeyError
from fuse_crypt.luks2 import HeaderError, format_volume, open_volume, profile
from fuse_crypt.luks2 import header as hdr
from tests.fuse_crypt.luks2_helpers import TINY, blank_image, opened_fd, rewrite_copy
from tests.fuzzing import fuzz, long_fuzz


def _parse(buf: bytes) -> None:
    with contextlib.suppress(HeaderError):  # anything else fails the test
        profile.validate(hdr.read_pair(buf).metadata)


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    img = blank_image(tmp_path_factory.mktemp("fuzz") / "v.img")
    with opened_fd(img) as fd:
        format_volume(fd, b"pw", kdf_cost=TINY)
    buf = img.read_bytes()[: hdr.BOTH_COPIES]
    profile.validate(hdr.read_pair(buf).metadata)  # the seed itself is accepted
    return buf


_WORDS = ["0", "4096", "16777216", "dynamic", "aes-xts-plain64", "cipher_null-ecb", "argon2id",
          "pbkdf2", "sha256", "luks2", "crypt", "raw", "+1", " 1", ""]  # fmt: skip
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(_WORDS)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(obj: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.extend(_paths(value, (*prefix, key)))
    return out


@long_fuzz
@fuzz(quick=200)
@given(data=st.binary(min_size=0, max_size=hdr.BOTH_COPIES + 10))
def test_raw_bytes(data: bytes) -> None:
    _parse(data)


@long_fuzz
@fuzz(quick=200)
@given(flips=st.lists(st.tuples(st.integers(0, hdr.HDR_SIZE - 1), st.integers(1, 255)), max_size=8),
       both=st.booleans())  # fmt: skip
def test_flips_with_checksums_recomputed(
    valid: bytes, flips: list[tuple[int, int]], both: bool
) -> None:
    """Same flips in both copies when ``both`` (per-copy fields excepted), so the pair still
    agrees and the parse reaches the field and JSON checks; else only the primary changes."""
    per_copy = {*range(0, 6), *range(0x68, 0xA8), *range(0x100, 0x108), *range(0x1C0, 0x200)}
    first = bytearray(valid[: hdr.HDR_SIZE])
    second = bytearray(valid[hdr.HDR_SIZE :])
    for pos, mask in flips:
        if 0x1C0 <= pos < 0x200:  # the checksum itself is recomputed below
            continue
        first[pos] ^= mask
        if both and pos not in per_copy:
            second[pos] ^= mask
    _parse(rewrite_copy(bytes(first)) + rewrite_copy(bytes(second)))


@long_fuzz
@fuzz(quick=300)
@given(data=st.data())
def test_structural_json_edits(valid: bytes, data: st.DataObject) -> None:
    metadata = hdr.read_pair(valid).metadata
    edited = copy.deepcopy(metadata)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(edited)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = edited
        for part in path[:-1]:
            parent = parent[part]
        if data.draw(st.booleans()):
            parent[path[-1]] = data.draw(json_values)
        else:
            del parent[path[-1]]
    text = json.dumps(edited, separators=(",", ":")).encode()
    if len(text) >= hdr.JSON_SIZE:
        return
    area = text + bytes(hdr.JSON_SIZE - len(text))
    buf = rewrite_copy(valid[: hdr.HDR_SIZE], json_area=area)
    buf += rewrite_copy(valid[hdr.HDR_SIZE :], json_area=area)
    _parse(buf)


@pytest.fixture(scope="module")
def volume_image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    img = blank_image(tmp_path_factory.mktemp("fuzzvol") / "v.img")
    with opened_fd(img) as fd:
        format_volume(fd, b"pw", kdf_cost=TINY)
    return img.read_bytes()[: profile.KEYSLOTS_OFFSET + 258048]  # headers + keyslot 0


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("corrupt") / "v.img"


@fuzz(quick=30)  # not in the long run: each case runs a (tiny) Argon2 and an AF merge, ~50 ms
@given(flips=st.dictionaries(st.integers(0, 255_999), st.integers(1, 255), min_size=1, max_size=4))
def test_keyslot_material_corruption(
    volume_image: bytes, flips: dict[int, int], scratch: Path
) -> None:
    """Whatever the host does to the keyslot area, the result is WrongKeyError, never a
    wrong key or another exception (the digest judges the merged key)."""
    data = bytearray(volume_image)
    for pos, mask in flips.items():  # distinct positions: two flips must not cancel out
        data[profile.KEYSLOTS_OFFSET + pos] ^= mask
    scratch.write_bytes(bytes(data))
    with opened_fd(scratch) as fd, pytest.raises(WrongKeyError):
        open_volume(fd, b"pw")
