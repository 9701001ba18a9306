"""Streaming GETs for sequential readers (issue 10), in-process over the strict fake.

A sequential reader of a multi-chunk file is served by one open GET instead of one
ranged GET per chunk; random, backwards and interleaved readers, streams that break
mid-body and tampered objects still read correct bytes (or EIO), never short or wrong
ones.  The real wire (moto, a cut connection) is in test_s3_transport.py.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fuse_crypt.backend.objectstore import _STREAMS_MAX
from fuse_crypt.backend.retrying import RetryingTransport
from fuse_crypt.backend.transport import BadResponse, TransientError
from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN
from fuse_crypt.nametransform import DIRIV_NAME, NameTransform
from tests.fuse_crypt.fake_transport import FakeTransport
from tests.fuse_crypt.test_backend_objectstore import FS, PRE, MiB, _init
from tests.fuse_crypt.test_retrying import stack
from tests.peers.fault_proxy import Fault, FaultProxy
from tests.peers.moto_s3 import MotoS3, moto_s3


@pytest.fixture
def t() -> FakeTransport:
    t = FakeTransport()
    _init(t)
    return t


def _ranged_gets(t: FakeTransport) -> list[int]:
    return [n for op, _, n in t.log if op == "get"]


def test_sequential_read_is_one_stream(t: FakeTransport) -> None:
    data = os.urandom(20 * MiB)
    FS(t).write("/seq", data)
    cold = FS(t)
    t.reset_counts()
    assert cold.read("/seq") == data
    assert t.counts["stream"] == 1, t.log
    assert _ranged_gets(t) == [], t.log  # not one GET per chunk
    assert cold.backend.cache_bytes_used() <= cold.backend.cache_bytes
    cold.close()
    assert not cold.backend._streams  # closed at the end of the object / unmount


def test_reader_starting_mid_file_streams_from_its_second_chunk(t: FakeTransport) -> None:
    data = os.urandom(28 * MiB)
    FS(t).write("/m", data)
    cold = FS(t)
    fh = cold.ops.open("/m", os.O_RDONLY)
    cold.ops.read(None, 1, 0, fh)
    t.reset_counts()
    off = 14 * MiB  # chunk 3: past where the stream opened by the first read stands
    while off < len(data):
        assert cold.ops.read(None, MiB, off, fh) == data[off : off + MiB]
        off += MiB
    # The first chunk has no predecessor in the cache: a ranged GET; then one stream.
    assert t.counts["stream"] == 1 and len(_ranged_gets(t)) == 1, t.log
    cold.ops.release(None, fh)
    cold.close()


def test_one_chunk_file_is_a_ranged_get_not_a_stream(t: FakeTransport) -> None:
    data = os.urandom(100_000)
    FS(t).write("/small", data)
    cold = FS(t)
    t.reset_counts()
    assert cold.read("/small") == data
    assert t.counts["stream"] == 0 and t.counts["get"] >= 1, t.log
    cold.close()


def test_sequential_read_through_the_retrying_wrapper_streams(t: FakeTransport) -> None:
    data = os.urandom(12 * MiB)
    FS(t).write("/seq", data)
    cold = FS(RetryingTransport(t))  # type: ignore[arg-type]
    t.reset_counts()
    assert cold.read("/seq") == data
    assert t.counts["stream"] == 1 and _ranged_gets(t) == [], t.log
    cold.close()


def test_random_read_is_still_one_small_get(t: FakeTransport) -> None:
    data = os.urandom(8 * MiB)
    FS(t).write("/big", data)
    cold = FS(t)
    fh = cold.ops.open("/big", os.O_RDONLY)
    cold.ops.read(None, 1, 4096 * 7, fh)
    rnd = random.Random(2)
    for _ in range(10):
        off = rnd.randrange(0, len(data) - 4096)
        t.reset_counts()
        assert cold.ops.read(None, 4096, off, fh) == data[off : off + 4096]
        assert t.counts["get"] == 1 and sum(t.counts.values()) == 1, t.log
        assert t.log[0][2] <= 2 * CIPHER_BS
    cold.ops.release(None, fh)
    cold.close()


def test_backwards_and_interleaved_readers_read_correct_bytes(t: FakeTransport) -> None:
    data = os.urandom(24 * MiB)
    other = os.urandom(10 * MiB)
    w = FS(t)
    w.write("/a", data)
    w.write("/b", other)
    cold = FS(t)
    fa = cold.ops.open("/a", os.O_RDONLY)
    fb = cold.ops.open("/b", os.O_RDONLY)
    step = 1 * MiB
    # Two sequential readers of one file and one of another, interleaved, plus a
    # reader going backwards through the first file chunk by chunk.
    pa, pa2, pb = 0, 12 * MiB, 0
    back = len(data) - step
    while pa < 12 * MiB or pb < len(other) or back >= 0:
        if pa < 12 * MiB:
            assert cold.ops.read(None, step, pa, fa) == data[pa : pa + step]
            pa += step
        if pa2 < len(data):
            assert cold.ops.read(None, step, pa2, fa) == data[pa2 : pa2 + step]
            pa2 += step
        if pb < len(other):
            assert cold.ops.read(None, step, pb, fb) == other[pb : pb + step]
            pb += step
        if back >= 0:
            assert cold.ops.read(None, step, back, fa) == data[back : back + step]
            back -= 4 * step
    assert len(cold.backend._streams) <= _STREAMS_MAX
    cold.ops.release(None, fa)
    cold.ops.release(None, fb)
    assert not cold.backend._streams  # closed at release
    cold.close()


@pytest.mark.parametrize("fail", ["stream_read", "stream"])
def test_broken_stream_falls_back_to_ranged_gets(t: FakeTransport, fail: str) -> None:
    data = os.urandom(16 * MiB)
    FS(t).write("/f", data)
    cold = FS(t)
    t.reset_counts()
    t.fail_next(fail, exc=lambda: TransientError("connection reset"))
    assert cold.read("/f") == data
    assert _ranged_gets(t), t.log  # the broken chunk came by a ranged GET
    cold.close()


def test_object_shorter_than_head_said_is_eio_not_zeros(t: FakeTransport) -> None:
    # HEAD (at open) said 9 MiB; the store then serves a cut body: the stream cannot
    # open for the promised range, the fallback GET is short, and the read is EIO.
    data = os.urandom(9 * MiB)
    fs = FS(t)
    fs.write("/s", data)
    key = PRE + fs.cpath("/s")
    cold = FS(t)
    fh = cold.ops.open("/s", os.O_RDONLY)
    o = t.objects[key]
    o.body = o.body[: HEADER_LEN + 5 * MiB]
    with pytest.raises(OSError) as ei:
        off = 0
        while off < len(data):
            assert cold.ops.read(None, MiB, off, fh) == data[off : off + MiB]
            off += MiB
    assert ei.value.errno == errno.EIO
    cold.ops.release(None, fh)
    cold.close()


@pytest.mark.parametrize("where", [100, 6 * MiB])
def test_tampered_object_read_by_stream_is_eio(t: FakeTransport, where: int) -> None:
    data = os.urandom(10 * MiB)
    fs = FS(t)
    fs.write("/a", data)
    ka = PRE + fs.cpath("/a")
    body = bytearray(t.body(ka))
    body[HEADER_LEN + where] ^= 1
    t.put_raw(ka, bytes(body), t.objects[ka].metadata)
    cold = FS(t)
    t.reset_counts()
    with pytest.raises(OSError) as ei:
        cold.read("/a")
    assert ei.value.errno == errno.EIO
    assert t.counts["stream"] == 1
    cold.close()


# -- over the wire: the OSS peer behind the fault proxy ---------------------------------------


def _gets(log: list[tuple[str, str, str]]) -> list[str]:
    return [kind for method, _, kind in log if method == "GET"]


@pytest.mark.parametrize("cut", [None, 0, 3 * MiB + 17, 7 * MiB + 5])  # 7 MiB: mid-pipeline
def test_stream_over_the_wire_and_cut_mid_body(oss_proxy: FaultProxy, cut: int | None) -> None:
    t = stack(oss_proxy)
    t.put(PRE + DIRIV_NAME, NameTransform.new_dir_iv(), metadata={"mode": "33060"})
    data = os.urandom(10 * MiB)
    FS(t).write("/f", data)  # type: ignore[arg-type]
    cold = FS(stack(oss_proxy))  # type: ignore[arg-type]
    fh = cold.ops.open("/f", os.O_RDONLY)
    n = len(oss_proxy.log)
    if cut is not None:
        oss_proxy.queue(Fault.cut(after=cut))  # the stream's GET is the next request
    out = b""
    while len(out) < len(data):
        piece = cold.ops.read(None, MiB, len(out), fh)
        assert piece
        out += piece
    assert out == data
    gets = _gets(oss_proxy.log[n:])
    if cut is None:
        assert gets == ["forward"], gets  # one GET for the whole file
    else:
        assert gets[0] == "cut" and len(gets) >= 2, gets  # fell back, right bytes
    cold.ops.release(None, fh)
    assert not cold.backend._streams
    cold.close()


# -- S3 over moto: the stream's answer is checked like get_buffer's -------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


@pytest.mark.parametrize(
    "bend",
    [
        lambda r: r.update(ContentRange="bytes 1-9999/10000"),  # another range
        lambda r: r.update(ContentRange=None),  # a 200 with the whole object
        lambda r: r.update(ContentLength=r["ContentLength"] + 1),
    ],
    ids=["range", "no-range", "length"],
)
def test_s3_stream_answer_must_match_the_request(
    moto: MotoS3, bend: Callable[[dict[str, Any]], None]
) -> None:
    t = moto.transport(moto.new_bucket("streams"))
    data = os.urandom(10000)
    t.put("k", data, metadata={})
    s = t.open_stream("k", 10, 10000)
    assert s.read_exact(90) == data[10:100]
    s.close()
    real = t._call
    bodies: list[Any] = []

    def bent(op: str, **kw: Any) -> Any:
        r = dict(real(op, **kw))
        bodies.append(r["Body"])
        bend(r)
        return r

    t._call = bent  # type: ignore[method-assign]
    with pytest.raises(BadResponse):
        t.open_stream("k", 10, 10000)
    assert bodies and bodies[0]._raw_stream.closed  # the connection was dropped
