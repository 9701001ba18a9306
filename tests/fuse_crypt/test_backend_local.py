"""LocalDirBackend against a real directory: errno contract, no-follow, handles."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from fuse_crypt.backend import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    LocalDirBackend,
    Stat,
    StorageBackend,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def be(root: Path) -> LocalDirBackend:
    b = LocalDirBackend(str(root))
    yield b
    b.destroy()


def _errno(exc_info: pytest.ExceptionInfo[OSError]) -> int | None:
    return exc_info.value.errno


def test_is_a_storage_backend(be: LocalDirBackend) -> None:
    assert isinstance(be, StorageBackend)
    assert "root" in repr(be)


@pytest.mark.parametrize("bad", ["/abs", "a/../b", "..", "a//b", "a/./b", "a\0b", "a/"])
def test_rejects_escaping_paths(be: LocalDirBackend, bad: str) -> None:
    with pytest.raises(OSError) as ei:
        be.lstat(bad)
    assert _errno(ei) == errno.EINVAL


def test_root_and_missing(be: LocalDirBackend, root: Path) -> None:
    st = be.lstat("")
    assert isinstance(st, Stat) and st.is_dir
    assert st.ino == os.stat(root).st_ino
    with pytest.raises(FileNotFoundError):
        be.lstat("nope")
    with pytest.raises(FileNotFoundError):
        be.listdir("nope")


def test_mkdir_listdir_scandir_rmdir(be: LocalDirBackend, root: Path) -> None:
    be.mkdir("d", 0o750)
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750 & ~_umask()
    be.write_small_file_excl("d/f", b"x", 0o644)
    be.symlink("target", "d/l")
    assert sorted(be.listdir("d")) == ["f", "l"]
    entries = {e.name: e for e in be.scandir("d")}
    assert stat.S_ISREG(entries["f"].type) and stat.S_ISLNK(entries["l"].type)
    assert entries["f"].ino == os.lstat(root / "d" / "f").st_ino
    assert {e.name: e.type for e in be.scandir("")}["d"] == stat.S_IFDIR
    with pytest.raises(OSError) as ei:
        be.rmdir("d")
    assert _errno(ei) == errno.ENOTEMPTY
    with pytest.raises(FileExistsError):
        be.mkdir("d", 0o700)
    be.unlink("d/f")
    be.unlink("d/l")
    be.rmdir("d")
    assert not (root / "d").exists()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_rename_plain_noreplace_exchange(be: LocalDirBackend, root: Path) -> None:
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    with pytest.raises(FileExistsError):
        be.rename("a", "b", RENAME_NOREPLACE)
    be.rename("a", "b", RENAME_EXCHANGE)
    assert (root / "a").read_bytes() == b"B" and (root / "b").read_bytes() == b"A"
    be.rename("a", "b")
    assert not (root / "a").exists() and (root / "b").read_bytes() == b"B"
    with pytest.raises(OSError) as ei:
        be.rename("b", "c", 0x80)
    assert _errno(ei) == errno.EINVAL


def test_link_symlink_readlink(be: LocalDirBackend, root: Path) -> None:
    (root / "f").write_bytes(b"data")
    be.link("f", "g")
    assert be.lstat("g").ino == be.lstat("f").ino and be.lstat("f").nlink == 2
    be.symlink("../../etc/passwd", "l")
    assert be.readlink("l") == "../../etc/passwd"
    assert be.lstat("l").is_link  # never followed
    with pytest.raises(OSError) as ei:
        be.readlink("f")
    assert _errno(ei) == errno.EINVAL


def test_metadata_ops_do_not_follow_symlinks(be: LocalDirBackend, root: Path) -> None:
    victim = root / "victim"
    victim.write_bytes(b"v")
    os.chmod(victim, 0o600)
    be.symlink("victim", "l")
    with pytest.raises(OSError) as ei:
        be.chmod("l", 0o777)
    assert _errno(ei) == errno.EOPNOTSUPP
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    before = victim.stat().st_mtime_ns
    be.utimens("l", 1_000_000_001, 2_000_000_002)
    assert victim.stat().st_mtime_ns == before
    assert os.lstat(root / "l").st_mtime_ns == 2_000_000_002
    with pytest.raises(OSError) as ei:
        be.open("l", os.O_RDONLY)
    assert _errno(ei) == errno.ELOOP


def test_chmod_chown_utimens(be: LocalDirBackend, root: Path) -> None:
    (root / "f").write_bytes(b"")
    be.chmod("f", 0o640)
    assert stat.S_IMODE(be.lstat("f").mode) == 0o640
    if os.geteuid() == 0:
        be.chown("f", 1234, 5678)
        st = be.lstat("f")
        assert (st.uid, st.gid) == (1234, 5678)
        be.chown("f", -1, 42)
        st = be.lstat("f")
        assert (st.uid, st.gid) == (1234, 42)
    be.utimens("f", 1_500_000_000_123_456_789, 1_600_000_000_987_654_321)
    st = be.lstat("f")
    assert st.atime_ns == 1_500_000_000_123_456_789
    assert st.mtime_ns == 1_600_000_000_987_654_321
    be.utimens("f", None, 1_700_000_000_000_000_001)  # None = leave unchanged
    st = be.lstat("f")
    assert st.atime_ns == 1_500_000_000_123_456_789
    assert st.mtime_ns == 1_700_000_000_000_000_001


def test_statfs(be: LocalDirBackend, root: Path) -> None:
    sv = be.statfs()
    ref = os.statvfs(root)
    assert sv["f_bsize"] == ref.f_bsize and sv["f_blocks"] == ref.f_blocks
    assert set(sv) >= {"f_bavail", "f_bfree", "f_files", "f_ffree", "f_namemax", "f_frsize"}


def test_xattrs(be: LocalDirBackend, root: Path) -> None:
    (root / "f").write_bytes(b"")
    try:
        be.setxattr("f", "user.test", b"\x00\x01value")
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            pytest.skip("backing filesystem has no user xattrs")
        raise
    assert be.getxattr("f", "user.test") == b"\x00\x01value"
    assert "user.test" in be.listxattr("f")
    with pytest.raises(FileExistsError):
        be.setxattr("f", "user.test", b"x", XATTR_CREATE)
    be.removexattr("f", "user.test")
    with pytest.raises(OSError) as ei:
        be.getxattr("f", "user.test")
    assert _errno(ei) == errno.ENODATA


def test_small_files(be: LocalDirBackend, root: Path) -> None:
    be.write_small_file_excl("iv", b"0123456789abcdef", 0o444)
    assert stat.S_IMODE(os.stat(root / "iv").st_mode) == 0o444
    assert be.read_small_file("iv") == b"0123456789abcdef"
    with pytest.raises(FileExistsError):
        be.write_small_file_excl("iv", b"other", 0o444)
    assert be.read_small_file("iv") == b"0123456789abcdef"
    with pytest.raises(OSError) as ei:
        be.read_small_file("iv", max_size=4)
    assert _errno(ei) == errno.EFBIG
    os.symlink("iv", root / "ivlink")
    with pytest.raises(OSError) as ei:
        be.read_small_file("ivlink")
    assert _errno(ei) == errno.ELOOP


def test_file_handles(be: LocalDirBackend, root: Path) -> None:
    h = be.open("f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert be.pwrite(h, b"hello", 0) == 5
        assert be.pwrite(h, memoryview(b"world"), 10) == 5
        assert be.pread(h, 100, 0) == b"hello\0\0\0\0\0world"
        buf = bytearray(8)
        assert be.pread_into(h, memoryview(buf), 10) == 5
        assert bytes(buf[:5]) == b"world"
        assert be.fstat(h).size == 15
        be.ftruncate(h, 3)
        assert be.pread(h, 100, 0) == b"hel"
        be.fallocate(h, 0x01, 0, 1 << 20)  # KEEP_SIZE: reserve only
        assert be.fstat(h).size == 3
        be.fsync(h)
        be.fsync(h, datasync=True)
        assert be.pread(h, 10, 100) == b""
    finally:
        be.close(h)
    with pytest.raises(FileExistsError):
        be.open("f", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    with pytest.raises(OSError) as ei:
        be.open("f", os.O_RDWR | os.O_APPEND)
    assert _errno(ei) == errno.EINVAL
    be.fsyncdir("")


def test_root_fd_survives_path_swap(tmp_path: Path) -> None:
    """After construction the backend is bound to the directory, not its path."""
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"original")
    be = LocalDirBackend(str(root))
    try:
        root.rename(tmp_path / "moved")
        root.mkdir()
        (root / "f").write_bytes(b"decoy")
        assert be.read_small_file("f") == b"original"
    finally:
        be.destroy()


def test_default_scandir_and_pread_into() -> None:
    """The base-class fallbacks work for a backend that only has the minimum."""

    class Tiny(LocalDirBackend):
        scandir = StorageBackend.scandir
        pread_into = StorageBackend.pread_into

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        Path(d, "x").write_bytes(b"abc")
        t = Tiny(d)
        try:
            [e] = t.scandir("")
            assert e.name == "x" and stat.S_ISREG(e.type)
            h = t.open("x", os.O_RDONLY)
            buf = bytearray(5)
            assert t.pread_into(h, memoryview(buf), 1) == 2 and bytes(buf[:2]) == b"bc"
            t.close(h)
        finally:
            t.destroy()


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "component-walk"])
def test_planted_symlinks_are_never_followed(tmp_path: Path, openat2: bool) -> None:
    """The host may swap a cipher directory for a symlink to anywhere in the
    guest; every call must then fail instead of touching the target."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"guest file")
    (root / "d").mkdir()
    (root / "d" / "sub").mkdir()
    be = LocalDirBackend(str(root))
    be._openat2 = openat2
    try:
        be.write_small_file_excl("d/sub/ok", b"1", 0o644)  # works before the swap
        (root / "d" / "sub" / "ok").unlink()
        (root / "d" / "sub").rmdir()
        (root / "d").rmdir()
        os.symlink(outside, root / "d")  # absolute, points out of the root
        os.symlink("../outside", root / "r")  # relative escape
        for parent in ("d", "r"):
            attempts = [
                lambda p=parent: be.lstat(f"{p}/victim"),
                lambda p=parent: be.listdir(f"{p}"),
                lambda p=parent: be.read_small_file(f"{p}/victim"),
                lambda p=parent: be.write_small_file_excl(f"{p}/planted", b"x", 0o644),
                lambda p=parent: be.mkdir(f"{p}/newdir", 0o755),
                lambda p=parent: be.unlink(f"{p}/victim"),
                lambda p=parent: be.chmod(f"{p}/victim", 0o777),
                lambda p=parent: be.utimens(f"{p}/victim", 1, 1),
                lambda p=parent: be.getxattr(f"{p}/victim", "user.x"),
                lambda p=parent: be.open(f"{p}/victim", os.O_RDWR),
                lambda p=parent: be.rename(f"{p}/victim", "stolen"),
                lambda p=parent: be.link(f"{p}/victim", "hard"),
            ]
            for attempt in attempts:
                with pytest.raises(OSError) as ei:
                    attempt()
                assert ei.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)
        assert sorted(os.listdir(outside)) == ["victim"]
        assert (outside / "victim").read_bytes() == b"guest file"
        assert stat.S_IMODE((outside / "victim").stat().st_mode) != 0o777
        assert sorted(os.listdir(root)) == ["d", "r"]
    finally:
        be.destroy()
