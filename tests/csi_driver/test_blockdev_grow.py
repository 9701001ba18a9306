"""Offline ext4 growth at stage (blockdev.grow_ext4_unmounted) on image files: the real
e2fsprogs, no loop device needed. The node-level path is in test_block_volumes.py
(test_expand_grows_the_filesystem)."""

from __future__ import annotations

import hashlib
import pathlib
import subprocess

import pytest

from csi_driver.volumes import blockdev

MiB = 1 << 20


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fs_size(path: pathlib.Path) -> int | None:
    out = subprocess.run(["dumpe2fs", "-h", str(path)], capture_output=True, text=True).stdout
    return blockdev.ext4_size(out)


@pytest.fixture
def ext4(tmp_path: pathlib.Path) -> pathlib.Path:
    img = tmp_path / "fs.img"
    with img.open("wb") as f:
        f.truncate(64 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    return img


def _resize(img: pathlib.Path, size: int) -> None:
    with img.open("r+b") as f:
        f.truncate(size)


def test_grows_to_the_device_and_stays_consistent(ext4: pathlib.Path) -> None:
    _resize(ext4, 200 * MiB)
    assert blockdev.grow_ext4_unmounted(str(ext4), 60) == 200 * MiB
    assert _fs_size(ext4) == 200 * MiB
    fsck = subprocess.run(["e2fsck", "-f", "-n", str(ext4)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # Grown: the next stage has nothing to do and does not even check the filesystem
    # (e2fsck -f would rewrite the superblock's last-check time).
    before = _sha(ext4)
    assert blockdev.grow_ext4_unmounted(str(ext4), 60) is None
    assert _sha(ext4) == before


def test_small_gaps_smaller_devices_and_other_contents_are_left_alone(
    ext4: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    _resize(ext4, 64 * MiB + blockdev.GROW_MIN - MiB)
    before = _sha(ext4)
    assert blockdev.grow_ext4_unmounted(str(ext4), 60) is None
    assert _sha(ext4) == before
    assert _fs_size(ext4) == 64 * MiB
    # A device smaller than its filesystem (the host shrank the disk) is never "grown":
    # resize2fs would shrink it.
    _resize(ext4, 48 * MiB)
    before = _sha(ext4)
    assert blockdev.grow_ext4_unmounted(str(ext4), 60) is None
    assert _sha(ext4) == before
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(b"")
    _resize(zeros, 64 * MiB)
    assert blockdev.grow_ext4_unmounted(str(zeros), 60) is None
    assert blockdev.grow_ext4_unmounted(str(tmp_path / "missing"), 60) is None


def test_ext4_size_parses_only_whole_numbers() -> None:
    head = "Block count:              16384\nBlock size:               4096\n"
    assert blockdev.ext4_size(head) == 64 * MiB
    assert blockdev.ext4_size("Block count: 16384\n") is None
    assert blockdev.ext4_size("Block count: 1e9\nBlock size: 4096\n") is None
