"""Shared pieces of the real-mount object-store tests: volumes in a moto bucket, our
mount over them, the CDH-style s3fs + gocryptfs stack over the same bucket, and tree
snapshots to compare what each side sees."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fuse_crypt.cli_helpers import fc, force_unmount, gocryptfs_mount, is_mounted
from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY, MotoS3

PASSWORD = "object store test password"


@dataclasses.dataclass
class S3Vol:
    moto: MotoS3
    bucket: str
    prefix: str
    creds: Path
    passfile: Path

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def store_args(self) -> list[str]:
        return [
            "--endpoint",
            self.moto.url,
            "--insecure-http",
            "--credentials-file",
            str(self.creds),
        ]

    def init(self) -> None:
        proc = fc(
            "init", "--scryptn", "10", "--passfile", self.passfile, *self.store_args(), self.url
        )
        assert proc.returncode == 0, proc.stderr


def new_s3vol(moto: MotoS3, tmp: Path, prefix: str = "vol1", init: bool = True) -> S3Vol:
    creds = tmp / "s3-creds"
    creds.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    creds.chmod(0o600)
    passfile = tmp / "s3-pass"
    passfile.write_text(PASSWORD + "\n")
    vol = S3Vol(moto, moto.new_bucket(), prefix, creds, passfile)
    if init:
        vol.init()
    return vol


@contextlib.contextmanager
def mount_ours(vol: S3Vol, mnt: Path, *extra: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    proc = fc("mount", "--passfile", vol.passfile, *vol.store_args(), *extra, vol.url, mnt)
    assert proc.returncode == 0, proc.stderr
    try:
        yield mnt
    finally:
        fc("unmount", mnt)
        force_unmount(mnt)


def have_s3fs_gocryptfs() -> str | None:
    for tool in ("s3fs", "gocryptfs", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} missing (apt)"
    return None


def _wait_mounted(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not is_mounted(path):
        assert time.monotonic() < deadline, f"{path} did not mount"
        time.sleep(0.05)


@contextlib.contextmanager
def mount_s3fs(vol: S3Vol, mnt: Path) -> Iterator[Path]:
    """s3fs 1.90 as CDH runs ossfs: bucket:/prefix, no stat cache; ``use_xattr`` so
    ``gocryptfs -fsck`` can list xattrs (without it fsck counts ENOTSUP as corruption)."""
    mnt.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "s3fs",
            f"{vol.bucket}:/{vol.prefix}",
            str(mnt),
            "-o",
            f"url={vol.moto.url}",
            "-o",
            "use_path_request_style",
            "-o",
            f"passwd_file={vol.creds}",
            "-o",
            "max_stat_cache_size=0",
            "-o",
            "use_xattr",
        ],
        check=True,
        capture_output=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
    )
    _wait_mounted(mnt)
    try:
        yield mnt
    finally:
        force_unmount(mnt)


@contextlib.contextmanager
def mount_theirs(vol: S3Vol, tmp: Path) -> Iterator[Path]:
    """CDH's two-hop stack: s3fs, then gocryptfs on top."""
    with (
        mount_s3fs(vol, tmp / "s3fs") as cipher,
        gocryptfs_mount(cipher, tmp / "gocryptfs", vol.passfile) as plain,
    ):
        yield plain


def write_tree(root: Path) -> None:
    """Nested dirs, a long name, symlinks, empty and multi-block files, renames."""
    (root / "top" / "mid" / "deep").mkdir(parents=True)
    (root / "top" / "mid" / "deep" / "leaf.txt").write_bytes(b"leaf\n")
    (root / "top" / ("L" * 180)).write_bytes(b"long name content")
    (root / "top" / "empty").write_bytes(b"")
    (root / "top" / "multi.bin").write_bytes(bytes(range(256)) * 70)  # 17,920 B: 5 blocks
    (root / "top" / "mid" / "link").symlink_to("deep/leaf.txt")
    (root / "top" / "dangling").symlink_to("/nowhere/" + "x" * 50)
    (root / "top" / "old-name").write_bytes(b"renamed file")
    (root / "top" / "old-name").rename(root / "top" / "new-name")
    (root / "movedir").mkdir()
    (root / "movedir" / "inner").write_bytes(b"inner")
    (root / "movedir").rename(root / "top" / "moveddir")


def snapshot(root: Path) -> dict[str, tuple[str, bytes]]:
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p).encode())
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out
