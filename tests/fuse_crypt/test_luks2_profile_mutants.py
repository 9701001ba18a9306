"""profile.validate in process: every refusal by its exact text, every bound on both sides.

Why a separate file: the hostile-image tests (test_luks2_hostile.py) go through open_volume
on real images and match a message fragment, which is right for attacks but lets a mutant
that moves a bound by one, swaps a dataclass field or changes which check speaks survive.
Here the JSON metadata is a literal of what cryptsetup 2.6 writes for CDH's luksFormat (and
what format_volume writes when bound), edited one member at a time; nothing touches a disk
or runs a KDF, so each test takes milliseconds and ``./run mutate`` kills most mutants here.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import pytest

from fuse_crypt.luks2 import HeaderError, profile
from fuse_crypt.luks2.keyslot import Kdf

PREFIX = "LUKS2 header refused: "
SLOT_SALT = bytes(range(32))
DIGEST_SALT = bytes(range(32, 64))
DIGEST_VALUE = bytes(range(64, 96))
MAC = bytes(range(96, 128))
AREA = 258048  # the smallest 4096-aligned area holding 64 x 4000 bytes of AF material
END = profile.KEYSLOTS_OFFSET + profile.KEYSLOTS_SIZE  # 16 MiB: where the data starts


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _argon2(time: int = 4, memory: int = 1048576, cpus: int = 4) -> dict[str, Any]:
    return {"type": "argon2id", "time": time, "memory": memory, "cpus": cpus,
            "salt": _b64(SLOT_SALT)}  # fmt: skip


def _pbkdf2(iterations: int = 1000) -> dict[str, Any]:
    return {"type": "pbkdf2", "hash": "sha256", "iterations": iterations,
            "salt": _b64(SLOT_SALT)}  # fmt: skip


def _slot(
    offset: int = profile.KEYSLOTS_OFFSET, kdf: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "type": "luks2",
        "key_size": 64,
        "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
        "area": {"type": "raw", "offset": str(offset), "size": str(AREA),
                 "encryption": "aes-xts-plain64", "key_size": 64},
        "kdf": kdf if kdf is not None else _argon2(),
    }  # fmt: skip


def _meta(*, bound: bool = False, sector: int = 4096) -> dict[str, Any]:
    """cryptsetup 2.6's header for CDH's options (one argon2id slot), or ours when bound."""
    tokens = {"0": {"type": "coco-csi-binding-v1", "keyslots": [], "mac": _b64(MAC)}}
    return {
        "keyslots": {"0": _slot()},
        "tokens": tokens if bound else {},
        "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                           "iv_tweak": "0", "encryption": "aes-xts-plain64",
                           "sector_size": sector}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                          "hash": "sha256", "iterations": 1000, "salt": _b64(DIGEST_SALT),
                          "digest": _b64(DIGEST_VALUE)}},
        "config": {"json_size": "12288", "keyslots_size": "16744448"},
    }  # fmt: skip


def _slots(meta: dict[str, Any], *kdfs: dict[str, Any]) -> dict[str, Any]:
    """Replace the keyslots with one adjacent slot per KDF (ids 0, 1, ...), digest to match."""
    meta["keyslots"] = {
        str(i): _slot(profile.KEYSLOTS_OFFSET + i * AREA, kdf) for i, kdf in enumerate(kdfs)
    }
    meta["digests"]["0"]["keyslots"] = list(meta["keyslots"])
    return meta


def _at(meta: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    *parents, last = path.split(".")
    node = meta
    for part in parents:
        node = node[part]
    return node, last


def _with(path: str, value: Any, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = _meta() if meta is None else meta
    node, last = _at(meta, path)
    node[last] = value
    return meta


def _without(path: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = _meta() if meta is None else meta
    node, last = _at(meta, path)
    del node[last]
    return meta


def _refused(meta: Any, text: str) -> None:
    before = copy.deepcopy(meta)
    with pytest.raises(HeaderError) as err:
        profile.validate(meta)
    assert str(err.value) == PREFIX + text
    assert meta == before  # validation never edits what it was given


# --- the accepted profiles, field by field -------------------------------------------------


def test_cdh_header_is_accepted_with_every_field_as_written() -> None:
    meta = _meta()
    before = copy.deepcopy(meta)
    got = profile.validate(meta)
    assert meta == before
    kdf = Kdf("argon2id", SLOT_SALT, time=4, memory_kib=1048576, cpus=4)
    assert got.keyslots == (profile.Keyslot("0", 1, 32768, AREA, kdf),)
    assert got.digest == profile.Digest(("0",), DIGEST_SALT, 1000, DIGEST_VALUE)
    assert got.segment == profile.Segment(16777216, 4096, 0)
    assert got.binding_mac is None
    assert got.binding_token_id is None


def test_bound_header_returns_the_mac_and_token_id() -> None:
    got = profile.validate(_meta(bound=True))
    assert got.binding_mac == MAC
    assert got.binding_token_id == "0"
    meta = _meta(bound=True)
    meta["tokens"] = {"31": meta["tokens"]["0"]}
    assert profile.validate(meta).binding_token_id == "31"


def test_pbkdf2_keyslot_and_priorities_are_returned_as_written() -> None:
    meta = _slots(_meta(), _pbkdf2(1000), _pbkdf2(profile.MAX_PBKDF2_ITERATIONS))
    meta["keyslots"]["0"]["priority"] = 0
    meta["keyslots"]["1"]["priority"] = 2
    got = profile.validate(meta)
    assert got.keyslots == (
        profile.Keyslot("0", 0, 32768, AREA, Kdf("pbkdf2", SLOT_SALT, iterations=1000)),
        profile.Keyslot("1", 2, 32768 + AREA, AREA, Kdf("pbkdf2", SLOT_SALT, iterations=1 << 24)),
    )
    assert got.digest.keyslots == ("0", "1")


def test_constants_are_cryptsetups() -> None:
    """The profile's numbers, pinned: a changed constant must be a reviewed change."""
    assert profile.CIPHER == "aes-xts-plain64"
    assert (profile.KEY_SIZE, profile.DATA_OFFSET) == (64, 16777216)
    assert (profile.KEYSLOTS_OFFSET, profile.KEYSLOTS_SIZE) == (32768, 16744448)
    assert profile.JSON_SIZE_TEXT == "12288"
    assert profile.SECTOR_SIZES == (512, 1024, 2048, 4096)
    assert profile.MAX_KEYSLOTS == 8
    assert (profile.MAX_ARGON2_MEMORY_KIB, profile.MAX_ARGON2_TIME) == (1 << 20, 32)
    assert profile.MAX_TOTAL_ARGON2_WORK == 1 << 24
    assert (profile.MAX_PBKDF2_ITERATIONS, profile.MAX_TOTAL_PBKDF2_ITERATIONS) == (
        1 << 24,
        1 << 25,
    )
    assert profile.MAX_DIGEST_ITERATIONS == 1 << 22
    assert profile.BINDING_TOKEN_TYPE == "coco-csi-binding-v1"


