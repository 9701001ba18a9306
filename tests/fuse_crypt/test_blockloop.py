"""The block daemon's two request loops, C (blockloop.c, the default) and Python (mfusepy,
the fallback), through a real daemon and ``<mnt>/disk``: the same answers, byte for byte
against a model and the sectors on disk, request for request at the edges.

The ext4-over-loop tests in test_blockfront.py run the default loop (C); these hit the
loop directly with unaligned and racing I/O, which the loop device never sends.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fuse_crypt.blockfront import CryptDevice, native, open_device
from fuse_crypt.luks2.segment import XtsSegment
from tests.fuse_crypt.block_rig import BlockRig

SS = 4096
OFFSET = 8192  # a "header" area before the segment, never touched
LOOPS = ("c", "python")


def _env(loop: str) -> dict[str, str]:
    return {native.LOOP_ENV: "python" if loop == "python" else ""}


_KEEP_SIZE, _PUNCH_HOLE = 0x01, 0x02


def _fallocate(fd: int, mode: int, off: int, n: int) -> int:
    """fallocate(2) itself (glibc's posix_fallocate would emulate it); 0 or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return 0 if fn(fd, mode, off, n) == 0 else ctypes.get_errno()


def _maps_blockloop(pid: int) -> bool:
    return "blockloop.so.0" in Path(f"/proc/{pid}/maps").read_text()


class Served:
    def __init__(self, rig: BlockRig, tmp_path: Path, loop: str, sectors: int = 64,
                 extra: tuple[str, ...] = ("--allow-regular-file",),
                 size: str = "dynamic") -> None:  # fmt: skip
        self.key = os.urandom(64)
        self.img = tmp_path / "d.img"
        with self.img.open("wb") as f:
            f.truncate(OFFSET + sectors * SS)
        self.mnt = tmp_path / "m"
        self.proc = rig.serve(self.img, self.mnt, self.key, offset=OFFSET, extra=extra,
                              env=_env(loop), size=size)  # fmt: skip
        self.disk = self.mnt / "disk"

    def plaintext_on_disk(self) -> bytes:
        raw = self.img.read_bytes()
        assert raw[:OFFSET] == bytes(OFFSET)
        return XtsSegment(self.key).decrypt(0, raw[OFFSET:])


def test_the_c_loop_is_built_and_chosen(tmp_path: Path) -> None:
    """CI must not quietly test the fallback only: the library is built here and chosen
    for a segment on libcrypto's contexts, unless the escape hatch asks for Python."""
    assert native.LIB_FILE.exists(), "blockloop.so.0 was not built (libfuse3-dev missing?)"
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 * SS))
    dev = CryptDevice(open_device(str(img)), XtsSegment(os.urandom(64)), offset=0, size=None)
    try:
        assert native.chosen(dev)
        mp = pytest.MonkeyPatch()
        mp.setenv(native.LOOP_ENV, "python")
        assert not native.chosen(dev)
        mp.undo()
        dev.segment.wipe()
        assert not native.chosen(dev)  # no contexts left: nothing to hand to C
    finally:
        dev.close()


def test_a_failed_c_loop_is_an_error_not_an_orderly_stop() -> None:
    """libfuse's loop failing (not ended by exit) must reach the supervisor as a failure:
    run() unmounts, then raises OSError(EIO), which run_fuse_loop does not read as a
    signal-ended loop the way it reads mfusepy's RuntimeError."""
    calls: list[str] = []

    class Lib:
        def coco_blk_run(self, handle: object) -> int:
            calls.append("run")
            return -errno.ENOMEM

        def coco_blk_unmount(self, handle: object) -> None:
            calls.append("unmount")

    loop = native.NativeLoop.__new__(native.NativeLoop)
    loop._lib, loop._handle = Lib(), object()
    with pytest.raises(OSError) as exc:
        loop.run()
    assert exc.value.errno == errno.EIO and not isinstance(exc.value, RuntimeError)
    assert calls == ["run", "unmount"]
    Lib.coco_blk_run = lambda self, handle: 0  # type: ignore[method-assign]
    loop.run()  # an orderly end raises nothing


