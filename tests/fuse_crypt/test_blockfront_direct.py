"""Ciphertext reads past the page cache (``O_DIRECT``) in the block daemon's device layer.

What could go wrong and is checked here: the direct descriptor reading another file or
stale data (coherence with buffered writes), the per-thread read buffers mixing up
concurrent requests, the page cache still filling (the whole point), and the fallbacks:
a device without direct I/O, a request that is not aligned, ``EINVAL`` at run time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.blockfront import CryptDevice, open_device
from fuse_crypt.blockfront import device as devmod
from fuse_crypt.luks2.segment import XtsSegment
from tests.fuse_crypt.block_rig import block_skip_reason

SS = 4096
MiB = 1 << 20
KEY = bytes(range(64))


def _image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def _loop(img: Path) -> Iterator[str]:
    reason = block_skip_reason()
    if reason:
        pytest.skip(reason)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield loop
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recent")]


def _cached_bytes(fd: int) -> int:
    """Bytes of ``fd``'s file in the page cache: cachestat(2) (Linux 6.5). A block
    device's cache lives only while it is open, so this asks through our own descriptor."""
    libc = ctypes.CDLL(None, use_errno=True)
    rng, st = _Range(0, 0), _Stat()
    if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            pytest.skip("cachestat(2) needs Linux 6.5 or later")
        raise OSError(err, os.strerror(err))
    return int(st.cache) * 4096


def _read_all(dev: CryptDevice, chunk: int = MiB) -> bytes:
    out = bytearray(dev.size)
    view = memoryview(out)
    for off in range(0, dev.size, chunk):
        assert dev.read_into(view[off : off + chunk], off) == min(chunk, dev.size - off)
    return bytes(out)


def test_direct_reads_leave_no_ciphertext_in_the_page_cache(tmp_path: Path) -> None:
    """A real loop device: 32 MiB read direct add nothing to the device's page cache, the
    same reads buffered add all of it; both return what was written."""
    img = _image(tmp_path / "d.img", 33 * MiB)
    data = os.urandom(32 * MiB)
    with _loop(img) as loop:
        for direct in (True, False):
            dev = CryptDevice(
                open_device(loop), XtsSegment(KEY), offset=MiB, size=None, direct_reads=direct
            )
            try:
                assert dev.direct_reads is direct
                dev.write(data, 0)
                dev.sync()
                os.posix_fadvise(dev.fd, 0, 0, os.POSIX_FADV_DONTNEED)
                before = _cached_bytes(dev.fd)
                assert _read_all(dev) == data
                grown = _cached_bytes(dev.fd) - before
                if direct:
                    assert grown < 2 * MiB, f"direct reads cached {grown} bytes"
                else:
                    assert grown >= 30 * MiB, f"buffered reads cached only {grown} bytes"
            finally:
                dev.close()


@pytest.mark.parametrize("where", ["loop", "file"])
def test_direct_reads_see_unsynced_buffered_writes(tmp_path: Path, where: str) -> None:
    """Writes stay buffered: a direct read right after one (no fsync) must return the new
    bytes, whole-sector and read-modify-write alike, never the old ones on the disk."""
    img = _image(tmp_path / "d.img", 9 * MiB)
    with contextlib.ExitStack() as stack:
        path = stack.enter_context(_loop(img)) if where == "loop" else str(img)
        dev = CryptDevice(
            open_device(path), XtsSegment(KEY), offset=MiB, size=None, direct_reads=True
        )
        stack.callback(dev.close)
        assert dev.direct_reads
        model = bytearray(_read_all(dev))
        for off, n in ((0, MiB), (3 * SS, SS), (5 * SS + 7, 3 * SS), (dev.size - SS, SS)):
            chunk = os.urandom(n)
            dev.write(chunk, off)
            model[off : off + n] = chunk
            lo = off - off % SS
            got = bytearray(2 * MiB)
            n_read = dev.read_into(memoryview(got)[: min(MiB, dev.size - lo)], lo)
            assert got[:n_read] == model[lo : lo + n_read]
        assert _read_all(dev) == bytes(model)
        assert _read_all(dev, 65 * SS) == bytes(model)  # other request sizes, same bytes
        assert _read_all(dev, SS) == bytes(model)  # small reads: buffered, same bytes


