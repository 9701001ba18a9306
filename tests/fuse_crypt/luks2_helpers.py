"""The one home of the LUKS2 test helpers: real cryptsetup 2.6 as the oracle, and header
forgery (the host's tools).

cryptsetup's luksFormat, luksDump (JSON and the volume key), open --test-passphrase,
luksAddKey, luksKillSlot and offline reencrypt need no device-mapper (luks2.md §7), so they
run on plain image files here. KDF costs are always tiny.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.luks2 import KdfCost
from fuse_crypt.luks2 import header as hdr

CRYPTSETUP = shutil.which("cryptsetup")
needs_cryptsetup = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup not installed")
#: CDH's luksFormat options (luks2.md §6.1)
CDH_FORMAT = ["--type", "luks2", "--cipher", "aes-xts-plain64", "--sector-size", "4096"]

TINY = KdfCost(time=4, memory_kib=32, cpus=1, iterations=1000)
IMAGE_SIZE = 17 * 1024 * 1024  # header + keyslots area + 1 MiB of data
TINY_PBKDF = {
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32",
                 "--pbkdf-parallel", "1"],
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
}  # fmt: skip
FAST_KDF = TINY_PBKDF["pbkdf2"]


def skip_without_cryptsetup() -> None:
    """For tests that decide at run time (the mark ``needs_cryptsetup`` otherwise)."""
    if CRYPTSETUP is None:
        pytest.skip("cryptsetup missing (Debian package cryptsetup-bin)")


def cryptsetup(
    *args: str, stdin: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run cryptsetup; with ``check`` a failure asserts with cryptsetup's own message."""
    assert CRYPTSETUP is not None
    res = subprocess.run([CRYPTSETUP, *args], input=stdin, capture_output=True, timeout=60)
    if check:
        assert res.returncode == 0, res.stderr.decode(errors="replace")
    return res


def blank_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def cs_luks_format(
    device: Path,
    passphrase: bytes = b"pw",
    *,
    kdf: str = "pbkdf2",
    header: Path | None = None,
    volume_key: bytes | None = None,
    extra: tuple[str, ...] = (),
) -> None:
    """``luksFormat`` with CDH's options on an existing ``device``; ``header``: detached
    (created at 16 MiB if missing); ``volume_key``: ours instead of a random one."""
    args = ["luksFormat", "--batch-mode", *CDH_FORMAT, *TINY_PBKDF[kdf], *extra]
    if header is not None:
        if not header.exists():
            blank_image(header, 16 << 20)
        args += ["--header", str(header)]
    vkfile = device.with_name(device.name + ".vk")
    if volume_key is not None:
        vkfile.write_bytes(volume_key)
        args += ["--volume-key-file", str(vkfile), "--key-size", str(len(volume_key) * 8)]
    try:
        cryptsetup(*args, "--key-file", "-", str(device), stdin=passphrase)
    finally:
        if volume_key is not None:
            vkfile.unlink()


def cs_format(path: Path, passphrase: bytes, kdf: str = "argon2id", *extra: str) -> Path:
    """A new image of IMAGE_SIZE, ``cryptsetup luksFormat``ed with CDH's options."""
    blank_image(path)
    cs_luks_format(path, passphrase, kdf=kdf, extra=extra)
    return path


def cs_volume_key(path: Path, passphrase: bytes = b"pw") -> bytes:
    """The volume key ``luksDump --dump-volume-key`` prints."""
    out = cryptsetup(
        "luksDump", "--dump-volume-key", "--batch-mode", "-d", "-", str(path), stdin=passphrase
    ).stdout.decode()
    block = out.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", block)))


def cs_test_passphrase(path: Path, passphrase: bytes, header: Path | None = None) -> int:
    """cryptsetup's exit code for ``open --test-passphrase`` (0 opens, 2 wrong key)."""
    hdr_args = ["--header", str(header)] if header is not None else []
    return cryptsetup(
        "open", "--test-passphrase", *hdr_args, "-d", "-", str(path), stdin=passphrase,
        check=False,
    ).returncode  # fmt: skip


def cs_opens(path: Path, passphrase: bytes, header: Path | None = None) -> bool:
    return cs_test_passphrase(path, passphrase, header) == 0


