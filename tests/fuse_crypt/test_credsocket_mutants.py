"""fuse_crypt/cli/credsocket.py in process, for mutation testing (tools/mutation.py): a real
CredentialSocket on a real unix socket in a temporary directory, with every refusal checked
by its exact answer line, the size and time bounds on both sides (the time bound with a
fake clock, and once for real with a short timeout), the directory and socket-file rules,
and the client's request format and answer bound.

The same socket inside a mounted ``fuse-crypt mount oss://`` daemon, with a non-root peer
in a forked child (SO_PEERCRED), is in tests/fuse_crypt/test_oss_rotation.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.backend.credentials import CredentialBox
from fuse_crypt.cli import credsocket as cs
from fuse_crypt.cli.credsocket import MAX_REQUEST, CredentialSocket, send_credentials
from fuse_crypt.cli.exitcodes import USAGE, CliError

IDENT = ("oss://bkt/vol", "https://oss-cn-hangzhou.aliyuncs.com", "cn-hangzhou")
HEAD = (
    b"LOCATION=oss://bkt/vol\nENDPOINT=https://oss-cn-hangzhou.aliyuncs.com\nREGION=cn-hangzhou\n"
)
NEW = b"OSS_ACCESS_KEY_ID=AKIDNEW0002\nOSS_ACCESS_KEY_SECRET=secret-new-0002\n\n"
FIRST = ("AKIDOLD0001", "secret-old-0001", None)


def _sock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CredentialSocket]:
    box = CredentialBox(*FIRST)
    srv = CredentialSocket(str(_sock_dir(tmp_path) / "s"), box, bucket="bkt", identity=IDENT)
    try:
        yield srv
    finally:
        srv.close()


def raw(path: str, data: bytes, *, shut: bool = True) -> bytes:
    """Send ``data`` as one request; the daemon's whole answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


# -- answers ---------------------------------------------------------------------------------


def test_valid_request_swaps_then_unchanged(
    server: CredentialSocket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    assert raw(server.path, HEAD + b"\n" + NEW) == b"OK changed\n"
    assert server.box.get() == ("AKIDNEW0002", "secret-new-0002", None)
    assert server.box.version == 1
    assert raw(server.path, HEAD + b"\n" + NEW) == b"OK unchanged\n"
    assert server.box.version == 1
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert msgs == [
        (logging.INFO, "event=credentials_swapped changed=True version=1"),
        (logging.INFO, "event=credentials_swapped changed=False version=1"),
    ]
    assert all(r.name == "fuse_crypt.credsocket" for r in caplog.records)
    assert "secret-new" not in caplog.text and "AKIDNEW" not in caplog.text


def test_client_round_trip_with_a_token(server: CredentialSocket) -> None:
    creds = NEW.replace(b"\n\n", b"\nOSS_SESSION_TOKEN=tok-3\n\n")
    assert send_credentials(server.path, IDENT, creds) == "OK changed"
    assert server.box.get() == ("AKIDNEW0002", "secret-new-0002", "tok-3")


@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        (HEAD + NEW.rstrip(b"\n") + b"\n", b"ERR malformed request\n"),  # no empty line
        (HEAD.replace(b"oss://", b"\xff") + b"\n" + NEW, b"ERR malformed request\n"),  # not UTF-8
        (  # UTF-8 (a prefix may be any printable text), but not this daemon's location
            HEAD.replace(b"oss://", "ö".encode()) + b"\n" + NEW,
            b"ERR the request is for another volume location or endpoint\n",
        ),
        (HEAD + b"NOEQUALS\n\n" + NEW, b"ERR malformed request\n"),
        (HEAD + b"BUCKET=bkt\n\n" + NEW, b"ERR malformed request\n"),
        (HEAD + b"REGION=cn-hangzhou\n\n" + NEW, b"ERR malformed request\n"),  # twice
        (b"location=oss://bkt/vol\n" + HEAD[23:] + b"\n" + NEW, b"ERR malformed request\n"),
        (b"\n\n" + NEW, b"ERR malformed request\n"),  # one empty identity line
        (
            HEAD.replace(b"/vol", b"/vol2") + b"\n" + NEW,
            b"ERR the request is for another volume location or endpoint\n",
        ),
        (
            HEAD.replace(b"https://", b"http://") + b"\n" + NEW,
            b"ERR the request is for another volume location or endpoint\n",
        ),
        (
            HEAD.replace(b"REGION=cn-hangzhou", b"REGION=cn-beijing") + b"\n" + NEW,
            b"ERR the request is for another volume location or endpoint\n",
        ),
        (
            HEAD.split(b"REGION")[0] + b"\n" + NEW,  # one name missing
            b"ERR the request is for another volume location or endpoint\n",
        ),
        (
            HEAD + b"\nOSS_ACCESS_KEY_ID=\n\n",
            b"ERR new credentials: no usable access key id and secret\n",
        ),
        (
            HEAD + b"\nother:AKIDX0001:secretx0001\n\n",  # s3fs line for another bucket
            b"ERR new credentials: no usable access key id and secret\n",
        ),
    ],
)
def test_refusals_by_exact_answer(
    server: CredentialSocket,
    caplog: pytest.LogCaptureFixture,
    request_: bytes,
    answer: bytes,
) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    assert raw(server.path, request_) == answer
    assert server.box.get() == FIRST and server.box.version == 0
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "event=credsocket_refused reason=invalid")
    ]