def test_concurrent_direct_readers_do_not_share_a_buffer(tmp_path: Path) -> None:
    """Four threads reading different sectors at once, as libfuse's workers do: each must
    decrypt its own ciphertext (one shared read buffer would mix them up)."""
    img = _image(tmp_path / "d.img", MiB + 12 * devmod.DIRECT_MIN)
    dev = CryptDevice(
        open_device(str(img)), XtsSegment(KEY), offset=MiB, size=None, direct_reads=True
    )
    try:
        assert dev.direct_reads
        model = os.urandom(dev.size)
        dev.write(model, 0)
        dev.sync()
        bad: list[str] = []

        def reader(k: int) -> None:
            out = bytearray(devmod.DIRECT_MIN)
            for i in range(150):
                off = ((k * 7 + i * 3) % 12) * devmod.DIRECT_MIN
                dev.read_into(memoryview(out), off)
                if out != model[off : off + len(out)]:
                    bad.append(f"thread {k} read {i} at {off}")
                    return

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert bad == []
    finally:
        dev.close()


def test_no_direct_io_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that refuses O_DIRECT (some filesystems, no /proc) is read buffered, and
    the log says why."""
    img = _image(tmp_path / "d.img", 2 * MiB)
    real_open = os.open

    def no_direct(path: str, flags: int, *a: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *a)

    fd = open_device(str(img))
    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.INFO, logger="fuse_crypt.blockfront"):
        dev = CryptDevice(fd, XtsSegment(KEY), offset=MiB, size=None, direct_reads=True)
    monkeypatch.undo()
    try:
        assert not dev.direct_reads
        assert "page cache" in caplog.text and "Invalid argument" in caplog.text
        data = os.urandom(dev.size)
        dev.write(data, 0)
        assert _read_all(dev) == data
    finally:
        dev.close()


def test_einval_at_run_time_switches_to_buffered_reads_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    img = _image(tmp_path / "d.img", 3 * MiB)
    dev = CryptDevice(
        open_device(str(img)), XtsSegment(KEY), offset=MiB, size=None, direct_reads=True
    )
    try:
        data = os.urandom(dev.size)
        dev.write(data, 0)
        dfd = dev._dfd
        assert dfd >= 0
        real = os.preadv
        calls: list[int] = []

        def preadv(fd: int, bufs: list[memoryview], off: int) -> int:
            calls.append(fd)
            if fd == dfd:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real(fd, bufs, off)

        monkeypatch.setattr(os, "preadv", preadv)
        with caplog.at_level(logging.WARNING, logger="fuse_crypt.blockfront"):
            assert _read_all(dev, devmod.DIRECT_MIN) == data
        assert not dev.direct_reads
        assert calls.count(dfd) == 1  # tried once, then never again
        assert caplog.text.count("direct reads refused") == 1
    finally:
        monkeypatch.undo()
        dev.close()


def test_misaligned_requests_and_segments_read_buffered(tmp_path: Path) -> None:
    """O_DIRECT needs aligned offsets: a segment 512 bytes into an image (alignment 4096
    assumed for files) or a request that is not whole sectors goes through the page cache,
    with the same bytes."""
    img = _image(tmp_path / "d.img", 2 * MiB + 512)
    dev = CryptDevice(
        open_device(str(img)), XtsSegment(KEY), offset=512, size=None, direct_reads=True
    )
    try:
        assert dev.direct_reads  # the descriptor exists; this segment cannot use it
        assert dev._read_direct(0, SS) is None
        data = os.urandom(dev.size)
        dev.write(data, 0)
        assert _read_all(dev) == data
    finally:
        dev.close()
    img2 = _image(tmp_path / "e.img", 2 * MiB)
    dev = CryptDevice(
        open_device(str(img2)), XtsSegment(KEY), offset=MiB, size=None, direct_reads=True
    )
    try:
        assert dev._read_direct(0, SS) is not None
        assert dev._read_direct(0, 1000) is None  # not whole blocks
        data = os.urandom(dev.size)
        dev.write(data, 0)
        out = bytearray(100)
        dev.read_into(memoryview(out), SS + 5)  # unaligned request: read-modify path
        assert out == data[SS + 5 : SS + 105]
    finally:
        dev.close()


def test_the_direct_descriptor_is_the_same_file_and_read_only(tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", 2 * MiB)
    fd = open_device(str(img))
    dfd, align, why = devmod.open_direct_reader(fd)
    try:
        assert (dfd >= 0, align, why) == (True, devmod.FILE_DIO_ALIGN, "")
        a, b = os.fstat(fd), os.fstat(dfd)
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
        import fcntl

        fl = fcntl.fcntl(dfd, fcntl.F_GETFL)
        assert fl & os.O_DIRECT and fl & os.O_ACCMODE == os.O_RDONLY
        assert not fl & os.O_NONBLOCK
        with pytest.raises(OSError):
            os.pwrite(dfd, b"x" * 4096, 0)
    finally:
        os.close(dfd)
        os.close(fd)
    with _loop(_image(tmp_path / "l.img", 2 * MiB)) as loop:
        fd = open_device(loop)
        dfd, align, why = devmod.open_direct_reader(fd)
        try:
            out = subprocess.run(["blockdev", "--getss", loop], capture_output=True, text=True)
            assert (dfd >= 0, align, why) == (True, int(out.stdout), "")
        finally:
            os.close(dfd)
            os.close(fd)


def test_a_bad_read_mode_in_the_environment_is_a_usage_error(tmp_path: Path) -> None:
    """FUSE_CRYPT_BLOCK_READS is direct or buffered; a typo must not silently pick one.
    Refused before the device is opened or the key read: exit 1, one line."""
    import sys

    img = _image(tmp_path / "d.img", 2 * MiB)
    (tmp_path / "mnt").mkdir()
    mnt = str(tmp_path / "mnt")
    argv = [sys.executable, "-m", "fuse_crypt.cli", "block-serve", "--masterkey", "stdin",
            "--offset", str(MiB), "--allow-regular-file", str(img), mnt]  # fmt: skip
    env = {**os.environ, devmod.READS_ENV: "Direct"}
    res = subprocess.run(argv, input=KEY.hex().encode() + b"\n", capture_output=True, env=env,
                         timeout=60)  # fmt: skip
    assert res.returncode == 1
    err = res.stderr.decode().strip()
    assert err.count("\n") == 0 and "FUSE_CRYPT_BLOCK_READS must be direct or buffered" in err
    assert KEY.hex() not in err and not os.path.ismount(tmp_path / "mnt")


# -- our read-ahead for direct reads (fuse_crypt/blockfront/readahead.py) --------------------


def _direct_dev(tmp_path: Path, mib: int) -> tuple[CryptDevice, bytearray]:
    img = _image(tmp_path / "ra.img", (mib + 1) * MiB)
    dev = CryptDevice(
        open_device(str(img)), XtsSegment(KEY), offset=MiB, size=None, direct_reads=True
    )
    model = bytearray(os.urandom(dev.size))
    dev.write(model, 0)
    dev.sync()
    return dev, model


def test_read_ahead_serves_a_sequential_reader(tmp_path: Path) -> None:
    from fuse_crypt.blockfront import readahead

    dev, model = _direct_dev(tmp_path, 48)
    try:
        ra = dev._ra
        assert ra is not None
        out = memoryview(bytearray(MiB))
        for off in range(0, 40 * MiB, MiB):
            dev.read_into(out, off)
            assert out == model[off : off + MiB], off
        assert ra.hits >= 30  # all but the first few requests came from the read-ahead
        assert ra._allocated <= readahead.WINDOW + readahead.SLACK
        # the loop device's requests arrive slightly out of order: still served
        hits = ra.hits
        for off in (41 * MiB, 40 * MiB, 43 * MiB, 42 * MiB, 44 * MiB):
            dev.read_into(out, off)
            assert out == model[off : off + MiB], off
        assert ra.hits > hits
    finally:
        dev.close()


def test_a_write_drops_what_was_read_ahead(tmp_path: Path) -> None:
    """The read-ahead holds ciphertext fetched before a write: a read after the write must
    return the written bytes, not the read-ahead's."""
    dev, model = _direct_dev(tmp_path, 32)
    try:
        out = memoryview(bytearray(MiB))
        for off in range(0, 4 * MiB, MiB):
            dev.read_into(out, off)
        assert dev._ra is not None and dev._ra._chunks  # chunks ahead are in flight or read
        for off, n in ((6 * MiB, MiB), (5 * MiB + 3 * SS, SS), (9 * MiB + 5, 100)):
            data = os.urandom(n)
            dev.write(data, off)
            model[off : off + n] = data
        for off in range(4 * MiB, 16 * MiB, MiB):
            dev.read_into(out, off)
            assert out == model[off : off + MiB], off
    finally:
        dev.close()