@pytest.mark.parametrize("loop", LOOPS)
def test_unaligned_io_matches_a_model_and_the_sectors(
    rig: BlockRig, tmp_path: Path, loop: str
) -> None:
    s = Served(rig, tmp_path, loop)
    assert _maps_blockloop(s.proc.pid) == (loop == "c")
    size = 64 * SS
    assert s.disk.stat().st_size == size
    rng = random.Random(11)
    model = bytearray(size)  # a fresh image reads as what its zero ciphertext decrypts to
    fd = os.open(s.disk, os.O_RDWR)
    try:
        model[:] = os.pread(fd, size, 0)
        assert bytes(model) == s.plaintext_on_disk()
        fixed = [(5, 100), (SS - 3, 10), (2 * SS, 3 * SS + 7), (size - 1, 1), (0, 0),
                 (SS, SS), (7 * SS + 1, SS - 2), (9 * SS - 1, 2)]  # fmt: skip
        ops = fixed + [(rng.randrange(size - 1), rng.randrange(1, 3 * SS)) for _ in range(150)]
        for off, n in ops:
            n = min(n, size - off)
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            model[off : off + n] = data
            r_off = rng.randrange(size)
            r_n = rng.randrange(1, 2 * SS)
            assert os.pread(fd, r_n, r_off) == bytes(model[r_off : r_off + r_n])
        assert os.pread(fd, size + 100, 0) == bytes(model)  # short at the end
        assert os.pread(fd, 10, size) == b""
        os.fsync(fd)
    finally:
        os.close(fd)
    assert s.plaintext_on_disk() == bytes(model)


@pytest.mark.parametrize("loop", LOOPS)
def test_edges_refusals_and_growth(rig: BlockRig, tmp_path: Path, loop: str) -> None:
    s = Served(rig, tmp_path, loop, sectors=8)
    size = 8 * SS
    before = s.img.read_bytes()
    fd = os.open(s.disk, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x" * 10, size - 5)  # crosses the end: nothing written
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", size)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.ftruncate(fd, size // 2)
        assert exc.value.errno == errno.EPERM
        os.ftruncate(fd, size)  # the same size: a no-op passes
        # a discard (punch hole) would tell the host which blocks are free
        assert _fallocate(fd, _PUNCH_HOLE | _KEEP_SIZE, 0, SS) == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    assert s.img.read_bytes() == before
    with pytest.raises(OSError) as exc:
        os.chmod(s.disk, 0o666)
    assert exc.value.errno == errno.EPERM
    with pytest.raises(OSError) as exc:
        (s.mnt / "new").write_bytes(b"x")
    assert exc.value.errno in (errno.EACCES, errno.EPERM, errno.ENOSYS)
    with pytest.raises(OSError):
        os.rename(s.disk, s.mnt / "other")
    assert sorted(os.listdir(s.mnt)) == ["disk"]
    st = os.statvfs(s.mnt)
    assert st.f_blocks * st.f_frsize == size
    assert s.disk.stat().st_mode & 0o777 == 0o600
    # the host grows the disk (dynamic size): the file follows at the next stat/open
    with s.img.open("r+b") as f:
        f.truncate(OFFSET + 12 * SS + 100)  # a ragged tail is not mapped
    assert s.disk.stat().st_size == 12 * SS
    fd = os.open(s.disk, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"grown", 11 * SS) == 5
        assert os.pread(fd, 5, 11 * SS) == b"grown"
        # ... and shrinks it under us: a read of what is gone is EIO, never zeros
        with s.img.open("r+b") as f:
            f.truncate(OFFSET + 2 * SS)
        with pytest.raises(OSError) as exc:
            os.pread(fd, SS, 5 * SS)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)


