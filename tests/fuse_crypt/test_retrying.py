"""RetryingTransport: the policy in-process (injected clock, sleep, random), then OssTransport
behind it through the fault-injection proxy: 5xx bursts, SlowDown, slow and cut answers."""

from __future__ import annotations

import errno
import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from fuse_crypt.backend.oss import OssCredentials, OssTransport
from fuse_crypt.backend.retrying import RetryingTransport, multipart_etag
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    TransientError,
)
from tests.fuse_crypt.conftest import OSS_AK, OSS_BUCKET, OSS_SK
from tests.fuse_crypt.transport_contract import TransportContract
from tests.peers.fault_proxy import Fault, FaultProxy

# -- in-process ------------------------------------------------------------------------------


class Flaky:
    """Just enough of a transport: a dict of objects, and a script of failures."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str], str]] = {}
        self.uploads: dict[str, dict[int, bytes]] = {}
        self.script: list[BaseException | None] = []
        self.calls: list[str] = []
        self.land_then_fail = False

    def _step(self, op: str) -> None:
        self.calls.append(op)
        if self.script:
            exc = self.script.pop(0)
            if exc is not None and not self.land_then_fail:
                raise exc

    def _after(self) -> None:
        if self.land_then_fail:
            self.land_then_fail = False
            raise TransientError("answer lost")

    def head(self, key: str) -> ObjectInfo:
        self._step("head")
        if key not in self.objects:
            raise ObjectNotFound("404")
        data, meta, etag = self.objects[key]
        return ObjectInfo(key, len(data), etag, 0, meta)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        self._step("get")
        data = self.objects[key][0]
        return data[start:] if length is None else data[start : start + length]

    def put(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        self._step("put")
        if if_none_match and key in self.objects:
            raise PreconditionFailed("409")
        etag = hashlib.md5(body).hexdigest().upper()  # noqa: S324
        self.objects[key] = (body, {k.lower(): v for k, v in metadata.items()}, etag)
        self._after()
        return etag

    def create_multipart(self, key: str, **_: Any) -> str:
        self._step("create")
        self.uploads["u1"] = {}
        return "u1"

    def upload_part(self, key: str, upload_id: str, n: int, body: bytes) -> str:
        self._step("part")
        self.uploads[upload_id][n] = body
        return hashlib.md5(body).hexdigest()  # noqa: S324

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        self._step("complete")
        if upload_id not in self.uploads:
            raise ObjectNotFound("NoSuchUpload")
        up = self.uploads.pop(upload_id)
        etag = multipart_etag(parts)
        assert etag is not None
        self.objects[key] = (b"".join(up[n] for n, _ in parts), {}, etag.upper())
        self._after()
        return etag

    def list(self, prefix: str, **_: Any) -> ListPage:
        self._step("list")
        return ListPage((), (), None)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def wrap(inner: Any, clock: Clock, rand: float = 1.0, **kw: Any) -> RetryingTransport:
    return RetryingTransport(
        inner, clock=lambda: clock.now, sleep=clock.sleep, random=lambda: rand, **kw
    )


def test_transient_failures_are_retried_with_exponential_full_jitter() -> None:
    f, c = Flaky(), Clock()
    f.objects["k"] = (b"data", {}, "E")
    f.script = [TransientError("503")] * 3
    assert wrap(f, c, base_delay=0.1, max_delay=0.3).get("k") == b"data"
    assert f.calls == ["get"] * 4
    assert c.sleeps == pytest.approx([0.1, 0.2, 0.3])  # random()=1: the caps, then max_delay
    c2 = Clock()
    f.script = [TransientError("503")] * 2
    wrap(f, c2, rand=0.25, base_delay=0.1).get("k")
    assert c2.sleeps == pytest.approx([0.025, 0.05])


def test_gives_up_after_attempts_with_a_typed_eio() -> None:
    f, c = Flaky(), Clock()
    f.script = [TransientError("OSS GET: 503 SlowDown")] * 10
    with pytest.raises(TransientError, match="gave up after 4 attempts") as e:
        wrap(f, c, attempts=4).get("k")
    assert e.value.errno == errno.EIO
    assert f.calls == ["get"] * 4 and len(c.sleeps) == 3


def test_budget_stops_retries_before_attempts_run_out() -> None:
    f, c = Flaky(), Clock()
    f.script = [TransientError("503")] * 10
    with pytest.raises(TransientError):
        wrap(f, c, attempts=10, base_delay=1.0, max_delay=100.0, budget=5.0).get("k")
    assert sum(c.sleeps) <= 5.0
    assert len(f.calls) == 3  # sleeps 1 + 2, then 4 more would pass the budget


@pytest.mark.parametrize(
    "exc", [ObjectNotFound("404"), AccessDenied("403"), BadResponse("x"), PreconditionFailed("409")]
)
def test_other_errors_are_not_retried(exc: Exception) -> None:
    f, c = Flaky(), Clock()
    f.script = [exc]
    with pytest.raises(type(exc)):
        wrap(f, c).get("k")
    assert f.calls == ["get"] and c.sleeps == []


def test_create_only_put_that_landed_unseen_is_a_success() -> None:
    f, c = Flaky(), Clock()
    f.land_then_fail = True
    etag = wrap(f, c).put("k", b"body", metadata={"Mode": "1"}, if_none_match=True)
    assert etag == hashlib.md5(b"body").hexdigest().upper()  # noqa: S324
    assert f.calls == ["put", "put", "head"]


def test_create_only_put_meeting_someone_else_still_fails() -> None:
    f, c = Flaky(), Clock()
    f.objects["k"] = (b"other", {}, "X")
    with pytest.raises(PreconditionFailed):
        wrap(f, c).put("k", b"body", metadata={}, if_none_match=True)
    f.script = [TransientError("reset")]  # a transient miss, then someone else's object
    with pytest.raises(PreconditionFailed):
        wrap(f, c).put("k", b"body", metadata={}, if_none_match=True)


def test_complete_that_landed_unseen_is_a_success() -> None:
    f, c = Flaky(), Clock()
    r = wrap(f, c)
    uid = r.create_multipart("k", metadata={})
    parts = [(1, r.upload_part("k", uid, 1, b"a" * 10)), (2, r.upload_part("k", uid, 2, b"b"))]
    f.land_then_fail = True
    etag = r.complete_multipart("k", uid, parts)
    assert etag.lower() == multipart_etag(parts)
    assert f.objects["k"][0] == b"a" * 10 + b"b"


def test_complete_of_an_unknown_upload_is_not_found() -> None:
    f, c = Flaky(), Clock()
    with pytest.raises(ObjectNotFound):
        wrap(f, c).complete_multipart("k", "nope", [(1, "0" * 32)])
    f.script = [TransientError("503")]
    f.objects["k"] = (b"old", {}, "OLD")  # the retry's 404 is not explained by our parts
    with pytest.raises(ObjectNotFound):
        wrap(f, c).complete_multipart("k", "nope", [(1, "0" * 32)])


def test_multipart_etag() -> None:
    a, b = hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()  # noqa: S324
    want = hashlib.md5(bytes.fromhex(a) + bytes.fromhex(b)).hexdigest() + "-2"  # noqa: S324
    assert multipart_etag([(1, f'"{a}"'), (2, b.upper())]) == want
    assert multipart_etag([(1, "not-hex")]) is None


# -- through the fault proxy, with the OSS peer ---------------------------------------------------

AK, SK, BUCKET = OSS_AK, OSS_SK, OSS_BUCKET


def stack(oss_proxy: FaultProxy, **kw: Any) -> RetryingTransport:
    oss = OssTransport(
        oss_proxy.endpoint,
        BUCKET,
        region="cn-hangzhou",
        credentials=OssCredentials(AK, SK),
        allow_insecure_http=True,
        connect_timeout=2.0,
        read_timeout=kw.pop("read_timeout", 2.0),
        request_timeout=kw.pop("request_timeout", 10.0),
    )
    policy = {"attempts": 5, "base_delay": 0.01, "max_delay": 0.05, "budget": 20.0}
    policy.update(kw)
    return RetryingTransport(oss, **policy)


@pytest.mark.parametrize(
    "fault",
    [
        Fault.error(503, "SlowDown"),
        Fault.error(500, "InternalError"),
        Fault.error(502, "BadGateway"),
        Fault.cut(after=3),
        Fault.cut(after=0),
        Fault.reset(),
    ],
    ids=lambda f: f"{f.kind}-{f.status}-{f.after}",
)
def test_recovers_from_bursts(oss_proxy: FaultProxy, fault: Fault) -> None:
    t = stack(oss_proxy)
    oss_proxy.queue(fault, fault, fault)
    t.put("burst/k", b"0123456789" * 10, metadata={"mode": "33188"})
    oss_proxy.queue(fault, fault, fault)
    assert t.get("burst/k", 10, 20) == (b"0123456789" * 10)[10:30], oss_proxy.log
    oss_proxy.queue(fault, fault)
    assert t.head("burst/k").metadata["mode"] == "33188"
    assert [kind for _, _, kind in oss_proxy.log].count("forward") == 3


def test_multipart_recovers_from_bursts(oss_proxy: FaultProxy) -> None:
    t = stack(oss_proxy)
    t.put("mp/src", b"s" * 200_000, metadata={})
    oss_proxy.queue(Fault.error(503, "SlowDown"))
    uid = t.create_multipart("mp/dst", metadata={"mode": "1"})
    oss_proxy.queue(Fault.cut(after=0), Fault.error(500, "InternalError"))
    e1 = t.upload_part_copy("mp/dst", uid, 1, "mp/src", 0, 150_000)
    oss_proxy.queue(Fault.reset())
    e2 = t.upload_part("mp/dst", uid, 2, b"tail")
    oss_proxy.queue(Fault.error(503, "SlowDown"))
    t.complete_multipart("mp/dst", uid, [(1, e1), (2, e2)])
    assert t.get("mp/dst", 149_998) == b"sstail"


def test_complete_whose_answer_is_cut_is_recognised(oss_proxy: FaultProxy) -> None:
    """The upstream completed the upload but the client never saw the answer."""
    t = stack(oss_proxy)
    uid = t.create_multipart("mp/cut", metadata={})
    e1 = t.upload_part("mp/cut", uid, 1, b"only part")
    oss_proxy.queue(Fault.cut(after=5))
    t.complete_multipart("mp/cut", uid, [(1, e1)])
    assert t.get("mp/cut") == b"only part"


def test_slow_answer_times_out_and_is_retried(oss_proxy: FaultProxy) -> None:
    t = stack(oss_proxy, read_timeout=0.3)
    t.put("slow/k", b"v", metadata={})
    oss_proxy.queue(Fault.slow(1.0))
    started = time.monotonic()
    assert t.get("slow/k") == b"v"
    assert time.monotonic() - started < 5


def test_persistent_throttling_fails_typed_and_bounded(oss_proxy: FaultProxy) -> None:
    t = stack(oss_proxy, attempts=4)
    oss_proxy.always = Fault.error(503, "SlowDown")
    started = time.monotonic()
    with pytest.raises(TransientError, match="503 SlowDown.*gave up after 4") as e:
        t.get("anything")
    assert e.value.errno == errno.EIO
    assert len(oss_proxy.log) == 4
    assert time.monotonic() - started < 5


def test_stalled_server_fails_typed_and_bounded(oss_proxy: FaultProxy) -> None:
    t = stack(oss_proxy, attempts=3, read_timeout=0.3)
    oss_proxy.always = Fault.stall()
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out") as e:
        t.head("anything")
    assert e.value.errno == errno.EIO
    assert time.monotonic() - started < 5


def test_trickling_body_hits_the_request_deadline(oss_proxy: FaultProxy) -> None:
    """Each byte arrives within the read timeout, but the whole answer takes too long."""
    t = stack(oss_proxy, attempts=2, read_timeout=1.0, request_timeout=0.5)
    oss_proxy.always = None
    t.put("trickle/k", b"x" * 64, metadata={})
    oss_proxy.always = Fault.trickle(0.05)
    started = time.monotonic()
    with pytest.raises(TransientError, match="too slow"):
        t.get("trickle/k")
    assert time.monotonic() - started < 5


def test_access_denied_is_not_retried_through_the_proxy(oss_proxy: FaultProxy) -> None:
    t = stack(oss_proxy)
    oss_proxy.queue(Fault.error(403, "AccessDenied"))
    with pytest.raises(AccessDenied):
        t.head("k")
    assert len(oss_proxy.log) == 1


class TestRetryingContract(TransportContract):
    """The wrapper is an ObjectTransport too: same contract, through a proxy that answers
    every tenth request with 503 SlowDown (also while 8 threads share it)."""

    part_size = 100 * 1024

    @pytest.fixture
    def make_transport(self, oss_proxy: FaultProxy) -> Any:
        oss_proxy.queue(*([None] * 9 + [Fault.error(503, "SlowDown")]) * 300)

        def make(max_body: int | None = None) -> RetryingTransport:
            t = stack(oss_proxy, attempts=8)
            if max_body is not None:
                t.inner.max_body = max_body
            return t

        return make
