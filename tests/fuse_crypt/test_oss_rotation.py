"""Expiring STS credentials swapped into a mounted ``fuse-crypt mount oss://`` daemon over
its control socket (fuse_crypt/cli/credsocket.py), on a real FUSE mount over the OSS peer,
whose STS triples really expire (``SecurityTokenExpired``): no remount, nothing lost."""

from __future__ import annotations

import errno
import os
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.cli.credsocket import MAX_REQUEST, send_credentials
from tests.fuse_crypt.cli_helpers import FC, fc
from tests.peers.oss_server import OssServer

BUCKET = "coco-rot"
PASSWORD = "oss rotation test password"
REGION = "cn-hangzhou"


def creds(triple: tuple[str, str, str]) -> str:
    ak, sk, tok = triple
    return f"OSS_ACCESS_KEY_ID={ak}\nOSS_ACCESS_KEY_SECRET={sk}\nOSS_SESSION_TOKEN={tok}\n\n"


@pytest.fixture(scope="module")
def oss() -> Iterator[OssServer]:
    with tempfile.TemporaryDirectory(prefix="oss") as d, OssServer(tls_dir=d) as server:
        server.create_bucket(BUCKET)
        yield server


def store_args(oss: OssServer) -> list[str]:
    assert oss.ca_path is not None
    return ["--endpoint", oss.endpoint, "--region", REGION, "--ca-bundle", oss.ca_path]


class Mounted:
    def __init__(self, oss: OssServer, url: str, mnt: Path, sock: str, first: str) -> None:
        self.oss, self.url, self.mnt, self.sock = oss, url, mnt, sock
        self.identity = (url, oss.endpoint, REGION)
        self.log = mnt.parent / "daemon.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    *FC,
                    "mount",
                    "-f",
                    *store_args(oss),
                    "--credentials-stdin",
                    "--control-socket",
                    sock,
                    "--credentials-wait",
                    "3",
                    url,
                    str(mnt),
                ],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "FUSE_CRYPT_LOG_LEVEL": "INFO"},
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write((first + PASSWORD + "\n").encode())
        self.proc.stdin.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def send(self, text: str) -> str:
        return send_credentials(self.sock, self.identity, text.encode())

    def stop(self) -> None:
        fc("unmount", self.mnt)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def mounted(oss: OssServer, tmp_path: Path) -> Iterator[tuple[Mounted, tuple[str, str, str]]]:
    url = f"oss://{BUCKET}/rot/{tmp_path.name}"
    first = oss.issue_sts(3600)
    init = fc("init", "--scryptn", "10", *store_args(oss), "--credentials-stdin", url,
              stdin=creds(first) + PASSWORD + "\n")  # fmt: skip
    assert init.returncode == 0, init.stderr
    ctl = tmp_path / "ctl"
    ctl.mkdir(mode=0o700)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mounted(oss, url, mnt, str(ctl / "c.sock"), creds(first))
    try:
        yield m, first
    finally:
        m.stop()