# --- objects: exact members -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("config", "config"),
        ("keyslots.0.af", "keyslot 0 af"),
        ("keyslots.0.area", "keyslot 0 area"),
        ("segments", "segments"),
        ("segments.0", "segment 0"),
        ("digests", "digests"),
        ("digests.0", "digest 0"),
    ],
)
def test_objects_must_be_objects_with_exactly_their_members(path: str, label: str) -> None:
    _refused(_with(path, []), f"{label} is not an object")
    _refused(_with(path, None), f"{label} is not an object")
    _refused(_with(path + ".extra", 1), f"{label} has an unknown member")
    node, last = _at(_meta(), path)
    first = next(iter(node[last]))
    _refused(_without(f"{path}.{first}"), f"{label} lacks a required member")


def test_metadata_members() -> None:
    _refused([], "metadata is not an object")
    _refused(_with("extra", {}), "metadata has an unknown member")
    for member in ("keyslots", "tokens", "segments", "digests", "config"):
        _refused(_without(member), "metadata lacks a required member")


def test_keyslot_members_and_the_optional_priority() -> None:
    _refused(_with("keyslots.0", []), "keyslot 0 is not an object")
    _refused(_with("keyslots.0.extra", 1), "keyslot 0 has an unknown member")
    for member in ("type", "key_size", "af", "area", "kdf"):
        _refused(_without(f"keyslots.0.{member}"), "keyslot 0 lacks a required member")
    assert profile.validate(_with("keyslots.0.priority", 1)).keyslots[0].priority == 1