def cs_json(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        cryptsetup("luksDump", "--dump-json-metadata", str(path)).stdout
    )
    return result


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def opened_fd(path: Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def read_copies(path: Path) -> tuple[bytes, bytes]:
    with open(path, "rb") as f:
        data = f.read(hdr.BOTH_COPIES)
    return data[: hdr.HDR_SIZE], data[hdr.HDR_SIZE :]


def write_copies(path: Path, first: bytes, second: bytes) -> None:
    """Overwrite the two header copies in place (the rest of the image stays)."""
    with open(path, "r+b") as f:
        f.write(first + second)


def rewrite_copy(
    copy: bytes,
    *,
    metadata: dict[str, Any] | None = None,
    json_area: bytes | None = None,
    seqid_delta: int = 0,
) -> bytes:
    """Re-encode one copy with edited JSON and/or seqid and a correct checksum (attacker's tool)."""
    buf = bytearray(copy)
    if metadata is not None:
        json_area = json.dumps(metadata, separators=(",", ":")).encode()
        json_area += bytes(hdr.JSON_SIZE - len(json_area))
    if json_area is not None:
        buf[hdr.BIN_SIZE :] = json_area
    seqid = int.from_bytes(buf[0x10:0x18], "big") + seqid_delta
    buf[0x10:0x18] = seqid.to_bytes(8, "big")
    buf[0x1C0:0x200] = bytes(64)
    buf[0x1C0:0x1E0] = hdr.checksum(bytes(buf))
    return bytes(buf)


def forge(path: Path, edit: Callable[[dict[str, Any]], None], *, primary: bool = True,
          secondary: bool = True, seqid_delta: int = 1) -> None:  # fmt: skip
    """Edit the JSON of the chosen copies, bump seqid, recompute checksums: what the host can do."""
    first, second = read_copies(path)
    metadata = hdr.decode_json(first[hdr.BIN_SIZE :])
    edit(metadata)
    if primary:
        first = rewrite_copy(first, metadata=metadata, seqid_delta=seqid_delta)
    if secondary:
        second = rewrite_copy(second, metadata=metadata, seqid_delta=seqid_delta)
    write_copies(path, first, second)


def integrity_image(
    path: Path,
    passphrase: bytes = b"pw",
    *,
    bound: bool = False,
    volume_key: bytes | None = None,
    size: int = IMAGE_SIZE,
) -> bytes:
    """A container in CDH's dataIntegrity profile, header as cryptsetup 2.6 writes it for
    ``luksFormat --integrity hmac-sha256`` (luks2.md §4.2; the segment's ``integrity``
    object seen with ``--debug-json``, the keyslot shape checked against the one
    ``luksAddKey`` writes in test_luks2_integrity.py): 96-byte volume key, keyslot area
    385024 bytes under a 64-byte aes-xts-plain64 KEK. Made in Python because cryptsetup
    cannot format integrity without device-mapper; so the data area has no dm-integrity
    superblock (only the kernel could use it anyway). ``bound``: with our binding token, as
    the kernel engine leaves it after ``bind_volume``. Returns the volume key."""
    import base64

    from fuse_crypt.luks2 import binding, format_volume, keyslot, profile, volume

    vk = volume_key or os.urandom(profile.INTEGRITY_KEY_SIZE)
    blank_image(path, size)
    with opened_fd(path) as fd:
        format_volume(fd, passphrase, kdf="pbkdf2", kdf_cost=TINY)
    slot, area = volume._new_keyslot(vk, passphrase, profile.KEYSLOTS_OFFSET, "pbkdf2", TINY)
    with open(path, "r+b") as f:
        f.seek(profile.KEYSLOTS_OFFSET)
        f.write(area)
    uuid = hdr.parse_copy(read_copies(path)[0], secondary=False).uuid
    salt = os.urandom(32)

    def edit(md: dict[str, Any]) -> None:
        md["keyslots"] = {"0": slot}
        md["segments"]["0"]["integrity"] = dict(profile.INTEGRITY_OBJECT)
        md["digests"]["0"]["salt"] = base64.b64encode(salt).decode()
        md["digests"]["0"]["digest"] = base64.b64encode(
            keyslot.compute_digest(vk, salt, 1000)
        ).decode()
        md["tokens"] = {}
        if bound:
            md["tokens"]["0"] = binding.token(binding.compute_mac(vk, md, uuid))

    forge(path, edit)
    return vk
