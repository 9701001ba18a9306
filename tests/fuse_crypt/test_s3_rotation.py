"""Rotated S3 keys handed to a mounted ``fuse-crypt mount s3://`` daemon over its control
socket (fuse_crypt/cli/credsocket.py, what the CSI node plugin's ``push_credentials`` does
on kubelet's republish), on a real FUSE mount over moto with IAM authentication on
(``moto_s3(auth=True)``): the old access key is deleted in IAM, so moto really refuses
it (``InvalidAccessKeyId``, and a bare 403 to HEAD).  No remount, nothing lost.

moto does not expire STS sessions, so expiry itself is exercised against the OSS peer
(tests/fuse_crypt/test_oss_rotation.py); here the refusal is a revoked key, which takes the
same path in the daemon (CredentialsRejected -> bounded wait -> re-send)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fuse_crypt.cli.credsocket import send_credentials
from tests.fuse_crypt.cli_helpers import FC, fc, force_unmount
from tests.fuse_crypt.conftest import fuse_available
from tests.peers.moto_s3 import MotoS3, moto_s3

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))

PASSWORD = "s3 rotation test password"
REGION = "us-east-1"
WAIT = 3  # --credentials-wait


def creds(key: tuple[str, str]) -> str:
    return f"AWS_ACCESS_KEY_ID={key[0]}\nAWS_SECRET_ACCESS_KEY={key[1]}\n\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3(auth=True) as m:
        yield m


@dataclass
class Mounted:
    moto: MotoS3
    bucket: str
    prefix: str
    user: str
    first: tuple[str, str]
    mnt: Path
    sock: str
    log: Path
    proc: subprocess.Popen[bytes]
    #: A file put into the volume by another writer (in-process, with the admin key)
    #: before the mount: the daemon has never seen it, so reading it goes to the store
    #: (HEAD for the lookup, then GET).
    outside: bytes

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def send(self, key: tuple[str, str]) -> str:
        return send_credentials(self.sock, (self.url, self.moto.url, REGION), creds(key).encode())

    def etags(self) -> dict[str, str]:
        page = self.moto.client().list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/")
        return {o["Key"]: o["ETag"] for o in page.get("Contents", [])}

    def assert_alive_and_clean(self, pid: int, *keys: tuple[str, str]) -> None:
        """Same daemon, still mounted (no remount), no credential in its log."""
        assert self.proc.poll() is None and self.proc.pid == pid
        assert os.path.ismount(self.mnt)
        log = self.log.read_text()
        for key in keys:
            assert key[0] not in log and key[1] not in log


def _write_outside(moto: MotoS3, bucket: str, prefix: str, data: bytes) -> None:
    from fuse_crypt.backend import ObjectStoreBackend
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.fusefrontend.mount import build_operations

    t = moto.transport(bucket)
    conf = ConfFile.loads(t.get(f"{prefix}/gocryptfs.conf"))
    backend = ObjectStoreBackend(t, prefix)
    ops, _ = build_operations(backend, conf.unlock(PASSWORD.encode()), conf)
    fh = ops.create("/outside.bin", 0o644)
    ops.write("/outside.bin", data, 0, fh)
    ops.release("/outside.bin", fh)
    backend.destroy()


@pytest.fixture
def mounted(moto: MotoS3, tmp_path: Path) -> Iterator[Mounted]:
    bucket = moto.new_bucket("rot")
    prefix = "vol"
    user = moto.new_user()
    first = moto.create_key(user)
    store = ["--endpoint", moto.url, "--insecure-http"]
    url = f"s3://{bucket}/{prefix}"
    init = fc("init", "--scryptn", "10", *store, "--credentials-stdin", url,
              stdin=creds(first) + PASSWORD + "\n")  # fmt: skip
    assert init.returncode == 0, init.stderr
    outside = os.urandom(700_000)
    _write_outside(moto, bucket, prefix, outside)
    ctl = tmp_path / "ctl"
    ctl.mkdir(mode=0o700)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = str(ctl / "c.sock")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*FC, "mount", "-f", *store, "--credentials-stdin", "--control-socket", sock,
             "--credentials-wait", str(WAIT), url, str(mnt)],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "FUSE_CRYPT_LOG_LEVEL": "INFO"},
        )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write((creds(first) + PASSWORD + "\n").encode())
    proc.stdin.close()
    m = Mounted(moto, bucket, prefix, user, first, mnt, sock, log, proc, outside)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the daemon did not mount"
            time.sleep(0.05)
        yield m
    finally:
        fc("unmount", mnt)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        force_unmount(mnt)


def test_key_rotation_without_remount(mounted: Mounted) -> None:
    m = mounted
    pid = m.proc.pid
    before = os.urandom(1_500_000)
    (m.mnt / "before.bin").write_bytes(before)
    os.sync()
    assert m.send(m.first) == "OK unchanged"  # an idempotent republish swaps nothing
    second = m.moto.create_key(m.user)
    assert m.send(second) == "OK changed"
    m.moto.delete_key(m.user, m.first[0])  # from now on moto refuses the first key
    assert sha((m.mnt / "outside.bin").read_bytes()) == sha(m.outside)
    assert sha((m.mnt / "before.bin").read_bytes()) == sha(before)
    stored = m.etags()
    after = os.urandom(300_000)
    (m.mnt / "after.bin").write_bytes(after)  # with the old key: EIO after the wait
    fd = os.open(m.mnt / "after.bin", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert len(m.etags()) == len(stored) + 1  # the upload landed, signed with the new key
    assert sha((m.mnt / "after.bin").read_bytes()) == sha(after)
    m.assert_alive_and_clean(pid, m.first, second)


def test_revoked_key_then_refreshed_within_the_wait(mounted: Mounted) -> None:
    """The key is revoked before the plugin hands over the new one: a lookup (HEAD) and
    a GET, then an upload, are refused, wait for the refresh and go on."""
    m = mounted
    pid = m.proc.pid
    second = m.moto.create_key(m.user)
    m.moto.delete_key(m.user, m.first[0])
    timer = threading.Timer(1.0, lambda: m.send(second))
    timer.start()
    try:
        t0 = time.monotonic()
        data = (m.mnt / "outside.bin").read_bytes()  # the daemon has never seen it
        took = time.monotonic() - t0
    finally:
        timer.join()
    assert sha(data) == sha(m.outside)
    assert 0.8 < took < WAIT + 2, took  # it waited for the refresh, and not past it
    third = m.moto.create_key(m.user)
    m.moto.delete_key(m.user, second[0])
    timer = threading.Timer(1.0, lambda: m.send(third))
    timer.start()
    written = os.urandom(200_000)
    try:
        t0 = time.monotonic()
        (m.mnt / "g.bin").write_bytes(written)  # uploaded on close: refused, then waits
        took = time.monotonic() - t0
    finally:
        timer.join()
    assert 0.8 < took < WAIT + 2, took
    assert sha((m.mnt / "g.bin").read_bytes()) == sha(written)
    assert any(k.endswith("/gocryptfs.conf") for k in m.etags())
    m.assert_alive_and_clean(pid, m.first, second, third)


def test_no_refresh_is_eio_and_nothing_acknowledged_is_lost(mounted: Mounted) -> None:
    m = mounted
    pid = m.proc.pid
    fd = os.open(m.mnt / "kept.bin", os.O_CREAT | os.O_WRONLY, 0o600)  # created empty
    m.moto.delete_key(m.user, m.first[0])
    kept = os.urandom(400_000)
    try:
        assert os.write(fd, kept) == len(kept)  # acknowledged (spooled, ciphertext)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        assert WAIT - 0.5 < time.monotonic() - t0 < WAIT + 12  # bounded by --credentials-wait
    finally:
        with pytest.raises(OSError):
            os.close(fd)  # close reports the failed upload too; the spool is kept
    # A read that needs the store fails the same way (the lookup's HEAD: was EACCES at
    # once, a refusal the daemon never waited for).
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        (m.mnt / "outside.bin").read_bytes()
    assert e.value.errno == errno.EIO
    assert WAIT - 0.5 < time.monotonic() - t0 < WAIT + 12
    before = m.etags()
    second = m.moto.create_key(m.user)
    assert m.send(second) == "OK changed"
    deadline = time.monotonic() + 25  # the background retry of failed uploads
    while m.etags() == before:
        assert time.monotonic() < deadline, "the kept spool was never uploaded"
        time.sleep(0.2)
    assert sha((m.mnt / "kept.bin").read_bytes()) == sha(kept)
    assert sha((m.mnt / "outside.bin").read_bytes()) == sha(m.outside)
    m.assert_alive_and_clean(pid, m.first, second)
