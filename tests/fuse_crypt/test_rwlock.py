"""RWLock: readers share, a writer excludes everyone, a waiting writer gets in."""

from __future__ import annotations

import threading
import time

from fuse_crypt.fusefrontend.rwlock import RWLock


def _started(target: object) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


def test_readers_share_and_writer_waits_for_them() -> None:
    lk = RWLock()
    lk.acquire_read()
    lk.acquire_read()  # a second reader does not block
    got = threading.Event()

    def writer() -> None:
        lk.acquire_write()
        got.set()
        lk.release_write()

    t = _started(writer)
    assert not got.wait(0.1)
    lk.release_read()
    assert not got.wait(0.1)
    lk.release_read()
    assert got.wait(5)
    t.join(5)


def test_writer_excludes_readers_and_is_preferred() -> None:
    lk = RWLock()
    lk.acquire_write()
    order: list[str] = []

    def reader() -> None:
        lk.acquire_read()
        order.append("r")
        lk.release_read()

    def writer() -> None:
        lk.acquire_write()
        order.append("w")
        time.sleep(0.05)
        lk.release_write()

    tw = _started(writer)
    time.sleep(0.05)  # the second writer is now waiting
    tr = _started(reader)
    time.sleep(0.05)
    assert order == []
    lk.release_write()
    tw.join(5)
    tr.join(5)
    assert order == ["w", "r"]  # the waiting writer went before the later reader
