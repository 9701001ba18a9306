"""NodeGetVolumeStats' BYTES used while a file's parts are being streamed (issue 10): the
daemon's own in-flight multipart upload is counted exactly once.

Why this is pinned: ``usage()`` reports ``pending`` = how far open dirty files have grown
past what the listing saw, from the file's size (its spool).  A streamed part is a copy of
spool bytes sent ahead of Complete, so those bytes are already inside ``pending``; adding
the parts again would count them twice, and leaving ``pending`` out would count them not
at all.  In process, over the strict fake (which keeps a started upload's parts apart from
the objects, as S3 and OSS do), with the part size small enough that 20 MiB streams four
parts before fsync.
"""

from __future__ import annotations

import os

from tests.fuse_crypt.test_backend_objectstore import FS, PRE, _init
from tests.fuse_crypt.test_objectstore_upload_stream import (
    SIZES,
    PartLog,
    _streamed,
    _wait,
    _write_seq,
)


def _listed(t: PartLog) -> tuple[int, int]:
    with t._lock:
        sizes = [len(o.body) for k, o in t.objects.items() if k.startswith(PRE)]
    return sum(sizes), len(sizes)


def _in_parts(t: PartLog) -> int:
    with t._lock:
        return sum(len(b) for _, parts, *_ in t.uploads.values() for b in parts.values())


def test_streamed_parts_are_counted_once_in_pending() -> None:
    t = PartLog()
    _init(t)
    fs = FS(t, **SIZES)
    try:
        data = os.urandom(20 * 1024 * 1024)
        fh = _write_seq(fs, "/big", data)
        # The fake counts a part when its request starts and stores it a moment later:
        # wait for the stored bytes (waiting on the count once read 3 parts' bytes in CI).
        part = SIZES["part_size"]
        _wait(lambda: _in_parts(t) == 4 * part, "4 parts stored before fsync")
        sent = _in_parts(t)  # sent, but part of no object yet
        assert _streamed(t) == 4  # the tail waits for fsync
        stored, objects, pending = fs.backend.usage()
        assert (stored, objects) == _listed(t)  # the listing never shows upload parts
        fs.ops.fsync("/big", 0, fh)
        fs.ops.release("/big", fh)
        after = fs.backend.usage()
        key = PRE + fs.cpath("/big")
        size = len(t.body(key))
        # The whole file was pending once: its bytes in parts were neither added again
        # nor left out; once Complete published it, the listing holds exactly that.
        assert pending == size and sent < size  # not size + sent, not size - sent
        assert after == (stored + size, objects, 0)
    finally:
        fs.close()
