"""LUKS2 binary headers and JSON areas: both copies, checksums, strict JSON.

Pure bytes in / bytes out. The only header size accepted is cryptsetup's default (16 KiB per
copy: 4 KiB binary header + 12 KiB JSON area), which every CDH and cryptsetup 2.6 volume
uses; the two copies together are the first 32 KiB of the device. :func:`read_pair` checks
both copies completely and requires them to agree (same seqid, same JSON bytes, same
label/uuid): cryptsetup would let a valid copy with a higher seqid win and copy it over the
other, which lets the host plant a forged secondary (luks2.md §5.1 A4). We refuse instead
and never repair. The checksum only detects accidents (anyone can recompute it); the
authentication is the binding MAC (binding.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from typing import Any

from .. import strictjson
from .errors import HeaderError

__all__ = [
    "BIN_SIZE",
    "BOTH_COPIES",
    "HDR_SIZE",
    "JSON_SIZE",
    "MAGIC_PRIMARY",
    "MAGIC_SECONDARY",
    "BinaryHeader",
    "HeaderPair",
    "build_copy",
    "checksum",
    "decode_json",
    "encode_json",
    "parse_copy",
    "read_pair",
]

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
VERSION = 2
HDR_SIZE = 16384  # one copy: binary header + JSON area (cryptsetup's default, the only profile)
BIN_SIZE = 4096
JSON_SIZE = HDR_SIZE - BIN_SIZE  # 12288
BOTH_COPIES = 2 * HDR_SIZE
CHECKSUM_ALG = "sha256"
MAX_JSON_DEPTH = 6  # LUKS2 metadata nests 4 deep ({keyslots:{0:{area:{...}}}}); a bomb is refused

_BIN = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")  # the 512 defined bytes (luks2.md §1)
_CSUM_OFFSET = 0x1C0
_CSUM_LEN = 64
_LABEL_LEN = 48
_SUBSYSTEM_LEN = 48
_UUID_LEN = 40
_SALT_LEN = 64
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class BinaryHeader:
    """The fields of one binary header that mean something (salt and csum are per copy)."""

    seqid: int
    label: str
    subsystem: str
    uuid: str


@dataclass(frozen=True)
class HeaderPair:
    """Both copies validated and equal: one binary header, the parsed JSON, the raw JSON area."""

    binary: BinaryHeader
    metadata: dict[str, Any]
    json_area: bytes


def _text_field(raw: bytes, name: str, *, allow_empty: bool = True) -> str:
    """A NUL-terminated field: text, then only NULs (cryptsetup zero-fills; refuse hidden bytes)."""
    end = raw.find(b"\0")
    if end < 0:
        raise HeaderError(f"LUKS2 binary header: {name} is not NUL-terminated")
    if any(raw[end:]):
        raise HeaderError(f"LUKS2 binary header: {name} has bytes after its NUL")
    try:
        text = raw[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"LUKS2 binary header: {name} is not UTF-8") from None
    if not text.isprintable() or (not allow_empty and not text):
        raise HeaderError(f"LUKS2 binary header: {name} is not printable text")
    return text


def checksum(copy: bytes) -> bytes:
    """sha256 over the binary header with csum zeroed, then the whole JSON area (NULs included)."""
    h = hashlib.sha256()
    h.update(copy[:_CSUM_OFFSET])
    h.update(bytes(_CSUM_LEN))
    h.update(copy[_CSUM_OFFSET + _CSUM_LEN :])
    return h.digest()


def parse_copy(copy: bytes, *, secondary: bool) -> BinaryHeader:
    """Check one 16 KiB copy completely (layout, padding, checksum); return its fields."""
    which = "secondary" if secondary else "primary"
    if len(copy) != HDR_SIZE:
        raise HeaderError(f"LUKS2 {which} header: short read")
    (
        magic,
        version,
        hdr_size,
        seqid,
        label,
        csum_alg,
        _salt,
        uuid,
        subsystem,
        hdr_offset,
        pad1,
        csum,
    ) = _BIN.unpack_from(copy)
    if magic != (MAGIC_SECONDARY if secondary else MAGIC_PRIMARY):
        raise HeaderError(f"LUKS2 {which} header: bad magic")
    if version != VERSION:
        raise HeaderError(f"LUKS2 {which} header: version is not 2")
    if hdr_size != HDR_SIZE:
        raise HeaderError(f"LUKS2 {which} header: hdr_size is not {HDR_SIZE}")
    if hdr_offset != (HDR_SIZE if secondary else 0):
        raise HeaderError(f"LUKS2 {which} header: hdr_offset does not match its position")
    if _text_field(csum_alg, "checksum_alg") != CHECKSUM_ALG:
        raise HeaderError(f"LUKS2 {which} header: checksum_alg is not sha256")
    if any(pad1) or any(copy[_BIN.size : BIN_SIZE]):
        raise HeaderError(f"LUKS2 {which} header: non-zero padding")
    if any(csum[32:]) or checksum(copy) != csum[:32]:
        raise HeaderError(f"LUKS2 {which} header: checksum mismatch")
    uuid_text = _text_field(uuid, "uuid", allow_empty=False)
    if not _UUID_RE.fullmatch(uuid_text):
        raise HeaderError(f"LUKS2 {which} header: uuid is not a lower-case UUID")
    return BinaryHeader(
        seqid=seqid,
        label=_text_field(label, "label"),
        subsystem=_text_field(subsystem, "subsystem"),
        uuid=uuid_text,
    )


def _json_depth_ok(text: bytes) -> bool:
    """True if brackets (outside strings) nest at most MAX_JSON_DEPTH deep.

    Checked before json.loads so a nesting bomb costs a linear scan, not a recursion.
    """
    depth = 0
    in_string = escaped = False
    for byte in text:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x7B, 0x5B):  # { [
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif byte in (0x7D, 0x5D):
            depth -= 1
    return True


def decode_json(area: bytes) -> dict[str, Any]:
    """The JSON area: '{', compact text, then only NULs (at least one); strict parse."""
    if len(area) != JSON_SIZE:
        raise HeaderError("LUKS2 JSON area: wrong size")
    if area[:1] != b"{":
        raise HeaderError("LUKS2 JSON area: does not start with '{'")
    end = area.find(b"\0")
    if end < 0:
        raise HeaderError("LUKS2 JSON area: no NUL terminator")
    if any(area[end:]):
        raise HeaderError("LUKS2 JSON area: bytes after the JSON text")
    text = area[:end]
    if not _json_depth_ok(text):
        raise HeaderError("LUKS2 JSON area: nested too deep")
    try:
        obj = strictjson.loads(text)
    except strictjson.DuplicateKeyError:
        raise HeaderError("LUKS2 JSON area: duplicate member") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise HeaderError("LUKS2 JSON area: not valid JSON") from None
    if not isinstance(obj, dict):
        raise HeaderError("LUKS2 JSON area: not a JSON object")
    return obj


def encode_json(obj: dict[str, Any]) -> bytes:
    """Serialise as cryptsetup does (json-c plain: compact, insertion order), NUL-padded."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    if len(text) >= JSON_SIZE:
        raise HeaderError("LUKS2 JSON metadata does not fit the 12 KiB JSON area")
    return text + bytes(JSON_SIZE - len(text))


