"""Open, format and re-key LUKS2 volumes through a file descriptor (pread/pwrite only).

Time-of-check/time-of-use: the first 32 KiB (both header copies) are read once, validated
(header.py, profile.py) and everything after works from that in-memory copy; the host device
is only read again for keyslot material, which counts only if it yields a volume key the
bound digest accepts. Before a metadata commit the on-disk header must still equal the copy
we validated, so a concurrent writer (or a swap) is refused instead of overwritten.

Nothing is written while opening: a refused header leaves the device bit-for-bit unchanged.
"""

from __future__ import annotations

import base64
import copy
import os
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadInputError, WrongKeyError
from . import binding, header, keyslot, profile
from .errors import HeaderError, Luks2Error
from .keyslot import Kdf, KdfCost

__all__ = [
    "DataSegment",
    "Opened",
    "add_passphrase",
    "bind_volume",
    "format_volume",
    "inspect_header",
    "is_luks",
    "open_volume",
    "remove_passphrase",
]

MAX_PASSPHRASE = 8 * 1024 * 1024  # cryptsetup's key-file limit
DIGEST_ITERATIONS = 1000  # the VK is 512 random bits: digest iterations add nothing


def _area_size(key_size: int) -> int:
    """cryptsetup's keyslot area for a volume key: 258048 (64 B), 385024 (96 B, integrity)."""
    return -(-keyslot.material_length(key_size) // 4096) * 4096


_SECONDARY_OFFSETS = tuple(0x4000 << i for i in range(9))  # where cryptsetup probes for SKUL


@dataclass(frozen=True)
class DataSegment:
    """Where the ciphertext lies and how it is encrypted (what the sector engine needs)."""

    offset: int  # bytes from the device start
    size: int | None  # bytes; None = dynamic (to the end of the device)
    sector_size: int  # 512..4096
    iv_tweak: int  # in 512-byte units as LUKS2 defines; always 0 here
    cipher: str  # "aes-xts-plain64"
    key_size: int  # bytes (64; 96 with integrity: XTS key then HMAC key)
    # "hmac(sha256)" for CDH's dataIntegrity (dm-integrity, kernel engine only), else None.
    integrity: str | None = None


@dataclass(frozen=True)
class Opened:
    """An unlocked volume. The key is kept out of repr so a log line cannot leak it."""

    volume_key: bytes = field(repr=False)
    segment: DataSegment
    uuid: str
    # Both header copies (first 32 KiB) exactly as validated and unlocked. Zero-padded to
    # 16 MiB it is a detached header cryptsetup opens with --volume-key-file (no keyslot
    # needed; tested), so a kernel engine never lets cryptsetup re-read the host's copy.
    header: bytes = field(default=b"", repr=False, compare=False)


@dataclass(frozen=True)
class _Loaded:
    raw: bytes  # the 32 KiB exactly as validated
    pair: header.HeaderPair
    meta: profile.Metadata


def _pread(fd: int, length: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        try:
            chunk = os.pread(fd, length - len(out), offset + len(out))
        except OSError as exc:
            raise Luks2Error(f"cannot read the device: {exc.strerror}") from None
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        raise Luks2Error(f"cannot write the device: {exc.strerror}") from None


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        raise Luks2Error(f"cannot fsync the device: {exc.strerror}") from None


def _device_size(fd: int) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)  # regular files and block devices alike
    except OSError as exc:
        raise Luks2Error(f"cannot size the device: {exc.strerror}") from None


def _check_passphrase(passphrase: bytes) -> None:
    if not isinstance(passphrase, bytes):
        raise BadInputError("the LUKS2 passphrase must be bytes")
    if not passphrase:
        raise BadInputError("the LUKS2 passphrase is empty")
    if len(passphrase) > MAX_PASSPHRASE:
        raise BadInputError("the LUKS2 passphrase is longer than 8 MiB")


def is_luks(fd: int) -> bool:
    """True if a LUKS magic (v1 or v2) is at the start, or a LUKS2 secondary copy where
    cryptsetup would look for one. Magic only: for "never format over a header" checks."""
    if _pread(fd, 6, 0) == header.MAGIC_PRIMARY:
        return True
    return any(_pread(fd, 6, off) == header.MAGIC_SECONDARY for off in _SECONDARY_OFFSETS)


def inspect_header(raw: bytes, *, allow_integrity: bool = False) -> DataSegment:
    """The data segment of a header copy (both copies, 32 KiB) the guest keeps, validated
    again as on open (no unlock, no key). For the kernel engine, which asks its own
    memory-backed copy, never the host's device, e.g. whether a volume has dataIntegrity.
    Raises HeaderError as open_volume would."""
    pair = header.read_pair(raw[: header.BOTH_COPIES])
    meta = profile.validate(pair.metadata, allow_integrity=allow_integrity)
    return _opened(b"", meta, pair.binary.uuid, b"").segment


def _load(fd: int, allow_integrity: bool = False) -> _Loaded:
    raw = _pread(fd, header.BOTH_COPIES, 0)
    pair = header.read_pair(raw)
    return _Loaded(raw, pair, profile.validate(pair.metadata, allow_integrity=allow_integrity))


def _slot_order(meta: profile.Metadata) -> list[profile.Keyslot]:
    """cryptsetup's order: priority 2 (prefer) first, then normal; 0 (ignore) never."""
    usable = [s for s in meta.keyslots if s.priority > 0]
    return sorted(usable, key=lambda s: (-s.priority, int(s.id)))


def _try_slot(
    fd: int, slot: profile.Keyslot, meta: profile.Metadata, passphrase: bytes
) -> bytes | None:
    key_size = meta.segment.key_size  # 64, or 96 with integrity; the KEK is 64 either way
    length = keyslot.material_length(key_size)
    material = _pread(fd, length, slot.area_offset)
    if len(material) != length:
        raise HeaderError(f"LUKS2 keyslot {slot.id}: area lies beyond the end of the device")
    kek = keyslot.derive_kek(passphrase, slot.kdf, profile.KEY_SIZE)
    try:
        split = keyslot.area_decrypt(kek, material)
    except ValueError:  # a KEK OpenSSL refuses (equal XTS halves): cannot be the right one
        return None
    candidate = keyslot.af_merge(split, key_size)
    digest = meta.digest
    if keyslot.digest_matches(candidate, digest.salt, digest.iterations, digest.value):
        return candidate
    return None


def _unlock(
    fd: int, loaded: _Loaded, passphrase: bytes, require_binding: bool
) -> tuple[bytes, str]:
    """The VK and the id of the slot that opened it, with the binding checked."""
    _check_passphrase(passphrase)
    meta = loaded.meta
    for slot in _slot_order(meta):
        vk = _try_slot(fd, slot, meta, passphrase)
        if vk is not None:
            break
    else:
        raise WrongKeyError("no LUKS2 keyslot opens with this passphrase")
    uuid = loaded.pair.binary.uuid
    if meta.binding_mac is None:
        if require_binding:
            raise HeaderError(
                "LUKS2 header refused: no coco-csi binding token (not made by coco-csi, or "
                "stripped); open with require_binding=False only for trusted CDH-made disks"
            )
    elif not binding.mac_matches(vk, loaded.pair.metadata, uuid, meta.binding_mac):
        raise HeaderError(
            "LUKS2 header refused: the binding MAC does not verify (header parameters were "
            "changed, or the header belongs to another volume key)"
        )
    return vk, slot.id


def _opened(vk: bytes, meta: profile.Metadata, uuid: str, raw: bytes) -> Opened:
    seg = meta.segment
    return Opened(
        volume_key=vk,
        segment=DataSegment(
            offset=seg.offset,
            size=None,
            sector_size=seg.sector_size,
            iv_tweak=seg.iv_tweak,
            cipher=profile.CIPHER,
            key_size=seg.key_size,
            integrity=seg.integrity,
        ),
        uuid=uuid,
        header=raw,
    )


def open_volume(
    fd: int, passphrase: bytes, *, require_binding: bool = True, allow_integrity: bool = False
) -> Opened:
    """Validate the header once, unlock from that copy, verify the binding; writes nothing.

    Raises HeaderError (hostile/unsupported header, missing or bad binding), WrongKeyError
    (no keyslot opens), BadInputError (empty passphrase), Luks2Error (I/O).
    ``require_binding=False`` accepts a header without our token (CDH/cryptsetup-made): the
    profile still holds, but nothing proves the header is the one the key's owner wrote.
    ``allow_integrity=True`` (the kernel engine only) also accepts CDH's dataIntegrity
    profile; ``Opened.segment.integrity`` then says whether the volume has it. Without it an
    integrity header is a HeaderError: its sectors are not plain XTS sectors.
    """
    loaded = _load(fd, allow_integrity)
    vk, _ = _unlock(fd, loaded, passphrase, require_binding)
    return _opened(vk, loaded.meta, loaded.pair.binary.uuid, loaded.raw)


def _kdf_json(kind: str, cost: KdfCost) -> tuple[dict[str, Any], Kdf]:
    salt = os.urandom(keyslot.SALT_LEN)
    b64 = base64.b64encode(salt).decode()
    if kind == "argon2id":
        obj: dict[str, Any] = {
            "type": "argon2id",
            "time": cost.time,
            "memory": cost.memory_kib,
            "cpus": cost.cpus,
            "salt": b64,
        }
        kdf = Kdf("argon2id", salt, cost.time, cost.memory_kib, cost.cpus)
    elif kind == "pbkdf2":
        obj = {"type": "pbkdf2", "hash": "sha256", "iterations": cost.iterations, "salt": b64}
        kdf = Kdf("pbkdf2", salt, iterations=cost.iterations)
    else:
        raise Luks2Error("kdf must be 'argon2id' or 'pbkdf2'")
    try:
        profile.validate_kdf(obj)  # our own costs obey the caps we impose on others
    except HeaderError as exc:
        raise Luks2Error(f"kdf_cost refused: {exc}") from None
    return obj, kdf


def _new_keyslot(
    vk: bytes, passphrase: bytes, offset: int, kind: str, cost: KdfCost
) -> tuple[dict[str, Any], bytes]:
    """A keyslot object and its encrypted area bytes (AF material, zero-padded to the area).
    The area is sized for ``vk`` as cryptsetup sizes it (64 or 96 bytes); the KEK is 64."""
    kdf_obj, kdf = _kdf_json(kind, cost)
    kek = keyslot.derive_kek(passphrase, kdf, profile.KEY_SIZE)
    material = keyslot.af_split(vk)
    material += bytes(keyslot.material_length(len(vk)) - len(material))
    try:
        area = keyslot.area_encrypt(kek, material)
    except ValueError:
        raise Luks2Error("derived keyslot key is unusable; retry") from None
    obj = {
        "type": "luks2",
        "key_size": len(vk),
        "af": {"type": "luks1", "stripes": keyslot.AF_STRIPES, "hash": keyslot.AF_HASH},
        "area": {
            "type": "raw",
            "offset": str(offset),
            "size": str(_area_size(len(vk))),
            "encryption": profile.CIPHER,
            "key_size": profile.KEY_SIZE,
        },
        "kdf": kdf_obj,
    }
    return obj, area


def _write_headers(fd: int, binary: header.BinaryHeader, metadata: dict[str, Any]) -> bytes:
    """Primary then secondary, each JSON area before its binary header, fsync after each.
    Returns both copies as written: the caller's header copy never comes from re-reading
    the device (the host could swap it in between)."""
    area = header.encode_json(metadata)
    written = []
    for secondary in (False, True):
        copy_bytes = header.build_copy(binary, area, secondary=secondary)
        base = header.HDR_SIZE if secondary else 0
        _pwrite(fd, copy_bytes[header.BIN_SIZE :], base + header.BIN_SIZE)
        _pwrite(fd, copy_bytes[: header.BIN_SIZE], base)
        _fsync(fd)
        written.append(copy_bytes)
    return b"".join(written)


def _rebind(vk: bytes, metadata: dict[str, Any], uuid: str) -> None:
    """Set (or refresh) the binding token's MAC in ``metadata``."""
    tokens = metadata["tokens"]
    token_id = next(iter(tokens), "0")
    tokens[token_id] = binding.token(binding.compute_mac(vk, metadata, uuid))


def format_volume(
    fd: int,
    passphrase: bytes,
    *,
    sector_size: int = 4096,
    kdf: str = "argon2id",
    integrity: None = None,
    label: str = "",
    volume_key: bytes | None = None,
    kdf_cost: KdfCost | None = None,
) -> Opened:
    """Write a new LUKS2 container (attached header, data at 16 MiB) with one keyslot.

    Overwrites the first 16 MiB unconditionally: checking that the device holds nothing
    worth keeping is the caller's job (see is_luks). The result opens with cryptsetup 2.6
    and with open_volume (it carries the binding token).
    """
    _check_passphrase(passphrase)
    if integrity is not None:
        raise Luks2Error("integrity is not supported by the userspace LUKS2 engine")
    if sector_size not in profile.SECTOR_SIZES:
        raise Luks2Error("sector_size must be 512, 1024, 2048 or 4096")
    if volume_key is None:
        volume_key = os.urandom(profile.KEY_SIZE)
    if len(volume_key) != profile.KEY_SIZE or volume_key[:32] == volume_key[32:]:
        raise Luks2Error("volume_key must be 64 bytes with distinct XTS halves")
    size = _device_size(fd)
    if size < profile.DATA_OFFSET + sector_size or (size - profile.DATA_OFFSET) % sector_size:
        raise Luks2Error(
            "device too small for LUKS2, or its data area is not a multiple of the sector size"
        )
    cost = kdf_cost or KdfCost()
    if not label.isprintable() or len(label.encode()) > 47:
        raise Luks2Error("label must be printable text of at most 47 bytes")
    binary = header.BinaryHeader(seqid=1, label=label, subsystem="", uuid=str(uuidlib.uuid4()))
    slot_obj, slot_area = _new_keyslot(volume_key, passphrase, profile.KEYSLOTS_OFFSET, kdf, cost)
    digest_salt = os.urandom(32)
    b64 = base64.b64encode
    metadata: dict[str, Any] = {
        "keyslots": {"0": slot_obj},
        "tokens": {},
        "segments": {
            "0": {
                "type": "crypt",
                "offset": str(profile.DATA_OFFSET),
                "size": "dynamic",
                "iv_tweak": "0",
                "encryption": profile.CIPHER,
                "sector_size": sector_size,
            }
        },
        "digests": {
            "0": {
                "type": "pbkdf2",
                "keyslots": ["0"],
                "segments": ["0"],
                "hash": "sha256",
                "iterations": DIGEST_ITERATIONS,
                "salt": b64(digest_salt).decode(),
                "digest": b64(
                    keyslot.compute_digest(volume_key, digest_salt, DIGEST_ITERATIONS)
                ).decode(),
            }
        },
        "config": {
            "json_size": profile.JSON_SIZE_TEXT,
            "keyslots_size": str(profile.KEYSLOTS_SIZE),
        },
    }
    _rebind(volume_key, metadata, binary.uuid)
    meta = profile.validate(metadata)  # what we write passes our own profile
    # Keyslots area first (random fill like cryptsetup, then slot 0), headers last, so a
    # crash never leaves a header that points at garbage.
    _pwrite(fd, bytes(header.BOTH_COPIES), 0)
    chunk = 1 << 20
    for offset in range(profile.KEYSLOTS_OFFSET, profile.DATA_OFFSET, chunk):
        _pwrite(fd, os.urandom(min(chunk, profile.DATA_OFFSET - offset)), offset)
    _pwrite(fd, slot_area, profile.KEYSLOTS_OFFSET)
    _fsync(fd)
    raw = _write_headers(fd, binary, metadata)
    return _opened(volume_key, meta, binary.uuid, raw)


def _still_validated(fd: int, loaded: _Loaded) -> None:
    """Refuse to write if the on-disk header is no longer the copy we validated."""
    if _pread(fd, header.BOTH_COPIES, 0) != loaded.raw:
        raise HeaderError("LUKS2 header changed on the device during the update; not committed")


def _commit(
    fd: int, loaded: _Loaded, metadata: dict[str, Any], allow_integrity: bool = False
) -> bytes:
    """Write ``metadata`` with seqid+1, only if the disk still holds the header we validated;
    return both copies as written."""
    profile.validate(metadata, allow_integrity=allow_integrity)
    _still_validated(fd, loaded)
    old = loaded.pair.binary
    binary = header.BinaryHeader(old.seqid + 1, old.label, old.subsystem, old.uuid)
    return _write_headers(fd, binary, metadata)


def _free_area(meta: profile.Metadata) -> int:
    """First 4 KiB-aligned gap of one area size in the keyslots area (cryptsetup's first fit)."""
    spans = sorted((s.area_offset, s.area_offset + s.area_size) for s in meta.keyslots)
    size = _area_size(meta.segment.key_size)
    candidate = profile.KEYSLOTS_OFFSET
    for start, end in spans:
        if candidate + size <= start:
            break
        candidate = max(candidate, end)
    if candidate + size > profile.KEYSLOTS_OFFSET + profile.KEYSLOTS_SIZE:
        raise Luks2Error("no room left in the keyslots area")
    return candidate


def add_passphrase(
    fd: int,
    passphrase: bytes,
    new_passphrase: bytes,
    *,
    require_binding: bool = True,
    allow_integrity: bool = False,
    kdf: str = "argon2id",
    kdf_cost: KdfCost | None = None,
) -> None:
    """Add a keyslot for ``new_passphrase`` (rotation step 1); ``passphrase`` must open one.

    The new area is written and fsynced before the metadata commit, so a crash leaves at
    worst unreferenced bytes in the keyslots area. ``allow_integrity``: as for open_volume
    (the new keyslot then holds the 96-byte key).
    """
    _check_passphrase(new_passphrase)
    loaded = _load(fd, allow_integrity)
    vk, _ = _unlock(fd, loaded, passphrase, require_binding)
    meta = loaded.meta
    used = {s.id for s in meta.keyslots}
    if len(used) >= profile.MAX_KEYSLOTS:
        raise Luks2Error(f"the volume already has {profile.MAX_KEYSLOTS} keyslots")
    new_id = next(str(i) for i in range(32) if str(i) not in used)
    offset = _free_area(meta)
    slot_obj, slot_area = _new_keyslot(vk, new_passphrase, offset, kdf, kdf_cost or KdfCost())
    metadata = copy.deepcopy(loaded.pair.metadata)
    metadata["keyslots"][new_id] = slot_obj
    metadata["digests"]["0"]["keyslots"].append(new_id)
    if meta.binding_mac is not None:
        _rebind(vk, metadata, loaded.pair.binary.uuid)
    profile.validate(metadata, allow_integrity=allow_integrity)
    _still_validated(fd, loaded)
    _pwrite(fd, slot_area, offset)
    _fsync(fd)
    _commit(fd, loaded, metadata, allow_integrity)


def remove_passphrase(
    fd: int, passphrase: bytes, *, require_binding: bool = True, allow_integrity: bool = False
) -> None:
    """Remove the keyslot ``passphrase`` opens (rotation step 2); never the last one.

    The area is overwritten with random bytes and fsynced before the metadata commit
    (cryptsetup's order): after a crash the slot is dead either way.
    """
    loaded = _load(fd, allow_integrity)
    vk, slot_id = _unlock(fd, loaded, passphrase, require_binding)
    meta = loaded.meta
    if len(meta.keyslots) <= 1:
        raise Luks2Error("refusing to remove the last keyslot: the volume would be lost")
    slot = next(s for s in meta.keyslots if s.id == slot_id)
    metadata = copy.deepcopy(loaded.pair.metadata)
    del metadata["keyslots"][slot_id]
    metadata["digests"]["0"]["keyslots"].remove(slot_id)
    if meta.binding_mac is not None:
        _rebind(vk, metadata, loaded.pair.binary.uuid)
    profile.validate(metadata, allow_integrity=allow_integrity)
    _still_validated(fd, loaded)
    _pwrite(fd, os.urandom(slot.area_size), slot.area_offset)
    _fsync(fd)
    _commit(fd, loaded, metadata, allow_integrity)


def bind_volume(fd: int, passphrase: bytes, *, allow_integrity: bool = False) -> Opened:
    """Add our binding token to a container **this guest has just formatted** with
    cryptsetup (the kernel engine's dataIntegrity format: only cryptsetup can write the
    dm-integrity superblock, and it writes no token); return it opened, as open_volume would.

    The header is validated and unlocked like any other first (a wrong key or a hostile
    header changes nothing); a header that already carries a token must verify and is left
    as it is. Never use it to adopt a disk of unknown origin: binding is what later proves
    the header is the one the key's owner wrote.
    """
    loaded = _load(fd, allow_integrity)
    vk, _ = _unlock(fd, loaded, passphrase, require_binding=False)
    if loaded.meta.binding_mac is not None:  # _unlock verified it
        return _opened(vk, loaded.meta, loaded.pair.binary.uuid, loaded.raw)
    metadata = copy.deepcopy(loaded.pair.metadata)
    _rebind(vk, metadata, loaded.pair.binary.uuid)
    meta = profile.validate(metadata, allow_integrity=allow_integrity)
    raw = _commit(fd, loaded, metadata, allow_integrity)
    return _opened(vk, meta, loaded.pair.binary.uuid, raw)