def test_read_ahead_interleaved_with_writes_matches_a_model(tmp_path: Path) -> None:
    """A sequential reader (the loop device's request sizes, restarting now and then) with
    writes landing ahead of, behind and under it: every read returns the model's bytes."""
    import random

    dev, model = _direct_dev(tmp_path, 24)
    rnd = random.Random(7)
    try:
        out = memoryview(bytearray(MiB))
        pos = 0
        for step in range(400):
            if rnd.random() < 0.2:
                off = rnd.randrange(0, dev.size - 2 * SS)
                data = os.urandom(rnd.choice((SS, 2 * SS, 17)))
                dev.write(data, off)
                model[off : off + len(data)] = data
            n = rnd.choice((MiB, 768 << 10, 256 << 10))
            if pos + n > dev.size:
                pos = rnd.choice((0, rnd.randrange(0, dev.size // MiB) * MiB))
                continue
            dev.read_into(out[:n], pos)
            assert out[:n] == model[pos : pos + n], (step, pos, n)
            pos += n
        assert _read_all(dev) == bytes(model)
    finally:
        dev.close()


def test_read_ahead_workers_stop_before_the_descriptor_closes(tmp_path: Path) -> None:
    dev, _ = _direct_dev(tmp_path, 24)
    out = memoryview(bytearray(MiB))
    for off in range(0, 8 * MiB, MiB):
        dev.read_into(out, off)
    ra = dev._ra
    assert ra is not None and any(
        t.name.startswith("fuse-crypt-readahead") for t in threading.enumerate()
    )
    dev.close()
    assert ra._pool is None and ra._chunks == {} and ra._free == []
    assert not any(t.name.startswith("fuse-crypt-readahead") for t in threading.enumerate())


def test_failed_read_ahead_leaves_the_reader_its_own_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk the workers could not read (EIO from the device) is not an error by itself:
    the reader reads the range again and gets the device's answer."""
    dev, model = _direct_dev(tmp_path, 16)
    real = os.preadv
    failing = threading.local()

    def preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        if threading.current_thread().name.startswith("fuse-crypt-readahead"):
            failing.hit = True
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        out = memoryview(bytearray(MiB))
        for off in range(0, 12 * MiB, MiB):
            dev.read_into(out, off)
            assert out == model[off : off + MiB], off
        assert dev._ra is not None and dev._ra.hits == 0
    finally:
        monkeypatch.undo()
        dev.close()


def test_read_ahead_unit_partial_and_short_chunks(tmp_path: Path) -> None:
    """DirectReadAhead alone, over a file shorter than the size it is told (a device the
    host shrank): a chunk read short is never served (its buffer may hold another chunk's
    bytes), and a request only partly read ahead is left to the caller."""
    from fuse_crypt.blockfront.readahead import CHUNK, DirectReadAhead

    img = tmp_path / "short.img"
    img.write_bytes(os.urandom(2 * CHUNK + CHUNK // 2))  # chunk 2 is short
    fd = os.open(img, os.O_RDONLY | os.O_DIRECT)
    ra = DirectReadAhead(fd, 0, lambda: 8 * CHUNK, window=4)
    got: list[tuple[int, bytes]] = []

    def sink(pos: int, view: memoryview) -> None:
        got.append((pos, bytes(view)))

    try:
        ra.advance(0, CHUNK // 2)  # a reader at the start counts as sequential
        ra.advance(CHUNK // 2, CHUNK)  # the window: chunks 0..4 go in flight
        assert sorted(ra._chunks) == [0, 1, 2, 3, 4]
        assert ra.serve(CHUNK, CHUNK, sink)  # chunk 1: whole, served
        assert got == [(0, img.read_bytes()[CHUNK : 2 * CHUNK])]
        got.clear()
        assert not ra.serve(2 * CHUNK, SS, sink)  # chunk 2 came back short
        assert not ra.serve(3 * CHUNK, SS, sink)  # chunk 3: nothing there at all
        assert not ra.serve(4 * CHUNK + CHUNK // 2, CHUNK, sink)  # chunk 5 was not read ahead
        assert got == []
    finally:
        ra.close()
        os.close(fd)
