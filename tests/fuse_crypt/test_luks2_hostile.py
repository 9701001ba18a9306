"""Hostile LUKS2 headers (luks2.md §5): each planted header is refused, the image unchanged.

The host can rewrite any header byte and recompute checksums and digests (forge() does
exactly that). Every case asserts the typed error, that the message names the check, and
that the image is bit-for-bit what it was (sha256). Cases run against a cryptsetup-made
(unbound, CDH-profile) image and/or one of ours (bound by the MAC token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.errors import WrongKeyError
from fuse_crypt.luks2 import (
    HeaderError,
    add_passphrase,
    format_volume,
    keyslot,
    open_volume,
    profile,
    volume,
)
from fuse_crypt.luks2 import header as hdr
from tests.fuse_crypt.luks2_helpers import (
    TINY,
    blank_image,
    cs_format,
    cs_test_passphrase,
    forge,
    needs_cryptsetup,
    opened_fd,
    read_copies,
    rewrite_copy,
    sha256_file,
    write_copies,
)

PW = b"correct horse"
Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(autouse=True)
def no_costly_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail fast, never allocate: no test here may reach a KDF with more than tiny costs
    (so a broken cap, e.g. under ./run mutate, fails the test instead of eating the RAM)."""
    real = keyslot.derive_kek

    def guarded(passphrase: bytes, kdf: keyslot.Kdf, length: int) -> bytes:
        assert kdf.memory_kib <= 1024 and kdf.time <= 8 and kdf.iterations <= 100_000, kdf
        return real(passphrase, kdf, length)

    monkeypatch.setattr(keyslot, "derive_kek", guarded)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("luks2")
    ours = blank_image(base / "ours.img")
    with opened_fd(ours) as fd:
        format_volume(fd, PW, kdf_cost=TINY)
    images = {"ours": ours}
    if shutil.which("cryptsetup"):
        images["cryptsetup"] = cs_format(base / "cs.img", PW)
    return images


@pytest.fixture(params=["ours", "cryptsetup"])
def image(request: pytest.FixtureRequest, pristine: dict[str, Path], tmp_path: Path) -> Path:
    if request.param not in pristine:
        pytest.skip("cryptsetup not installed")
    return Path(shutil.copy(pristine[request.param], tmp_path / "v.img"))


def _bound(image: Path) -> bool:
    return b"coco-csi-binding-v1" in b"".join(read_copies(image))


def _refused(image: Path, match: str, *, bound: bool | None = None) -> None:
    """open_volume raises HeaderError naming ``match``; the image is unchanged.

    ``bound`` None: require the binding exactly when the image carries our token (so the
    profile, not the missing token, is what refuses a cryptsetup-made image).
    """
    before = sha256_file(image)
    with opened_fd(image) as fd, pytest.raises(HeaderError, match=match):
        open_volume(fd, PW, require_binding=_bound(image) if bound is None else bound)
    assert sha256_file(image) == before


