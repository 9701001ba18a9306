"""Fast in-process checks of ``blockfront/device.py`` that mutation testing runs first.

The device is an image file; each test compares what ``CryptDevice`` does with the
ciphertext an independent ``XtsSegment`` gives for the same plaintext, so a wrong offset,
span or read-modify-write shows as a byte difference, not only as a failed round trip.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.blockfront import CryptDevice, DeviceError, open_device
from fuse_crypt.luks2.segment import XtsSegment

SS = 4096
KEY = bytes(range(64))


def _dev(path: Path, size: int, *, offset: int = 0) -> CryptDevice:
    with path.open("wb") as f:
        f.truncate(size)
    return CryptDevice(open_device(str(path)), XtsSegment(KEY), offset=offset, size=None)


def test_unaligned_write_lands_encrypted_at_the_segment_offset(tmp_path: Path) -> None:
    dev = _dev(tmp_path / "img", 8 * SS, offset=SS)
    try:
        assert dev.size == 7 * SS
        dev.write(bytes(2 * SS), 0)  # known plaintext around the unaligned write
        data = os.urandom(SS + 100)
        assert dev.write(data, 50) == len(data)
        plain = bytearray(2 * SS)
        plain[50 : 50 + len(data)] = data
        raw = (tmp_path / "img").read_bytes()
        assert raw[SS : 3 * SS] == XtsSegment(KEY).encrypt(0, bytes(plain))
        assert dev.read(50, len(data)) == data
    finally:
        dev.close()


def _img(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_open_device_flags(tmp_path: Path) -> None:
    """Blocking after the non-blocking open, close-on-exec, read-only means read-only, and
    each refusal carries its errno (callers map it to a CSI code)."""
    img = _img(tmp_path / "img", SS)
    fd = open_device(str(img))
    try:
        assert os.get_blocking(fd) and not os.get_inheritable(fd)
        assert os.pwrite(fd, b"w", 0) == 1
    finally:
        os.close(fd)
    fd = open_device(str(img), read_only=True)
    try:
        assert os.get_blocking(fd)
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"w", 0)
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(fd)
    link = tmp_path / "link"
    link.symlink_to(img)
    for path, kw, code in (
        (link, {}, errno.ELOOP),
        (img, {"allow_regular": False}, errno.ENOTBLK),
        (Path("/dev/null"), {}, errno.ENOTBLK),
        (tmp_path / "missing", {}, errno.ENOENT),
    ):
        with pytest.raises(DeviceError) as err:
            open_device(str(path), **kw)  # type: ignore[arg-type]
        assert err.value.errno == code, path


def test_open_device_closes_what_it_refuses(tmp_path: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(DeviceError):
        open_device("/dev/null")
    assert set(os.listdir("/proc/self/fd")) == before


def test_geometry_checks_on_both_sides(tmp_path: Path) -> None:
    img = _img(tmp_path / "img", 4 * SS)
    seg = XtsSegment(KEY)
    for offset, size in ((-512, None), (100, None), (0, 0), (0, -SS), (0, SS + 512)):
        with pytest.raises(DeviceError) as err:
            CryptDevice(open_device(str(img)), seg, offset=offset, size=size)
        assert err.value.errno == errno.EINVAL, (offset, size)
    # the smallest accepted values on each side
    dev = CryptDevice(open_device(str(img)), XtsSegment(KEY), offset=512, size=None)
    assert dev.size == 3 * SS  # 4 SS - 512 rounded down to whole sectors
    dev.close()
    exact = CryptDevice(open_device(str(img)), XtsSegment(KEY), offset=SS, size=3 * SS)
    assert exact.size == 3 * SS  # the segment ends exactly at the device's end
    exact.close()
    one = CryptDevice(open_device(str(img)), XtsSegment(KEY), offset=3 * SS, size=None)
    assert one.size == SS  # exactly one sector after the header
    one.close()
    with pytest.raises(DeviceError) as err:
        CryptDevice(open_device(str(img)), XtsSegment(KEY), offset=3 * SS + 512, size=None)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(DeviceError) as err:
        CryptDevice(open_device(str(img)), XtsSegment(KEY), offset=SS + 512, size=3 * SS)
    assert err.value.errno == errno.ENOSPC


def test_reads_past_the_end_and_negative_offsets(tmp_path: Path) -> None:
    dev = _dev(tmp_path / "img", 2 * SS)
    try:
        assert dev.read(2 * SS + 5, 10) == b""
        assert dev.read_into(memoryview(bytearray(10)), 3 * SS) == 0
        assert len(dev.read(2 * SS - 3, 10)) == 3
        for call in (lambda: dev.read(-1, 1), lambda: dev.write(b"x", -1)):
            with pytest.raises(DeviceError) as err:
                call()
            assert err.value.errno == errno.EINVAL
        assert dev.write(b"", 2 * SS) == 0  # nothing to write: not ENOSPC
        with pytest.raises(DeviceError) as err:
            dev.write(b"x", 2 * SS)
        assert err.value.errno == errno.ENOSPC
        assert dev.write(b"x", 2 * SS - 1) == 1
    finally:
        dev.close()


def test_read_only_refuses_even_empty_writes(tmp_path: Path) -> None:
    img = _img(tmp_path / "img", 2 * SS)
    dev = CryptDevice(
        open_device(str(img), read_only=True), XtsSegment(KEY), offset=0, size=None,
        read_only=True,
    )  # fmt: skip
    try:
        with pytest.raises(DeviceError) as err:
            dev.write(b"", 0)
        assert err.value.errno == errno.EROFS
    finally:
        dev.close()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, SS), (SS, 2 * SS), (1, 10), (SS - 1, 2), (10, SS), (SS + 7, 2 * SS), (0, 3 * SS - 1),
     (1, 3 * SS - 1)],
)  # fmt: skip
def test_write_keeps_every_other_byte_and_encrypts_exact_sectors(
    tmp_path: Path, offset: int, length: int
) -> None:
    """Aligned, head-only, tail-only, head and tail in one or in two sectors: the bytes
    around the write keep their old plaintext and the whole 4-sector image is exactly the
    independent encryption of the model."""
    path = tmp_path / "img"
    dev = _dev(path, 4 * SS)
    try:
        model = bytearray(os.urandom(4 * SS))
        dev.write(bytes(model), 0)
        data = os.urandom(length)
        assert dev.write(data, offset) == length
        model[offset : offset + length] = data
        assert path.read_bytes() == XtsSegment(KEY).encrypt(0, bytes(model))
        assert dev.read(0, 4 * SS) == bytes(model)
        out = bytearray(length + 3)
        assert dev.read_into(memoryview(out), offset) == min(length + 3, 4 * SS - offset)
        assert out[:length] == data
    finally:
        dev.close()


def test_aligned_read_decrypts_in_the_callers_buffer(tmp_path: Path) -> None:
    path = tmp_path / "img"
    dev = _dev(path, 4 * SS, offset=SS)
    try:
        plain = os.urandom(3 * SS)
        dev.write(plain, 0)
        buf = bytearray(b"\xee" * (2 * SS + 5))
        assert dev.read_into(memoryview(buf), SS) == 2 * SS  # short: the segment ends
        assert buf[: 2 * SS] == plain[SS:] and buf[2 * SS :] == b"\xee" * 5
    finally:
        dev.close()


def test_sync_and_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _dev(tmp_path / "img", 2 * SS)
    synced: list[int] = []
    monkeypatch.setattr(os, "fdatasync", synced.append)
    dev.sync()
    assert synced == [dev.fd]
    monkeypatch.undo()
    fd, seg = dev.fd, dev.segment
    dev.close()
    assert dev.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(Exception, match="wiped"):
        seg.encrypt(0, bytes(SS))
    dev.close()  # twice is harmless


def test_read_ahead_window_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hint's position and length, each threshold on both sides."""
    from fuse_crypt.blockfront import device as devmod

    hints: list[tuple[int, int, int]] = []
    drops: list[tuple[int, int]] = []  # drop-behind (DONTNEED), checked once below
    fds: set[int] = set()

    def fadvise(fd: int, off: int, n: int, adv: int) -> None:
        if adv == os.POSIX_FADV_DONTNEED:
            drops.append((off, n))
            return
        fds.add(fd)
        hints.append((off, n, adv))

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    mib, ra, req = 1 << 20, devmod.READAHEAD, devmod._RA_MIN_REQUEST
    assert (ra, devmod._NEAR, req) == (8 * mib, 2 * mib, 128 << 10)
    dev = _dev(tmp_path / "img", 512 + 64 * mib, offset=512)
    try:
        small = memoryview(bytearray(req - SS))
        dev.read_into(small, 0)
        dev.read_into(small, req - SS)  # sequential but below the minimum request
        assert hints == []
        big = memoryview(bytearray(req))
        assert drops == []  # small reads keep their ciphertext
        dev.read_into(big, 2 * req - 2 * SS)  # sequential, exactly the minimum: hinted
        end = 3 * req - 2 * SS
        assert hints == [(512 + end, ra, os.POSIX_FADV_WILLNEED)]
        assert drops == [(512 + 2 * req - 2 * SS, req)]  # and dropped once decrypted
        hints.clear()
        # the next read inside the first half of the window: no new hint
        dev.read_into(big, end)
        assert hints == []
        # ending exactly half a window before its end: still no hint
        dev.read_into(big, end + ra // 2 - req)
        assert hints == []
        # one sector further: the window is extended from where it ended
        dev.read_into(big, end + ra // 2 - req + SS)
        assert hints == [(512 + end + ra, ra // 2 + SS, os.POSIX_FADV_WILLNEED)]
        hints.clear()
        # a jump of more than _NEAR past both the last read and the window: random
        dev2 = _dev(tmp_path / "img2", 512 + 64 * mib, offset=512)
        try:
            dev2.read_into(big, 20 * mib)
            assert hints == []  # a first read away from the start has no predecessor
            assert fds == {dev.fd}  # the hints so far went to the first device's descriptor
            dev2.read_into(big, 20 * mib + req + 2 * mib)  # exactly _NEAR after: hinted
            assert len(hints) == 1
            hints.clear()
            dev2.read_into(big, 40 * mib)  # further: not
            dev2.read_into(big, 40 * mib + req + 2 * mib + SS)  # a sector more than _NEAR
            assert hints == []
            back = 40 * mib + 2 * req + 2 * mib + SS - 2 * mib  # exactly _NEAR before the end
            dev2.read_into(big, back)
            assert len(hints) == 1
            hints.clear()
            dev2.read_into(big, back + req - 2 * mib - SS)  # a sector more than _NEAR before
            assert hints == []
            hints.clear()
            # at the end of the segment: the hint stops there
            dev2.read_into(big, dev2.size - 4 * mib - 2 * req)
            dev2.read_into(big, dev2.size - 4 * mib - req)
            assert hints == [(512 + dev2.size - 4 * mib, 4 * mib, os.POSIX_FADV_WILLNEED)]
            hints.clear()
            dev2.read_into(big, dev2.size - req)  # nothing left to hint
            assert hints == []
        finally:
            dev2.close()
    finally:
        dev.close()


def test_short_writes_and_reads_are_completed_at_the_right_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may return short counts: the rest goes to (comes from) the next bytes."""
    path = tmp_path / "img"
    dev = _dev(path, 6 * SS, offset=SS)
    real_pwrite, real_preadv = os.pwrite, os.preadv
    chunks: list[int] = []

    def pwrite(fd: int, data: memoryview, off: int) -> int:
        chunks.append(off)
        return real_pwrite(fd, bytes(data)[:1000], off)

    def preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        part = bufs[0][:777]
        return real_preadv(fd, [part], off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "preadv", preadv)
    try:
        data = os.urandom(3 * SS)
        dev.write(data, SS)
        assert chunks[:3] == [2 * SS, 2 * SS + 1000, 2 * SS + 2000]
        assert dev.read(SS, 3 * SS) == data
        assert dev.read(SS + 5, 10) == data[5:15]
        monkeypatch.undo()
        raw = path.read_bytes()
        assert raw[2 * SS : 5 * SS] == XtsSegment(KEY).encrypt(SS, data)
    finally:
        monkeypatch.undo()
        dev.close()


def test_a_write_that_makes_no_progress_is_eio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = _dev(tmp_path / "img", 2 * SS)
    real_pwrite = os.pwrite
    calls: list[int] = []

    def pwrite(fd: int, data: memoryview, off: int) -> int:
        calls.append(off)
        return 0 if len(calls) == 1 else real_pwrite(fd, data, off)

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        with pytest.raises(DeviceError) as err:
            dev.write(bytes(SS), 0)
        assert err.value.errno == errno.EIO
        assert err.value.strerror == "short write to the device"
        assert calls == [0]
        calls.clear()
        monkeypatch.setattr(os, "pwrite", lambda fd, data, off: real_pwrite(fd, data[:1], off))
        assert dev.write(b"ab", 0) == 2  # one byte at a time is progress, not an error
    finally:
        monkeypatch.undo()
        dev.close()


def test_every_refusal_says_what_and_has_its_errno(tmp_path: Path) -> None:
    """The exact (errno, text) of each refusal: the daemon maps errno to the FUSE reply and
    logs the text, so both are behaviour."""
    img = _img(tmp_path / "img", 4 * SS)
    link = tmp_path / "link"
    link.symlink_to(img)

    def refused(call: Any) -> tuple[int | None, str | None]:
        with pytest.raises(DeviceError) as err:
            call()
        return err.value.errno, err.value.strerror

    def dev(**kw: Any) -> CryptDevice:
        return CryptDevice(open_device(str(img)), XtsSegment(KEY), **kw)

    assert refused(lambda: open_device(str(link))) == (
        errno.ELOOP, "the device path is a symbolic link"
    )  # fmt: skip
    assert refused(lambda: open_device(str(img), allow_regular=False)) == (
        errno.ENOTBLK, "the device is a regular file"
    )  # fmt: skip
    assert refused(lambda: open_device("/dev/null")) == (
        errno.ENOTBLK, "the device is not a block device"
    )  # fmt: skip
    assert refused(lambda: open_device(str(tmp_path / "missing"))) == (
        errno.ENOENT, "cannot open the device: No such file or directory"
    )  # fmt: skip
    assert refused(lambda: dev(offset=100, size=None)) == (
        errno.EINVAL, "the segment offset must be a multiple of 512"
    )  # fmt: skip
    assert refused(lambda: dev(offset=0, size=100)) == (
        errno.EINVAL, "the segment size must be whole sectors"
    )  # fmt: skip
    assert refused(lambda: dev(offset=SS, size=4 * SS)) == (
        errno.ENOSPC, "the device is smaller than its segment"
    )  # fmt: skip
    assert refused(lambda: dev(offset=4 * SS, size=None)) == (
        errno.ENOSPC, "the device is smaller than its header"
    )  # fmt: skip
    d = dev(offset=0, size=None)
    ro = CryptDevice(open_device(str(img), read_only=True), XtsSegment(KEY), offset=0,
                     size=None, read_only=True)  # fmt: skip
    try:
        assert refused(lambda: d.read(-1, 1)) == (errno.EINVAL, "negative offset")
        assert refused(lambda: d.write(b"x", -1)) == (errno.EINVAL, "negative offset")
        assert refused(lambda: d.write(b"x", 4 * SS)) == (
            errno.ENOSPC, "write past the end of the volume"
        )  # fmt: skip
        assert refused(lambda: ro.write(b"x", 0)) == (errno.EROFS, "read-only")
        with img.open("r+b") as f:
            f.truncate(SS)
        assert refused(lambda: d.read(2 * SS, 1)) == (errno.EIO, "short read from the device")
    finally:
        d.close()
        ro.close()


@pytest.mark.parametrize(
    ("offset", "length", "reads"),
    [(0, SS, []), (SS, 2 * SS, []), (5, 10, [0]), (SS + 1, SS - 1, [SS]), (SS, SS - 1, [SS]),
     (SS - 1, 2, [0, SS]), (1, 2 * SS, [0, 2 * SS])],
)  # fmt: skip
def test_only_partial_sectors_are_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, length: int, reads: list[int]
) -> None:
    """Whole sectors are encrypted straight from the caller's bytes; a partial head and a
    partial tail are each read once (one sector inside a single sector, not twice)."""
    dev = _dev(tmp_path / "img", 4 * SS, offset=SS)
    real = os.preadv
    seen: list[int] = []

    def preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        seen.append(off - SS)
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        dev.write(os.urandom(length), offset)
        assert seen == reads
    finally:
        monkeypatch.undo()
        dev.close()


def test_one_byte_reads_are_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = _dev(tmp_path / "img", 2 * SS)
    try:
        data = os.urandom(SS)
        dev.write(data, 0)
        real = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1]], off))
        assert dev.read(0, SS) == data
    finally:
        monkeypatch.undo()
        dev.close()


def test_a_refused_hint_does_not_fail_the_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fadvise(fd: int, off: int, n: int, adv: int) -> None:
        raise OSError(errno.ESPIPE, "no hints here")

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    dev = _dev(tmp_path / "img", 4 << 20)
    try:
        data = os.urandom(1 << 20)
        dev.write(data, 0)
        assert dev.read(0, 1 << 20) == data  # sequential from the start: a hint is tried
    finally:
        dev.close()


def test_aligned_reads_decrypt_in_place_unaligned_through_a_bounce_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = _dev(tmp_path / "img", 4 * SS)
    real = os.preadv
    into: list[object] = []

    def preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        into.append(bufs[0].obj)
        return real(fd, bufs, off)

    monkeypatch.setattr(os, "preadv", preadv)
    try:
        out = bytearray(2 * SS)
        dev.read_into(memoryview(out), SS)
        assert into and all(o is out for o in into)
        into.clear()
        dev.read_into(memoryview(out), SS + 1)
        assert into and all(o is not out for o in into)
    finally:
        monkeypatch.undo()
        dev.close()


def test_a_block_device_is_sized_and_claimed(tmp_path: Path) -> None:
    """A real loop device: BLKGETSIZE64 gives its size, a writer claims it exclusively."""
    import subprocess

    from fuse_crypt.blockfront.device import device_size
    from tests.fuse_crypt.block_rig import block_skip_reason

    reason = block_skip_reason()
    if reason:
        pytest.skip(reason)
    img = _img(tmp_path / "img", 8 * SS + 512)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(img)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        fd = open_device(loop)
        try:
            assert device_size(fd) == 8 * SS + 512
            with pytest.raises(DeviceError) as err:
                open_device(loop)
            assert (err.value.errno, err.value.strerror) == (
                errno.EBUSY, "the device is in use (mounted or open)"
            )  # fmt: skip
            dev = CryptDevice(fd, XtsSegment(KEY), offset=SS, size=None)
            assert dev.size == 7 * SS
            data = os.urandom(SS)
            dev.write(data, 6 * SS)
            assert dev.read(6 * SS, SS) == data
            dev.close()  # closes fd
            fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_a_fifo_opened_read_only_does_not_wait_for_a_writer(tmp_path: Path) -> None:
    """O_RDONLY on a FIFO blocks until a writer appears unless O_NONBLOCK is given (O_RDWR
    never blocks on Linux, so only the read-only probe shows it). A helper opens it for
    writing after 3 s, so a regression fails on the clock instead of hanging."""
    import threading
    import time

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = threading.Event()

    def rescue() -> None:
        if not done.wait(3):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=rescue, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(DeviceError) as err:
            open_device(str(fifo), read_only=True)
    finally:
        done.set()
    assert time.monotonic() - t0 < 3
    assert err.value.errno == errno.ENOTBLK


def test_close_releases_descriptor_zero_too(tmp_path: Path) -> None:
    """A daemon whose stdin is closed (the key was read from it) may get fd 0 for its
    device; close must release that one as well."""
    img = _img(tmp_path / "img", 2 * SS)
    saved = os.dup(0)
    try:
        fd = open_device(str(img))
        os.dup2(fd, 0)
        os.close(fd)
        dev = CryptDevice(0, XtsSegment(KEY), offset=0, size=None)
        dev.close()
        assert dev.fd == -1
        with pytest.raises(OSError) as err:
            os.fstat(0)
        assert err.value.errno == errno.EBADF
    finally:
        os.dup2(saved, 0)
        os.close(saved)
