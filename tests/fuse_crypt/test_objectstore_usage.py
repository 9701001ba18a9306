"""What NodeGetVolumeStats reports for a bucket volume, measured in process: the object
backend's ``usage()`` under the real crypto frontend over the strict fake transport, the
daemon's ``UsageCache``, and the STATS request on a real control socket (a real
CredentialSocket on a unix socket in a temporary directory).

The same path through a real ``coco-csi node``, a real mount and moto is in
tests/csi_driver/test_object_stats.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.backend import objectstore
from fuse_crypt.backend.credentials import CredentialBox
from fuse_crypt.backend.objectstore import ObjectStoreBackend
from fuse_crypt.backend.transport import AccessDenied, BadResponse, ListPage, ObjectInfo
from fuse_crypt.cli import credsocket as cs
from fuse_crypt.cli.credsocket import (
    CredentialSocket,
    UsageRefused,
    VolumeUsage,
    query_usage,
    send_credentials,
)
from fuse_crypt.cli.usagecache import StillListing, Usage, UsageCache
from tests.fuse_crypt.fake_transport import FakeTransport
from tests.fuse_crypt.test_backend_objectstore import FS, PRE, _init

LOC = "s3://bkt/vols/v1"
IDENT = (LOC, "https://s3.example.com", "us-east-1")
SECRET = "usage-secret-Zq81"
NEW = b"AWS_ACCESS_KEY_ID=AKIDNEW0002\nAWS_SECRET_ACCESS_KEY=" + SECRET.encode() + b"\n\n"


def _prefix_sizes(t: FakeTransport, prefix: str = PRE) -> tuple[int, int]:
    sizes = [len(o.body) for k, o in t.objects.items() if k.startswith(prefix)]
    return sum(sizes), len(sizes)


@pytest.fixture
def t() -> FakeTransport:
    t = FakeTransport()
    _init(t)
    return t


@pytest.fixture
def fs(t: FakeTransport) -> Iterator[FS]:
    f = FS(t)
    yield f
    f.close()


# -- ObjectStoreBackend.usage ------------------------------------------------------------


def test_usage_is_the_ciphertext_and_every_object_under_the_prefix(
    fs: FS, t: FakeTransport
) -> None:
    plain = 0
    fs.ops.mkdir("/d", 0o755)
    fs.ops.mkdir("/d/e", 0o755)
    for i in range(12):
        data = os.urandom(i * 3000)
        plain += len(data)
        fs.write(f"/d/e/f{i}" if i % 2 else f"/f{i}", data)
    fs.ops.symlink("/f1", "target-of-a-link")
    # Neighbours that share the key prefix's text but not the volume: never counted.
    t.put_raw("vols/v10/x", b"x" * 999)
    t.put_raw("vols/v1", b"y" * 999)
    t.put_raw("other", b"z" * 999)
    stored, objects, pending = fs.backend.usage()
    assert (stored, objects) == _prefix_sizes(t)
    assert pending == 0
    # gocryptfs.diriv x3, two dir markers, 12 files, one symlink
    assert objects == 3 + 2 + 12 + 1
    assert stored > plain  # headers and per-block tags: ciphertext, not plaintext


def test_usage_pages_past_1000_objects(t: FakeTransport) -> None:
    for i in range(2500):
        t.put_raw(f"{PRE}k{i:05d}", b"ab")
    be = ObjectStoreBackend(t, PRE)
    t.reset_counts()
    assert be.usage() == (2 * 2500 + 16, 2501, 0)
    assert t.counts["list"] == 3


def test_whole_bucket_volume(t: FakeTransport) -> None:
    t.put_raw("other", b"z" * 10)
    be = ObjectStoreBackend(t, "")
    assert be.usage() == (16 + 10, 2, 0)


def test_pending_bytes_of_an_open_file_then_uploaded(fs: FS, t: FakeTransport) -> None:
    fh = fs.ops.create("/big", 0o644)
    try:
        fs.ops.write("/big", b"q" * 100_000, 0, fh)
        stored, objects, pending = fs.backend.usage()
        assert (stored, objects) == _prefix_sizes(t)
        assert pending > 100_000  # the spooled ciphertext, not yet in the bucket
        fs.ops.flush("/big", fh)
    finally:
        fs.ops.release("/big", fh)
    stored2, objects2, pending2 = fs.backend.usage()
    assert pending2 == 0
    assert stored2 == stored + pending
    assert objects2 == objects


class _Hostile(FakeTransport):
    """A store whose listing is replaced by ``pages(prefix, token)``."""

    def __init__(self, pages: object) -> None:
        super().__init__()
        self._pages = pages

    def list(self, prefix: str, **kw: object) -> ListPage:  # type: ignore[override]
        self._req("list", prefix)
        return self._pages(prefix, kw.get("token"))  # type: ignore[operator,no-any-return]


def _obj(key: str, size: int = 1) -> ObjectInfo:
    return ObjectInfo(key, size, "e", 0)


@pytest.mark.parametrize(
    "page",
    [
        ListPage((_obj(PRE + "a"), _obj("vols/v2/stolen")), (), None),  # outside the prefix
        ListPage((_obj(PRE + "a", -1),), (), None),  # negative size
        ListPage((_obj(PRE + "a", 1 << 60),), (), None),  # 1 EiB
        ListPage((_obj(PRE + "a"),), (), "same"),  # token that never advances
    ],
    ids=["outside", "negative", "huge", "stuck-token"],
)
def test_hostile_pages_are_refused(page: ListPage) -> None:
    t = _Hostile(lambda prefix, token: page)
    with pytest.raises(BadResponse) as ei:
        ObjectStoreBackend(t, PRE).usage()
    assert ei.value.errno == errno.EIO
    assert t.counts["list"] <= 2


def test_more_objects_than_the_bound_is_e2big() -> None:
    def pages(prefix: str, token: str | None) -> ListPage:
        n = int(token or 0)
        return ListPage(tuple(_obj(f"{prefix}{n}-{i}") for i in range(1000)), (), str(n + 1))

    t = _Hostile(pages)
    with pytest.raises(OSError) as ei:
        ObjectStoreBackend(t, PRE).usage(max_objects=5000)
    assert ei.value.errno == errno.E2BIG
    assert t.counts["list"] == 6


def test_endless_empty_pages_are_bounded_in_pages() -> None:
    def pages(prefix: str, token: str | None) -> ListPage:
        return ListPage((), (), str(int(token or 0) + 1))

    t = _Hostile(pages)
    with pytest.raises(OSError) as ei:
        ObjectStoreBackend(t, PRE).usage(max_objects=5000)
    assert ei.value.errno == errno.E2BIG
    assert t.counts["list"] == 5000 // 100 + 11


def test_a_listing_past_its_budget_is_etimedout() -> None:
    now = [0.0]

    def pages(prefix: str, token: str | None) -> ListPage:
        now[0] += 1.0  # every page takes a (fake) second
        n = int(token or 0)
        return ListPage((_obj(f"{prefix}{n}"),), (), str(n + 1))

    t = _Hostile(pages)
    with pytest.raises(OSError) as ei:
        ObjectStoreBackend(t, PRE).usage(budget=5.0, clock=lambda: now[0])
    assert ei.value.errno == errno.ETIMEDOUT
    assert t.counts["list"] == 6


def test_default_bounds_are_the_documented_ones() -> None:
    assert objectstore.USAGE_MAX_OBJECTS == 1_000_000
    assert objectstore.USAGE_BUDGET == 60.0


# -- UsageCache --------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_serves_within_its_ttl_and_lists_again_after() -> None:
    clock = _Clock()
    calls: list[int] = []

    def compute() -> Usage:
        calls.append(1)
        clock.now += 0.5  # the listing took 0.5 s: ttl = max(30, 15) = 30
        return (len(calls) * 10, len(calls), 0)

    cache = UsageCache(compute, clock=clock)
    assert cache.get() == ((10, 1, 0), 0.0)
    clock.now += 29.0
    assert cache.get() == ((10, 1, 0), 29.0)
    clock.now += 1.0
    assert cache.get()[0] == (20, 2, 0)
    assert cache.listings == 2


def test_a_slow_listing_is_cached_longer() -> None:
    clock = _Clock()

    def compute() -> Usage:
        clock.now += 4.0  # ttl = max(30, 30 x 4) = 120
        return (1, 1, 0)

    cache = UsageCache(compute, clock=clock)
    cache.get()
    clock.now += 119.0
    cache.get()
    assert cache.listings == 1
    clock.now += 1.0
    cache.get()
    assert cache.listings == 2


def test_one_listing_at_a_time_and_waiters_give_up() -> None:
    go = threading.Event()
    started = threading.Event()

    def compute() -> Usage:
        started.set()
        assert go.wait(10)
        return (7, 7, 0)

    cache = UsageCache(compute, wait=0.2)
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            cache.get()
        except StillListing as e:
            errors.append(e)

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    assert started.is_set() and len(errors) == 3
    go.set()
    cache.wait = 5
    assert cache.get()[0] == (7, 7, 0)
    assert cache.listings == 1  # the three waiters and the last caller shared one listing


def test_a_slow_refresh_serves_the_last_answer_with_its_age() -> None:
    clock = _Clock()
    go = threading.Event()
    results = [(1, 1, 0), (2, 2, 0)]

    def compute() -> Usage:
        if len(results) == 1:
            assert go.wait(10)
        return results.pop(0)

    cache = UsageCache(compute, clock=clock, wait=0.2)
    assert cache.get() == ((1, 1, 0), 0.0)
    clock.now += 45.0
    assert cache.get() == ((1, 1, 0), 45.0)  # stale, while the second listing runs
    go.set()
    deadline = time.monotonic() + 5
    while cache.listings < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert cache.get() == ((2, 2, 0), 0.0)


def test_failures_are_not_cached() -> None:
    results: list[object] = [OSError(errno.ETIMEDOUT, "slow"), (3, 3, 0)]

    def compute() -> Usage:
        r = results.pop(0)
        if isinstance(r, OSError):
            raise r
        return r  # type: ignore[return-value]

    cache = UsageCache(compute)
    with pytest.raises(OSError) as ei:
        cache.get()
    assert ei.value.errno == errno.ETIMEDOUT
    assert cache.get()[0] == (3, 3, 0)


def test_an_unexpected_exception_is_an_answer_not_a_dead_thread() -> None:
    def compute() -> Usage:
        raise KeyError("store said: secret-in-exception")

    with pytest.raises(OSError) as ei:
        UsageCache(compute).get()
    assert "secret-in-exception" not in str(ei.value)


# -- STATS over the control socket -----------------------------------------------------


def _sock_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ctl"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CredentialSocket]:
    box = CredentialBox("AKIDOLD0001", "secret-old-0001", None)
    srv = CredentialSocket(str(_sock_dir(tmp_path) / "s"), box, bucket="bkt", identity=IDENT)
    try:
        yield srv
    finally:
        srv.close()


def raw(path: str, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_stats_round_trip_over_a_real_backend(
    server: CredentialSocket, fs: FS, t: FakeTransport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for i in range(5):
        fs.write(f"/f{i}", os.urandom(5000))
    server.usage = UsageCache(fs.backend.usage)
    got = query_usage(server.path, LOC)
    stored, objects = _prefix_sizes(t)
    assert got == VolumeUsage(stored, objects, 0, 0)
    assert raw(server.path, b"STATS\nLOCATION=" + LOC.encode() + b"\n\n") == (
        f"OK bytes={stored} objects={objects} pending=0 age=0\n".encode()
    )
    assert server.usage.listings == 1  # the second answer came from the cache
    assert SECRET not in caplog.text and "secret-old" not in caplog.text


def test_stats_before_the_store_exists(server: CredentialSocket) -> None:
    with pytest.raises(UsageRefused) as ei:
        query_usage(server.path, LOC)
    assert ei.value.reason == "volume usage not available yet"


@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        (b"STATS\nLOCATION=s3://bkt/vols/v2\n\n", b"ERR the request is for another volume"),
        (b"STATS\nLOCATION=" + LOC.encode() + b"\n", b"ERR malformed request"),  # no empty line
        (b"STATS\nLOCATION=" + LOC.encode() + b"\n\nextra", b"ERR malformed request"),
        (b"STATS\nENDPOINT=https://s3.example.com\n\n", b"ERR malformed request"),
        (b"STATS\n" + LOC.encode() + b"\n\n", b"ERR malformed request"),
        (b"STATS\n\n", b"ERR malformed request"),
        (b"STATS\nLOCATION=\xff\n\n", b"ERR malformed request"),  # not UTF-8
        ("STATS\nLOCATION=s3://bkt/vols/v1é\n\n".encode(), b"ERR the request is for another"),
    ],
)
def test_malformed_stats_requests(server: CredentialSocket, request_: bytes, answer: bytes) -> None:
    server.usage = UsageCache(lambda: (1, 1, 0))
    assert raw(server.path, request_).startswith(answer)
    assert server.usage.listings == 0


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.E2BIG, "x"), "too many objects to measure"),
        (OSError(errno.ETIMEDOUT, "x"), "the listing took too long"),
        (BadResponse("list: key outside the prefix <planted-text>"), "the object store failed"),
        (AccessDenied("InvalidAccessKeyId: " + SECRET), "the object store failed"),
    ],
)
def test_listing_failures_are_fixed_phrases(
    server: CredentialSocket, exc: OSError, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    def compute() -> Usage:
        raise exc

    server.usage = UsageCache(compute)
    with pytest.raises(UsageRefused) as ei:
        query_usage(server.path, LOC)
    assert ei.value.reason.startswith(reason)
    assert "planted" not in ei.value.reason and SECRET not in ei.value.reason
    assert "planted" not in caplog.text and SECRET not in caplog.text


def test_a_slow_listing_answers_err_and_credentials_still_swap(server: CredentialSocket) -> None:
    """A listing in progress never holds up a credential refresh (each connection is
    served in its own thread)."""
    go = threading.Event()

    def compute() -> Usage:
        assert go.wait(10)
        return (1, 1, 0)

    server.usage = UsageCache(compute, wait=4.0)
    out: list[object] = []

    def ask() -> None:
        try:
            out.append(query_usage(server.path, LOC))
        except UsageRefused as e:
            out.append(e.reason)

    th = threading.Thread(target=ask)
    th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert send_credentials(server.path, IDENT, NEW) == "OK changed"
    assert time.monotonic() - t0 < 2.5  # not behind the usage query's 4 s wait
    th.join(10)
    assert out == ["the listing is still running"]
    go.set()
    time.sleep(0.1)
    assert query_usage(server.path, LOC) == VolumeUsage(1, 1, 0, 0)


def test_more_clients_than_the_bound_are_told_busy(server: CredentialSocket) -> None:
    go = threading.Event()

    def compute() -> Usage:
        assert go.wait(10)
        return (1, 1, 0)

    server.usage = UsageCache(compute, wait=10)
    threads = [
        threading.Thread(target=query_usage, args=(server.path, LOC)) for _ in range(cs.MAX_CLIENTS)
    ]
    for th in threads:
        th.start()
    time.sleep(0.5)
    assert raw(server.path, b"STATS\nLOCATION=" + LOC.encode() + b"\n\n") == b"ERR busy\n"
    go.set()
    for th in threads:
        th.join(10)
    assert query_usage(server.path, LOC).objects == 1


def test_client_bounds_and_refuses_odd_answers(tmp_path: Path) -> None:
    d = _sock_dir(tmp_path)
    path = str(d / "fake")
    answers = [b"OK bytes=-1 objects=1 pending=0 age=0\n", b"ERR \x01\x02\n", b"", b"X" * 5000]
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve() -> None:
        for a in answers:
            conn, _ = srv.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(4096)
                conn.sendall(a)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    reasons = []
    for _ in answers:
        with pytest.raises(UsageRefused) as ei:
            query_usage(path, LOC, timeout=5)
        reasons.append(ei.value.reason)
    srv.close()
    assert reasons == ["malformed answer", "unprintable reason", "no answer", "malformed answer"]
    with pytest.raises(UsageRefused):
        query_usage(path, LOC + "\nREGION=x")
    with pytest.raises(FileNotFoundError):
        query_usage(path + "-gone", LOC)


def test_stats_from_another_uid_is_refused_before_any_listing(tmp_path: Path) -> None:
    """SO_PEERCRED is checked before the request is even read: a peer that is not the
    allowed uid learns nothing and costs no listing."""
    box = CredentialBox("AKIDOLD0001", "secret-old-0001", None)
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"),
        box,
        bucket="bkt",
        identity=IDENT,
        allowed_uid=os.geteuid() + 1,
    )
    try:
        srv.usage = UsageCache(lambda: (1, 1, 0))
        with pytest.raises(UsageRefused) as ei:
            query_usage(srv.path, LOC)
        assert ei.value.reason == "permission denied"
        assert srv.usage.listings == 0
    finally:
        srv.close()


def test_cache_defaults_are_the_documented_ones() -> None:
    cache = UsageCache(lambda: (0, 0, 0))
    assert (cache.min_ttl, cache.ttl_factor, cache.wait) == (30.0, 30.0, 6.0)


def test_the_listing_thread_never_keeps_the_daemon_alive() -> None:
    """A listing stuck on the store must not block the daemon's exit at unmount."""
    go = threading.Event()

    def compute() -> Usage:
        assert go.wait(10)
        return (1, 1, 0)

    cache = UsageCache(compute, wait=0.05)
    with pytest.raises(StillListing):
        cache.get()
    try:
        listing = [th for th in threading.enumerate() if th.name == "usage-listing"]
        assert len(listing) == 1 and listing[0].daemon
    finally:
        go.set()


