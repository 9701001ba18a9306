"""Concurrent readers and writers, through a real mount and on the ops layer.

The FUSE loop is multithreaded; blocks are read-modify-written, so without the
per-inode lock two writers touching the same 4 KiB block would lose updates and
readers could observe half-rewritten blocks.  For ordinary opens the kernel also
serialises writes per inode, so the mount-level tests check end-to-end coherence
(including the ciphertext view) and the last test drives the operations layer
directly from many threads to exercise the daemon's own lock (it fails with the
lock disabled).
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from pathlib import Path

from fuse_crypt.contentenc import PLAIN_BS
from tests.fuse_env import needs_fuse

from .conftest import CipherView, Mount

pytestmark = needs_fuse


def run_threads(fns: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "thread hung"
    if errors:
        raise errors[0]


def test_writers_sharing_blocks_lose_nothing(mnt: Mount) -> None:
    """8 writers own interleaved 100-byte stripes: every block is shared by
    several writers, so each write is a read-modify-write racing the others."""
    f = mnt.path / "stripes"
    stripe, nwriters, rounds = 100, 8, 40
    size = stripe * nwriters * rounds  # 32000 bytes, ~8 blocks
    f.write_bytes(bytes(size))

    def writer(w: int) -> Callable[[], None]:
        def go() -> None:
            fd = os.open(f, os.O_WRONLY)
            try:
                order = list(range(rounds))
                random.Random(w).shuffle(order)
                for r in order:
                    off = (r * nwriters + w) * stripe
                    os.pwrite(fd, bytes([65 + w]) * stripe, off)
            finally:
                os.close(fd)

        return go

    run_threads([writer(w) for w in range(nwriters)])
    expect = b"".join(bytes([65 + w]) * stripe for _ in range(rounds) for w in range(nwriters))
    assert f.read_bytes() == expect
    assert CipherView(mnt.volume).decrypt_file(CipherView(mnt.volume).cpath("stripes")) == expect


def test_readers_never_see_torn_blocks(mnt: Mount) -> None:
    """A writer keeps rewriting whole-file generations (each block filled with
    one generation byte, unaligned writes spanning blocks); readers must only
    ever see bytes of some generation, never EIO."""
    f = mnt.path / "gen"
    size = 6 * PLAIN_BS + 123
    f.write_bytes(bytes([0]) * size)
    stop = threading.Event()
    seen: set[int] = set()

    def writer() -> None:
        fd = os.open(f, os.O_WRONLY)
        try:
            for gen in range(1, 60):
                os.pwrite(fd, bytes([gen]) * (size - 1001), 1001)
                os.pwrite(fd, bytes([gen]) * 1001, 0)
        finally:
            os.close(fd)
            stop.set()

    def reader() -> None:
        while not stop.is_set():
            fd = os.open(f, os.O_RDONLY)
            try:
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
            assert len(data) == size
            seen.update(set(data))
            assert max(data) < 60

    run_threads([writer, reader, reader, reader])
    assert f.read_bytes() == bytes([59]) * size
    assert len(seen) >= 1


def test_parallel_files_and_directories(mnt: Mount) -> None:
    """Independent workers each create a directory tree, write, rename and verify
    their own files; the cipher view must agree afterwards."""

    def worker(i: int) -> Callable[[], None]:
        def go() -> None:
            rng = random.Random(i)
            base = mnt.path / f"w{i}"
            base.mkdir()
            (base / "sub").mkdir()
            blobs = {}
            for j in range(12):
                data = rng.randbytes(rng.randrange(1, 3 * PLAIN_BS))
                name = f"f{j}" if j % 3 else "L" * 200 + str(j)
                (base / "sub" / name).write_bytes(data)
                blobs[name] = data
            for name in list(blobs)[:4]:
                os.rename(base / "sub" / name, base / ("r_" + name[:50]))
                blobs["../r_" + name[:50]] = blobs.pop(name)
            for name, data in blobs.items():
                assert (base / "sub" / name).resolve().read_bytes() == data
            os.rename(base / "sub", base / "moved")
            assert len(os.listdir(base / "moved")) == 8

        return go

    run_threads([worker(i) for i in range(6)])
    cv = CipherView(mnt.volume)
    assert sorted(os.listdir(mnt.path)) == [f"w{i}" for i in range(6)]
    for i in range(6):
        moved = cv.cpath(f"w{i}/moved")
        assert moved.is_dir()
        assert (
            len([n for n in os.listdir(moved) if not n.startswith("gocryptfs.")])
            + len([n for n in os.listdir(moved) if n.startswith("gocryptfs.longname.")]) // 2
            >= 8
        )


def test_many_readers_one_big_file(mnt: Mount, tmp_path: Path) -> None:
    f = mnt.path / "big"
    data = os.urandom(4 << 20)
    f.write_bytes(data)

    def reader(seed: int) -> Callable[[], None]:
        def go() -> None:
            rng = random.Random(seed)
            fd = os.open(f, os.O_RDONLY)
            try:
                for _ in range(50):
                    off = rng.randrange(0, len(data))
                    n = rng.randrange(1, 300000)
                    assert os.pread(fd, n, off) == data[off : off + n]
            finally:
                os.close(fd)

        return go

    run_threads([reader(s) for s in range(6)])


def test_inode_lock_serialises_read_modify_write(tmp_path: Path) -> None:
    """The kernel already serialises writes per inode for ordinary opens, so the
    daemon's own per-inode lock is exercised here without the kernel in between
    (as an object-store backend or FOPEN_PARALLEL_DIRECT_WRITES would): threads
    write overlapping-block stripes through separate handles of one file while
    others read; nothing may be lost and no read may fail."""
    from fuse_crypt.backend import LocalDirBackend
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.fusefrontend.mount import build_operations

    from .conftest import make_volume

    vol = make_volume(tmp_path / "cipher")
    conf = ConfFile.read(str(vol.cipherdir / "gocryptfs.conf"))
    backend = LocalDirBackend(str(vol.cipherdir))
    ops, core = build_operations(backend, vol.master_key, conf)
    stripe, nwriters, rounds = 37, 8, 60
    size = stripe * nwriters * rounds
    fh0 = ops.create("/f", 0o644, os.O_RDWR)
    ops.write("/f", bytes(size), 0, fh0)
    stop = threading.Event()

    def writer(w: int) -> Callable[[], None]:
        def go() -> None:
            fh = ops.open("/f", os.O_RDWR)
            try:
                for r in range(rounds):
                    ops.write("/f", bytes([65 + w]) * stripe, (r * nwriters + w) * stripe, fh)
            finally:
                ops.release("/f", fh)

        return go

    def reader() -> None:
        fh = ops.open("/f", os.O_RDONLY)
        try:
            while not stop.is_set():
                assert len(ops.read("/f", size, 0, fh)) == size
        finally:
            ops.release("/f", fh)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        run_threads([writer(w) for w in range(nwriters)])
    finally:
        stop.set()
        for t in readers:
            t.join(30)
    expect = b"".join(bytes([65 + w]) * stripe for _ in range(rounds) for w in range(nwriters))
    assert ops.read("/f", size + 10, 0, fh0) == expect
    ops.release("/f", fh0)
    assert ops.files.open_count() == 0
    core.wipe()
    backend.destroy()