def test_identity_values_may_hold_equals_signs(tmp_path: Path) -> None:
    ident = ("s3://bkt/v=1", "https://s3.example", "us-east-1")
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), CredentialBox(*FIRST), bucket="bkt", identity=ident
    )
    try:
        body = b"bkt:AKIDS3FS001:secret-s3fs-1\n\n"  # s3fs format for our own bucket
        assert send_credentials(srv.path, ident, body) == "OK changed"
        assert srv.box.get() == ("AKIDS3FS001", "secret-s3fs-1", None)
    finally:
        srv.close()


def test_identity_of_a_non_ascii_prefix_round_trips(tmp_path: Path) -> None:
    """A prefix may be any printable text (fuse-crypt accepts it): the refresh of such a
    volume must reach its daemon, not crash the plugin on an ASCII-only header."""
    ident = ("oss://bkt/données/ü", "https://oss-cn-hangzhou.aliyuncs.com", "cn-hangzhou")
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), CredentialBox(*FIRST), bucket="bkt", identity=ident
    )
    try:
        assert send_credentials(srv.path, ident, NEW) == "OK changed"
        assert srv.box.get() == ("AKIDNEW0002", "secret-new-0002", None)
        other = ("oss://bkt/donnees/u", *ident[1:])
        assert send_credentials(srv.path, other, NEW).startswith("ERR the request is for another")
    finally:
        srv.close()


def test_credentials_size_bound_after_trailing_newlines(server: CredentialSocket) -> None:
    """The body's trailing empty lines are stripped to one before the 4096-byte bound."""
    creds = NEW.rstrip(b"\n") + b"\n"
    pad = b"#" * (4095 - len(creds)) + b"\n"
    body = pad + creds[:-1]  # 4095 bytes, no final newline
    assert len(body) == 4095
    assert raw(server.path, HEAD + b"\n" + body + b"\n\n\n") == b"OK changed\n"
    over = b"#" + body
    assert raw(server.path, HEAD + b"\n" + over + b"\n\n") == b"ERR new credentials: too large\n"


def test_peer_uid_must_be_the_allowed_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    box = CredentialBox(*FIRST)
    me = os.geteuid()
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), box, bucket="bkt", identity=IDENT, allowed_uid=me + 1
    )
    try:
        assert raw(srv.path, HEAD + b"\n" + NEW) == b"ERR permission denied\n"
        assert box.version == 0
        assert [r.getMessage() for r in caplog.records] == [
            "event=credsocket_refused reason=peer-uid"
        ]
    finally:
        srv.close()
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert cs._peer_uid(left) == me
    srv = CredentialSocket(str(tmp_path / "ctl" / "s2"), box, bucket="bkt", identity=IDENT)
    try:
        assert srv.allowed_uid == 0 and me == 0  # the default: root only
    finally:
        srv.close()