def test_a_stale_answer_younger_than_a_second_reports_its_real_age() -> None:
    clock = _Clock()
    go = threading.Event()
    runs: list[int] = []

    def compute() -> Usage:
        runs.append(1)
        if len(runs) > 1:  # the second listing blocks
            assert go.wait(10)
        return (1, 1, 0)

    cache = UsageCache(compute, clock=clock, min_ttl=0.0, ttl_factor=0.0, wait=0.05)
    assert cache.get() == ((1, 1, 0), 0.0)
    clock.now += 0.5
    try:
        assert cache.get() == ((1, 1, 0), 0.5)
    finally:
        go.set()


def test_an_unexpected_exception_is_named_by_its_type_only() -> None:
    def compute() -> Usage:
        raise KeyError("secret-in-exception")

    with pytest.raises(OSError) as ei:
        UsageCache(compute).get()
    assert str(ei.value) == "listing failed: KeyError"


def test_stats_of_a_prefix_that_is_not_ascii(tmp_path: Path) -> None:
    """fuse-crypt accepts any printable prefix; the location travels as UTF-8."""
    loc = "oss://bkt/données/卷"
    box = CredentialBox("AKIDOLD0001", "secret-old-0001", None)
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), box, bucket="bkt", identity=(loc, "", "")
    )
    try:
        srv.usage = UsageCache(lambda: (9, 3, 0))
        assert query_usage(srv.path, loc) == VolumeUsage(9, 3, 0, 0)
    finally:
        srv.close()