def read_pair(buf: bytes) -> HeaderPair:
    """Validate both copies from the first 32 KiB of the device; refuse any disagreement."""
    if len(buf) != BOTH_COPIES:
        raise HeaderError("LUKS2 header: short read")
    primary = parse_copy(buf[:HDR_SIZE], secondary=False)
    secondary = parse_copy(buf[HDR_SIZE:], secondary=True)
    if primary.seqid != secondary.seqid:
        raise HeaderError(
            "LUKS2 header: the two copies have different seqids (refused, not repaired)"
        )
    if primary != secondary:
        raise HeaderError("LUKS2 header: the two copies' label, uuid or subsystem differ")
    area = buf[BIN_SIZE:HDR_SIZE]
    if area != buf[HDR_SIZE + BIN_SIZE :]:
        raise HeaderError("LUKS2 header: the two copies' JSON areas differ")
    return HeaderPair(binary=primary, metadata=decode_json(area), json_area=area)


def build_copy(binary: BinaryHeader, json_area: bytes, *, secondary: bool) -> bytes:
    """One 16 KiB copy with a fresh salt and its checksum (what cryptsetup writes)."""
    if len(json_area) != JSON_SIZE:
        raise HeaderError("LUKS2 JSON area: wrong size")
    fixed = _BIN.pack(
        MAGIC_SECONDARY if secondary else MAGIC_PRIMARY,
        VERSION,
        HDR_SIZE,
        binary.seqid,
        _pack_text(binary.label, _LABEL_LEN, "label"),
        _pack_text(CHECKSUM_ALG, 32, "checksum_alg"),
        os.urandom(_SALT_LEN),
        _pack_text(binary.uuid, _UUID_LEN, "uuid"),
        _pack_text(binary.subsystem, _SUBSYSTEM_LEN, "subsystem"),
        HDR_SIZE if secondary else 0,
        bytes(184),
        bytes(_CSUM_LEN),
    )
    copy = bytearray(fixed + bytes(BIN_SIZE - len(fixed)) + json_area)
    copy[_CSUM_OFFSET : _CSUM_OFFSET + 32] = checksum(bytes(copy))
    return bytes(copy)


def _pack_text(text: str, size: int, name: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) >= size or b"\0" in raw:
        raise HeaderError(f"LUKS2 binary header: {name} too long or contains NUL")
    return raw + bytes(size - len(raw))