def _set(path: str, value: Any) -> Edit:
    def edit(meta: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = meta
        for part in parents:
            node = node[part]
        node[last] = value

    return edit


# (name, edit, expected message fragment) — each is a published or obvious attack
PROFILE_CASES: list[tuple[str, Edit, str]] = [
    ("A1 null segment cipher", _set("segments.0.encryption", "cipher_null-ecb"), "encryption"),
    ("segment plain IV", _set("segments.0.encryption", "aes-xts-plain"), "encryption"),
    ("segment ecb", _set("segments.0.encryption", "aes-ecb"), "encryption"),
    ("A2 null keyslot cipher", _set("keyslots.0.area.encryption", "cipher_null-ecb"), "area enc"),
    ("keyslot 32-byte KEK", _set("keyslots.0.area.key_size", 32), "area key_size"),
    ("data offset 0 (overlaps header)", _set("segments.0.offset", "0"), "offset"),
    ("data offset moved", _set("segments.0.offset", "33554432"), "offset"),
    ("data offset '+16777216'", _set("segments.0.offset", "+16777216"), "decimal"),
    ("keyslot area over the header", _set("keyslots.0.area.offset", "0"), "outside"),
    ("keyslot area into the data", _set("keyslots.0.area.offset", "16773120"), "outside"),
    ("iv_tweak forged", _set("segments.0.iv_tweak", "8"), "iv_tweak"),
    ("sized segment", _set("segments.0.size", "4096"), "dynamic"),
    ("sector size 8192", _set("segments.0.sector_size", 8192), "sector_size"),
    ("sector size as string", _set("segments.0.sector_size", "4096"), "sector_size"),
    (
        "integrity segment",
        _set(
            "segments.0.integrity",
            {"type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"},
        ),
        "dm-integrity .*userspace engine cannot serve it",
    ),  # fmt: skip
    ("segment flags", _set("segments.0.flags", ["backup-previous"]), "unknown member"),
    (
        "second segment",
        _set("segments.1", {"type": "linear", "offset": "0", "size": "dynamic"}),
        "unknown member",
    ),  # fmt: skip
    (
        "A6 requirements",
        _set("config.requirements", {"mandatory": ["online-reencrypt-v2"]}),
        "unknown member",
    ),  # fmt: skip
    ("reencrypt keyslot", _set("keyslots.0.type", "reencrypt"), "type is not luks2"),
    ("unknown config flag", _set("config.flags", ["no-journal"]), "flag"),
    ("json_size lie", _set("config.json_size", "4182016"), "json_size"),
    ("keyslots_size lie", _set("config.keyslots_size", "134217728"), "keyslots_size"),
    (
        "A7 argon2 4 GiB",
        _set(
            "keyslots.0.kdf",
            {
                "type": "argon2id",
                "time": 4,
                "memory": 4194304,
                "cpus": 1,
                "salt": base64.b64encode(bytes(32)).decode(),
            },
        ),
        "memory",
    ),  # fmt: skip
    (
        "A7 argon2 time 1e6",
        _set(
            "keyslots.0.kdf",
            {
                "type": "argon2id",
                "time": 1000000,
                "memory": 32,
                "cpus": 1,
                "salt": base64.b64encode(bytes(32)).decode(),
            },
        ),
        "time",
    ),  # fmt: skip
    (
        "A7 argon2 threads",
        _set(
            "keyslots.0.kdf",
            {
                "type": "argon2id",
                "time": 4,
                "memory": 1024,
                "cpus": 64,
                "salt": base64.b64encode(bytes(32)).decode(),
            },
        ),
        "cpus",
    ),  # fmt: skip
    (
        "A7 argon2 1 GiB x 32",
        _set(
            "keyslots.0.kdf",
            {
                "type": "argon2id",
                "time": 32,
                "memory": 1048576,
                "cpus": 4,
                "salt": base64.b64encode(bytes(32)).decode(),
            },
        ),
        "cap",
    ),  # fmt: skip
    (
        "A7 pbkdf2 2^31",
        _set(
            "keyslots.0.kdf",
            {
                "type": "pbkdf2",
                "hash": "sha256",
                "iterations": 2**31,
                "salt": base64.b64encode(bytes(32)).decode(),
            },
        ),
        "iterations",
    ),  # fmt: skip
    ("A7 digest 2^31", _set("digests.0.iterations", 2**31), "iterations"),
    ("argon2i", _set("keyslots.0.kdf.type", "argon2i"), "argon2id or pbkdf2"),
    ("pbkdf2 md5 digest", _set("digests.0.hash", "md5"), "hash"),
    ("af stripes 1", _set("keyslots.0.af.stripes", 1), "stripes"),
    ("A8 bool as int", _set("keyslots.0.key_size", True), "key_size"),
    ("A8 float", _set("segments.0.sector_size", 4096.0), "sector_size"),
    ("A8 lax base64", _set("digests.0.salt", "AAAA AAAA"), "base64"),
    ("digest of no segment", _set("digests.0.segments", []), "segment 0"),
    ("unbound keyslot", _set("digests.0.keyslots", []), "keyslots"),
    ("foreign token", _set("tokens.5", {"type": "systemd-tpm2", "keyslots": ["0"]}), "token"),
    ("extra top-level", _set("extra", {}), "unknown member"),
]


@pytest.mark.parametrize(
    ("name", "edit", "match"), PROFILE_CASES, ids=[c[0] for c in PROFILE_CASES]
)
def test_profile_refuses_planted_header(image: Path, name: str, edit: Edit, match: str) -> None:
    forge(image, edit)
    t0 = time.process_time()  # CPU time (all threads): a KDF spends it, a loaded machine not
    _refused(image, match)
    assert time.process_time() - t0 < 2, "refusal must come before any costly KDF"


@needs_cryptsetup
def test_cryptsetup_itself_accepts_a_null_segment_cipher(
    pristine: dict[str, Path], tmp_path: Path
) -> None:
    """Why the engine must check: cryptsetup 2.6.1 unlocks A1 happily (luks2.md §5.2)."""
    img = Path(shutil.copy(pristine["cryptsetup"], tmp_path / "a1.img"))
    forge(img, _set("segments.0.encryption", "cipher_null-ecb"))
    assert cs_test_passphrase(img, PW) == 0
    _refused(img, "encryption")


def test_forged_secondary_with_higher_seqid(image: Path) -> None:
    """A4: cryptsetup would use the secondary and copy it over the primary; we refuse."""
    forge(image, _set("segments.0.encryption", "cipher_null-ecb"), primary=False, seqid_delta=5)
    _refused(image, "seqid")
    forge(image, lambda meta: None, primary=False, seqid_delta=0)  # same seqid, same JSON: fine


def test_copies_with_different_json(image: Path) -> None:
    forge(image, _set("config.flags", ["allow-discards"]), primary=False, seqid_delta=0)
    _refused(image, "JSON areas differ")


def test_one_copy_broken(image: Path) -> None:
    first, second = read_copies(image)
    broken = bytearray(second)
    broken[0x200] ^= 1  # secondary padding: its checksum breaks
    write_copies(image, first, bytes(broken))
    _refused(image, "secondary header: non-zero padding")


@pytest.mark.parametrize("where", [0x18, 0x300, hdr.BIN_SIZE + 2, hdr.HDR_SIZE - 1])
def test_checksum_mismatch(image: Path, where: int) -> None:
    first, second = read_copies(image)
    data = bytearray(first + second)
    data[where] ^= 0x40
    write_copies(image, bytes(data[: hdr.HDR_SIZE]), bytes(data[hdr.HDR_SIZE :]))
    _refused(image, "checksum|padding|after the JSON")


@pytest.mark.parametrize(
    ("field", "offset", "value", "match"),
    [
        ("magic", 0, b"LUKS\xba\xbf", "magic"),
        ("version", 6, b"\x00\x01", "version"),
        ("hdr_size", 8, (4 * 1024 * 1024).to_bytes(8, "big"), "hdr_size"),
        ("hdr_offset", 0x100, (4096).to_bytes(8, "big"), "hdr_offset"),
        ("checksum_alg", 0x48, b"sha1\0\0", "checksum_alg"),
        ("uuid", 0xA8, b"../../etc/passwd\0", "uuid"),
    ],
)
def test_binary_header_fields(
    image: Path, field: str, offset: int, value: bytes, match: str
) -> None:
    first, second = read_copies(image)
    buf = bytearray(first)
    buf[offset : offset + len(value)] = value
    first = rewrite_copy(bytes(buf))  # checksum recomputed: only the field check can catch it
    write_copies(image, first, second)
    _refused(image, match)


def _area(text: bytes) -> bytes:
    return text + bytes(hdr.JSON_SIZE - len(text))


@pytest.mark.parametrize(
    ("name", "area", "match"),
    [
        ("no NUL (12 KiB of JSON)", b"{" + b" " * (hdr.JSON_SIZE - 2) + b"}", "NUL"),
        ("depth bomb", _area(b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}"), "deep"),
        ("string bomb", _area(b'{"a":"' + b"x" * 12000 + b'"}'), "unknown member|lacks"),
        ("duplicate member", _area(b'{"keyslots":{},"keyslots":{}}'), "duplicate"),
        ("NaN", _area(b'{"keyslots":NaN}'), "not valid JSON"),  # strictjson refuses NaN
        ("huge int", _area(b'{"a":' + b"9" * 5000 + b"}"), "not valid JSON"),
        ("bytes after NUL", _area(b"{}\0x"), "after"),
        ("not an object", _area(b"{]"), "not valid JSON"),
        ("invalid UTF-8", _area(b'{"\xff":1}'), "not valid JSON"),
    ],
)
def test_json_area_bombs(image: Path, name: str, area: bytes, match: str) -> None:
    first, second = read_copies(image)
    write_copies(image, rewrite_copy(first, json_area=area), rewrite_copy(second, json_area=area))
    t0 = time.process_time()  # CPU time: wall time failed under load (3.2 s, mutmut at nice 19)
    _refused(image, match)
    assert time.process_time() - t0 < 2


def _many_slots(kdf: dict[str, Any], count: int) -> Edit:
    """``count`` keyslots, each within the per-slot caps, spread over the keyslots area."""

    def edit(meta: dict[str, Any]) -> None:
        template = meta["keyslots"]["0"]
        for i in range(count):
            slot = json.loads(json.dumps(template))
            slot["area"]["offset"] = str(32768 + i * 258048)
            slot["kdf"] = kdf
            meta["keyslots"][str(i)] = slot
        meta["digests"]["0"]["keyslots"] = [str(i) for i in range(count)]

    return edit


_SALT = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    "kdf",
    [
        {"type": "argon2id", "time": 8, "memory": 1048576, "cpus": 4, "salt": _SALT},
        {"type": "pbkdf2", "hash": "sha256", "iterations": 1 << 24, "salt": _SALT},
    ],
    ids=["argon2", "pbkdf2"],
)
def test_kdf_budget_covers_all_keyslots(image: Path, kdf: dict[str, Any]) -> None:
    """A7 spread over slots: 3 slots each at the per-slot cap exceed the total budget."""
    forge(image, _many_slots(kdf, 3))
    _refused(image, "together")


def test_overlapping_keyslot_areas(image: Path) -> None:
    def edit(meta: dict[str, Any]) -> None:
        _many_slots(meta["keyslots"]["0"]["kdf"], 2)(meta)
        meta["keyslots"]["1"]["area"]["offset"] = "36864"  # inside slot 0's area

    forge(image, edit)
    _refused(image, "overlap")


def test_truncated_device(image: Path) -> None:
    """The header is fine but the keyslot material lies past the end of the device."""
    with open(image, "r+b") as f:
        f.truncate(40000)
    _refused(image, "beyond the end")


def test_two_default_cdh_slots_fit_the_budget(image: Path) -> None:
    """Rotation of a cryptsetup-default disk (1 GiB x 4 passes per slot) stays accepted."""
    kdf = {"type": "argon2id", "time": 4, "memory": 1048576, "cpus": 2, "salt": _SALT}
    forge(image, _many_slots(kdf, 2))
    meta = hdr.read_pair(image.read_bytes()[: hdr.BOTH_COPIES]).metadata
    assert len(profile.validate(meta).keyslots) == 2  # validated, not run: 1 GiB is not for CI


# --- the binding: what only the MAC can catch ----------------------------------------------


@pytest.fixture
def ours(pristine: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copy(pristine["ours"], tmp_path / "ours.img"))


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("sector size 4096 -> 512", _set("segments.0.sector_size", 512)),
        ("allow-discards flag", _set("config.flags", ["allow-discards"])),
    ],
)
@pytest.mark.parametrize("require_binding", [True, False])
def test_binding_catches_profile_valid_changes(
    ours: Path, name: str, edit: Edit, require_binding: bool
) -> None:
    """Well-formed, profile-valid edits: the passphrase still unlocks, the MAC refuses
    (a token that is present is always checked, even with require_binding=False)."""
    forge(ours, edit)
    _refused(ours, "binding MAC", bound=require_binding)