def test_stats_log_lines_are_exact_and_carry_no_request_bytes(
    server: CredentialSocket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    results: list[object] = [OSError(errno.E2BIG, "x")]

    def compute() -> Usage:
        raise results.pop()  # type: ignore[misc]

    server.usage = UsageCache(compute)
    raw(server.path, b"STATS\nLOCATION=\xff-planted\n\n")
    raw(server.path, b"STATS\nLOCATION=s3://bkt/planted\n\n")
    raw(server.path, b"STATS\nLOCATION=" + LOC.encode() + b"\n\n")
    msgs = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert msgs == [
        (logging.WARNING, "event=credsocket_refused reason=invalid"),
        (logging.WARNING, "event=credsocket_refused reason=other-location"),
        (logging.WARNING, "event=volume_usage_failed reason=too-many-objects-to-measure"),
    ]
    assert "planted" not in caplog.text


def test_still_listing_is_logged(
    server: CredentialSocket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    go = threading.Event()

    def compute() -> Usage:
        assert go.wait(10)
        return (1, 1, 0)

    server.usage = UsageCache(compute, wait=0.05)
    try:
        raw(server.path, b"STATS\nLOCATION=" + LOC.encode() + b"\n\n")
    finally:
        go.set()
    assert [r.getMessage() for r in caplog.records] == [
        "event=volume_usage_failed reason=listing-still-running"
    ]


@pytest.mark.parametrize(
    ("tail", "answer"),
    [
        (b"\n\n\n\n", b"ERR malformed request\n"),  # the request ends at its first empty line
        (b"=x\n\n", b"ERR the request is for another volume location or endpoint\n"),
    ],
)
def test_stats_request_is_split_at_the_first_separators(
    server: CredentialSocket, tail: bytes, answer: bytes
) -> None:
    server.usage = UsageCache(lambda: (1, 1, 0))
    assert raw(server.path, b"STATS\nLOCATION=" + LOC.encode() + tail) == answer


def test_a_location_holding_an_equals_sign(tmp_path: Path) -> None:
    loc = "s3://bkt/a=b/c"
    box = CredentialBox("AKIDOLD0001", "secret-old-0001", None)
    srv = CredentialSocket(
        str(_sock_dir(tmp_path) / "s"), box, bucket="bkt", identity=(loc, "", "")
    )
    try:
        srv.usage = UsageCache(lambda: (5, 1, 0))
        assert query_usage(srv.path, loc) == VolumeUsage(5, 1, 0, 0)
    finally:
        srv.close()


def test_store_failure_names_only_the_error_type(server: CredentialSocket) -> None:
    def compute() -> Usage:
        raise BadResponse("list: key outside the prefix")

    server.usage = UsageCache(compute)
    with pytest.raises(UsageRefused) as ei:
        query_usage(server.path, LOC)
    assert ei.value.reason == "the object store failed (BadResponse)"
    assert str(ei.value) == ei.value.reason


def test_client_thread_is_a_daemon_thread(server: CredentialSocket) -> None:
    """A client stuck behind a listing must not keep the mount daemon from exiting."""
    go = threading.Event()

    def compute() -> Usage:
        assert go.wait(10)
        return (1, 1, 0)

    server.usage = UsageCache(compute, wait=5)
    th = threading.Thread(
        target=raw, args=(server.path, b"STATS\nLOCATION=" + LOC.encode() + b"\n\n")
    )
    th.start()
    try:
        time.sleep(0.3)
        clients = [t for t in threading.enumerate() if t.name == "credsocket-client"]
        assert len(clients) == 1 and clients[0].daemon
    finally:
        go.set()
        th.join(10)


def test_client_refuses_a_carriage_return_bounds_the_reason_and_times_out(
    tmp_path: Path,
) -> None:
    d = _sock_dir(tmp_path)
    path = str(d / "fake")
    with pytest.raises(UsageRefused):
        query_usage(path, LOC + "\rX")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)
    answers = [b"ERR " + b"r" * 300 + b"\n", None]

    def serve() -> None:
        for a in answers:
            conn, _ = srv.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(4096)
                if a is None:
                    time.sleep(3)
                else:
                    conn.sendall(a)

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(UsageRefused) as ei:
            query_usage(path, LOC, timeout=5)
        assert ei.value.reason == "r" * 200
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            query_usage(path, LOC, timeout=0.5)
        assert time.monotonic() - t0 < 2
    finally:
        srv.close()


def test_finished_client_threads_are_forgotten(server: CredentialSocket) -> None:
    """kubelet asks every minute for months: nothing may pile up per request."""
    server.usage = UsageCache(lambda: (1, 1, 0))
    for _ in range(5):
        query_usage(server.path, LOC)
    deadline = time.monotonic() + 5
    while server._client_threads:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_busy_is_logged(server: CredentialSocket, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fuse_crypt.credsocket")
    go = threading.Event()

    def compute() -> Usage:
        assert go.wait(10)
        return (1, 1, 0)

    server.usage = UsageCache(compute, wait=10)
    threads = [
        threading.Thread(target=query_usage, args=(server.path, LOC)) for _ in range(cs.MAX_CLIENTS)
    ]
    for th in threads:
        th.start()
    time.sleep(0.5)
    try:
        assert raw(server.path, b"STATS\nLOCATION=" + LOC.encode() + b"\n\n") == b"ERR busy\n"
    finally:
        go.set()
        for th in threads:
            th.join(10)
    assert [r.getMessage() for r in caplog.records] == ["event=credsocket_refused reason=busy"]