def test_token_members() -> None:
    meta = _meta(bound=True)
    _refused(_with("tokens.0", [], copy.deepcopy(meta)), "token 0 is not an object")
    _refused(_with("tokens.0.extra", 1, copy.deepcopy(meta)), "token 0 has an unknown member")
    for member in ("type", "keyslots", "mac"):
        _refused(
            _without(f"tokens.0.{member}", copy.deepcopy(meta)), "token 0 lacks a required member"
        )


# --- fixed values: the value and its JSON type --------------------------------------------


@pytest.mark.parametrize(
    ("path", "good", "text"),
    [
        ("keyslots.0.type", "luks2", "keyslot 0 type is not luks2"),
        ("keyslots.0.key_size", 64, "keyslot 0 key_size is not 64"),
        ("keyslots.0.af.type", "luks1", "keyslot 0 af type is not luks1"),
        ("keyslots.0.af.stripes", 4000, "keyslot 0 af stripes is not 4000"),
        ("keyslots.0.af.hash", "sha256", "keyslot 0 af hash is not sha256"),
        ("keyslots.0.area.type", "raw", "keyslot 0 area type is not raw"),
        ("keyslots.0.area.encryption", "aes-xts-plain64",
         "keyslot 0 area encryption is not aes-xts-plain64"),
        ("keyslots.0.area.key_size", 64, "keyslot 0 area key_size is not 64"),
        ("segments.0.type", "crypt", "segment 0 type is not crypt"),
        ("segments.0.encryption", "aes-xts-plain64", "segment 0 encryption is not aes-xts-plain64"),
        ("segments.0.size", "dynamic", "segment 0 size is not dynamic"),
        ("digests.0.type", "pbkdf2", "digest 0 type is not pbkdf2"),
        ("digests.0.hash", "sha256", "digest 0 hash is not sha256"),
        ("config.json_size", "12288", "config json_size is not 12288"),
        ("config.keyslots_size", "16744448", "config keyslots_size is not 16744448"),
    ],
)  # fmt: skip
def test_fixed_values_exact_value_and_type(path: str, good: Any, text: str) -> None:
    profile.validate(_with(path, good))
    if isinstance(good, str):
        bad: list[Any] = [good.upper(), good[:-1], good + " ", "", None, [good]]
        bad = [value for value in bad if value != good]
    else:
        bad = [good + 1, good - 1, str(good), float(good), True, None]
    for value in bad:
        _refused(_with(path, value), text)


def test_booleans_are_not_integers_where_the_value_is_one() -> None:
    """``True == 1`` in Python: a check by value alone would take a boolean priority."""
    _refused(_with("keyslots.0.priority", True), "keyslot 0 priority is not an integer")
    _refused(_with("keyslots.0.priority", 1.0), "keyslot 0 priority is not an integer")
    _refused(_with("keyslots.0.priority", "1"), "keyslot 0 priority is not an integer")


def test_priority_bounds_both_sides() -> None:
    """0 ignore, 1 normal, 2 prefer (cryptsetup's CRYPT_SLOT_PRIORITY_*): nothing else."""
    for value in (0, 1, 2):
        assert profile.validate(_with("keyslots.0.priority", value)).keyslots[0].priority == value
    for value in (-1, 3, 1 << 31):
        _refused(
            _with("keyslots.0.priority", value), "keyslot 0 priority is out of the accepted range"
        )


# --- decimal u64 strings --------------------------------------------------------------------


def test_u64_strings_are_plain_decimal_digits() -> None:
    for value in ("+16777216", " 16777216", "16777216 ", "1_6777216", "", "0x1000000", "-0",
                  "\u0661", 16777216, None):  # fmt: skip
        _refused(_with("segments.0.offset", value), "segment 0 offset is not a decimal string")
    _refused(_with("segments.0.offset", "0" * 20 + "1"), "segment 0 offset is not a decimal string")
    # 20 digits with leading zeros: the same number to strtoull (cryptsetup) and to int()
    assert profile.validate(_with("segments.0.offset", "0" * 12 + "16777216")).segment.offset == (
        16777216
    )