def test_binding_covers_the_uuid(ours: Path) -> None:
    first, second = read_copies(ours)
    new_uuid = b"00000000-0000-4000-8000-000000000000"
    copies = []
    for copy in (first, second):
        buf = bytearray(copy)
        buf[0xA8 : 0xA8 + 36] = new_uuid
        copies.append(rewrite_copy(bytes(buf)))
    write_copies(ours, *copies)
    _refused(ours, "binding MAC", bound=True)


def test_binding_token_stripped(ours: Path) -> None:
    forge(ours, _set("tokens", {}))
    _refused(ours, "no coco-csi binding token", bound=True)


def test_other_volume_key_with_copied_token(ours: Path, tmp_path: Path) -> None:
    """A3: a whole header for another VK (the host got the passphrase somehow) plus the
    victim's token: the keyslot opens, the MAC (keyed from the VK) does not verify."""
    victim_token = json.loads(json.dumps(hdr.read_pair(ours.read_bytes()[: hdr.BOTH_COPIES])
                                         .metadata["tokens"]))  # fmt: skip
    with opened_fd(ours) as fd:
        format_volume(fd, PW, kdf_cost=TINY, volume_key=os.urandom(64))
    forge(ours, _set("tokens", victim_token))
    _refused(ours, "binding MAC", bound=True)
    forge(ours, _set("tokens", {}))
    _refused(ours, "no coco-csi binding token", bound=True)


