"""Streaming multipart uploads of sequential writes (issue 10).

Once a file's spool holds one written range from offset 0 past the multipart threshold,
its complete parts are uploaded in the background while the writer goes on, so fsync /
close only send the tail and CompleteMultipartUpload.  What must not change: the object
is replaced only by Complete; a part written again after it was sent is sent again;
truncate, unlink, rename and unmount never complete stale data and leave no multipart
upload behind; a failed part falls back to the whole upload at fsync (EIO and retry
semantics unchanged); small and random-written files keep the upload at close.

In-process over the strict fake (request counts, part numbers), over the OSS peer behind
the fault proxy (bursts and cut connections during a streamed part), and through a real
FUSE mount over moto (parts visible in the bucket before fsync, content read back through
coco-csi and through s3fs+gocryptfs).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_crypt.backend.transport import AccessDenied, TransientError
from fuse_crypt.nametransform import DIRIV_NAME, NameTransform
from tests.fuse_crypt.conftest import fuse_available
from tests.fuse_crypt.fake_transport import FakeTransport
from tests.fuse_crypt.objectstore_helpers import (
    have_s3fs_gocryptfs,
    mount_ours,
    mount_theirs,
    new_s3vol,
)
from tests.fuse_crypt.test_backend_objectstore import FS, PRE, MiB, _init
from tests.fuse_crypt.test_retrying import stack
from tests.peers.fault_proxy import Fault, FaultProxy
from tests.peers.moto_s3 import MotoS3, moto_s3
from tests.peers.oss_server import OssServer

#: Small sizes so a few MiB exercise many parts (5 MiB is S3's minimum part).
SIZES = {"part_size": 5 * MiB, "multipart_threshold": 6 * MiB}


class PartLog(FakeTransport):
    """The strict fake, recording part numbers; ``gate[n]`` holds part ``n`` until set."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[int] = []
        self.gate: dict[int, threading.Event] = {}

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes) -> str:
        ev = self.gate.get(part_number)
        if ev is not None:
            assert ev.wait(20), "gate never opened"
        with self._lock:
            self.parts.append(part_number)
        return super().upload_part(key, upload_id, part_number, body)


@pytest.fixture
def t() -> PartLog:
    t = PartLog()
    _init(t)
    return t


