"""Shared LUKS2 test helpers: real cryptsetup 2.6 as the oracle, and header forgery.

cryptsetup's luksFormat, luksDump, open --test-passphrase, luksAddKey and luksKillSlot need
no device-mapper, so they run on plain image files here. KDF costs are always tiny.
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

TINY = KdfCost(time=4, memory_kib=32, cpus=1, iterations=1000)
IMAGE_SIZE = 20 * 1024 * 1024
TINY_PBKDF = {
    "argon2id": ["--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory", "32",
                 "--pbkdf-parallel", "1"],
    "pbkdf2": ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"],
}  # fmt: skip


def cryptsetup(
    *args: str, stdin: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    assert CRYPTSETUP is not None
    return subprocess.run(
        [CRYPTSETUP, *args], input=stdin, capture_output=True, timeout=60, check=check
    )


def blank_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def cs_format(path: Path, passphrase: bytes, kdf: str = "argon2id", *extra: str) -> Path:
    """``cryptsetup luksFormat`` with CDH's options (luks2.md §6.1), tiny KDF costs."""
    blank_image(path)
    cryptsetup(
        "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", "aes-xts-plain64",
        "--sector-size", "4096", *TINY_PBKDF[kdf], *extra, str(path), "-", stdin=passphrase,
    )  # fmt: skip
    return path


def cs_volume_key(path: Path, passphrase: bytes) -> bytes:
    out = cryptsetup(
        "luksDump", "--dump-volume-key", "--batch-mode", "-d", "-", str(path), stdin=passphrase
    ).stdout.decode()
    block = out.split("MK dump:", 1)[1]
    return bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", block)))


def cs_test_passphrase(path: Path, passphrase: bytes) -> int:
    return cryptsetup(
        "open", "--test-passphrase", "-d", "-", str(path), stdin=passphrase, check=False
    ).returncode


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
    data = path.read_bytes()[: hdr.BOTH_COPIES]
    return data[: hdr.HDR_SIZE], data[hdr.HDR_SIZE :]


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
    with open(path, "r+b") as f:
        f.write(first + second)
