"""The bucket layout is the real thing: Debian's s3fs (1.90) + gocryptfs (CDH's two-hop
stack) and our one-hop mount read each other's trees over the same moto server, and a
tree we wrote passes ``gocryptfs -fsck`` through s3fs."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse_crypt.cli_helpers import gocryptfs_init
from tests.fuse_crypt.conftest import fuse_available
from tests.fuse_crypt.objectstore_helpers import (
    have_s3fs_gocryptfs,
    mount_ours,
    mount_s3fs,
    mount_theirs,
    new_s3vol,
    snapshot,
    write_tree,
)
from tests.peers.moto_s3 import MotoS3, moto_s3

_why = fuse_available() or have_s3fs_gocryptfs()
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


def test_ours_to_s3fs_gocryptfs(moto: MotoS3, tmp_path: Path) -> None:
    vol = new_s3vol(moto, tmp_path)
    with mount_ours(vol, tmp_path / "ours") as m:
        write_tree(m)
        want = snapshot(m)
    with mount_theirs(vol, tmp_path) as plain:
        assert snapshot(plain) == want
    with mount_s3fs(vol, tmp_path / "s3fs-fsck") as cipher:
        fsck = subprocess.run(
            ["gocryptfs", "-fsck", "-passfile", str(vol.passfile), str(cipher)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert "no problems found" in fsck.stdout


def test_s3fs_gocryptfs_to_ours(moto: MotoS3, tmp_path: Path) -> None:
    vol = new_s3vol(moto, tmp_path, init=False)
    with mount_s3fs(vol, tmp_path / "s3fs-init") as cipher:
        gocryptfs_init(cipher, vol.passfile)
    with mount_theirs(vol, tmp_path) as plain:
        write_tree(plain)
        want = snapshot(plain)
    with mount_ours(vol, tmp_path / "ours") as m:
        assert snapshot(m) == want
        # and we can keep working in their tree
        (m / "top" / "mid" / "ours.txt").write_bytes(b"from coco-csi")
        (m / "top" / "moveddir").rename(m / "top" / "moveddir2")
    with mount_theirs(vol, tmp_path / "again") as plain:
        assert (plain / "top" / "mid" / "ours.txt").read_bytes() == b"from coco-csi"
        assert (plain / "top" / "moveddir2" / "inner").read_bytes() == b"inner"
