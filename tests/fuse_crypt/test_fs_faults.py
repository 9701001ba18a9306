"""Tampered ciphertext through a real mount: EIO, never wrong plaintext.

One volume is filled through a first mount, then its cipher files are damaged in
different ways while unmounted, and a fresh mount (empty kernel page cache) reads
them back.  Each case checks that the damaged read fails with EIO, that intact
parts and other files keep working, and that the daemon logged the event with the
path but without contents or keys.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN, PLAIN_BS
from fuse_crypt.nametransform import DIRIV_NAME
from tests.fuse_env import needs_fuse

from .conftest import CipherView, Mount, MountFactory, Volume, make_volume, start_mount

pytestmark = needs_fuse

MARKER = b"PLAINTEXT-MARKER-"
NAMES = ["good", "flip", "trunc_tail", "trunc_mid", "swap", "foreign", "header", "zero_nonce"]


def content(name: str) -> bytes:
    """3 blocks minus a bit; recognisable plaintext so leaks would be visible."""
    body = (MARKER + name.encode() + b" ") * 1000
    return body[: 3 * PLAIN_BS - 100]


def block(raw: bytes | bytearray, n: int) -> slice:
    return slice(HEADER_LEN + n * CIPHER_BS, HEADER_LEN + (n + 1) * CIPHER_BS)


def tamper(cv: CipherView) -> None:
    def rw(name: str, fn: Callable[[bytearray], object]) -> None:
        p = cv.cpath(name)
        raw = bytearray(p.read_bytes())
        fn(raw)
        p.write_bytes(bytes(raw))

    def flip(raw: bytearray) -> None:
        raw[HEADER_LEN + CIPHER_BS + 100] ^= 0x01  # inside block 1's ciphertext

    def swap(raw: bytearray) -> None:
        b0, b1 = raw[block(raw, 0)], raw[block(raw, 1)]
        raw[block(raw, 0)], raw[block(raw, 1)] = b1, b0

    def header(raw: bytearray) -> None:
        raw[0:2] = b"\x00\x03"

    def zero_nonce(raw: bytearray) -> None:
        raw[HEADER_LEN : HEADER_LEN + 16] = bytes(16)

    rw("flip", flip)
    rw("swap", swap)
    rw("header", header)
    rw("zero_nonce", zero_nonce)
    good = cv.cpath("good").read_bytes()
    rw("foreign", lambda raw: raw.__setitem__(block(raw, 0), good[block(good, 0)]))
    # Leave 10 bytes of the last block: shorter than nonce+tag, impossible size.
    p = cv.cpath("trunc_tail")
    os.truncate(p, HEADER_LEN + 2 * CIPHER_BS + 10)
    # Cut the last block in the middle: the tag no longer verifies.
    p = cv.cpath("trunc_mid")
    os.truncate(p, p.stat().st_size - 500)
    # Symlink target, xattr value, directory IV.
    link = cv.cpath("link")
    stored = os.readlink(link)
    link.unlink()
    os.symlink(stored[:-4] + ("AAAA" if not stored.endswith("AAAA") else "BBBB"), link)
    xf = cv.cpath("xattr_file")
    [name] = os.listxattr(xf)
    value = bytearray(os.getxattr(xf, name))
    value[-1] ^= 0xFF
    os.setxattr(xf, name, bytes(value))
    diriv = cv.cpath("baddir") / DIRIV_NAME
    os.chmod(diriv, 0o644)
    diriv.write_bytes(bytes(16))


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Volume]]:
    base = tmp_path_factory.mktemp("faults")
    vol = make_volume(base / "cipher")
    m1 = start_mount(vol, base / "mnt1")
    try:
        for name in NAMES:
            (m1.path / name).write_bytes(content(name))
        os.symlink("/secret/link/target", m1.path / "link")
        (m1.path / "xattr_file").write_bytes(b"x")
        os.setxattr(m1.path / "xattr_file", "user.secret", b"xattr plaintext")
        (m1.path / "baddir").mkdir()
        (m1.path / "baddir" / "inner").write_bytes(b"inner")
        (m1.path / "okdir").mkdir()
        (m1.path / "okdir" / "inner").write_bytes(b"fine")
    finally:
        m1.unmount()
    tamper(CipherView(vol))
    m2 = start_mount(vol, base / "mnt2")
    try:
        yield m2, vol
    finally:
        m2.unmount()


def read_all(p: Path) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def pread(p: Path, n: int, off: int) -> bytes:
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def expect_eio(fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as ei:
        fn()
    assert ei.value.errno == errno.EIO


def test_intact_file_reads(damaged: tuple[Mount, Volume]) -> None:
    m, _ = damaged
    assert read_all(m.path / "good") == content("good")


def test_flipped_bit_fails_only_that_block(damaged: tuple[Mount, Volume]) -> None:
    m, _ = damaged
    p = m.path / "flip"
    assert pread(p, PLAIN_BS, 0) == content("flip")[:PLAIN_BS]
    expect_eio(lambda: pread(p, 10, PLAIN_BS + 5))
    expect_eio(lambda: read_all(p))
    assert pread(p, 100, 2 * PLAIN_BS) == content("flip")[2 * PLAIN_BS : 2 * PLAIN_BS + 100]


@pytest.mark.parametrize("name", ["trunc_tail", "trunc_mid", "swap", "foreign", "header"])
def test_damaged_reads_fail_with_eio(damaged: tuple[Mount, Volume], name: str) -> None:
    m, _ = damaged
    expect_eio(lambda: read_all(m.path / name))


def test_zero_nonce_block_is_corruption(damaged: tuple[Mount, Volume]) -> None:
    m, _ = damaged
    expect_eio(lambda: pread(m.path / "zero_nonce", 100, 0))
    assert (
        pread(m.path / "zero_nonce", 100, PLAIN_BS)
        == content("zero_nonce")[PLAIN_BS : PLAIN_BS + 100]
    )


def test_truncated_file_still_stats_and_unlinks(damaged: tuple[Mount, Volume]) -> None:
    m, _ = damaged
    st = (m.path / "trunc_tail").stat()  # lenient size like gocryptfs, no EIO on stat
    assert st.st_size > 2 * PLAIN_BS
    assert pread(m.path / "trunc_tail", 100, 0) == content("trunc_tail")[:100]


def test_writes_into_a_damaged_block_fail(damaged: tuple[Mount, Volume]) -> None:
    """Read-modify-write must not re-encrypt garbage as if it were valid."""
    m, _ = damaged
    fd = os.open(m.path / "swap", os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, b"x", 10)
        assert ei.value.errno == errno.EIO
    finally:
        os.close(fd)


def test_symlink_xattr_and_diriv_damage(damaged: tuple[Mount, Volume]) -> None:
    m, _ = damaged
    expect_eio(lambda: os.readlink(m.path / "link"))
    expect_eio(lambda: os.getxattr(m.path / "xattr_file", "user.secret"))
    expect_eio(lambda: os.listdir(m.path / "baddir"))
    assert (m.path / "okdir" / "inner").read_bytes() == b"fine"
    assert "baddir" in os.listdir(m.path)


def test_other_files_keep_working_and_log_is_clean(damaged: tuple[Mount, Volume]) -> None:
    m, vol = damaged
    expect_eio(lambda: read_all(m.path / "flip"))
    assert read_all(m.path / "good") == content("good")
    (m.path / "after").write_bytes(b"still writable")
    assert (m.path / "after").read_bytes() == b"still writable"
    log = m.log()
    cv = CipherView(vol)

    def rel(name: str) -> str:
        return str(cv.cpath(name).relative_to(vol.cipherdir))

    # Logs leave the TEE: they name cipher paths, never plaintext ones (issue 7, finding 5).
    assert f"event=corrupt_block path={rel('flip')} " in log
    assert f"event=corrupt_data path={rel('header')} " in log
    assert f"corrupt_symlink cpath={rel('link')}" in log and "corrupt_xattr" in log
    for name in ("/flip", "/header", "/link", "/xattr_file", "/baddir"):
        assert name not in log
    assert MARKER.decode() not in log
    assert "xattr plaintext" not in log and "/secret/link/target" not in log
    assert vol.master_key.hex() not in log.lower()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_enospc_fails_cleanly(tmp_path: Path, mount_factory: MountFactory) -> None:
    """A full backing store fails the write with ENOSPC; what was written before
    stays readable (space is reserved before blocks are written, so no torn
    cipher block is left behind)."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(small)], check=True)
    try:
        vol = make_volume(small / "cipher")
        m = mount_factory(vol)
        keep = os.urandom(100_000)
        (m.path / "keep").write_bytes(keep)
        fd = os.open(m.path / "keep", os.O_WRONLY)
        try:
            with pytest.raises(OSError) as ei:
                for i in range(64):  # far more than fits
                    os.pwrite(fd, os.urandom(64 * 1024), 100_000 + i * 64 * 1024)
            assert ei.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        data = (m.path / "keep").read_bytes()
        assert data[:100_000] == keep
        assert len(data) >= 100_000
        (m.path / "keep").unlink()
        (m.path / "after").write_bytes(b"space again")
        assert (m.path / "after").read_bytes() == b"space again"
        m.unmount()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_directory_swapped_for_symlink_is_not_followed(
    tmp_path: Path, mount_factory: MountFactory
) -> None:
    """The host swaps a cipher directory for a symlink into the guest (with a
    copied diriv so names still encrypt).  While the kernel still believes the
    directory exists, writes through it must fail, and nothing may land outside."""
    vol = make_volume(tmp_path / "swap")
    m = mount_factory(vol)
    (m.path / "dir").mkdir()
    (m.path / "dir" / "f").write_bytes(b"inside")
    cdir = CipherView(vol).cpath("dir")
    outside = tmp_path / "guest"
    outside.mkdir()
    os.rename(cdir, tmp_path / "parked")
    (outside / DIRIV_NAME).write_bytes((tmp_path / "parked" / DIRIV_NAME).read_bytes())
    os.symlink(outside, cdir)
    for attempt in (
        lambda: (m.path / "dir" / "new").write_bytes(b"leak"),
        lambda: os.mkdir(m.path / "dir" / "newdir"),
        lambda: os.symlink("x", m.path / "dir" / "ln"),
    ):
        with pytest.raises(OSError):
            attempt()
    assert os.listdir(outside) == [DIRIV_NAME]
    assert (m.path / "ok").write_bytes(b"rest works") == 10
