"""``fuse-crypt init/mount oss://BUCKET/PREFIX`` on real FUSE mounts over the OSS peer
(oss2 V4 signatures verified), credentials on stdin before the password: the path the
CSI node plugin takes."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuse_crypt.cli_helpers import FC, assert_one_line_error, fc, force_unmount
from tests.peers.oss_server import OssServer

AK, SK = "LTAI-cli-ak-0001", "cli-secret-Zq8w7e6r5t4y"
BUCKET = "coco-cli"
PASSWORD = "oss cli test password"
CREDS = f"OSS_ACCESS_KEY_ID={AK}\nOSS_ACCESS_KEY_SECRET={SK}\n\n"


@pytest.fixture(scope="module")
def oss() -> Iterator[OssServer]:
    with tempfile.TemporaryDirectory(prefix="oss") as d, OssServer(tls_dir=d) as server:
        server.add_credentials(AK, SK)
        server.create_bucket(BUCKET)
        yield server


def store_args(oss: OssServer) -> list[str]:
    assert oss.ca_path is not None
    return [
        "--endpoint",
        oss.endpoint,
        "--region",
        "cn-hangzhou",
        "--ca-bundle",
        oss.ca_path,
        "--credentials-stdin",
    ]


def test_init_mount_write_read_remount(oss: OssServer, tmp_path: Path) -> None:
    url = f"oss://{BUCKET}/cli/vol1"
    proc = fc("init", "--scryptn", "10", *store_args(oss), url, stdin=CREDS + PASSWORD + "\n")
    assert proc.returncode == 0, proc.stderr
    keys = set(oss.objects(BUCKET))
    assert {"cli/vol1/gocryptfs.conf", "cli/vol1/gocryptfs.diriv"} <= keys
    # init refuses a prefix that holds a volume
    again = fc("init", "--scryptn", "10", *store_args(oss), url, stdin=CREDS + PASSWORD + "\n")
    assert_one_line_error(again, 40)

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for round_ in range(2):
        daemon = subprocess.Popen(
            [*FC, "mount", "-f", *store_args(oss), url, str(mnt)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert daemon.stdin is not None
        daemon.stdin.write((CREDS + PASSWORD + "\n").encode())
        daemon.stdin.close()
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(mnt):
                assert daemon.poll() is None, daemon.stdout.read() if daemon.stdout else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
            if round_ == 0:
                (mnt / "d").mkdir()
                (mnt / "d" / "hello.txt").write_bytes(b"hello oss\n" * 1000)
            else:
                assert (mnt / "d" / "hello.txt").read_bytes() == b"hello oss\n" * 1000
        finally:
            fc("unmount", mnt)
            daemon.wait(timeout=30)
            force_unmount(mnt)
    assert not any("hello" in k for k in oss.objects(BUCKET))


def test_wrong_credentials_and_missing_endpoint(oss: OssServer) -> None:
    url = f"oss://{BUCKET}/cli/vol2"
    bad = f"OSS_ACCESS_KEY_ID={AK}\nOSS_ACCESS_KEY_SECRET=wrong-secret-value\n\n"
    proc = fc("init", "--scryptn", "10", *store_args(oss), url, stdin=bad + PASSWORD + "\n")
    line = assert_one_line_error(proc, 6)
    assert "wrong-secret-value" not in proc.stderr and SK not in line
    no_ep = fc("init", "--credentials-stdin", url, stdin=CREDS + PASSWORD + "\n")
    assert_one_line_error(no_ep, 1)
    no_creds = fc("init", *store_args(oss), url, stdin="\n" + PASSWORD + "\n")
    assert_one_line_error(no_creds, 1)