def test_other_volume_key_unknown_passphrase(ours: Path, tmp_path: Path) -> None:
    """A3 without the passphrase: the host's own header does not open with ours."""
    with opened_fd(ours) as fd:
        format_volume(fd, b"the host's passphrase", kdf_cost=TINY)
    before = sha256_file(ours)
    with opened_fd(ours) as fd, pytest.raises(WrongKeyError):
        open_volume(fd, PW)
    assert sha256_file(ours) == before


def test_digest_swapped_for_a_host_key(ours: Path) -> None:
    """The digest names a VK the host chose: the real keyslot no longer matches it."""
    salt = bytes(32)
    host_vk = bytes(range(64))
    forge(ours, _set("digests.0.salt", base64.b64encode(salt).decode()))
    forge(ours, _set("digests.0.digest", base64.b64encode(
        hashlib.pbkdf2_hmac("sha256", host_vk, salt, 1000, 32)).decode()))  # fmt: skip
    before = sha256_file(ours)
    with opened_fd(ours) as fd, pytest.raises(WrongKeyError):
        open_volume(fd, PW)
    assert sha256_file(ours) == before


# --- time of check / time of use -------------------------------------------------------------


def _swap_during_kdf(monkeypatch: pytest.MonkeyPatch, image: Path, edit: Edit) -> None:
    """While the KDF runs (after validation), the host rewrites the on-disk header."""
    real = keyslot.derive_kek
    done = []

    def swapping(passphrase: bytes, kdf: keyslot.Kdf, length: int) -> bytes:
        if not done:
            forge(image, edit)
            done.append(True)
        return real(passphrase, kdf, length)

    monkeypatch.setattr(keyslot, "derive_kek", swapping)


