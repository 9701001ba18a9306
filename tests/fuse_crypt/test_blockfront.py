"""The userspace block engine's daemon: CryptDevice logic, then real loop devices and ext4.

The real tests attach ``<mnt>/disk`` with ``losetup --direct-io=on`` and run mkfs/mount on
it, on an image that cryptsetup 2.6 formatted with CDH's options (attached header, data at
16 MiB), the volume key taken from ``luksDump --dump-volume-key``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.blockfront import CryptDevice, DeviceError, open_device
from fuse_crypt.luks2.segment import XtsSegment
from tests.fuse_crypt import luks2_helpers as lh
from tests.fuse_crypt.block_rig import BlockRig
from tests.fuse_crypt.cli_helpers import (
    FC,
    assert_one_line_error,
    free_port,
    metrics_text,
    scrape_metrics,
)
from tests.fuzzing import fuzz

SS = 4096
MiB = 1 << 20


def _image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _device(path: Path, key: bytes, *, offset: int = 0, size: int | None = None) -> CryptDevice:
    return CryptDevice(open_device(str(path)), XtsSegment(key), offset=offset, size=size)


# -- CryptDevice, no FUSE --------------------------------------------------------------------


def test_unaligned_io_matches_a_model_and_the_sectors(tmp_path: Path) -> None:
    key = os.urandom(64)
    img = _image(tmp_path / "d.img", 8192 + 16 * SS)
    dev = _device(img, key, offset=8192)
    assert dev.size == 16 * SS
    model = bytearray(dev.read(0, dev.size))
    for off, data in ((5, b"a" * 100), (SS - 3, b"b" * 10), (SS * 2, os.urandom(3 * SS + 7)),
                      (dev.size - 1, b"z"), (0, b"")):  # fmt: skip
        assert dev.write(data, off) == len(data)
        model[off : off + len(data)] = data
    assert dev.read(0, dev.size + 100) == bytes(model)
    assert dev.read(dev.size, 10) == b""
    dev.sync()
    # What is on disk is exactly the model, sector by sector, under an independent key copy.
    raw = img.read_bytes()
    assert raw[:8192] == bytes(8192)  # the "header" area before the segment is untouched
    assert XtsSegment(key).decrypt(0, raw[8192:]) == bytes(model)
    dev.close()


def test_read_ahead_hints_sequential_large_reads_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large reads that continue each other prefetch the next ciphertext (within the
    segment, at the device offset); small or scattered reads never do."""
    from fuse_crypt.blockfront import device as devmod

    hints: list[tuple[int, int]] = []
    drops: list[tuple[int, int]] = []

    def fadvise(fd: int, off: int, n: int, adv: int) -> None:
        (hints if adv == os.POSIX_FADV_WILLNEED else drops).append((off, n))
        assert adv in (os.POSIX_FADV_WILLNEED, os.POSIX_FADV_DONTNEED)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    img = _image(tmp_path / "d.img", 8192 + 64 * MiB)
    dev = _device(img, os.urandom(64), offset=8192)
    buf = memoryview(bytearray(MiB))
    for off in range(0, 8 * SS, SS):  # small sequential reads (metadata, small files)
        dev.read_into(buf[:SS], off)
    assert drops == []  # small reads keep their ciphertext cached
    for off in (40 * MiB, 3 * MiB, 20 * MiB):  # large but scattered
        dev.read_into(buf, off)
    assert hints == []
    # drop-behind: each large read's ciphertext, at the device offset, once decrypted
    assert drops == [(8192 + off, MiB) for off in (40 * MiB, 3 * MiB, 20 * MiB)]
    for off in range(0, 10 * MiB, MiB):  # sequential 1 MiB reads
        dev.read_into(buf, off)
    ra = devmod.READAHEAD
    assert hints[0] == (8192 + 2 * MiB, ra)  # from the second read's end
    assert all(off >= 8192 and n > 0 for off, n in hints)
    assert len(hints) <= 10 * MiB // (ra // 2) + 1  # one hint per half window, not per read
    # out of order by a request (as the loop device's split read-ahead arrives): still hinted
    n = len(hints)
    for off in (12 * MiB, 11 * MiB, 13 * MiB, 14 * MiB, 15 * MiB, 16 * MiB, 17 * MiB):
        dev.read_into(buf, off)
    assert len(hints) > n
    hints.clear()
    dev.read_into(buf, dev.size - MiB)  # near the end: never past the segment
    dev.read_into(buf, dev.size - MiB)
    assert all(off + n <= 8192 + dev.size for off, n in hints)
    dev.close()


