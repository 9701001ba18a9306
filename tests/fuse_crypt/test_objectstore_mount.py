"""``fuse-crypt mount s3://BUCKET/PREFIX`` for real: FUSE over moto, and the tamper tests
run against both the local and the object backend."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fuse_crypt.cli_helpers import assert_one_line_error, fc
from tests.fuse_crypt.conftest import Mount, Volume, fuse_available
from tests.fuse_crypt.objectstore_helpers import PASSWORD, S3Vol, mount_ours, new_s3vol
from tests.peers.moto_s3 import MotoS3, moto_s3

pytestmark = pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


@pytest.fixture
def s3vol(moto: MotoS3, tmp_path: Path) -> S3Vol:
    return new_s3vol(moto, tmp_path)


def test_posix_over_moto(s3vol: S3Vol, tmp_path: Path) -> None:
    with mount_ours(s3vol, tmp_path / "m") as m:
        (m / "d" / "e").mkdir(parents=True)
        data = os.urandom(3 * 1024 * 1024 + 77)
        (m / "d" / "e" / "f").write_bytes(data)
        with open(m / "d" / "e" / "f", "r+b") as f:
            f.seek(1_000_000)
            f.write(b"patched")
            f.truncate(2_000_000)
        data = data[:1_000_000] + b"patched" + data[1_000_007:2_000_000]
        (m / "d").rename(m / "moved")
        (m / "moved" / "e" / "f").rename(m / "moved" / "g")
        assert sorted(os.listdir(m)) == ["moved"]
        assert (m / "moved" / "g").read_bytes() == data
        os.chmod(m / "moved" / "g", 0o600)
        os.utime(m / "moved" / "g", ns=(1, 1_500_000_000_123_456_789))
        with pytest.raises(OSError) as ei:
            os.link(m / "moved" / "g", m / "moved" / "hard")
        assert ei.value.errno == errno.EPERM
        st = os.statvfs(m)
        assert st.f_blocks > 0
    with mount_ours(s3vol, tmp_path / "m2") as m:
        assert (m / "moved" / "g").read_bytes() == data
        st2 = os.stat(m / "moved" / "g")
        assert st2.st_mode & 0o777 == 0o600 and st2.st_mtime_ns == 1_500_000_000_123_456_789


def test_readdir_past_1000_entries(s3vol: S3Vol, tmp_path: Path) -> None:
    """Listing pages of 1,000: the entries are created in-process (one PUT each, in
    parallel) to keep the test short; the mount lists them through FUSE."""
    from fuse_crypt.backend import ObjectStoreBackend
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.fusefrontend.mount import build_operations

    n = 1050
    t = s3vol.moto.transport(s3vol.bucket)
    conf = ConfFile.loads(t.get(f"{s3vol.prefix}/gocryptfs.conf"))
    backend = ObjectStoreBackend(t, s3vol.prefix)
    ops, _ = build_operations(backend, conf.unlock(PASSWORD.encode()), conf)
    ops.mkdir("/many", 0o755)

    def touch(i: int) -> None:
        ops.release(None, ops.create(f"/many/n{i:05d}", 0o644))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(touch, range(n)))
    backend.destroy()
    with mount_ours(s3vol, tmp_path / "m") as m:
        assert sorted(os.listdir(m / "many")) == [f"n{i:05d}" for i in range(n)]


def test_mount_errors_are_one_line(s3vol: S3Vol, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    bad = S3Vol(s3vol.moto, s3vol.bucket, "nothing-here", s3vol.creds, s3vol.passfile)
    assert_one_line_error(
        fc("mount", "--passfile", bad.passfile, *bad.store_args(), bad.url, mnt), 23
    )
    no_opt_in = [a for a in s3vol.store_args() if a != "--insecure-http"]
    assert_one_line_error(fc("mount", "--passfile", s3vol.passfile, *no_opt_in, s3vol.url, mnt), 1)
    s3vol.creds.chmod(0o644)
    msg = assert_one_line_error(
        fc("mount", "--passfile", s3vol.passfile, *s3vol.store_args(), s3vol.url, mnt), 1
    )
    assert "0600" in msg
    s3vol.creds.chmod(0o600)
    wrong = tmp_path / "wrongpw"
    wrong.write_text("nope\n")
    assert_one_line_error(fc("mount", "--passfile", wrong, *s3vol.store_args(), s3vol.url, mnt), 12)
    assert_one_line_error(fc("init", "--passfile", wrong, *s3vol.store_args(), s3vol.url), 40)


# -- tamper: the same attacks, both backends ---------------------------------------------


def _tamper_local(vol: Volume, cpath: Path, how: str, other: Path) -> None:
    body = bytearray(cpath.read_bytes())
    cpath.write_bytes(_tampered(body, how, other.read_bytes()))


def _tampered(body: bytearray, how: str, other: bytes) -> bytes:
    if how == "flip":
        body[18 + 5000] ^= 0x40
        return bytes(body)
    if how == "truncate":
        return bytes(body[: 18 + 4128 + 100])
    if how == "header-swap":
        return other[:18] + bytes(body[18:])
    b1, b2 = slice(18, 18 + 4128), slice(18 + 4128, 18 + 2 * 4128)
    body[b1], body[b2] = body[b2], body[b1]
    return bytes(body)


HOWS = ["flip", "truncate", "header-swap", "block-swap"]


@pytest.mark.parametrize("how", HOWS)
def test_tamper_local_backend(
    how: str, volume: Volume, mount_factory: Callable[..., Mount], tmp_path: Path
) -> None:
    from tests.fuse_crypt.conftest import CipherView

    data = os.urandom(20000)
    m = mount_factory(volume)
    (m.path / "a").write_bytes(data)
    (m.path / "b").write_bytes(data)
    m.unmount()
    cv = CipherView(volume)
    _tamper_local(volume, cv.cpath("a"), how, cv.cpath("b"))
    m2 = mount_factory(volume, mountpoint=tmp_path / "m2")
    with pytest.raises(OSError) as ei:
        (m2.path / "a").read_bytes()
    assert ei.value.errno == errno.EIO


@pytest.mark.parametrize("how", HOWS)
def test_tamper_object_backend(how: str, s3vol: S3Vol, tmp_path: Path) -> None:
    data = os.urandom(20000)
    with mount_ours(s3vol, tmp_path / "m") as m:
        (m / "a").write_bytes(data)
        (m / "b").write_bytes(data)
    client = s3vol.moto.client()
    objs = s3vol.moto.objects(s3vol.bucket, s3vol.prefix + "/")
    files = sorted(k for k, o in objs.items() if len(o["body"]) > 20000)
    assert len(files) == 2
    ka, kb = files
    body = _tampered(bytearray(objs[ka]["body"]), how, objs[kb]["body"])
    client.put_object(Bucket=s3vol.bucket, Key=ka, Body=body, Metadata=objs[ka]["meta"])
    with mount_ours(s3vol, tmp_path / "m2") as m:
        results = []
        for name in ("a", "b"):
            try:
                results.append((m / name).read_bytes() == data)
            except OSError as e:
                assert e.errno == errno.EIO
                results.append(False)
        assert sorted(results) == [False, True]  # the tampered one is EIO, the other intact


def test_daemon_killed_mid_upload_leaves_a_whole_version(s3vol: S3Vol, tmp_path: Path) -> None:
    """SIGKILL while close() uploads a new 24 MiB version: afterwards the object is the old
    version or the new one, whole (it decrypts end to end), never a mix or a stub."""
    import signal
    import subprocess
    import threading
    import time

    old, new = os.urandom(24 << 20), os.urandom(24 << 20)
    with mount_ours(s3vol, tmp_path / "m") as m:
        (m / "f").write_bytes(old)
    mnt = tmp_path / "m2"
    with mount_ours(s3vol, mnt) as m:
        pids = subprocess.run(
            ["pgrep", "-f", f"fuse_crypt.cli mount .*{mnt}"], capture_output=True, text=True
        ).stdout.split()
        assert pids
        f = open(m / "f", "r+b")  # noqa: SIM115 - closed by the killer's race below
        f.write(new)

        def kill_soon() -> None:
            time.sleep(0.3)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)

        threading.Thread(target=kill_soon).start()
        with contextlib.suppress(OSError):
            f.close()  # the upload happens here (or dies with the daemon)
        time.sleep(0.5)
    with mount_ours(s3vol, tmp_path / "m3") as m:
        assert (m / "f").read_bytes() in (old, new)


def test_leak_scan_of_the_bucket(s3vol: S3Vol, tmp_path: Path) -> None:
    """Marker strings in names, contents, xattrs and symlink targets: none of them in any
    object key, metadata value or body."""
    marker = "LEAKMARKER"
    with mount_ours(s3vol, tmp_path / "m") as m:
        d = m / f"{marker}-dir"
        d.mkdir()
        (d / f"{marker}-file").write_bytes(marker.encode() * 500)
        (d / f"{marker}-link").symlink_to(f"../{marker}-target")
        with pytest.raises(OSError) as ei:
            os.setxattr(d / f"{marker}-file", f"user.{marker}", marker.encode())
        assert ei.value.errno == errno.EOPNOTSUPP
        (d / f"{marker}-file").rename(d / f"{marker}-renamed")
    for key, o in s3vol.moto.objects(s3vol.bucket).items():
        blob = (key + repr(o["meta"]) + o["ctype"]).encode() + o["body"]
        assert marker.encode() not in blob and marker.lower().encode() not in blob


def test_foreground_masterkey_stdin_as_the_csi_plugin_runs_it(s3vol: S3Vol, tmp_path: Path) -> None:
    """The CSI node plugin's form: ``mount --foreground --masterkey stdin``, credentials
    from the 0600 file (stdin carries the key), ready line on stdout, SIGTERM unmounts."""
    import signal
    import subprocess
    import sys

    from fuse_crypt.configfile import ConfFile, format_master_key
    from tests.fuse_crypt.cli_helpers import is_mounted

    with mount_ours(s3vol, tmp_path / "m") as m:
        (m / "hello").write_bytes(b"csi")
    t = s3vol.moto.transport(s3vol.bucket)
    key = ConfFile.loads(t.get(f"{s3vol.prefix}/gocryptfs.conf")).unlock(PASSWORD.encode())
    mnt = tmp_path / "fg"
    mnt.mkdir()
    argv = [
        sys.executable,
        "-m",
        "fuse_crypt.cli",
        "mount",
        "--foreground",
        "--masterkey",
        "stdin",
        "--ro",
        *s3vol.store_args(),
        s3vol.url,
        str(mnt),
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((format_master_key(key) + "\n").encode())
        proc.stdin.close()
        assert proc.stdout.readline() == b"Filesystem mounted and ready.\n"
        assert (mnt / "hello").read_bytes() == b"csi"
        with pytest.raises(OSError) as ei:
            (mnt / "new").write_bytes(b"x")
        assert ei.value.errno == errno.EROFS
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