def test_open_uses_the_validated_copy(ours: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with opened_fd(ours) as fd:
        expected = open_volume(fd, PW)
    _swap_during_kdf(monkeypatch, ours, _set("segments.0.encryption", "cipher_null-ecb"))
    with opened_fd(ours) as fd:
        assert open_volume(fd, PW) == expected  # parameters from the copy validated first
    assert b"cipher_null" in ours.read_bytes()[: hdr.BOTH_COPIES]  # the swap did happen


@pytest.mark.parametrize("op", ["add", "remove"])
def test_update_refuses_a_header_swapped_after_validation(
    ours: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    with opened_fd(ours) as fd:
        add_passphrase(fd, PW, b"second", kdf_cost=TINY)
    _swap_during_kdf(monkeypatch, ours, _set("segments.0.encryption", "cipher_null-ecb"))
    swapped: list[str] = []
    real_pread = volume._pread

    def record(fd: int, length: int, offset: int) -> bytes:
        out = real_pread(fd, length, offset)
        if offset == 0 and length == hdr.BOTH_COPIES and b"cipher_null" in out:
            swapped.append(sha256_file(ours))
        return out

    monkeypatch.setattr(volume, "_pread", record)
    with opened_fd(ours) as fd, pytest.raises(HeaderError, match="changed on the device"):
        if op == "add":
            add_passphrase(fd, PW, b"third", kdf_cost=TINY)
        else:
            volume.remove_passphrase(fd, PW)
    assert swapped and sha256_file(ours) == swapped[0]  # nothing written after the swap