def test_u64_range_both_sides() -> None:
    _refused(_with("segments.0.offset", str((1 << 64) - 1)), "segment 0 offset is not 16777216")
    _refused(_with("segments.0.offset", str(1 << 64)), "segment 0 offset is out of range")
    _refused(_with("segments.0.offset", "9" * 20), "segment 0 offset is out of range")
    _refused(_with("segments.0.iv_tweak", str(1 << 64)), "segment 0 iv_tweak is out of range")
    _refused(_with("keyslots.0.area.offset", str(1 << 64)), "keyslot 0 area offset is out of range")
    _refused(_with("keyslots.0.area.size", str(1 << 64)), "keyslot 0 area size is out of range")


def test_u64_labels() -> None:
    _refused(_with("segments.0.iv_tweak", 0), "segment 0 iv_tweak is not a decimal string")
    _refused(
        _with("keyslots.0.area.offset", 32768), "keyslot 0 area offset is not a decimal string"
    )
    _refused(
        _with("keyslots.0.area.size", "+258048"), "keyslot 0 area size is not a decimal string"
    )


# --- the data segment -----------------------------------------------------------------------


def test_segment_offset_and_iv_tweak_are_fixed() -> None:
    for value in ("16777215", "16777217", "0", "33554432"):
        _refused(_with("segments.0.offset", value), "segment 0 offset is not 16777216")
    for value in ("1", "8", str((1 << 64) - 1)):
        _refused(_with("segments.0.iv_tweak", value), "segment 0 iv_tweak is not 0")
    _refused(_with("segments.1", {}), "segments has an unknown member")


@pytest.mark.parametrize("sector", [512, 1024, 2048, 4096])
def test_every_sector_size_is_accepted_when_bound(sector: int) -> None:
    got = profile.validate(_meta(bound=True, sector=sector))
    assert got.segment == profile.Segment(16777216, sector, 0)


@pytest.mark.parametrize("sector", [512, 1024, 2048])
def test_unbound_header_must_use_cdh_sectors(sector: int) -> None:
    _refused(_meta(sector=sector), "an unbound header must use 4096-byte sectors (the CDH profile)")


@pytest.mark.parametrize("value", [0, 256, 511, 513, 4095, 4097, 8192, "4096", 4096.0, True, None])
def test_sector_size_outside_the_list_is_refused(value: Any) -> None:
    text = "segment 0 sector_size is not 512, 1024, 2048 or 4096"
    _refused(_with("segments.0.sector_size", value, _meta(bound=True)), text)


# --- keyslot areas --------------------------------------------------------------------------


def test_area_alignment_and_minimum_size() -> None:
    text = "keyslot 0 area offset or size is not aligned or too small"
    _refused(_with("keyslots.0.area.offset", str(32768 + 512)), text)
    _refused(_with("keyslots.0.area.offset", str(32768 + 2048)), text)
    _refused(_with("keyslots.0.area.size", str(AREA + 512)), text)
    _refused(_with("keyslots.0.area.size", str(AREA - 4096)), text)  # 253952 < 256000
    _refused(_with("keyslots.0.area.size", "256000"), text)  # the material itself, unaligned
    _refused(_with("keyslots.0.area.size", "0"), text)
    got = profile.validate(_with("keyslots.0.area.size", str(AREA + 4096)))
    assert got.keyslots[0].area_size == AREA + 4096


def test_area_must_lie_in_the_keyslots_area_both_ends() -> None:
    text = "keyslot 0 area lies outside the keyslots area"
    _refused(_with("keyslots.0.area.offset", str(32768 - 4096)), text)
    _refused(_with("keyslots.0.area.offset", "0"), text)
    last = END - AREA
    got = profile.validate(_with("keyslots.0.area.offset", str(last)))
    assert got.keyslots[0].area_offset == last
    _refused(_with("keyslots.0.area.offset", str(last + 4096)), text)
    _refused(_with("keyslots.0.area.offset", str(END)), text)
    profile.validate(_with("keyslots.0.area.size", str(END - 32768)))
    _refused(_with("keyslots.0.area.size", str(END - 32768 + 4096)), text)


