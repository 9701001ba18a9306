"""Upload bodies sent as a view of the spool (``SpoolRange``, issue 10's write-path
memory): the view's file semantics, then the bytes that land in the store through the
real clients (oss2 against the signature-checking OSS peer, botocore against moto),
with 5xx bursts and cut connections on the part uploads (fault proxy) so every retry
must send the body again from its first byte.  The crypto layer's MAC would catch a
wrong byte only on a later read: here each uploaded object is compared byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from fuse_crypt.backend.retrying import RetryingTransport
from fuse_crypt.backend.s3 import S3Transport
from fuse_crypt.backend.transport import (
    SPOOL_PIECE,
    Body,
    SpoolRange,
    TransientError,
    body_md5_hex,
    rewind,
)
from tests.fuse_crypt.fake_transport import FakeTransport
from tests.fuse_crypt.test_backend_objectstore import FS, _init
from tests.fuse_crypt.test_objectstore_upload_stream import PartLog, _wait
from tests.fuse_crypt.test_retrying import stack
from tests.peers.fault_proxy import Fault, FaultProxy
from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY, MotoS3, moto_s3

MiB = 1 << 20


@pytest.fixture
def spool() -> Iterator[tuple[int, bytes]]:
    data = os.urandom(6 * MiB + 12345)
    fd = os.memfd_create("test-spool", os.MFD_CLOEXEC)
    os.pwrite(fd, data, 0)
    try:
        yield fd, data
    finally:
        os.close(fd)


# -- the view --------------------------------------------------------------------------------


def test_view_reads_seeks_and_never_leaves_its_range(spool: tuple[int, bytes]) -> None:
    fd, data = spool
    a, n = 1_000_003, 3 * MiB + 17
    v = SpoolRange(fd, a, n)
    assert len(v) == n and v.seekable() and v.readable() and not v.writable()
    assert v.read(10) == data[a : a + 10] and v.tell() == 10
    assert v.read(SPOOL_PIECE * 2 + 5) == data[a + 10 : a + 10 + SPOOL_PIECE * 2 + 5]
    v.seek(-7, os.SEEK_END)
    assert v.read(100) == data[a + n - 7 : a + n]  # clipped at the range's end
    assert v.read(1) == b"" and v.read() == b""
    v.seek(0)
    assert b"".join(v) == data[a : a + n]  # iteration, in pieces of at most SPOOL_PIECE
    v.seek(5)
    assert bytes(v) == data[a : a + n] and v.tell() == 5  # whole, position kept
    assert v.md5_hex() == hashlib.md5(data[a : a + n]).hexdigest() == body_md5_hex(v)
    assert v.tell() == 5
    buf = bytearray(9)
    assert v.readinto(buf) == 9 and bytes(buf) == data[a + 5 : a + 14]
    assert rewind(v) is v and v.tell() == 0
    v.seek(3, os.SEEK_CUR)
    assert v.read(2) == data[a + 3 : a + 5]
    with pytest.raises(ValueError):
        v.seek(-1)
    with pytest.raises(ValueError):
        SpoolRange(fd, -1, 5)
    assert rewind(bytearray(b"xy")) == b"xy" and type(rewind(bytearray(b"xy"))) is bytes
    c = v.capped(1000)  # short reads, from the range's start, for botocore
    assert c.tell() == 0 and len(c) == n and c.read(MiB) == data[a : a + 1000]
    assert bytes(c) == data[a : a + n] and c.md5_hex() == v.md5_hex()


def test_view_of_a_spool_cut_short_is_eio_never_zeros(spool: tuple[int, bytes]) -> None:
    fd, data = spool
    v = SpoolRange(fd, len(data) - 10, 20)  # 10 bytes past the spool's end
    with pytest.raises(OSError) as e:
        v.read()
    assert e.value.errno == errno.EIO


def test_view_reads_only_what_is_asked(
    spool: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of the view: a client reading it in 1 MiB pieces (botocore's hashing)
    or iterating it never brings more than that piece into memory, in one pread."""
    fd, data = spool
    sizes: list[int] = []
    real = os.pread

    def pread(f: int, n: int, off: int) -> bytes:
        sizes.append(n)
        return real(f, n, off)

    monkeypatch.setattr(os, "pread", pread)
    v = SpoolRange(fd, 0, len(data))
    while v.read(MiB):
        pass
    assert sizes and max(sizes) <= MiB and len(sizes) == -(-len(data) // MiB)
    sizes.clear()
    v.seek(0)
    assert sum(len(p) for p in v) == len(data)
    assert max(sizes) <= SPOOL_PIECE


# -- through the real clients, with faults on the wire -------------------------------------


_FAULTS = [
    Fault.error(503, "SlowDown"),
    Fault.error(500, "InternalError"),
    Fault.cut(after=0),
    Fault.reset(),
]


@pytest.mark.parametrize("fault", _FAULTS, ids=lambda f: f"{f.kind}-{f.status}")
def test_oss_part_retried_sends_the_spool_bytes(
    oss_proxy: FaultProxy, spool: tuple[int, bytes], fault: Fault
) -> None:
    fd, data = spool
    t = stack(oss_proxy)
    uid = t.create_multipart("sv/mp", metadata={})
    p1, p2 = SpoolRange(fd, 0, 5 * MiB), SpoolRange(fd, 5 * MiB, len(data) - 5 * MiB)
    oss_proxy.queue(fault, fault)  # the body is read (signed, sent) before each fault
    e1 = t.upload_part("sv/mp", uid, 1, p1)
    oss_proxy.queue(fault)
    e2 = t.upload_part("sv/mp", uid, 2, p2)
    assert e1.strip('"').lower() == hashlib.md5(data[: 5 * MiB]).hexdigest()
    t.complete_multipart("sv/mp", uid, [(1, e1), (2, e2)])
    assert t.get("sv/mp") == data
    kinds = [k for _, _, k in oss_proxy.log]
    assert kinds.count(fault.kind) == 3, kinds


def test_oss_put_of_a_view_retried(oss_proxy: FaultProxy, spool: tuple[int, bytes]) -> None:
    fd, data = spool
    t = stack(oss_proxy)
    oss_proxy.queue(Fault.error(503, "SlowDown"), Fault.cut(after=0))
    etag = t.put("sv/put", SpoolRange(fd, 7, 2 * MiB), metadata={"mode": "33188"})
    assert etag.strip('"').lower() == hashlib.md5(data[7 : 7 + 2 * MiB]).hexdigest()
    assert t.get("sv/put") == data[7 : 7 + 2 * MiB]


def test_oss_create_only_put_of_a_view_that_landed_unseen(
    oss_proxy: FaultProxy, spool: tuple[int, bytes]
) -> None:
    """The retry meets its own object: recognised by the view's MD5, read in pieces."""
    fd, _ = spool
    t = stack(oss_proxy)
    oss_proxy.queue(Fault.cut(after=5))  # forwarded (stored), the answer cut
    t.put("sv/excl", SpoolRange(fd, 0, MiB + 1), metadata={"mode": "1"}, if_none_match=True)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


#: Not ``cut`` here: an UploadPart answer has no body, so the proxy cuts its head in
#: half, and S3Transport takes a head without its ETag for a bad answer (not retried);
#: OssTransport checks the parser's defects and retries it (test above).
_S3_FAULTS = [f for f in _FAULTS if f.kind != "cut"]


@pytest.mark.parametrize("fault", _S3_FAULTS, ids=lambda f: f"{f.kind}-{f.status}")
def test_s3_part_retried_sends_the_spool_bytes(
    moto: MotoS3, spool: tuple[int, bytes], fault: Fault
) -> None:
    """botocore signs the payload (SHA-256 over plain http) by reading the view, seeks
    back, sends it; on a 5xx its own retry and then the wrapper's rewind it."""
    fd, data = spool
    bucket = moto.new_bucket("spoolview")
    with FaultProxy(("127.0.0.1", moto.port)) as proxy:
        s3 = S3Transport(
            bucket,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_url=proxy.endpoint,
            allow_insecure_http=True,
            max_attempts=1,  # the wrapper's retries only: each one must rewind
            read_timeout=5.0,
        )
        t = RetryingTransport(s3, attempts=5, base_delay=0.01, max_delay=0.05)
        uid = t.create_multipart("sv/mp", metadata={})
        proxy.queue(fault, fault)
        e1 = t.upload_part("sv/mp", uid, 1, SpoolRange(fd, 0, 5 * MiB))
        proxy.queue(fault)
        e2 = t.upload_part("sv/mp", uid, 2, SpoolRange(fd, 5 * MiB, len(data) - 5 * MiB))
        t.complete_multipart("sv/mp", uid, [(1, e1), (2, e2)])
        proxy.queue(fault)
        t.put("sv/put", SpoolRange(fd, 3, 3 * MiB), metadata={})
        kinds = [k for _, _, k in proxy.log]
        assert kinds.count(fault.kind) == 4, kinds
    direct = moto.client()
    got = direct.get_object(Bucket=bucket, Key="sv/mp")["Body"].read()
    assert got == data
    assert direct.get_object(Bucket=bucket, Key="sv/put")["Body"].read() == data[3 : 3 + 3 * MiB]


# -- which uploads are views (in-process, over the strict fake) -----------------------------


class BodyLog(FakeTransport):
    """The strict fake, recording each upload body's kind and length."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[tuple[str, str, int]] = []

    def put(self, key: str, body: Body, **kw: Any) -> str:
        self.bodies.append(("put", type(body).__name__, len(body)))
        return super().put(key, body, **kw)

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        self.bodies.append(("part", type(body).__name__, len(body)))
        return super().upload_part(key, upload_id, part_number, body)


def _big(log: BodyLog, op: str) -> list[str]:
    return [kind for o, kind, n in log.bodies if o == op and n >= MiB]


def test_single_put_and_fsync_time_parts_are_views() -> None:
    """Not only the streamed parts: a single PUT of a sequentially written file and the
    parts an overwrite uploads at fsync (no stream: it does not start at offset 0) go
    as views; ranges mixing the spool with the published object stay composed bytes.
    Read back through a fresh backend (MAC-checked), byte for byte."""
    t = BodyLog()
    _init(t)
    fs = FS(t, part_size=5 * MiB, multipart_threshold=6 * MiB)
    small = os.urandom(3 * MiB)
    fs.write("/small", small)
    assert _big(t, "put") == ["SpoolRange"], t.bodies
    data = bytearray(os.urandom(20 * MiB))
    fs.write("/f", bytes(data))
    t.bodies.clear()
    fh = fs.ops.open("/f", os.O_WRONLY)
    new = os.urandom(12 * MiB)
    for off in range(0, len(new), MiB):  # plaintext [4, 16) MiB: parts 2 and 3 whole
        fs.ops.write("/f", new[off : off + MiB], 4 * MiB + off, fh)
    fs.ops.fsync("/f", 0, fh)
    fs.ops.release("/f", fh)
    data[4 * MiB : 16 * MiB] = new
    parts = _big(t, "part")
    assert parts.count("SpoolRange") >= 2 and "bytes" in parts, t.bodies
    fs.close()
    fresh = FS(t)
    assert fresh.read("/f") == bytes(data)
    assert fresh.read("/small") == small
    fresh.close()


class RefusesPart1(PartLog):
    """Part 1 is held on the wire (``gate[1]``), then refused, as S3 refuses a body whose
    bytes changed between signing and sending (XAmzContentSHA256Mismatch)."""

    refused = False

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        ev = self.gate.get(part_number)
        if part_number == 1 and ev is not None and not self.refused:
            self.refused = True
            assert ev.wait(20), "gate never opened"
            raise TransientError("upload_part: HTTP 400 XAmzContentSHA256Mismatch")
        return super().upload_part(key, upload_id, part_number, body)


def test_part_rewritten_while_sent_and_refused_is_only_stale() -> None:
    """The view is read while it is sent, so a writer changing the part meanwhile can
    make the store refuse it: that part is re-sent at fsync, the stream is kept (no
    second CreateMultipartUpload, no whole upload), and the object is what was written."""
    t = RefusesPart1()
    _init(t)
    fs = FS(t, part_size=5 * MiB, multipart_threshold=6 * MiB)
    t.gate[1] = threading.Event()
    data = bytearray(os.urandom(20 * MiB))
    fh = fs.ops.create("/f", 0o644)
    for off in range(0, len(data), MiB):
        fs.ops.write("/f", bytes(data[off : off + MiB]), off, fh)
    _wait(lambda: t.counts["upload_part"] >= 1, "parts on the wire")
    fs.ops.write("/f", b"LATE", 4096, fh)  # into part 1, held on the wire
    data[4096:4100] = b"LATE"
    t.gate[1].set()
    fs.ops.fsync("/f", 0, fh)
    fs.ops.release("/f", fh)
    # one PUT: the empty object of the create; one CreateMultipartUpload: the stream
    assert t.counts["create_multipart"] == 1 and t.counts["put"] == 1, t.counts
    assert t.parts.count(1) == 1, t.parts  # the refused one never reached the store
    assert FS(t).read("/f") == bytes(data)
    assert not t.uploads
    fs.close()
