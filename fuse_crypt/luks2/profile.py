"""The accepted LUKS2 profiles: every hostile-header check in one place (luks2.md §5.4).

The host writes the header, so the parsed JSON is validated member by member against the
exact shape cryptsetup 2.6 writes for ``luksFormat --type luks2 --cipher aes-xts-plain64
--sector-size 4096`` (CDH's current options) and for our own format_volume. Anything else is
refused with a HeaderError naming the check: unknown members, null or other ciphers in the
segment or a keyslot area, integrity unless the caller asks for it (only the kernel engine
serves dm-integrity: see ``validate``), requirements (reencryption), unexpected offsets,
more than one segment or digest, KDF costs above fixed caps (a planted header must not stall
or exhaust the guest: every slot is checked, not only the one tried), and lax encodings
(``"+1"`` strings, booleans as numbers, non-canonical base64) that could make two parsers
see two headers."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from .errors import HeaderError
from .keyslot import AF_HASH, AF_STRIPES, Kdf, material_length

__all__ = [
    "BINDING_TOKEN_TYPE",
    "CIPHER",
    "DATA_OFFSET",
    "INTEGRITY",
    "INTEGRITY_KEY_SIZE",
    "JSON_SIZE_TEXT",
    "SECTOR_SIZES",
    "KEY_SIZE",
    "KEYSLOTS_OFFSET",
    "KEYSLOTS_SIZE",
    "MAX_ARGON2_MEMORY_KIB",
    "MAX_ARGON2_TIME",
    "MAX_DIGEST_ITERATIONS",
    "MAX_KEYSLOTS",
    "MAX_PBKDF2_ITERATIONS",
    "MAX_TOTAL_ARGON2_WORK",
    "MAX_TOTAL_PBKDF2_ITERATIONS",
    "Digest",
    "Keyslot",
    "Metadata",
    "Segment",
    "validate",
    "validate_kdf",
]

CIPHER = "aes-xts-plain64"  # the only data and keyslot-area cipher accepted
KEY_SIZE = 64  # AES-256-XTS volume key and KEK
# CDH's dataIntegrity (luksFormat --integrity hmac-sha256, luks2.md §4.2): dm-integrity under
# dm-crypt with authenc(hmac(sha256),xts(aes)). The volume key is the XTS key followed by the
# 32-byte HMAC key; keyslot areas stay aes-xts-plain64 with a 64-byte KEK. Journals are
# "none" in the header whatever CDH passes (cryptsetup 2.6 ignores --integrity-no-journal
# at format time): that is the one shape accepted.
INTEGRITY = "hmac(sha256)"
INTEGRITY_KEY_SIZE = KEY_SIZE + 32
INTEGRITY_OBJECT = {"type": INTEGRITY, "journal_encryption": "none", "journal_integrity": "none"}
DATA_OFFSET = 16 * 1024 * 1024  # attached header: data starts at 16 MiB (cryptsetup default)
KEYSLOTS_OFFSET = 32768  # after both 16 KiB header copies
KEYSLOTS_SIZE = DATA_OFFSET - KEYSLOTS_OFFSET  # 16744448
JSON_SIZE_TEXT = "12288"
SECTOR_SIZES = (512, 1024, 2048, 4096)
CDH_SECTOR_SIZE = 4096  # without a binding token only CDH's sector size is accepted
MAX_KEYSLOTS = 8
# KDF caps: above cryptsetup 2.6's own defaults (argon2id 1 GiB / 4 passes, benchmarked to
# ~2 s; pbkdf2 ~2 s; digest ~125 ms) with room for faster CPUs, far below a DoS.
MAX_ARGON2_MEMORY_KIB = 1024 * 1024
MAX_ARGON2_TIME = 32
MAX_ARGON2_WORK = MAX_ARGON2_MEMORY_KIB * 8  # memory x passes per slot (8 GiB-passes, ~4 s)
MAX_ARGON2_CPUS = 4
MAX_TOTAL_ARGON2_WORK = 2 * MAX_ARGON2_WORK  # over all keyslots: more slots, not more cost
MAX_PBKDF2_ITERATIONS = 1 << 24
MAX_TOTAL_PBKDF2_ITERATIONS = 2 * MAX_PBKDF2_ITERATIONS
MAX_DIGEST_ITERATIONS = 1 << 22
MIN_PBKDF2_ITERATIONS = 1000
BINDING_TOKEN_TYPE = "coco-csi-binding-v1"
BINDING_MAC_LEN = 32
ALLOWED_CONFIG_FLAGS = frozenset(
    {"allow-discards", "same-cpu-crypt", "submit-from-crypt-cpus", "no-read-workqueue",
     "no-write-workqueue"}
)  # fmt: skip

_DIGITS = re.compile(r"[0-9]{1,20}")
_ID = re.compile(r"[0-9]|[12][0-9]|3[01]")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


@dataclass(frozen=True)
class Keyslot:
    """A validated keyslot: where its AF material lies and how to derive its KEK."""

    id: str
    priority: int
    area_offset: int
    area_size: int
    kdf: Kdf


@dataclass(frozen=True)
class Digest:
    """The segment-0 digest: which keyslots open it and the PBKDF2 check of the VK."""

    keyslots: tuple[str, ...]
    salt: bytes
    iterations: int
    value: bytes


@dataclass(frozen=True)
class Segment:
    """The data segment: byte offset, dynamic size, 512-byte-unit iv_tweak (always 0), and
    ``integrity`` (``"hmac(sha256)"``, only when the caller allowed it) or None."""

    offset: int
    sector_size: int
    iv_tweak: int
    integrity: str | None = None

    @property
    def key_size(self) -> int:
        """Volume-key bytes: 64 for XTS alone, 96 with the HMAC key of dm-integrity."""
        return INTEGRITY_KEY_SIZE if self.integrity else KEY_SIZE


@dataclass(frozen=True)
class Metadata:
    """One validated header: the parts the opener needs, plus the MAC from the binding token."""

    keyslots: tuple[Keyslot, ...]
    digest: Digest
    segment: Segment
    binding_mac: bytes | None
    binding_token_id: str | None


def _fail(what: str) -> HeaderError:
    return HeaderError(f"LUKS2 header refused: {what}")


def _obj(
    value: Any, what: str, required: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A JSON object with exactly the ``required`` members and some of ``optional``."""
    if not isinstance(value, dict):
        raise _fail(f"{what} is not an object")
    keys = set(value)
    if not required <= keys:
        raise _fail(f"{what} lacks a required member")
    if keys - required - optional:
        raise _fail(f"{what} has an unknown member")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"{what} is not a string")
    return value