def test_rotation_without_remount(mounted: tuple[Mounted, tuple[str, str, str]]) -> None:
    m, first = mounted
    st = os.lstat(m.sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    (m.mnt / "before.txt").write_bytes(b"written with the first token\n" * 500)
    assert m.send(creds(first)) == "OK unchanged"  # idempotent: nothing swapped
    second = m.oss.issue_sts(3600)
    assert m.send(creds(second)) == "OK changed"
    m.oss.expire(first[0])  # the old token is now refused by the store
    assert (m.mnt / "before.txt").read_bytes() == b"written with the first token\n" * 500
    (m.mnt / "after.txt").write_bytes(b"written with the second token\n")
    os.sync()
    assert (m.mnt / "after.txt").read_bytes() == b"written with the second token\n"
    statuses = [r["status"] for r in m.oss.state.requests[-20:]]
    assert 403 not in statuses, "requests after the swap must use the new token"
    log = m.log.read_text()
    for secret in (*first, *second):
        assert secret not in log


def test_expired_then_refreshed_within_the_wait(
    mounted: tuple[Mounted, tuple[str, str, str]],
) -> None:
    """A request refused with SecurityTokenExpired waits for the refresh, then succeeds."""
    m, first = mounted
    (m.mnt / "f.txt").write_bytes(b"x" * 10000)
    m.oss.expire(first[0])
    second = m.oss.issue_sts(3600)
    timer = threading.Timer(1.0, lambda: m.send(creds(second)))
    timer.start()
    try:
        t0 = time.monotonic()
        (m.mnt / "g.txt").write_bytes(b"y" * 5000)  # upload on close: refused, then waits
        assert time.monotonic() - t0 < 3.0 + 2.0
    finally:
        timer.join()
    assert (m.mnt / "g.txt").read_bytes() == b"y" * 5000
    assert any(r["status"] == 403 for r in m.oss.state.requests)


def test_no_refresh_is_eio_and_the_spool_is_kept(
    mounted: tuple[Mounted, tuple[str, str, str]],
) -> None:
    m, first = mounted
    fd = os.open(m.mnt / "kept.txt", os.O_CREAT | os.O_WRONLY, 0o600)  # created empty
    m.oss.expire(first[0])
    try:
        os.write(fd, b"acknowledged data\n")
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        assert 2.5 < time.monotonic() - t0 < 15  # --credentials-wait 3: bounded
    finally:
        with pytest.raises(OSError):
            os.close(fd)  # close reports the failed upload too; the spool is kept
    key_prefix = m.url.split("/", 3)[3] + "/"

    def snapshot() -> dict[str, str]:
        return {k: o.etag for k, o in m.oss.objects(BUCKET).items() if k.startswith(key_prefix)}

    before = snapshot()
    second = m.oss.issue_sts(3600)
    assert m.send(creds(second)) == "OK changed"
    deadline = time.monotonic() + 20  # the background retry of failed uploads
    while snapshot() == before:
        assert time.monotonic() < deadline, "the kept spool was never uploaded"
        time.sleep(0.2)
    assert (m.mnt / "kept.txt").read_bytes() == b"acknowledged data\n"


def test_control_socket_refuses(
    mounted: tuple[Mounted, tuple[str, str, str]], tmp_path: Path
) -> None:
    m, first = mounted
    new = m.oss.issue_sts(3600)
    # another volume's location or another endpoint: never swapped in
    other = (m.url + "x", m.oss.endpoint, REGION)
    answer = send_credentials(m.sock, other, creds(new).encode())
    assert answer.startswith("ERR") and not any(x in answer for x in new)
    evil = (m.url, "https://127.0.0.2:1", REGION)
    assert send_credentials(m.sock, evil, creds(new).encode()).startswith("ERR")
    # malformed, oversized
    bad = m.send("OSS_ACCESS_KEY_ID=\n\n")
    assert bad.startswith("ERR") and "\n" not in bad
    # the daemon stops reading past the bound, answers and hangs up
    assert m.send("A" * (MAX_REQUEST + 10)).startswith("ERR")
    # too slow: a client that never finishes its request is dropped after 5 s
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(m.sock)
        s.sendall(b"LOCATION=")
        t0 = time.monotonic()
        assert s.recv(100).startswith(b"ERR")
        assert 4 < time.monotonic() - t0 < 10
    assert m.send("OSS_ACCESS_KEY_ID=a b\x01\nOSS_ACCESS_KEY_SECRET=zz\n\n").startswith("ERR")
    # not root: SO_PEERCRED says so
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(m.sock)  # the file is 0600: connect itself is refused
            os.write(w, b"connected")
        except OSError:
            os.write(w, b"refused")
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 100) == b"refused"
    os.close(r)
    # the daemon still works with its current credentials; nothing leaked in its log
    (m.mnt / "still.txt").write_bytes(b"ok")
    assert (m.mnt / "still.txt").read_bytes() == b"ok"
    log = m.log.read_text()
    for secret in (*first, *new):
        assert secret not in log


def test_peer_uid_check_itself(tmp_path: Path) -> None:
    """SO_PEERCRED, not just the file mode: a socket opened up to everyone still refuses a
    peer that is not root."""
    from fuse_crypt.backend.credentials import CredentialBox
    from fuse_crypt.cli.credsocket import CredentialSocket

    d = Path(tempfile.mkdtemp(prefix="ctl"))  # /tmp: reachable by uid 65534 (tmp_path is not)
    box = CredentialBox("AKID0001", "secret0001", None)
    srv = CredentialSocket(str(d / "s"), box, bucket="b", identity=("oss://b/p", "e", "r"))
    try:
        os.chmod(d, 0o755)
        os.chmod(d / "s", 0o666)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
                ans = send_credentials(
                    str(d / "s"),
                    ("oss://b/p", "e", "r"),
                    b"OSS_ACCESS_KEY_ID=AKID0002\nOSS_ACCESS_KEY_SECRET=secret0002\n\n",
                )
                os.write(w, ans.encode())
            except OSError as e:
                os.write(w, f"oserror {e.errno}".encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        assert os.read(r, 100) == b"ERR permission denied"
        os.close(r)
        assert box.get() == ("AKID0001", "secret0001", None) and box.version == 0
        ok = send_credentials(
            str(d / "s"),
            ("oss://b/p", "e", "r"),
            b"OSS_ACCESS_KEY_ID=AKID0002\nOSS_ACCESS_KEY_SECRET=secret0002\n\n",
        )
        assert ok == "OK changed" and box.get()[0] == "AKID0002"
    finally:
        srv.close()
    assert not (d / "s").exists()
    d.rmdir()