def test_keyslot_areas_may_touch_but_not_overlap() -> None:
    meta = _slots(_meta(), _pbkdf2(), _pbkdf2(), _pbkdf2())
    profile.validate(meta)  # adjacent areas
    _with("keyslots.2.area.offset", str(32768 + 2 * AREA - 4096), meta)
    _refused(meta, "keyslot areas overlap")
    meta = _slots(_meta(), _pbkdf2(), _pbkdf2())
    _refused(_with("keyslots.1.area.offset", "32768", meta), "keyslot areas overlap")


def test_area_order_does_not_follow_the_slot_ids() -> None:
    """Slot 0 above slot 1, apart: fine (spans are compared in offset order)."""
    meta = _slots(_meta(), _pbkdf2(), _pbkdf2())
    _with("keyslots.0.area.offset", str(32768 + 4 * AREA), meta)
    got = profile.validate(meta)
    assert [s.area_offset for s in got.keyslots] == [32768 + 4 * AREA, 32768 + AREA]
    _with("keyslots.0.area.offset", str(32768 + 2 * AREA - 4096), meta)
    _refused(meta, "keyslot areas overlap")


# --- keyslot ids and counts -----------------------------------------------------------------


def test_keyslot_count_is_one_to_eight() -> None:
    text = "keyslots is not an object of 1..8 keyslots"
    _refused(_with("keyslots", {}), text)
    _refused(_with("keyslots", []), text)
    _refused(_with("keyslots", None), text)
    assert len(profile.validate(_slots(_meta(), *[_pbkdf2()] * 8)).keyslots) == 8
    _refused(_slots(_meta(), *[_pbkdf2()] * 9), text)


def test_keyslot_ids_are_0_to_31() -> None:
    for good in ("31", "9", "10", "30"):
        meta = _meta()
        meta["keyslots"] = {good: meta["keyslots"]["0"]}
        meta["digests"]["0"]["keyslots"] = [good]
        assert profile.validate(meta).keyslots[0].id == good
    for bad in ("32", "01", "-1", "", " 1", "a", "40", "0 "):
        meta = _meta()
        meta["keyslots"] = {bad: meta["keyslots"]["0"]}
        meta["digests"]["0"]["keyslots"] = [bad]
        _refused(meta, "keyslot id is not 0..31")


# --- KDFs -----------------------------------------------------------------------------------


def _kdf_refused(kdf: Any, text: str) -> None:
    _refused(_with("keyslots.0.kdf", kdf), "keyslot 0 kdf" + text)
    with pytest.raises(HeaderError) as err:
        profile.validate_kdf(kdf)
    assert str(err.value) == PREFIX + "kdf" + text


def test_kdf_type() -> None:
    for kdf in ({"type": "argon2i"}, {"type": "PBKDF2"}, {}, [], None, "argon2id"):
        _kdf_refused(kdf, " type is not argon2id or pbkdf2")


def test_kdf_members() -> None:
    for kdf in (_argon2(), _pbkdf2()):
        _kdf_refused({**kdf, "extra": 1}, " has an unknown member")
        for member in kdf:
            if member != "type":
                _kdf_refused(
                    {k: v for k, v in kdf.items() if k != member}, " lacks a required member"
                )


@pytest.mark.parametrize(
    ("member", "low", "high"),
    [("cpus", 1, 4), ("time", 1, 32), ("memory", 32, 1 << 20)],
)
def test_argon2_bounds_both_sides(member: str, low: int, high: int) -> None:
    base = {"time": 1, "memory": 32, "cpus": 1}
    for value in (low, high):
        kdf = _argon2(**{**base, member: value})
        got = profile.validate_kdf(kdf)
        assert (got.time, got.memory_kib, got.cpus) == (kdf["time"], kdf["memory"], kdf["cpus"])
    for value in (low - 1, high + 1, 0, -1):
        _kdf_refused(_argon2(**{**base, member: value}), f" {member} is out of the accepted range")
    for value in (float(low), True, str(low), None):
        _kdf_refused(_argon2(**{**base, member: value}), f" {member} is not an integer")