@fuzz(quick=60)
@given(
    ops=st.lists(
        st.tuples(st.integers(0, 8 * SS), st.binary(min_size=0, max_size=3 * SS)), max_size=8
    )
)
def test_random_writes_property(ops: list[tuple[int, bytes]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        img = _image(Path(d) / "d.img", 8 * SS)
        dev = _device(img, os.urandom(64))
        model = bytearray(dev.read(0, dev.size))
        for off, data in ops:
            if off + len(data) > dev.size:
                with pytest.raises(DeviceError) as exc:
                    dev.write(data, off)
                assert exc.value.errno == errno.ENOSPC
                continue
            dev.write(data, off)
            model[off : off + len(data)] = data
        assert dev.read(0, dev.size) == bytes(model)
        dev.close()


def test_sizes_read_only_and_growth(tmp_path: Path) -> None:
    key = os.urandom(64)
    img = _image(tmp_path / "d.img", 4 * SS + 100)  # a ragged tail is not mapped
    dev = _device(img, key)
    assert dev.size == 4 * SS
    with img.open("r+b") as f:
        f.truncate(10 * SS)
    assert dev.refresh_size() == 10 * SS
    fixed = _device(img, key, size=2 * SS)
    assert fixed.size == 2 * SS and fixed.refresh_size() == 2 * SS
    with pytest.raises(DeviceError, match="smaller than its segment"):
        _device(img, key, size=20 * SS)
    with pytest.raises(DeviceError, match="smaller than its header"):
        _device(img, key, offset=10 * SS)
    with pytest.raises(DeviceError, match="whole sectors"):
        _device(img, key, size=100)
    ro = CryptDevice(open_device(str(img), read_only=True), XtsSegment(key), offset=0,
                     size=None, read_only=True)  # fmt: skip
    with pytest.raises(DeviceError) as exc:
        ro.write(b"x", 0)
    assert exc.value.errno == errno.EROFS
    for d in (dev, fixed, ro):
        d.close()


def test_open_device_refuses_links_fifos_and_files(tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", SS)
    link = tmp_path / "link"
    link.symlink_to(img)
    with pytest.raises(DeviceError, match="symbolic link"):
        open_device(str(link))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="not a block device"):
        open_device(str(fifo))  # O_NONBLOCK: no writer needed, no hang
    assert time.monotonic() - t0 < 2
    with pytest.raises(DeviceError, match="a regular file"):
        open_device(str(img), allow_regular=False)
    with pytest.raises(DeviceError, match="not a block device"):
        open_device("/dev/null")
    with pytest.raises(DeviceError, match="cannot open"):
        open_device(str(tmp_path))  # a directory cannot be opened O_RDWR
    with pytest.raises(DeviceError, match="cannot open"):
        open_device(str(tmp_path / "missing"))


def test_shrunk_device_is_eio_not_garbage(tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", 4 * SS)
    dev = _device(img, os.urandom(64))
    with img.open("r+b") as f:
        f.truncate(SS)  # the host shrinks the disk under us
    with pytest.raises(DeviceError) as exc:
        dev.read(2 * SS, SS)
    assert exc.value.errno == errno.EIO
    dev.close()


# -- real daemon, loop devices, ext4 ---------------------------------------------------------


@pytest.fixture
def luks_image(tmp_path: Path) -> tuple[Path, bytes, int]:
    """A 64 MiB image cryptsetup formatted with CDH's options; (path, VK, data offset)."""
    lh.skip_without_cryptsetup()
    img = _image(tmp_path / "disk.img", 64 * MiB)
    lh.cs_luks_format(img)
    seg = lh.cs_json(img)["segments"]["0"]
    return img, lh.cs_volume_key(img), int(seg["offset"])


MARKER = b"coco-block-marker-7f3a9c"
NAME = "secret-file-name-5b1e"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ext4_round_trip_through_restart(
    rig: BlockRig, luks_image: tuple[Path, bytes, int], tmp_path: Path
) -> None:
    img, vk, offset = luks_image
    header_before = img.read_bytes()[:offset]
    mnt, fs = tmp_path / "mnt", tmp_path / "fs"
    proc = rig.serve(img, mnt, vk, offset=offset)
    assert (mnt / "disk").stat().st_size == 48 * MiB
    loop = rig.attach(mnt / "disk")
    assert Path(f"/sys/block/{Path(loop).name}/loop/dio").read_text().strip() == "1"
    subprocess.run(["mkfs.ext4", "-q", loop], check=True, capture_output=True)
    rig.mount(loop, fs)
    (fs / NAME).write_bytes(MARKER * 1000)
    (fs / "dir").mkdir()
    (fs / "dir" / "big").write_bytes(os.urandom(3 * MiB))
    big = _sha(fs / "dir" / "big")
    rig.umount(fs)
    rig.detach(loop)
    assert rig.stop(proc, mnt) == 0
    raw = img.read_bytes()
    assert MARKER not in raw and NAME.encode() not in raw
    assert raw[:offset] == header_before  # the LUKS2 header is never written
    # cryptsetup still takes it for the same LUKS2 volume
    assert lh.cs_opens(img, b"pw")

    proc = rig.serve(img, mnt, vk, offset=offset)
    loop = rig.attach(mnt / "disk")
    fsck = subprocess.run(["fsck.ext4", "-n", loop], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()
    rig.mount(loop, fs)
    assert (fs / NAME).read_bytes() == MARKER * 1000
    assert _sha(fs / "dir" / "big") == big
    rig.umount(fs)
    rig.detach(loop)
    rig.stop(proc, mnt)


def test_read_only_daemon(rig: BlockRig, tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", 16 * MiB)
    vk = os.urandom(64)
    mnt = tmp_path / "mnt"
    proc = rig.serve(img, mnt, vk, offset=0, extra=("--allow-regular-file", "--ro"))
    with pytest.raises(OSError) as exc:
        os.open(mnt / "disk", os.O_RDWR)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        (mnt / "other").write_bytes(b"x")
    with pytest.raises(OSError):
        os.truncate(mnt / "disk", 0)
    rig.stop(proc, mnt)


def test_cli_refusals(rig: BlockRig, tmp_path: Path) -> None:
    img = _image(tmp_path / "d.img", 16 * MiB)
    mnt = tmp_path / "mnt"
    proc = rig.serve(img, mnt, os.urandom(64), offset=0, extra=(), expect_ready=False)
    assert proc.returncode != 0
    assert "regular file" in rig.log(mnt)
    proc = rig.serve(img, mnt, b"\x01" * 64, offset=0, expect_ready=False)
    assert proc.returncode == 14 and "halves are equal" in rig.log(mnt)
    proc = rig.serve(img, mnt, os.urandom(64), offset=32 * MiB, expect_ready=False)
    assert proc.returncode != 0 and "smaller than its header" in rig.log(mnt)
    assert "Traceback" not in rig.log(mnt)
    assert not os.path.ismount(mnt)


def test_daemon_killed_mid_write_then_fsck_clean(
    rig: BlockRig, luks_image: tuple[Path, bytes, int], tmp_path: Path
) -> None:
    img, vk, offset = luks_image
    mnt, fs = tmp_path / "mnt", tmp_path / "fs"
    proc = rig.serve(img, mnt, vk, offset=offset)
    loop = rig.attach(mnt / "disk")
    subprocess.run(["mkfs.ext4", "-q", loop], check=True, capture_output=True)
    rig.mount(loop, fs)
    (fs / "before").write_bytes(b"committed")
    os.sync()
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                with open(fs / f"f{i % 50}", "wb") as f:
                    f.write(os.urandom(64 * 1024))
                    if i % 5 == 0:
                        os.fsync(f.fileno())
            except OSError:
                return
            i += 1

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    time.sleep(1.0)
    rig.kill(proc)  # SIGKILL: no cleanup in the daemon
    stop.set()
    t.join(20)
    rig.umount(fs, lazy=True)
    rig.detach(loop)
    rig.stop(proc, mnt)

    proc = rig.serve(img, mnt, vk, offset=offset)
    loop = rig.attach(mnt / "disk")
    rig.mount(loop, fs)  # replays the journal
    assert (fs / "before").read_bytes() == b"committed"
    rig.umount(fs)
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", loop], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode()
    rig.detach(loop)
    rig.stop(proc, mnt)


def _format_ours(img: Path, passphrase: bytes) -> bytes:
    """Format ``img`` as our own (bound) LUKS2 volume, data at 16 MiB; the volume key."""
    from fuse_crypt.luks2 import KdfCost, format_volume

    fd = os.open(img, os.O_RDWR)
    try:
        opened = format_volume(fd, passphrase, kdf="pbkdf2", kdf_cost=KdfCost(iterations=1000))
    finally:
        os.close(fd)
    return bytes(opened.volume_key)


def test_passphrase_mode_reads_the_header_once(rig: BlockRig, tmp_path: Path) -> None:
    """--passphrase stdin: key and geometry from our own validated, bound header; a wrong
    passphrase is exit 12; a cryptsetup-made (unbound) header needs --accept-unbound-header."""
    img = _image(tmp_path / "ours.img", 32 * MiB)
    volume_key = _format_ours(img, b"s3cret")
    mnt = tmp_path / "mnt"
    proc = rig.serve(img, mnt, b"", offset=0, passphrase=b"s3cret")
    assert (mnt / "disk").stat().st_size == 16 * MiB
    with (mnt / "disk").open("r+b") as f:
        f.write(b"through the header")
    rig.stop(proc, mnt)
    raw = img.read_bytes()
    seg = XtsSegment(volume_key)
    assert seg.decrypt(0, raw[16 * MiB : 16 * MiB + SS]).startswith(b"through the header")
    proc = rig.serve(img, mnt, b"", offset=0, passphrase=b"wrong", expect_ready=False)
    assert proc.returncode == 12 and "passphrase incorrect" in rig.log(mnt)
    assert img.read_bytes() == raw

    lh.skip_without_cryptsetup()
    cdh = _image(tmp_path / "cdh.img", 32 * MiB)
    lh.cs_luks_format(cdh, b"pw")
    proc = rig.serve(cdh, mnt, b"", offset=0, passphrase=b"pw", expect_ready=False)
    assert proc.returncode == 23 and "LUKS2:" in rig.log(mnt)
    extra = ("--allow-regular-file", "--accept-unbound-header")
    proc = rig.serve(cdh, mnt, b"", offset=0, passphrase=b"pw", extra=extra)
    assert (mnt / "disk").stat().st_size == 16 * MiB
    rig.stop(proc, mnt)
    assert "Traceback" not in rig.log(mnt)


def test_a_block_device_is_claimed_exclusively(rig: BlockRig, tmp_path: Path) -> None:
    """Two writers of one disk (a second stage, a mounted filesystem) are refused: EBUSY."""
    img = _image(tmp_path / "d.img", 8 * MiB)
    loop = rig.attach(img)
    fd = open_device(loop)
    try:
        with pytest.raises(DeviceError) as exc:
            open_device(loop)
        assert exc.value.errno == errno.EBUSY
        os.close(open_device(loop, read_only=True))  # readers (probes) are fine
    finally:
        os.close(fd)
    os.close(open_device(loop))  # released with the first descriptor


# -- block-serve --metrics-addr: real daemon, real HTTP scrape -------------------------------

REQS = "fuse_crypt_block_requests_total"


def _series(m: dict[str, float], prefix: str) -> list[str]:
    return [k for k in m if k.startswith(prefix)]


def _assert_secret_free(body: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in body, "a secret is in the /metrics body"


def test_metrics_count_exact_bytes_requests_and_errors(rig: BlockRig, tmp_path: Path) -> None:
    """O_DIRECT reads and writes of known sizes move the counters by exactly those bytes and
    one request each; ENOSPC past the end and EIO from a device shrunk under the daemon are
    counted by op and errno; the scrape holds the block daemon's series, not the mount's."""
    import mmap

    img = _image(tmp_path / "d.img", 32 * MiB)
    _format_ours(img, b"pw")
    port = free_port()
    mnt = tmp_path / "mnt"
    extra = ("--allow-regular-file", "--metrics-addr", f"127.0.0.1:{port}")
    proc = rig.serve(img, mnt, b"", offset=0, passphrase=b"pw", extra=extra)
    m0 = scrape_metrics(port)
    (info,) = _series(m0, "fuse_crypt_block_info{")
    labels = f'device="{img}"', f'mountpoint="{mnt}"', 'read_only="false"', 'sector_size="4096"'
    assert all(label in info for label in labels), info
    assert m0["fuse_crypt_block_size_bytes"] == 16 * MiB
    assert m0["fuse_crypt_uptime_seconds"] > 0
    assert _series(m0, "fuse_crypt_block_errors_total") == []
    # only this daemon's series: none of the mount daemon's backend/crypto counters
    shared = {"fuse_crypt_start_time_seconds", "fuse_crypt_uptime_seconds"}
    foreign = [
        k
        for k in m0
        if k.startswith("fuse_crypt_") and not k.startswith("fuse_crypt_block_") and k not in shared
    ]
    assert foreign == []

    buf = mmap.mmap(-1, 5 * SS)
    buf[:] = os.urandom(5 * SS)
    fd = os.open(mnt / "disk", os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [memoryview(buf)[: 3 * SS]], 8 * SS) == 3 * SS
        os.fsync(fd)
        assert os.preadv(fd, [buf], 7 * SS) == 5 * SS
        m1 = scrape_metrics(port)
        assert m1[REQS + '{op="write"}'] - m0.get(REQS + '{op="write"}', 0) == 1
        assert m1[REQS + '{op="read"}'] - m0.get(REQS + '{op="read"}', 0) == 1
        assert m1[REQS + '{op="fsync"}'] - m0.get(REQS + '{op="fsync"}', 0) == 1
        assert (
            m1["fuse_crypt_block_plain_bytes_written_total"]
            - m0["fuse_crypt_block_plain_bytes_written_total"]
            == 3 * SS
        )
        assert (
            m1["fuse_crypt_block_plain_bytes_read_total"]
            - m0["fuse_crypt_block_plain_bytes_read_total"]
            == 5 * SS
        )
        assert _series(m1, "fuse_crypt_block_errors_total") == []

        with pytest.raises(OSError) as exc:  # 8 KiB from the last sector: past the end
            os.pwritev(fd, [memoryview(buf)[: 2 * SS]], 16 * MiB - SS)
        assert exc.value.errno == errno.ENOSPC
        with img.open("r+b") as f:  # the host shrinks the disk under the daemon
            f.truncate(16 * MiB + 4 * SS)
        with pytest.raises(OSError) as exc:
            os.preadv(fd, [memoryview(buf)[:SS]], 8 * SS)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    m2 = scrape_metrics(port)
    assert m2['fuse_crypt_block_errors_total{errno="ENOSPC",op="write"}'] == 1
    assert m2['fuse_crypt_block_errors_total{errno="EIO",op="read"}'] == 1
    assert len(_series(m2, "fuse_crypt_block_errors_total{")) == 2
    assert m2[REQS + '{op="write"}'] == m1[REQS + '{op="write"}'] + 1  # failed ones count
    assert m2[REQS + '{op="read"}'] == m1[REQS + '{op="read"}'] + 1
    for name in ("read", "written"):  # a refused request moved no bytes
        key = f"fuse_crypt_block_plain_bytes_{name}_total"
        assert m2[key] == m1[key]
    assert rig.stop(proc, mnt) == 0


def test_metrics_never_show_the_passphrase_or_key(rig: BlockRig, tmp_path: Path) -> None:
    """The body is scanned for the passphrase and the volume key (hex, either case); the
    same scan finds a marker planted in the mount point's name, which the info label
    exports, so it does read what the daemon serves."""
    passphrase = b"pass-" + os.urandom(12).hex().encode()
    img = _image(tmp_path / "d.img", 32 * MiB)
    vk = _format_ours(img, passphrase)
    planted = "planted-" + os.urandom(8).hex()
    mnt = tmp_path / f"mnt-{planted}"
    port = free_port()
    extra = ("--allow-regular-file", "--ro", "--metrics-addr", f"127.0.0.1:{port}")
    proc = rig.serve(img, mnt, b"", offset=0, passphrase=passphrase, extra=extra)
    with (mnt / "disk").open("rb", buffering=0) as f:
        assert len(f.read(SS)) == SS
    body = metrics_text(port)
    assert 'read_only="true"' in body
    assert 'fuse_crypt_block_requests_total{op="read"}' in body
    _assert_secret_free(body, [passphrase.decode(), vk.hex(), vk.hex().upper()])
    with pytest.raises(AssertionError, match="a secret"):
        _assert_secret_free(body, [planted])
    assert rig.stop(proc, mnt) == 0


def test_metrics_addr_refusals(rig: BlockRig, tmp_path: Path) -> None:
    """A malformed --metrics-addr is a one-line usage error before the passphrase is read
    (stdin stays open and unwritten: reading it would block) or the device is touched; a
    port in use fails the daemon (exit 11) before anything is mounted."""
    img = _image(tmp_path / "d.img", 32 * MiB)
    _format_ours(img, b"pw")
    before = img.read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for bad in ("localhost", "host:port", "127.0.0.1:70000"):
        argv = [*FC, "block-serve", "--passphrase", "stdin", "--allow-regular-file"]
        argv += ["--metrics-addr", bad, str(img), str(mnt)]
        p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            rc = p.wait(30)
        finally:
            assert p.stdin is not None
            p.stdin.close()
        assert p.stderr is not None and p.stdout is not None
        done = subprocess.CompletedProcess(argv, rc, p.stdout.read(), p.stderr.read())
        p.stdout.close()
        p.stderr.close()
        assert "HOST:PORT" in assert_one_line_error(done, 1)
    assert img.read_bytes() == before
    assert not os.path.ismount(mnt)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        extra = ("--allow-regular-file", "--metrics-addr", f"127.0.0.1:{taken.getsockname()[1]}")
        proc = rig.serve(img, mnt, b"", offset=0, passphrase=b"pw", extra=extra, expect_ready=False)
    assert proc.returncode == 11
    assert "cannot serve metrics" in rig.log(mnt) and "Traceback" not in rig.log(mnt)
    assert not os.path.ismount(mnt)


def test_metrics_port_zero_binds_a_free_port_and_prints_it(rig: BlockRig, tmp_path: Path) -> None:
    """``--metrics-addr 127.0.0.1:0``: the kernel picks the port while the daemon binds it
    (nobody can take it in between) and the daemon prints it before it is ready; that port
    serves this daemon's metrics."""
    import re

    img = _image(tmp_path / "d.img", 32 * MiB)
    _format_ours(img, b"pw")
    mnt = tmp_path / "mnt"
    extra = ("--allow-regular-file", "--metrics-addr", "127.0.0.1:0")
    proc = rig.serve(img, mnt, b"", offset=0, passphrase=b"pw", extra=extra)
    log = rig.log(mnt)
    found = re.findall(r"Serving metrics on 127\.0\.0\.1:(\d+)\n", log)
    assert len(found) == 1, log
    assert log.index("Serving metrics") < log.index("Filesystem mounted and ready.")
    port = int(found[0])
    assert port > 0
    (info,) = _series(scrape_metrics(port), "fuse_crypt_block_info{")
    assert f'mountpoint="{mnt}"' in info
    assert rig.stop(proc, mnt) == 0
