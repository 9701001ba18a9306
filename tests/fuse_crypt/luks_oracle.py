"""cryptsetup 2.6 as an oracle for the LUKS2 tests (no device-mapper needed).

Only the commands that work without device-mapper are used (luks2.md §7): luksFormat,
luksDump (JSON and the volume key), open --test-passphrase and offline reencrypt. Fast KDF
settings keep each call well under a second.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

FAST_KDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
CDH_FORMAT = ["--type", "luks2", "--cipher", "aes-xts-plain64", "--sector-size", "4096"]


def skip_without_cryptsetup() -> None:
    if shutil.which("cryptsetup") is None:
        pytest.skip("cryptsetup missing (Debian package cryptsetup-bin)")


def run(args: list[str], passphrase: bytes = b"pw") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["cryptsetup", "--batch-mode", *args], input=passphrase, capture_output=True, timeout=60
    )


def check(args: list[str], passphrase: bytes = b"pw") -> None:
    res = run(args, passphrase)
    assert res.returncode == 0, res.stderr.decode(errors="replace")


def luks_format(
    device: Path,
    *,
    header: Path | None = None,
    volume_key: bytes | None = None,
    passphrase: bytes = b"pw",
    extra: tuple[str, ...] = (),
) -> None:
    """``luksFormat`` with CDH's options; with ``volume_key`` the VK is ours (--volume-key-file)."""
    args = ["luksFormat", *CDH_FORMAT, *FAST_KDF, *extra]
    if header is not None:
        if not header.exists():
            header.write_bytes(b"")
            with header.open("r+b") as f:
                f.truncate(16 << 20)
        args += ["--header", str(header)]
    if volume_key is not None:
        vkfile = device.with_name(device.name + ".vk")
        vkfile.write_bytes(volume_key)
        args += ["--volume-key-file", str(vkfile), "--key-size", str(len(volume_key) * 8)]
    check([*args, "--key-file", "-", str(device)], passphrase)
    if volume_key is not None:
        vkfile.unlink()


def dump_json(path: Path) -> dict[str, Any]:
    res = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(path)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def dump_volume_key(path: Path, passphrase: bytes = b"pw") -> bytes:
    res = run(["luksDump", "--dump-volume-key", "--key-file", "-", str(path)], passphrase)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    text = res.stdout.decode()
    block = text.split("MK dump:", 1)[1]
    hexdigits = "".join(re.findall(r"\b[0-9a-f]{2}\b", block))
    return bytes.fromhex(hexdigits)


def passphrase_opens(path: Path, passphrase: bytes, header: Path | None = None) -> bool:
    args = ["open", "--test-passphrase", "--key-file", "-"]
    if header is not None:
        args += ["--header", str(header)]
    return run([*args, str(path)], passphrase).returncode == 0