def test_argon2_memory_floor_does_not_grow_with_four_cpus() -> None:
    """max(32, 8 x cpus): with at most 4 lanes the floor is 32 KiB whatever the lanes."""
    got = profile.validate_kdf(_argon2(time=1, memory=32, cpus=4))
    assert got == Kdf("argon2id", SLOT_SALT, time=1, memory_kib=32, cpus=4)
    _kdf_refused(_argon2(time=1, memory=31, cpus=4), " memory is out of the accepted range")
    _kdf_refused(_argon2(time=1, memory=8, cpus=1), " memory is out of the accepted range")


def test_argon2_work_cap_per_slot_both_sides() -> None:
    profile.validate_kdf(_argon2(time=8, memory=1 << 20, cpus=1))  # exactly 8 GiB-passes
    _kdf_refused(_argon2(time=9, memory=1 << 20, cpus=1), " memory x time is above the cap")
    profile.validate_kdf(_argon2(time=32, memory=1 << 18, cpus=1))
    _kdf_refused(_argon2(time=32, memory=(1 << 18) + 1, cpus=1), " memory x time is above the cap")


def test_argon2_returns_each_parameter_in_its_place() -> None:
    got = profile.validate_kdf(_argon2(time=3, memory=4096, cpus=2))
    assert got == Kdf("argon2id", SLOT_SALT, time=3, memory_kib=4096, cpus=2)


def test_pbkdf2_bounds_and_hash() -> None:
    for value in (1000, 1 << 24):
        assert profile.validate_kdf(_pbkdf2(value)) == Kdf("pbkdf2", SLOT_SALT, iterations=value)
    for value in (999, (1 << 24) + 1, 0):
        _kdf_refused(_pbkdf2(value), " iterations is out of the accepted range")
    _kdf_refused(_pbkdf2(True), " iterations is not an integer")
    _kdf_refused(_pbkdf2(1000.0), " iterations is not an integer")
    for value in ("sha512", "SHA256", "sha1", None):
        _kdf_refused({**_pbkdf2(), "hash": value}, " hash is not sha256")


def test_kdf_salt_is_canonical_base64_of_32_bytes() -> None:
    for kdf in (_argon2(time=1, memory=32, cpus=1), _pbkdf2()):
        for salt in (None, 32, "!" * 44, "-" + _b64(SLOT_SALT)[1:], "AAAA====", "A"):
            _kdf_refused({**kdf, "salt": salt}, " salt is not base64")
        for salt in (_b64(bytes(31)), _b64(bytes(33)), "", _b64(SLOT_SALT)[:-4] + "AAB="):
            _kdf_refused({**kdf, "salt": salt}, " salt has the wrong length or is not canonical")


# --- totals over all keyslots -------------------------------------------------------------


def test_argon2_total_cap_both_sides() -> None:
    at_cap = _argon2(time=8, memory=1 << 20, cpus=1)
    assert len(profile.validate(_slots(_meta(), at_cap, at_cap)).keyslots) == 2
    text = "the keyslots' KDF costs together are above the cap"
    _refused(_slots(_meta(), at_cap, at_cap, _argon2(time=1, memory=32, cpus=1)), text)
    profile.validate(_slots(_meta(), at_cap, at_cap, _pbkdf2()))  # PBKDF2 has no memory cost


def test_pbkdf2_total_cap_both_sides() -> None:
    at_cap = _pbkdf2(1 << 24)
    profile.validate(_slots(_meta(), at_cap, at_cap, _argon2(time=1, memory=32, cpus=1)))
    text = "the keyslots' KDF costs together are above the cap"
    _refused(_slots(_meta(), at_cap, at_cap, _pbkdf2(1000)), text)
    _refused(_slots(_meta(), at_cap, _pbkdf2((1 << 24) - 999), _pbkdf2(1000)), text)
    profile.validate(_slots(_meta(), at_cap, _pbkdf2((1 << 24) - 1000), _pbkdf2(1000)))


# --- the digest -----------------------------------------------------------------------------