@pytest.mark.parametrize("loop", LOOPS)
def test_racing_writers_of_one_sector_lose_nothing(
    rig: BlockRig, tmp_path: Path, loop: str
) -> None:
    """Partial-sector writes are read-modify-write: two writers of disjoint bytes in the
    same sectors must both land (the write lock), whatever the interleaving."""
    s = Served(rig, tmp_path, loop, sectors=4)
    fds = [os.open(s.disk, os.O_RDWR) for _ in range(4)]
    start = threading.Barrier(len(fds))
    errors: list[BaseException] = []

    def positions(i: int) -> list[int]:
        # writer i owns the bytes p with p % 4 == i, spread over sectors 1 and 2
        return [(rnd * 28 + i) % (2 * SS) for rnd in range(300)]

    def writer(i: int, fd: int) -> None:
        try:
            start.wait()
            for p in positions(i):
                os.pwrite(fd, bytes([i + 1]), SS + p)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i, fd)) for i, fd in enumerate(fds)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fd in fds:
        os.close(fd)
    assert not errors
    got = s.plaintext_on_disk()[SS : 3 * SS]
    for i in range(len(fds)):
        assert all(got[p] == i + 1 for p in positions(i)), i


@pytest.mark.parametrize("loop", LOOPS)
def test_fixed_size_segment(rig: BlockRig, tmp_path: Path, loop: str) -> None:
    """``--size``: the segment ends there, whatever the device does afterwards."""
    s = Served(rig, tmp_path, loop, sectors=8, size=str(4 * SS))
    assert s.disk.stat().st_size == 4 * SS
    with s.img.open("r+b") as f:
        f.truncate(OFFSET + 16 * SS)  # the host grows the disk: a fixed segment stays
    assert s.disk.stat().st_size == 4 * SS
    fd = os.open(s.disk, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", 4 * SS)
        assert exc.value.errno == errno.ENOSPC
        assert os.pread(fd, 2 * SS, 3 * SS) == os.pread(fd, SS, 3 * SS)  # short at its end
    finally:
        os.close(fd)


@pytest.mark.parametrize("loop", LOOPS)
def test_read_only_daemon(rig: BlockRig, tmp_path: Path, loop: str) -> None:
    s = Served(rig, tmp_path, loop, sectors=4, extra=("--allow-regular-file", "--ro"))
    before = s.img.read_bytes()
    assert s.disk.stat().st_mode & 0o777 == 0o400
    with pytest.raises(OSError) as exc:
        os.open(s.disk, os.O_RDWR)
    assert exc.value.errno == errno.EROFS
    assert len(s.disk.read_bytes()) == 4 * SS
    assert s.img.read_bytes() == before


#: A child that serves ``NativeLoop`` itself (not through the CLI): the key comes on stdin,
#: "counts" on stdin prints the loop's counters and size as JSON, EOF ends it. A child, not a
#: thread of pytest: a loop that stops answering then cannot wedge the test runner.
_CHILD = r"""
import json, os, sys, threading
from fuse_crypt.blockfront import CryptDevice, native, open_device
from fuse_crypt.luks2.segment import XtsSegment
img, mnt, offset, tweak = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
key = bytes.fromhex(sys.stdin.readline())
dev = CryptDevice(open_device(img), XtsSegment(key, iv_tweak=tweak), offset=offset, size=None)
loop = native.NativeLoop(dev, mnt, fsname="fuse-crypt-test")
served = threading.Thread(target=loop.run, daemon=True)
served.start()
print("ready", flush=True)
for line in sys.stdin:
    requests, read, written, errors = loop.counts()
    print(json.dumps({"requests": requests, "read": read, "written": written,
                      "errors": [[op, code, n] for (op, code), n in errors.items()],
                      "size": loop.size(), "initialized": loop.initialized()}), flush=True)
loop.exit()
os.system(f"fusermount3 -u {mnt}")
served.join(15)
loop.close()
dev.close()
print("stopped" if not served.is_alive() else "still serving", flush=True)
"""


def test_c_loop_tweak_base_and_counters(rig: BlockRig, tmp_path: Path) -> None:
    """NativeLoop itself: a segment whose tweak does not start at 0 (the tweak base
    reaches C), and the counters --metrics-addr exports, exactly."""
    key = os.urandom(64)
    img = tmp_path / "d.img"
    with img.open("wb") as f:
        f.truncate(OFFSET + 8 * SS)
    mnt = tmp_path / "m"
    mnt.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(img), str(mnt), str(OFFSET), "24"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    rig.daemons.append((child, mnt))  # type: ignore[arg-type]  # stopped and unmounted at teardown
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(key.hex() + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ready"
    disk = mnt / "disk"
    fd = os.open(disk, os.O_RDWR)
    try:
        plain = bytearray(os.pread(fd, 8 * SS, 0))
        data = os.urandom(2 * SS + 10)
        assert os.pwrite(fd, data, SS - 5) == len(data)
        plain[SS - 5 : SS - 5 + len(data)] = data
        assert os.pread(fd, 3 * SS, SS - 5)[: len(data)] == data
        with pytest.raises(OSError):
            os.pwrite(fd, b"x" * 10, 8 * SS - 5)
        os.fsync(fd)
    finally:
        os.close(fd)
    raw = img.read_bytes()[OFFSET:]
    assert raw == XtsSegment(key, iv_tweak=24).encrypt(0, bytes(plain))
    assert raw != XtsSegment(key).encrypt(0, bytes(plain))
    child.stdin.write("counts\n")
    child.stdin.flush()
    got = json.loads(child.stdout.readline())
    assert got["requests"] == {"read": 2, "write": 2, "fsync": 1}
    assert (got["read"], got["written"]) == (8 * SS + 3 * SS, len(data))
    assert got["errors"] == [["write", errno.ENOSPC, 1]]
    assert got["size"] == 8 * SS and got["initialized"]
    child.stdin.close()
    assert child.stdout.readline().strip() == "stopped"
    assert child.wait(15) == 0
    assert not os.path.ismount(mnt)


def _cached_pages(path: Path, off: int, n: int) -> int:
    """Pages of ``path`` in the page cache in [off, off+n): cachestat(2), Linux 6.5+."""

    class Range(ctypes.Structure):
        _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]

    class Stat(ctypes.Structure):
        _fields_ = [(f, ctypes.c_uint64) for f in
                    ("cache", "dirty", "writeback", "evicted", "recently_evicted")]  # fmt: skip

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = Range(off, n), Stat()
        if libc.syscall(451, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            pytest.skip(f"cachestat(2) unavailable: {os.strerror(ctypes.get_errno())}")
        return int(st.cache)
    finally:
        os.close(fd)


@pytest.mark.parametrize("loop", LOOPS)
def test_large_reads_drop_their_ciphertext_small_ones_keep_it(
    rig: BlockRig, tmp_path: Path, loop: str
) -> None:
    """Drop-behind: the filesystem above caches what a large (read-ahead) read returned, so
    its ciphertext leaves the device's cache once decrypted; a small read's stays."""
    s = Served(rig, tmp_path, loop, sectors=1024)  # 4 MiB
    mib = 1 << 20
    buf = mmap.mmap(-1, mib)
    buf.write(os.urandom(mib))
    fd = os.open(s.img, os.O_WRONLY | os.O_DIRECT)  # real data, past the page cache
    try:
        for i in range(4):
            os.pwritev(fd, [buf], OFFSET + i * mib)
    finally:
        os.close(fd)
    assert _cached_pages(s.img, 0, OFFSET + 4 * mib) == 0
    fd = os.open(s.disk, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], mib) == mib  # one large read at 1 MiB
        # read, decrypted, dropped (the C loop drops after its reply, so it may take a
        # moment): all of its 256 pages but a few of the large folios the kernel's
        # read-ahead may put across the range's ends, which DONTNEED leaves alone
        deadline = time.monotonic() + 5
        while _cached_pages(s.img, OFFSET + mib, mib) >= 64 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _cached_pages(s.img, OFFSET + mib, mib) < 64
        assert os.preadv(fd, [memoryview(buf)[:SS]], 3 * mib) == SS  # one small read
        assert _cached_pages(s.img, OFFSET + 3 * mib, SS) == 1  # its page stays
    finally:
        os.close(fd)