# -- size and time bounds --------------------------------------------------------------------


def test_request_size_bound_both_sides(server: CredentialSocket) -> None:
    assert MAX_REQUEST == 16 * 1024
    at = HEAD + b"\n" + NEW + b"#" * (MAX_REQUEST - len(HEAD) - 1 - len(NEW))
    assert len(at) == MAX_REQUEST
    assert raw(server.path, at) == b"ERR new credentials: too large\n"  # read, then parsed
    over = at + b"#"
    assert raw(server.path, over) == b"ERR request too large or too slow\n"
    # a client that keeps sending (no shutdown) still gets the answer (drained, bounded)
    assert raw(server.path, b"A" * (3 * MAX_REQUEST), shut=False) == (
        b"ERR request too large or too slow\n"
    )


def test_slow_client_is_dropped_after_the_read_timeout(
    server: CredentialSocket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    assert cs.READ_TIMEOUT == 5.0
    monkeypatch.setattr(cs, "READ_TIMEOUT", 0.4)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(server.path)
        s.sendall(b"LOCATION=")
        t0 = time.monotonic()
        assert s.recv(100) == b"ERR request too large or too slow\n"
        assert 0.3 < time.monotonic() - t0 < 3
    assert caplog.records[-1].getMessage() == "event=credsocket_refused reason=too-large-or-slow"
    assert caplog.records[-1].levelno == logging.WARNING
    # a slow but timely client (two chunks inside the bound) is served
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(server.path)
        s.sendall(HEAD)
        time.sleep(0.1)
        s.sendall(b"\n" + NEW)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b"OK changed\n"


class FakeConn:
    """What _read_request sees of a connection: recv sizes and timeouts are recorded."""

    def __init__(self, chunks: list[bytes | type[BaseException]]) -> None:
        self.chunks = chunks
        self.recvs: list[int] = []
        self.timeouts: list[float] = []

    def settimeout(self, t: float) -> None:
        self.timeouts.append(t)

    def recv(self, n: int) -> bytes:
        self.recvs.append(n)
        c = self.chunks.pop(0)
        if isinstance(c, type):
            raise c()
        return c[:n]


class Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def monotonic(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


def test_read_request_reads_at_most_one_byte_past_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cs, "time", Clock(100.0))
    c = FakeConn([b"a" * 1000, b"b" * MAX_REQUEST])
    assert cs._read_request(c) is None  # type: ignore[arg-type]
    assert c.recvs == [MAX_REQUEST + 1, MAX_REQUEST + 1 - 1000]
    assert c.timeouts == [5.0, 5.0]
    c = FakeConn([b"a" * 1000, b"b" * (MAX_REQUEST - 1000), b""])
    assert cs._read_request(c) == b"a" * 1000 + b"b" * (MAX_REQUEST - 1000)  # type: ignore[arg-type]
    assert c.recvs == [MAX_REQUEST + 1, MAX_REQUEST + 1 - 1000, 1]
    c = FakeConn([b""])
    assert cs._read_request(c) == b""  # type: ignore[arg-type]


def test_read_request_deadline_with_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # start 100 -> deadline 105; a check at 103 leaves 2 s for the next recv
    monkeypatch.setattr(cs, "time", Clock(100.0, 101.0, 103.0, 105.0))
    c = FakeConn([b"x", b"y", b"z"])
    assert cs._read_request(c) is None  # type: ignore[arg-type]
    assert c.timeouts == [4.0, 2.0]  # at 105 exactly: no time left, no third recv
    assert c.recvs == [MAX_REQUEST + 1, MAX_REQUEST]
    monkeypatch.setattr(cs, "time", Clock(100.0, 104.999))
    c = FakeConn([b"x", b""])
    assert cs._read_request(c) == b"x"  # type: ignore[arg-type]
    assert c.timeouts[0] == pytest.approx(0.001)
    monkeypatch.setattr(cs, "time", Clock(100.0, 100.0))
    c = FakeConn([b"x", TimeoutError])
    assert cs._read_request(c) is None  # type: ignore[arg-type]


# -- the socket file and its directory -------------------------------------------------------


def test_socket_file_mode_umask_and_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    masks: list[int] = []
    real_umask = os.umask

    def spy(mask: int) -> int:
        masks.append(mask)
        return real_umask(mask)

    monkeypatch.setattr(cs.os, "umask", spy)
    before = real_umask(0o022)
    real_umask(before)
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), CredentialBox(*FIRST), bucket="bkt", identity=IDENT
    )
    try:
        st = os.lstat(srv.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert masks == [0o177, before]
        threads = [t for t in threading.enumerate() if t.name == "credsocket"]
        assert threads and all(t.daemon for t in threads)
        assert srv.identity == dict(zip(("LOCATION", "ENDPOINT", "REGION"), IDENT, strict=True))
    finally:
        srv.close()
    assert not os.path.lexists(srv.path)
    assert not srv._thread.is_alive()


def test_identity_must_have_three_parts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CredentialSocket(
            str(_sock_dir(tmp_path) / "s"), CredentialBox(*FIRST), bucket="b", identity=IDENT[:2]
        )  # type: ignore[arg-type]


def test_stale_socket_replaced_other_files_refused(tmp_path: Path) -> None:
    d = _sock_dir(tmp_path)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d / "s"))
    stale.close()
    srv = CredentialSocket(str(d / "s"), CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    try:
        assert raw(srv.path, HEAD + b"\n" + NEW) == b"OK changed\n"
    finally:
        srv.close()
    (d / "f").write_bytes(b"keep")
    with pytest.raises(CliError) as info:
        CredentialSocket(str(d / "f"), CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    assert str(info.value) == f"--control-socket {d / 'f'} exists and is not a socket"
    assert info.value.code == USAGE
    assert (d / "f").read_bytes() == b"keep"
    os.symlink(d / "f", d / "l")  # a symlink is not followed (lstat), even to a socket
    with pytest.raises(CliError):
        CredentialSocket(str(d / "l"), CredentialBox(*FIRST), bucket="bkt", identity=IDENT)


def test_bind_failure_is_a_usage_error_and_restores_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _sock_dir(tmp_path)
    long = str(d / ("s" * 200))  # longer than sun_path
    before = os.umask(0o022)
    os.umask(before)
    closed: list[bool] = []
    real = socket.socket.close

    def spy_close(self: socket.socket) -> None:
        closed.append(True)
        real(self)

    monkeypatch.setattr(cs.socket.socket, "close", spy_close)
    with pytest.raises(CliError) as info:
        CredentialSocket(long, CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    monkeypatch.undo()
    # (an OSError without strerror: the message once ended in ": None")
    assert str(info.value) == f"--control-socket {long}: AF_UNIX path too long"
    assert info.value.code == USAGE and info.value.__suppress_context__
    assert closed
    now = os.umask(before)
    assert now == before


def test_bind_failure_with_an_errno_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: socket.socket, path: str) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cs.socket.socket, "bind", refuse)
    path = str(_sock_dir(tmp_path) / "s")
    with pytest.raises(CliError) as info:
        CredentialSocket(path, CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    assert str(info.value) == f"--control-socket {path}: Permission denied"


@pytest.mark.parametrize(
    ("mode", "ok"),
    [
        (0o700, True),
        (0o755, True),
        (0o750, True),
        (0o770, False),
        (0o702, False),
        (0o720, False),
        (0o777, False),
    ],
)
def test_directory_mode(tmp_path: Path, mode: int, ok: bool) -> None:
    d = tmp_path / "ctl"
    d.mkdir()
    d.chmod(mode)
    if ok:
        CredentialSocket(str(d / "s"), CredentialBox(*FIRST), bucket="b", identity=IDENT).close()
        return
    with pytest.raises(CliError) as info:
        CredentialSocket(str(d / "s"), CredentialBox(*FIRST), bucket="b", identity=IDENT)
    assert str(info.value) == (
        f"--control-socket directory {d} must be ours and not writable by others"
    )
    assert info.value.code == USAGE
    assert not (d / "s").exists()


def test_directory_owner_kind_and_existence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _sock_dir(tmp_path)
    os.chown(d, 65534, 65534)
    msg = f"--control-socket directory {d} must be ours and not writable by others"
    with pytest.raises(CliError) as info:
        CredentialSocket(str(d / "s"), CredentialBox(*FIRST), bucket="b", identity=IDENT)
    assert str(info.value) == msg
    f = tmp_path / "file"
    f.write_bytes(b"")
    f.chmod(0o600)
    cs.CredentialSocket._check_dir(str(d.parent))  # ours: fine
    with pytest.raises(CliError) as info:
        cs.CredentialSocket._check_dir(str(f))
    assert (
        str(info.value) == f"--control-socket directory {f} must be ours and not writable by others"
    )
    with pytest.raises(CliError) as info:
        CredentialSocket(
            str(tmp_path / "nope" / "s"), CredentialBox(*FIRST), bucket="b", identity=IDENT
        )
    assert str(info.value) == (
        f"--control-socket directory {tmp_path / 'nope'}: No such file or directory"
    )
    assert info.value.code == USAGE and info.value.__suppress_context__
    # a bare name: the current directory is checked
    (tmp_path / "cwd").mkdir()
    own = _sock_dir(tmp_path / "cwd")
    monkeypatch.chdir(own)
    srv = CredentialSocket("s", CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    try:
        assert send_credentials(str(own / "s"), IDENT, NEW) == "OK changed"
    finally:
        srv.close()
    os.chmod(own, 0o777)
    with pytest.raises(CliError) as info:
        CredentialSocket("s", CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    assert str(info.value) == "--control-socket directory . must be ours and not writable by others"


def test_close_leaves_a_replaced_path_alone(tmp_path: Path) -> None:
    d = _sock_dir(tmp_path)
    srv = CredentialSocket(str(d / "s"), CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    os.unlink(d / "s")
    (d / "s").write_bytes(b"someone else's")
    t0 = time.monotonic()
    srv.close()
    assert time.monotonic() - t0 < 2  # the serving thread stops at once
    assert (d / "s").read_bytes() == b"someone else's" and not srv._thread.is_alive()
    srv.close()  # twice: nothing raised


# -- the client ------------------------------------------------------------------------------


class FakeDaemon:
    """A unix socket answering ``answer`` once, keeping what it was sent."""

    def __init__(self, path: str, answer: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(1)
        self.got = b""
        self.answer = answer
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.got += chunk
            if self.answer is None:
                time.sleep(1.5)
                return
            conn.sendall(self.answer)

    def close(self) -> None:
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize(
    ("answer", "want"),
    [
        (b"OK changed\n", "OK changed"),
        (b"  ERR x \n\n", "ERR x"),
        (b"ERR \xff\n", "ERR \ufffd"),
        (b"E" * 5000, "E" * 512),
    ],
)
def test_client_request_format_and_answer_bound(tmp_path: Path, answer: bytes, want: str) -> None:
    fd = FakeDaemon(str(tmp_path / "d"), answer)
    try:
        assert send_credentials(str(tmp_path / "d"), IDENT, NEW) == want
    finally:
        fd.close()
    assert fd.got == HEAD + b"\n" + NEW


def test_client_times_out_and_reports_unreachable(tmp_path: Path) -> None:
    fd = FakeDaemon(str(tmp_path / "d"), None)
    t0 = time.monotonic()
    try:
        with pytest.raises(OSError):
            send_credentials(str(tmp_path / "d"), IDENT, NEW, timeout=0.3)
    finally:
        fd.close()
    assert time.monotonic() - t0 < 3
    with pytest.raises(OSError):
        send_credentials(str(tmp_path / "missing"), IDENT, NEW)


def test_client_default_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[Any] = []

    class Spy(socket.socket):
        def settimeout(self, t: Any) -> None:
            seen.append(t)
            super().settimeout(t)

    monkeypatch.setattr(cs.socket, "socket", Spy)
    with pytest.raises(OSError):
        send_credentials(str(tmp_path / "missing"), IDENT, NEW)
    assert seen == [6.0]


# -- what the parser raises, and the body's trailing lines -----------------------------------


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (HEAD + NEW.rstrip(b"\n"), "malformed request"),
        (b"\xff=1\n\n" + NEW, "malformed request"),
        (b"X=1\n\n" + NEW, "malformed request"),
        (
            HEAD.replace(b"/vol", b"/v") + b"\n" + NEW,
            "the request is for another volume location or endpoint",
        ),
    ],
)
def test_parse_refusals_are_usage_errors(server: CredentialSocket, data: bytes, text: str) -> None:
    with pytest.raises(CliError) as info:
        server._parse(data)
    assert str(info.value) == text and info.value.code == USAGE


def test_only_trailing_newlines_are_stripped_from_the_body(server: CredentialSocket) -> None:
    body = b"OSS_ACCESS_KEY_ID=AKIDNEWX\nOSS_ACCESS_KEY_SECRET=secret-endsX\n\n"
    assert server._parse(HEAD + b"\n" + body) == ("AKIDNEWX", "secret-endsX", None)
    # a trailing space counts towards the 4096-byte bound (only newlines are stripped)
    creds = NEW.rstrip(b"\n") + b"\n"
    body = b"#" * (4095 - len(creds)) + b"\n" + creds[:-1] + b" "
    assert len(body) == 4096
    with pytest.raises(CliError) as info:
        server._parse(HEAD + b"\n" + body + b"\n\n")
    assert str(info.value) == "new credentials: too large"


def test_client_refuses_an_identity_of_the_wrong_size(tmp_path: Path) -> None:
    for ident in (IDENT[:2], (*IDENT, "extra")):
        with pytest.raises(ValueError):
            send_credentials(str(tmp_path / "none"), ident, NEW)  # type: ignore[arg-type]


def test_client_collects_an_answer_sent_in_parts(tmp_path: Path) -> None:
    path = str(tmp_path / "d")
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(path)
        srv.listen(1)

        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                while conn.recv(65536):
                    pass
                conn.sendall(b"OK ")
                time.sleep(0.2)
                conn.sendall(b"changed\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        assert send_credentials(path, IDENT, NEW) == "OK changed"
        t.join(5)


def test_close_after_the_file_is_gone(tmp_path: Path) -> None:
    d = _sock_dir(tmp_path)
    srv = CredentialSocket(str(d / "s"), CredentialBox(*FIRST), bucket="bkt", identity=IDENT)
    os.unlink(d / "s")
    srv.close()  # nothing raised
    assert not srv._thread.is_alive()


def test_close_waits_for_a_request_being_read(
    server: CredentialSocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cs, "READ_TIMEOUT", 0.5)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.path)
        s.sendall(b"LOCATION=")
        time.sleep(0.1)  # accepted: the thread is reading it, for up to 0.5 s
        server.close()
        assert not server._thread.is_alive()
        assert not [th for th in threading.enumerate() if th.name == "credsocket-client"]


# -- the serving loop ------------------------------------------------------------------------


class ConnSpy:
    """A connection that records its timeouts and the receives after the answer."""

    def __init__(self, conn: socket.socket, log: list[tuple[str, Any]]) -> None:
        self._conn, self.log = conn, log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __enter__(self) -> ConnSpy:
        return self

    def __exit__(self, *a: Any) -> None:
        self._conn.close()

    def settimeout(self, t: float | None) -> None:
        self.log.append(("timeout", t))
        self._conn.settimeout(t)

    def sendall(self, data: bytes) -> None:
        self.log.append(("sendall", data))
        self._conn.sendall(data)

    def recv(self, n: int) -> bytes:
        data = self._conn.recv(n)
        self.log.append(("recv", (n, len(data))))
        return data


class SockSpy:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.logs: list[list[tuple[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def accept(self) -> tuple[ConnSpy, Any]:
        conn, addr = self._sock.accept()
        self.logs.append([])
        return ConnSpy(conn, self.logs[-1]), addr


def _spied(server: CredentialSocket) -> SockSpy:
    spy = SockSpy(server._sock)
    server._sock = spy  # type: ignore[assignment]
    assert raw(server.path, b"x") == b"ERR malformed request\n"  # the loop now uses the spy
    return spy


def test_answer_timeouts_and_a_drain_that_stops_at_end_of_stream(
    server: CredentialSocket,
) -> None:
    spy = _spied(server)
    assert raw(server.path, HEAD + b"\n" + NEW) == b"OK changed\n"
    (log,) = spy.logs
    deadline = time.monotonic() + 5  # the daemon drains after the client saw the answer
    while log[-1][0] != "recv" and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    after = log[[e[0] for e in log].index("sendall") - 1 :]
    assert after == [
        ("timeout", 5.0),
        ("sendall", b"OK changed\n"),
        ("timeout", 1.0),
        ("recv", (MAX_REQUEST, 0)),  # the client had finished: one receive, then done
    ]


def test_drain_is_bounded_to_four_receives(server: CredentialSocket) -> None:
    spy = _spied(server)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(server.path)
        s.sendall(b"A" * (MAX_REQUEST + 1))
        got = s.recv(100)
        assert got == b"ERR request too large or too slow\n"
        with contextlib.suppress(OSError):  # (the daemon hangs up after draining)
            for _ in range(8):  # keeps sending past the answer
                s.sendall(b"B" * MAX_REQUEST)
        time.sleep(0.3)
        deadline = time.monotonic() + 5
        while len(spy.logs[0]) < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
    log = spy.logs[0]
    drained = log[[e[0] for e in log].index("sendall") + 2 :]
    assert [e[0] for e in drained] == ["recv"] * 4
    assert all(e[1][0] == MAX_REQUEST and e[1][1] > 0 for e in drained)


def test_a_failing_connection_does_not_stop_the_server(
    server: CredentialSocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = server._handle
    calls: list[int] = []

    def flaky(conn: socket.socket) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionResetError("peer went away")
        if len(calls) == 2:
            time.sleep(0.3)  # the client is gone by then: the answer cannot be sent
        return real(conn)

    monkeypatch.setattr(server, "_handle", flaky)
    got: bytes | None = None
    with contextlib.suppress(OSError):  # closed, or reset (its request was never read)
        got = raw(server.path, HEAD + b"\n" + NEW)
    assert got in (None, b"")  # no answer for that one
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(server.path)
        s.sendall(HEAD + b"\n" + NEW)
        s.shutdown(socket.SHUT_WR)
    time.sleep(0.5)
    assert send_credentials(server.path, IDENT, NEW, timeout=3) == "OK unchanged"
    assert len(calls) == 3


def test_accept_errors_are_retried_after_a_short_pause(tmp_path: Path) -> None:
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), CredentialBox(*FIRST), bucket="b", identity=IDENT
    )
    srv.close()
    accepts: list[float] = []

    class Failing:
        def accept(self) -> Any:
            accepts.append(time.monotonic())
            if len(accepts) == 3:
                srv._closed.set()
            raise OSError(errno.EMFILE, "Too many open files")

    srv._closed.clear()
    srv._sock = Failing()  # type: ignore[assignment]
    t0 = time.monotonic()
    srv._serve()  # returns once closed
    assert len(accepts) == 3
    assert 0.09 <= time.monotonic() - t0 < 0.9  # two pauses of 0.05 s