def _wait(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _write_seq(fs: FS, path: str, data: bytes, fh: int | None = None, start: int = 0) -> int:
    """Write ``data`` at ``start`` in 1 MiB pieces, as a sequential writer through FUSE."""
    if fh is None:
        fh = fs.ops.create(path, 0o644)
    for off in range(0, len(data), MiB):
        fs.ops.write(path, data[off : off + MiB], start + off, fh)
    return fh


def _streamed(t: FakeTransport) -> int:
    with t._lock:
        return t.counts["upload_part"]


def test_parts_are_uploaded_before_fsync(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    data = os.urandom(20 * MiB)  # ~20.2 MiB of ciphertext: 4 whole parts and a tail
    t.reset_counts()
    fh = _write_seq(fs, "/big", data)
    _wait(lambda: _streamed(t) == 4, "4 parts streamed before fsync")
    assert t.counts["complete_multipart"] == 0 and t.counts["put"] == 1  # the create only
    key = PRE + fs.cpath("/big")
    assert t.body(key) == b""  # nothing visible before Complete
    fs.ops.fsync("/big", 0, fh)
    assert sorted(t.parts) == [1, 2, 3, 4, 5]  # only the tail was left for fsync
    assert t.counts["create_multipart"] == 1 and t.counts["complete_multipart"] == 1
    assert not t.uploads
    fs.ops.release("/big", fh)
    assert t.counts["upload_part"] == 5  # release after fsync: nothing more to send
    assert FS(t).read("/big") == data
    fs.close()


def test_release_without_fsync_publishes_the_stream(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    data = os.urandom(16 * MiB)
    fh = _write_seq(fs, "/r", data)
    fs.ops.release("/r", fh)
    assert t.counts["complete_multipart"] == 1 and not t.uploads
    assert FS(t).read("/r") == data
    fs.close()


def test_rewrite_of_a_sent_part_sends_it_again(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    data = bytearray(os.urandom(20 * MiB))
    fh = _write_seq(fs, "/w", bytes(data))
    _wait(lambda: 1 in t.parts, "part 1 streamed")
    fs.ops.write("/w", b"REWRITTEN", 100, fh)  # inside part 1, already sent
    data[100:109] = b"REWRITTEN"
    fs.ops.release("/w", fh)
    assert t.parts.count(1) == 2, t.parts
    assert FS(t).read("/w") == bytes(data)
    assert not t.uploads
    fs.close()


def test_write_into_a_part_in_flight_is_not_lost(t: PartLog) -> None:
    """Part 1 is read from the spool, then held on the wire while the writer changes it:
    its answer must not be used."""
    fs = FS(t, **SIZES)
    t.gate[1] = threading.Event()
    data = bytearray(os.urandom(20 * MiB))
    fh = _write_seq(fs, "/f", bytes(data))
    _wait(lambda: t.counts["upload_part"] >= 1, "part 1 on the wire")
    fs.ops.write("/f", b"LATE", 4096, fh)
    data[4096:4100] = b"LATE"
    t.gate[1].set()
    fs.ops.release("/f", fh)
    assert t.parts.count(1) == 2, t.parts
    assert FS(t).read("/f") == bytes(data)
    fs.close()


def test_unlink_mid_write_aborts_and_completes_nothing(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    fh = _write_seq(fs, "/u", os.urandom(20 * MiB))
    _wait(lambda: _streamed(t) >= 2, "parts streamed")
    fs.ops.unlink("/u")
    fs.ops.write("/u", b"after unlink", 0, fh)
    fs.ops.release("/u", fh)
    _wait(lambda: not t.uploads, "the upload aborted")
    assert t.counts["complete_multipart"] == 0 and t.counts["abort_multipart"] == 1
    assert PRE + fs.cpath("/u") not in t.objects
    fs.close()


def test_a_failed_abort_is_retried_in_the_background(t: PartLog) -> None:
    """An abandoned upload whose abort fails is not left to cost the tenant storage: the
    background retry aborts it once the store answers again."""
    fs = FS(t, **SIZES)
    fh = _write_seq(fs, "/o", os.urandom(20 * MiB))
    _wait(lambda: _streamed(t) >= 2, "parts streamed")
    t.fail_next("abort_multipart", 2)
    fs.ops.unlink("/o")
    fs.ops.release("/o", fh)
    _wait(lambda: not t.uploads, "the orphaned upload aborted")
    assert t.counts["abort_multipart"] == 3 and t.counts["complete_multipart"] == 0
    fs.close()


def test_a_failed_abort_gets_a_last_try_at_unmount(t: PartLog) -> None:
    """Unmount with a file still streaming drops its upload; an abort that fails then gets
    one more try before the daemon exits."""
    fs = FS(t, **SIZES)
    _write_seq(fs, "/o", os.urandom(20 * MiB))
    _wait(lambda: _streamed(t) >= 2, "parts streamed")
    t.fail_next("abort_multipart", 1, exc=lambda: AccessDenied("injected 403"))
    fs.backend.destroy()  # never released: what a forced unmount does to the backend
    assert not t.uploads and t.counts["abort_multipart"] == 2
    assert t.counts["complete_multipart"] == 0


def test_truncate_mid_write_drops_the_stream(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    data = os.urandom(20 * MiB)
    fh = _write_seq(fs, "/t", data)
    _wait(lambda: _streamed(t) >= 2, "parts streamed")
    fs.ops.truncate("/t", 8 * MiB, fh)
    more = os.urandom(12 * MiB)
    _write_seq(fs, "/t", more, fh, start=8 * MiB)
    fs.ops.release("/t", fh)
    assert FS(t).read("/t") == data[: 8 * MiB] + more
    assert t.counts["complete_multipart"] == 1 and not t.uploads
    fs.close()


def test_truncate_below_the_threshold_uploads_with_one_put(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    data = os.urandom(12 * MiB)
    fh = _write_seq(fs, "/s", data)
    _wait(lambda: _streamed(t) >= 1, "a part streamed")
    fs.ops.truncate("/s", 3 * MiB, fh)
    fs.ops.release("/s", fh)
    assert FS(t).read("/s") == data[: 3 * MiB]
    assert t.counts["complete_multipart"] == 0 and not t.uploads
    fs.close()


def test_rename_of_the_open_file_mid_write(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    first, second = os.urandom(12 * MiB), os.urandom(8 * MiB)
    fh = _write_seq(fs, "/a", first)
    _wait(lambda: _streamed(t) >= 1, "a part streamed")
    fs.ops.rename("/a", "/b")  # publishes what was written under the old name, then moves
    _write_seq(fs, "/b", second, fh, start=len(first))
    fs.ops.release("/b", fh)
    assert FS(t).read("/b") == first + second
    assert PRE + fs.cpath("/a") not in t.objects and not t.uploads
    fs.close()


def test_failed_streamed_part_falls_back_at_fsync(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    t.fail_next("upload_part", 1)  # the first streamed part; no retry layer here
    data = os.urandom(20 * MiB)
    fh = _write_seq(fs, "/x", data)
    fs.ops.fsync("/x", 0, fh)  # the stream is aborted, the file uploaded whole
    assert t.counts["create_multipart"] == 2 and t.counts["abort_multipart"] == 1
    assert t.counts["complete_multipart"] == 1 and not t.uploads
    fs.ops.release("/x", fh)
    assert FS(t).read("/x") == data
    fs.close()


def test_failed_complete_is_eio_keeps_old_version_and_retries(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    old = os.urandom(12 * MiB)
    fs.write("/o", old)
    key = PRE + fs.cpath("/o")
    before = t.body(key)
    new = os.urandom(20 * MiB)
    fh = fs.ops.open("/o", os.O_RDWR)
    _write_seq(fs, "/o", new, fh)
    _wait(lambda: _streamed(t) >= 4, "parts streamed")
    t.fail_next("complete_multipart", 1, lambda: TransientError("cut"))
    with pytest.raises(OSError) as ei:
        fs.ops.fsync("/o", 0, fh)
    assert ei.value.errno == errno.EIO
    assert t.body(key) == before and not t.uploads  # aborted, old version intact
    fs.ops.fsync("/o", 0, fh)  # spool kept: the retry publishes it whole
    fs.ops.release("/o", fh)
    assert FS(t).read("/o") == new
    fs.close()


def test_unmount_with_an_open_streaming_file_leaves_no_upload(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    _write_seq(fs, "/open", os.urandom(20 * MiB))
    _wait(lambda: _streamed(t) >= 2, "parts streamed")
    fs.backend.destroy()  # never released: what a forced unmount does to the backend
    assert not t.uploads and t.counts["complete_multipart"] == 0


def test_small_and_random_written_files_keep_the_upload_at_close(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    t.reset_counts()
    fh = _write_seq(fs, "/small", os.urandom(5 * MiB))
    time.sleep(0.2)
    assert t.counts["create_multipart"] == 0
    fs.ops.release("/small", fh)
    assert t.counts["put"] == 2, t.counts  # the create, then the body
    assert not {"create_multipart", "upload_part"} & set(t.counts), t.counts
    # Written back to front: never one range from offset 0 until the last write.
    data = os.urandom(20 * MiB)
    fh = fs.ops.create("/rand", 0o644)
    for off in reversed(range(0, len(data), MiB)):
        fs.ops.write("/rand", data[off : off + MiB], off, fh)
        if off:
            assert t.counts["create_multipart"] == 0
    fs.ops.release("/rand", fh)
    assert FS(t).read("/rand") == data and not t.uploads
    fs.close()


def test_chmod_during_the_stream_is_honoured(t: PartLog) -> None:
    fs = FS(t, **SIZES)
    fh = _write_seq(fs, "/c", os.urandom(12 * MiB))
    _wait(lambda: _streamed(t) >= 1, "a part streamed")
    fs.ops.chmod("/c", 0o600)
    fs.ops.release("/c", fh)
    assert FS(t).ops.getattr("/c")["st_mode"] & 0o777 == 0o600
    fs.close()


# -- over the wire: the OSS peer behind the fault proxy ---------------------------------


@pytest.mark.parametrize(
    "fault,n",
    [(Fault.error(503, "SlowDown"), 3), (Fault.cut(after=0), 3), (Fault.reset(), 12)],
    ids=["5xx-burst", "cut", "reset-past-retries"],
)
def test_faults_during_a_streamed_part(
    oss_peer: OssServer, oss_proxy: FaultProxy, fault: Fault, n: int
) -> None:
    t = stack(oss_proxy, attempts=3)
    t.put(PRE + DIRIV_NAME, NameTransform.new_dir_iv(), metadata={"mode": "33060"})
    fs = FS(t, **SIZES)  # type: ignore[arg-type]
    data = os.urandom(20 * MiB)
    fh = fs.ops.create("/f", 0o644)
    _write_seq(fs, "/f", data[: 6 * MiB], fh)  # below the threshold: nothing sent yet
    sent = len(oss_proxy.log)
    oss_proxy.queue(None, *[fault] * n)  # CreateMultipartUpload passes, then the parts
    _write_seq(fs, "/f", data[6 * MiB :], fh, start=6 * MiB)
    _wait(lambda: any(k != "forward" for _, _, k in oss_proxy.log[sent:]), "faults hit")
    for attempt in range(5):
        try:
            fs.ops.fsync("/f", 0, fh)
            break
        except OSError as e:
            assert e.errno == errno.EIO and attempt < 4
    fs.ops.release("/f", fh)
    assert FS(stack(oss_proxy)).read("/f") == data  # type: ignore[arg-type]
    hit = [(m, k) for m, _, k in oss_proxy.log[sent:] if k != "forward"]
    # the faults hit streamed parts, and perhaps the abort of the abandoned stream
    assert hit and all(m in ("PUT", "DELETE") for m, _ in hit), hit
    assert any(m == "PUT" for m, _ in hit), hit
    oss_proxy.reset()  # the outage ends: an abort that failed in it is retried
    fs.close()
    assert not oss_peer.state.uploads, "a multipart upload was left behind"


# -- a real FUSE mount over moto ------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


_no_fuse = fuse_available()


@pytest.mark.skipif(_no_fuse is not None, reason=str(_no_fuse))
def test_mount_streams_parts_before_fsync(moto: MotoS3, tmp_path: Path) -> None:
    vol = new_s3vol(moto, tmp_path)
    c = moto.client()
    data = os.urandom(40 * MiB)  # default sizes: 8 MiB parts past 16 MiB
    with mount_ours(vol, tmp_path / "m") as m:
        fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            for off in range(0, len(data), MiB):
                os.write(fd, data[off : off + MiB])

            def parts() -> int:
                ups = c.list_multipart_uploads(Bucket=vol.bucket).get("Uploads", [])
                return sum(
                    len(
                        c.list_parts(Bucket=vol.bucket, Key=u["Key"], UploadId=u["UploadId"]).get(
                            "Parts", []
                        )
                    )
                    for u in ups
                )

            _wait(lambda: parts() >= 4, "parts in the bucket before fsync", timeout=60)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert not c.list_multipart_uploads(Bucket=vol.bucket).get("Uploads")
    with mount_ours(vol, tmp_path / "again") as m:
        assert (m / "big").read_bytes() == data
    why = have_s3fs_gocryptfs()
    if why is None:
        with mount_theirs(vol, tmp_path / "theirs") as plain:
            assert (plain / "big").read_bytes() == data
    else:
        pytest.xfail(f"coco-csi read back; the s3fs+gocryptfs read was not run: {why}")