def _eq(value: Any, expected: str | int, what: str) -> None:
    if type(value) is not type(expected) or value != expected:
        raise _fail(what)


def _u64(value: Any, what: str) -> int:
    """A decimal u64 string, digits only (int() would take ' 1', '+1', '1_0')."""
    if not isinstance(value, str) or not _DIGITS.fullmatch(value):
        raise _fail(f"{what} is not a decimal string")
    number = int(value)
    if number >= 1 << 64:
        raise _fail(f"{what} is out of range")
    return number


def _int(value: Any, what: str, low: int, high: int) -> int:
    """A JSON integer (not a bool, not a float) within [low, high]."""
    if type(value) is not int:
        raise _fail(f"{what} is not an integer")
    if not low <= value <= high:
        raise _fail(f"{what} is out of the accepted range")
    return value


def _b64(value: Any, what: str, length: int) -> bytes:
    """Canonical standard base64 of exactly ``length`` bytes."""
    if not isinstance(value, str) or not _B64.fullmatch(value):
        raise _fail(f"{what} is not base64")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _fail(f"{what} is not base64") from None
    if len(raw) != length or base64.b64encode(raw).decode() != value:
        raise _fail(f"{what} has the wrong length or is not canonical")
    return raw


def _ids(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _fail(f"{what} is not a list")
    ids = tuple(_str(item, what) for item in value)
    if any(not _ID.fullmatch(item) for item in ids) or len(set(ids)) != len(ids):
        raise _fail(f"{what} has a bad or repeated id")
    return ids


def _kdf(value: Any, what: str) -> Kdf:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "argon2id":
        obj = _obj(value, what, {"type", "time", "memory", "cpus", "salt"})
        cpus = _int(obj["cpus"], f"{what} cpus", 1, MAX_ARGON2_CPUS)
        time = _int(obj["time"], f"{what} time", 1, MAX_ARGON2_TIME)
        memory = _int(obj["memory"], f"{what} memory", max(32, 8 * cpus), MAX_ARGON2_MEMORY_KIB)
        if memory * time > MAX_ARGON2_WORK:
            raise _fail(f"{what} memory x time is above the cap")
        return Kdf("argon2id", _b64(obj["salt"], f"{what} salt", 32), time, memory, cpus)
    if kind == "pbkdf2":
        obj = _obj(value, what, {"type", "hash", "iterations", "salt"})
        _eq(obj["hash"], "sha256", f"{what} hash is not sha256")
        iterations = _int(
            obj["iterations"], f"{what} iterations", MIN_PBKDF2_ITERATIONS, MAX_PBKDF2_ITERATIONS
        )
        return Kdf("pbkdf2", _b64(obj["salt"], f"{what} salt", 32), iterations=iterations)
    raise _fail(f"{what} type is not argon2id or pbkdf2")


def validate_kdf(value: Any) -> Kdf:
    """The caps applied to a KDF object on its own (also used on the keyslots we create)."""
    return _kdf(value, "kdf")


def _keyslot(slot_id: str, value: Any, key_size: int) -> Keyslot:
    """One keyslot. ``key_size`` (the volume key's) comes from the segment: 64, or 96 with
    integrity; the area's KEK is 64 bytes either way (cryptsetup's aes-xts-plain64 fallback)."""
    what = f"keyslot {slot_id}"
    obj = _obj(value, what, {"type", "key_size", "af", "area", "kdf"}, frozenset({"priority"}))
    _eq(obj["type"], "luks2", f"{what} type is not luks2")
    _eq(obj["key_size"], key_size, f"{what} key_size is not {key_size}")
    priority = _int(obj.get("priority", 1), f"{what} priority", 0, 2)
    af = _obj(obj["af"], f"{what} af", {"type", "stripes", "hash"})
    _eq(af["type"], "luks1", f"{what} af type is not luks1")
    _eq(af["stripes"], AF_STRIPES, f"{what} af stripes is not {AF_STRIPES}")
    _eq(af["hash"], AF_HASH, f"{what} af hash is not {AF_HASH}")
    area = _obj(obj["area"], f"{what} area", {"type", "offset", "size", "encryption", "key_size"})
    _eq(area["type"], "raw", f"{what} area type is not raw")
    _eq(area["encryption"], CIPHER, f"{what} area encryption is not {CIPHER}")
    _eq(area["key_size"], KEY_SIZE, f"{what} area key_size is not {KEY_SIZE}")
    offset = _u64(area["offset"], f"{what} area offset")
    size = _u64(area["size"], f"{what} area size")
    if offset % 4096 or size % 4096 or size < material_length(key_size):
        raise _fail(f"{what} area offset or size is not aligned or too small")
    if offset < KEYSLOTS_OFFSET or offset + size > KEYSLOTS_OFFSET + KEYSLOTS_SIZE:
        raise _fail(f"{what} area lies outside the keyslots area")
    return Keyslot(slot_id, priority, offset, size, _kdf(obj["kdf"], f"{what} kdf"))


def _segment(segments: Any, allow_integrity: bool) -> Segment:
    segs = _obj(segments, "segments", {"0"})
    if isinstance(segs["0"], dict) and "integrity" in segs["0"] and not allow_integrity:
        # Before anything else: dm-integrity sectors are not plain XTS sectors, so such a
        # volume must never be served as if it were (its data would read as garbage, and
        # writes would bypass the tags the kernel engine checks).
        raise _fail(
            "segment 0 uses dm-integrity (dataIntegrity): the userspace engine cannot serve "
            "it; only the kernel engine opens it, for a volume staged with dataIntegrity"
        )
    members = {"type", "offset", "size", "iv_tweak", "encryption", "sector_size"}
    optional = frozenset({"integrity"}) if allow_integrity else frozenset()
    seg = _obj(segs["0"], "segment 0", members, optional)
    _eq(seg["type"], "crypt", "segment 0 type is not crypt")
    _eq(seg["encryption"], CIPHER, f"segment 0 encryption is not {CIPHER}")
    _eq(seg["size"], "dynamic", "segment 0 size is not dynamic")
    if _u64(seg["iv_tweak"], "segment 0 iv_tweak") != 0:
        raise _fail("segment 0 iv_tweak is not 0")
    if _u64(seg["offset"], "segment 0 offset") != DATA_OFFSET:
        raise _fail(f"segment 0 offset is not {DATA_OFFSET}")
    sector = seg["sector_size"]
    if type(sector) is not int or sector not in SECTOR_SIZES:
        raise _fail("segment 0 sector_size is not 512, 1024, 2048 or 4096")
    integrity = None
    if "integrity" in seg:
        obj = _obj(seg["integrity"], "segment 0 integrity", set(INTEGRITY_OBJECT))
        for name, expected in INTEGRITY_OBJECT.items():
            _eq(obj[name], expected, f"segment 0 integrity {name} is not {expected}")
        if sector != CDH_SECTOR_SIZE:
            raise _fail("an integrity segment must use 4096-byte sectors (the CDH profile)")
        integrity = INTEGRITY
    return Segment(DATA_OFFSET, sector, 0, integrity)


def _digest(digests: Any, slot_ids: set[str]) -> Digest:
    members = {"type", "keyslots", "segments", "hash", "iterations", "salt", "digest"}
    dig = _obj(_obj(digests, "digests", {"0"})["0"], "digest 0", members)
    _eq(dig["type"], "pbkdf2", "digest 0 type is not pbkdf2")
    _eq(dig["hash"], "sha256", "digest 0 hash is not sha256")
    if _ids(dig["segments"], "digest 0 segments") != ("0",):
        raise _fail("digest 0 does not cover exactly segment 0")
    keyslots = _ids(dig["keyslots"], "digest 0 keyslots")
    if set(keyslots) != slot_ids:
        raise _fail("digest 0 keyslots do not match the keyslots")
    return Digest(
        keyslots=keyslots,
        salt=_b64(dig["salt"], "digest 0 salt", 32),
        iterations=_int(
            dig["iterations"], "digest 0 iterations", MIN_PBKDF2_ITERATIONS, MAX_DIGEST_ITERATIONS
        ),
        value=_b64(dig["digest"], "digest 0 digest", 32),
    )


def _config(config: Any) -> None:
    cfg = _obj(config, "config", {"json_size", "keyslots_size"}, frozenset({"flags"}))
    _eq(cfg["json_size"], JSON_SIZE_TEXT, f"config json_size is not {JSON_SIZE_TEXT}")
    _eq(cfg["keyslots_size"], str(KEYSLOTS_SIZE), f"config keyslots_size is not {KEYSLOTS_SIZE}")
    if "flags" in cfg:
        flags = cfg["flags"]
        if not isinstance(flags, list) or not all(
            isinstance(f, str) and f in ALLOWED_CONFIG_FLAGS for f in flags
        ):
            raise _fail("config flags has an unknown flag")


def _binding(tokens: Any) -> tuple[bytes | None, str | None]:
    """At most one token, and only ours: cryptsetup ignores it, we never run token handlers."""
    if not isinstance(tokens, dict):
        raise _fail("tokens is not an object")
    if not tokens:
        return None, None
    if len(tokens) != 1:
        raise _fail("more than one token")
    ((token_id, token),) = tokens.items()
    if not _ID.fullmatch(token_id):
        raise _fail("token id is not 0..31")
    obj = _obj(token, f"token {token_id}", {"type", "keyslots", "mac"})
    _eq(obj["type"], BINDING_TOKEN_TYPE, "the token is not a coco-csi binding token")
    if obj["keyslots"] != []:
        raise _fail("the binding token lists keyslots")
    return _b64(obj["mac"], "binding token mac", BINDING_MAC_LEN), token_id


def validate(metadata: dict[str, Any], *, allow_integrity: bool = False) -> Metadata:
    """Check the whole JSON metadata against the accepted profiles; return what opening needs.

    ``allow_integrity``: also accept CDH's dataIntegrity profile (segment ``integrity``
    exactly ``hmac(sha256)`` with both journals ``none``, 4096-byte sectors, 96-byte volume
    key in every keyslot). Only the kernel engine may ask: the userspace engine serves plain
    XTS sectors, and without the flag such a header is refused before anything else.
    """
    top = _obj(metadata, "metadata", {"keyslots", "tokens", "segments", "digests", "config"})
    _config(top["config"])
    segment = _segment(top["segments"], allow_integrity)
    if not isinstance(top["keyslots"], dict) or not 1 <= len(top["keyslots"]) <= MAX_KEYSLOTS:
        raise _fail(f"keyslots is not an object of 1..{MAX_KEYSLOTS} keyslots")
    for slot_id in top["keyslots"]:
        if not _ID.fullmatch(slot_id):
            raise _fail("keyslot id is not 0..31")
    keyslots = tuple(_keyslot(k, v, segment.key_size) for k, v in top["keyslots"].items())
    argon2_work = sum(s.kdf.memory_kib * s.kdf.time for s in keyslots)
    pbkdf2_work = sum(s.kdf.iterations for s in keyslots)
    if argon2_work > MAX_TOTAL_ARGON2_WORK or pbkdf2_work > MAX_TOTAL_PBKDF2_ITERATIONS:
        raise _fail("the keyslots' KDF costs together are above the cap")
    spans = sorted((s.area_offset, s.area_offset + s.area_size) for s in keyslots)
    if any(prev[1] > cur[0] for prev, cur in zip(spans, spans[1:], strict=False)):
        raise _fail("keyslot areas overlap")
    digest = _digest(top["digests"], {s.id for s in keyslots})
    mac, token_id = _binding(top["tokens"])
    if mac is None and segment.sector_size != CDH_SECTOR_SIZE:
        raise _fail("an unbound header must use 4096-byte sectors (the CDH profile)")
    return Metadata(keyslots, digest, segment, mac, token_id)