def test_digest_covers_exactly_segment_0() -> None:
    text = "digest 0 does not cover exactly segment 0"
    for segments in ([], ["1"], ["0", "1"], ["1", "0"]):
        _refused(_with("digests.0.segments", segments), text)
    _refused(_with("digests.0.segments", ["0", "0"]), "digest 0 segments has a bad or repeated id")
    _refused(_with("digests.0.segments", "0"), "digest 0 segments is not a list")
    _refused(_with("digests.0.segments", [0]), "digest 0 segments is not a string")


def test_digest_keyslots_match_the_keyslots() -> None:
    text = "digest 0 keyslots do not match the keyslots"
    for keyslots in ([], ["1"], ["0", "1"]):
        _refused(_with("digests.0.keyslots", keyslots), text)
    meta = _slots(_meta(), _pbkdf2(), _pbkdf2())
    _refused(_with("digests.0.keyslots", ["0"], meta), text)
    meta = _slots(_meta(), _pbkdf2(), _pbkdf2())
    assert profile.validate(_with("digests.0.keyslots", ["1", "0"], meta)).digest.keyslots == (
        "1",
        "0",
    )
    _refused(_with("digests.0.keyslots", ["0", "0"]), "digest 0 keyslots has a bad or repeated id")
    _refused(_with("digests.0.keyslots", ["32"]), "digest 0 keyslots has a bad or repeated id")
    _refused(_with("digests.0.keyslots", {"0": 1}), "digest 0 keyslots is not a list")
    _refused(_with("digests.0.keyslots", [None]), "digest 0 keyslots is not a string")


def test_digest_iterations_both_sides() -> None:
    for value in (1000, 1 << 22):
        assert profile.validate(_with("digests.0.iterations", value)).digest.iterations == value
    for value in (999, (1 << 22) + 1):
        _refused(
            _with("digests.0.iterations", value), "digest 0 iterations is out of the accepted range"
        )
    _refused(_with("digests.0.iterations", "1000"), "digest 0 iterations is not an integer")


def test_digest_salt_and_value_are_32_bytes() -> None:
    for member in ("salt", "digest"):
        _refused(_with(f"digests.0.{member}", "*"), f"digest 0 {member} is not base64")
        _refused(
            _with(f"digests.0.{member}", _b64(bytes(16))),
            f"digest 0 {member} has the wrong length or is not canonical",
        )


# --- config ---------------------------------------------------------------------------------


def test_config_flags() -> None:
    every = sorted(profile.ALLOWED_CONFIG_FLAGS)
    assert every == ["allow-discards", "no-read-workqueue", "no-write-workqueue",
                     "same-cpu-crypt", "submit-from-crypt-cpus"]  # fmt: skip
    for flags in ([], every, ["allow-discards"]):
        profile.validate(_with("config.flags", flags))
    for flags in (["no-journal"], ["allow-discards", "x"], [1], "allow-discards", None, {}):
        _refused(_with("config.flags", flags), "config flags has an unknown flag")


# --- tokens ---------------------------------------------------------------------------------


def test_tokens() -> None:
    _refused(_with("tokens", []), "tokens is not an object")
    _refused(_with("tokens", None), "tokens is not an object")
    two = _meta(bound=True)
    two["tokens"]["1"] = copy.deepcopy(two["tokens"]["0"])
    _refused(two, "more than one token")
    for bad in ("32", "01", "a", ""):
        meta = _meta(bound=True)
        meta["tokens"] = {bad: meta["tokens"]["0"]}
        _refused(meta, "token id is not 0..31")


def test_binding_token_fields() -> None:
    for value in ("luks2-keyring", "coco-csi-binding-v2", None):
        _refused(
            _with("tokens.0.type", value, _meta(bound=True)),
            "the token is not a coco-csi binding token",
        )
    for value in (["0"], [0], None, {}, ""):
        _refused(
            _with("tokens.0.keyslots", value, _meta(bound=True)), "the binding token lists keyslots"
        )
    _refused(_with("tokens.0.mac", "*", _meta(bound=True)), "binding token mac is not base64")
    _refused(
        _with("tokens.0.mac", _b64(bytes(31)), _meta(bound=True)),
        "binding token mac has the wrong length or is not canonical",
    )
