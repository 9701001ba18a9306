"""POSIX behaviour of a real fuse_crypt mount, checked on both sides.

Every test works in its own directory of one shared mount (mounting costs a Python
start-up) and asserts the plaintext result *and* what landed in the cipher
directory: names encrypted (recomputed independently with the crypto layer),
contents never stored in plaintext, gocryptfs layout (header, holes, sizes, dir IVs,
long-name files).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN, PLAIN_BS
from fuse_crypt.nametransform import CONF_NAME, DIRIV_NAME, NameTransform
from tests.fuse_env import needs_fuse

from .conftest import CipherView as Crypto
from .conftest import Mount, MountFactory, Volume, make_volume, start_mount

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, Crypto]]:
    base = tmp_path_factory.mktemp("posix")
    vol = make_volume(base / "cipher")
    m = start_mount(vol, base / "mnt")
    try:
        yield m, Crypto(vol)
    finally:
        m.unmount()


@pytest.fixture
def d(shared: tuple[Mount, Crypto], request: pytest.FixtureRequest) -> Path:
    """A fresh plaintext directory for this test."""
    m, _ = shared
    p = m.path / request.node.name.replace("[", "_").replace("]", "")
    p.mkdir()
    return p


@pytest.fixture
def cr(shared: tuple[Mount, Crypto]) -> Crypto:
    return shared[1]


def rel(m: Mount, p: Path) -> str:
    return str(p.relative_to(m.path))


@pytest.fixture
def m(shared: tuple[Mount, Crypto]) -> Mount:
    return shared[0]


# -- contents -----------------------------------------------------------------------


def test_create_write_read_and_ciphertext(m: Mount, cr: Crypto, d: Path) -> None:
    secret = b"top secret plaintext " * 500  # 10500 bytes, 3 blocks
    f = d / "hello.txt"
    f.write_bytes(secret)
    assert f.read_bytes() == secret
    assert f.stat().st_size == len(secret)
    c = cr.cpath(rel(m, f))
    assert c.exists(), "name must be the gocryptfs EME name"
    assert "hello" not in " ".join(os.listdir(c.parent))
    raw = c.read_bytes()
    assert len(raw) == cr.enc.cipher_size(len(secret)) == 18 + 10500 + 3 * 32
    assert b"top secret" not in raw
    assert raw[:2] == b"\x00\x02"
    assert cr.decrypt_file(c) == secret


def test_empty_file_has_no_header_then_first_write_creates_one(
    m: Mount, cr: Crypto, d: Path
) -> None:
    f = d / "empty"
    f.touch()
    c = cr.cpath(rel(m, f))
    assert c.stat().st_size == 0 and f.stat().st_size == 0
    assert f.read_bytes() == b""
    with open(f, "r+b") as fh:
        fh.write(b"x")
    assert c.stat().st_size == 18 + 1 + 32
    assert f.read_bytes() == b"x"


def test_header_only_file_is_empty_and_gets_new_file_id(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "hdr"
    f.write_bytes(b"abc")
    c = cr.cpath(rel(m, f))
    old_header = c.read_bytes()[:HEADER_LEN]
    os.truncate(c, HEADER_LEN)  # crash leftover: header without blocks
    os.utime(c)  # let the kernel's cached attrs expire via a new open below
    fd = os.open(f, os.O_RDWR)
    try:
        assert os.fstat(fd).st_size == 0
        os.pwrite(fd, b"new content", 0)
    finally:
        os.close(fd)
    raw = c.read_bytes()
    assert raw[:HEADER_LEN] != old_header, "a header-only file must get a fresh file ID"
    assert cr.decrypt_file(c) == b"new content"
    assert f.read_bytes() == b"new content"


def test_writes_at_any_offset_match_a_model(m: Mount, cr: Crypto, d: Path) -> None:
    rng = random.Random(1234)
    f = d / "model"
    model = bytearray()
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for step in range(80):
            op = rng.random()
            if op < 0.7:
                off = rng.randrange(0, 40000)
                data = rng.randbytes(rng.choice([1, 17, 4095, 4096, 4097, rng.randrange(1, 12000)]))
                os.pwrite(fd, data, off)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + len(data)] = data
            else:
                size = rng.randrange(0, 50000)
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            if step % 8 == 7:
                assert os.fstat(fd).st_size == len(model)
                assert os.pread(fd, len(model) + 10, 0) == bytes(model)
                c = cr.cpath(rel(m, f))
                assert c.stat().st_size == cr.enc.cipher_size(len(model))
                assert cr.decrypt_file(c) == bytes(model)
        # Unaligned reads across block boundaries.
        for _ in range(20):
            off = rng.randrange(0, len(model) + 100)
            n = rng.randrange(1, 9000)
            assert os.pread(fd, n, off) == bytes(model[off : off + n])
    finally:
        os.close(fd)


def test_append_mode(d: Path) -> None:
    f = d / "log"
    f.write_bytes(b"a" * 5000)
    with open(f, "ab") as fh:
        fh.write(b"bbb")
    assert f.read_bytes() == b"a" * 5000 + b"bbb"


def test_o_trunc(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "t"
    f.write_bytes(b"x" * 9000)
    with open(f, "wb") as fh:  # O_TRUNC
        fh.write(b"short")
    assert f.read_bytes() == b"short"
    assert cr.decrypt_file(cr.cpath(rel(m, f))) == b"short"


@pytest.mark.parametrize(
    ("start", "new"),
    [
        (10000, 9000),  # shrink within last block
        (10000, 8192),  # shrink to a block boundary
        (10000, 0),  # to zero: the header disappears too
        (5000, 6000),  # grow within the last block
        (5000, 3 * 4096),  # grow beyond, aligned: holes
        (5000, 20000),  # grow beyond, unaligned
        (0, 4096 * 4),  # grow an empty file: header + holes
        (0, 10),
    ],
)
def test_truncate(m: Mount, cr: Crypto, d: Path, start: int, new: int) -> None:
    f = d / "tr"
    data = os.urandom(start)
    f.write_bytes(data)
    os.truncate(f, new)
    expect = data[:new] + bytes(max(0, new - start))
    assert f.stat().st_size == new
    assert f.read_bytes() == expect
    c = cr.cpath(rel(m, f))
    assert c.stat().st_size == cr.enc.cipher_size(new)
    assert cr.decrypt_file(c) == expect


def test_grow_leaves_holes_on_disk(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "holes"
    f.write_bytes(b"x" * 100)
    os.truncate(f, 4 * PLAIN_BS)
    raw = cr.cpath(rel(m, f)).read_bytes()
    blocks = [raw[HEADER_LEN + i * CIPHER_BS : HEADER_LEN + (i + 1) * CIPHER_BS] for i in range(4)]
    assert blocks[0] != bytes(CIPHER_BS)  # zero-padded, re-encrypted
    assert blocks[1] == blocks[2] == blocks[3] == bytes(CIPHER_BS)  # holes


def test_sparse_write_like_gocryptfs(m: Mount, cr: Crypto, d: Path) -> None:
    """Sheet §7 (V): 1 byte at offset 12293 of a new file -> 12440 cipher bytes,
    blocks 0-2 all-zero holes, block 3 = 38 bytes."""
    f = d / "sparse"
    with open(f, "wb") as fh:
        fh.seek(12293)
        fh.write(b"X")
    raw = cr.cpath(rel(m, f)).read_bytes()
    assert len(raw) == 12440
    assert raw[HEADER_LEN : HEADER_LEN + 3 * CIPHER_BS] == bytes(3 * CIPHER_BS)
    assert len(raw) - (HEADER_LEN + 3 * CIPHER_BS) == 38
    assert f.read_bytes() == bytes(12293) + b"X"


def test_file_larger_than_4gib(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "huge"
    off = 5 << 30
    with open(f, "wb") as fh:
        fh.write(b"head")
        fh.seek(off)
        fh.write(b"tail at five gib")
    assert f.stat().st_size == off + 16
    with open(f, "rb") as fh:
        fh.seek(off - 3)
        assert fh.read(100) == b"\0\0\0tail at five gib"
        fh.seek(1 << 32)  # well inside the hole
        assert fh.read(8192) == bytes(8192)
        assert fh.read(0) == b""
        fh.seek(0)
        assert fh.read(4) == b"head"
    c = cr.cpath(rel(m, f))
    st = c.stat()
    assert st.st_size == cr.enc.cipher_size(off + 16)
    assert st.st_blocks * 512 < 1 << 20, "holes must stay sparse on disk"


def test_read_past_eof(d: Path) -> None:
    f = d / "small"
    f.write_bytes(b"abc")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 3) == b""
        assert os.pread(fd, 100, 100000) == b""
        assert os.pread(fd, 2, 1) == b"bc"
    finally:
        os.close(fd)


# -- directories ----------------------------------------------------------------------


def test_mkdir_creates_diriv_and_rmdir_cleans_up(m: Mount, cr: Crypto, d: Path) -> None:
    sub = d / "sub"
    sub.mkdir(mode=0o750)
    c = cr.cpath(rel(m, sub))
    diriv = c / DIRIV_NAME
    assert diriv.stat().st_size == 16 and stat.S_IMODE(diriv.stat().st_mode) == 0o444
    assert stat.S_IMODE(c.stat().st_mode) == 0o750 & ~_umask()
    assert os.listdir(sub) == []
    (sub / "f").write_bytes(b"1")
    with pytest.raises(OSError) as ei:
        sub.rmdir()
    assert ei.value.errno == errno.ENOTEMPTY
    (sub / "f").unlink()
    sub.rmdir()
    assert not c.exists()
    assert not [n for n in os.listdir(c.parent) if n.startswith("gocryptfs.diriv.rmdir")]
    sub.mkdir()  # same name again: a new IV, caches must not serve the old one
    (sub / "again").write_bytes(b"ok")
    assert (sub / "again").read_bytes() == b"ok"
    assert (c / DIRIV_NAME).read_bytes() != b""


def test_mkdir_restrictive_mode(d: Path) -> None:
    sub = d / "ro"
    sub.mkdir(mode=0o500)
    assert stat.S_IMODE(sub.stat().st_mode) == 0o500
    assert os.listdir(sub) == []


def test_readdir_hides_reserved_and_skips_undecryptable(m: Mount, cr: Crypto, d: Path) -> None:
    names = {"a", "b c", "ünïcødé", "x" * 255}
    for n in names:
        (d / n).write_bytes(n.encode())
    cdir = cr.cpath(rel(m, d))
    (cdir / "bm90LWEtdmFsaWQtbmFtZQ").write_bytes(b"junk")  # valid b64, wrong length
    (cdir / "gocryptfs.longname.bogus").write_bytes(b"junk")  # no .name file
    assert set(os.listdir(d)) == names
    assert "undecryptable_name" in m.log() and "bad_long_name" in m.log()
    assert "ünïcødé" not in m.log()
    on_disk = set(os.listdir(cdir))
    assert DIRIV_NAME in on_disk and not (names & on_disk)
    root_listing = os.listdir(m.path)
    assert CONF_NAME not in root_listing and DIRIV_NAME not in root_listing


def test_long_names(m: Mount, cr: Crypto, d: Path) -> None:
    long_file = "f" * 200
    long_dir = "D" * 230
    (d / long_file).write_bytes(b"long")
    (d / long_dir).mkdir()
    (d / long_dir / "inner").write_bytes(b"in")
    cdir = cr.cpath(rel(m, d))
    disk = sorted(os.listdir(cdir))
    longs = [n for n in disk if NameTransform.is_long_name_file(n)]
    assert len(longs) == 2
    for n in longs:
        content = (cdir / (n + ".name")).read_bytes()
        assert stat.S_IMODE((cdir / (n + ".name")).stat().st_mode) == 0o444
        assert cr.nt.read_long_name(n, content)  # hash matches the full cName
        assert len(n) <= 255
    assert sorted(os.listdir(d)) == sorted([long_file, long_dir])
    assert (d / long_dir / "inner").read_bytes() == b"in"
    # rename long -> short -> long, across directories
    (d / "short").mkdir()
    os.rename(d / long_file, d / "short" / "s")
    remaining = [n for n in os.listdir(cdir) if n.startswith("gocryptfs.longname.")]
    assert len(remaining) == 2, "only the long directory and its .name file remain"
    os.rename(d / "short" / "s", d / "short" / ("g" * 240))
    csub = cr.cpath(rel(m, d / "short"))
    assert len([n for n in os.listdir(csub) if n.endswith(".name")]) == 1
    assert (d / "short" / ("g" * 240)).read_bytes() == b"long"
    (d / "short" / ("g" * 240)).unlink()
    assert [n for n in os.listdir(csub) if n != DIRIV_NAME] == []
    (d / long_dir / "inner").unlink()
    (d / long_dir).rmdir()
    assert sorted(n for n in os.listdir(cdir) if n.startswith("gocryptfs.longname")) == []


def test_name_too_long(d: Path) -> None:
    with pytest.raises(OSError) as ei:
        (d / ("n" * 256)).write_bytes(b"")
    assert ei.value.errno == errno.ENAMETOOLONG


# -- rename / unlink / links ------------------------------------------------------------


def test_rename_files_and_dirs(m: Mount, cr: Crypto, d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    (d / "x").mkdir()
    (d / "y").mkdir()
    os.rename(d / "a", d / "a2")
    assert (d / "a2").read_bytes() == b"A" and not (d / "a").exists()
    os.rename(d / "a2", d / "b")  # over an existing file
    assert (d / "b").read_bytes() == b"A"
    os.rename(d / "b", d / "x" / "moved")  # across directories
    assert (d / "x" / "moved").read_bytes() == b"A"
    os.rename(d / "x", d / "x2")  # directory with contents
    assert (d / "x2" / "moved").read_bytes() == b"A"
    (d / "x2" / "new").write_bytes(b"N")  # path caches follow the rename
    os.rename(d / "x2", d / "y")  # over an empty directory (which holds a diriv)
    assert (d / "y" / "new").read_bytes() == b"N"
    assert sorted(os.listdir(d)) == ["y"]
    (d / "z").mkdir()
    (d / "z" / "keep").write_bytes(b"k")
    with pytest.raises(OSError) as ei:
        os.rename(d / "y", d / "z")
    assert ei.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert (d / "z" / "keep").read_bytes() == b"k"
    assert cr.decrypt_file(cr.cpath(rel(m, d / "y" / "moved"))) == b"A"


def test_rename_noreplace_and_exchange(d: Path) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    at_fdcwd = -100
    (d / "p").write_bytes(b"P")
    (d / "q").write_bytes(b"Q")
    rc = libc.renameat2(at_fdcwd, bytes(d / "p"), at_fdcwd, bytes(d / "q"), 1)
    assert rc == -1 and ctypes.get_errno() == errno.EEXIST
    assert (d / "q").read_bytes() == b"Q"
    rc = libc.renameat2(at_fdcwd, bytes(d / "p"), at_fdcwd, bytes(d / "q"), 2)
    assert rc == 0
    assert (d / "p").read_bytes() == b"Q" and (d / "q").read_bytes() == b"P"


def test_unlink_and_open_unlinked_file(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "gone"
    f.write_bytes(b"still readable" * 400)
    c = cr.cpath(rel(m, f))
    fd = os.open(f, os.O_RDWR)
    try:
        f.unlink()
        assert not f.exists() and not c.exists()
        assert os.listdir(d) == []
        assert os.pread(fd, 14, 0) == b"still readable"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 5, 0) == b"STILL"
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
    finally:
        os.close(fd)


def test_symlinks_are_encrypted(m: Mount, cr: Crypto, d: Path) -> None:
    targets = {"rel": "status.txt", "abs": "/a/b/c/d", "long": "t/" * 150 + "end"}
    (d / "status.txt").write_bytes(b"It works!\n")
    for name, target in targets.items():
        os.symlink(target, d / name)
    for name, target in targets.items():
        assert os.readlink(d / name) == target
        assert os.lstat(d / name).st_size == len(target)
        stored = os.readlink(cr.cpath(rel(m, d / name)))
        assert target not in stored and stored != target
        assert cr.nt.decrypt_symlink(stored) == target
    assert (d / "rel").read_bytes() == b"It works!\n"


def test_hard_links(m: Mount, cr: Crypto, d: Path) -> None:
    (d / "orig").write_bytes(b"shared")
    (d / "sub").mkdir()
    os.link(d / "orig", d / "sub" / "other")
    a, b = os.stat(d / "orig"), os.stat(d / "sub" / "other")
    assert a.st_nlink == b.st_nlink == 2 and a.st_ino == b.st_ino
    with open(d / "sub" / "other", "r+b") as fh:
        fh.write(b"SH")
    assert (d / "orig").read_bytes() == b"SHared"
    assert (
        cr.cpath(rel(m, d / "orig")).stat().st_ino
        == cr.cpath(rel(m, d / "sub/other")).stat().st_ino
    )
    os.link(d / "orig", d / ("L" * 210))
    os.unlink(d / "orig")
    assert (d / ("L" * 210)).read_bytes() == b"SHared"


# -- metadata ---------------------------------------------------------------------------


def test_chmod_chown_utimens(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "meta"
    f.write_bytes(b"m")
    os.chmod(f, 0o604)
    assert stat.S_IMODE(f.stat().st_mode) == 0o604
    c = cr.cpath(rel(m, f))
    assert stat.S_IMODE(c.stat().st_mode) == 0o604
    if os.geteuid() == 0:
        os.chown(f, 4321, 8765)
        assert (f.stat().st_uid, f.stat().st_gid) == (4321, 8765)
        assert (c.stat().st_uid, c.stat().st_gid) == (4321, 8765)
    os.utime(f, ns=(1_111_111_111_123_456_789, 1_222_222_222_987_654_321))
    st = f.stat()
    assert st.st_atime_ns == 1_111_111_111_123_456_789
    assert st.st_mtime_ns == 1_222_222_222_987_654_321
    assert c.stat().st_mtime_ns == 1_222_222_222_987_654_321  # stored on the cipher file
    # UTIME_OMIT for atime via touch -m
    subprocess.run(["touch", "-m", "-d", "@2000000000", str(f)], check=True)
    st = f.stat()
    assert st.st_atime_ns == 1_111_111_111_123_456_789
    assert st.st_mtime_ns == 2_000_000_000 * 10**9
    os.utime(d)  # directories too, to "now"
    os.chmod(d, 0o755)


def test_statfs_fsync_access(d: Path) -> None:
    sv = os.statvfs(d)
    assert sv.f_namemax == 255 and sv.f_blocks > 0 and sv.f_bsize > 0
    f = d / "sync"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert os.access(f, os.R_OK | os.W_OK)
    assert not os.access(f, os.X_OK)
    os.chmod(f, 0o750)
    assert os.access(f, os.X_OK)
    assert not os.access(d / "missing", os.F_OK)


def test_xattrs_encrypted(m: Mount, cr: Crypto, d: Path) -> None:
    f = d / "x"
    f.write_bytes(b"")
    os.setxattr(f, "user.comment", b"secret xattr")
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.comment") == b"secret xattr"
    assert os.getxattr(f, "user.empty") == b""
    assert sorted(os.listxattr(f)) == ["user.comment", "user.empty"]
    with pytest.raises(FileExistsError):
        os.setxattr(f, "user.comment", b"x", os.XATTR_CREATE)
    c = cr.cpath(rel(m, f))
    stored = os.listxattr(c)
    assert len(stored) == 2 and all(s.startswith("user.gocryptfs.") for s in stored)
    enc_name = cr.nt.encrypt_xattr_name("user.comment")
    raw = os.getxattr(c, enc_name)
    assert len(raw) == 44 and b"secret" not in raw  # sheet §15: 16 + 12 + 16
    os.removexattr(f, "user.comment")
    assert os.listxattr(f) == ["user.empty"]
    with pytest.raises(OSError) as ei:
        os.getxattr(f, "user.comment")
    assert ei.value.errno == errno.ENODATA
    (d / "sd").mkdir()
    os.setxattr(d / "sd", "user.dir", b"on a directory")
    assert os.getxattr(d / "sd", "user.dir") == b"on a directory"


# -- read-only mounts ---------------------------------------------------------------------


def test_read_only_mount_refuses_every_write(tmp_path: Path, mount_factory: MountFactory) -> None:
    vol = make_volume(tmp_path / "rocipher")
    rw = mount_factory(vol)
    (rw.path / "f").write_bytes(b"content")
    (rw.path / "dir").mkdir()
    os.symlink("f", rw.path / "l")
    os.setxattr(rw.path / "f", "user.a", b"1")
    rw.unmount()
    ro = mount_factory(vol, read_only=True)
    p = ro.path
    assert (p / "f").read_bytes() == b"content"
    assert os.getxattr(p / "f", "user.a") == b"1"
    before = sorted(os.listdir(vol.cipherdir))
    attempts = [
        lambda: os.close(os.open(p / "f", os.O_RDWR)),
        lambda: os.close(os.open(p / "new", os.O_WRONLY | os.O_CREAT, 0o644)),
        lambda: os.mkdir(p / "d2"),
        lambda: os.rmdir(p / "dir"),
        lambda: os.unlink(p / "f"),
        lambda: os.rename(p / "f", p / "g"),
        lambda: os.symlink("x", p / "l2"),
        lambda: os.link(p / "f", p / "h"),
        lambda: os.chmod(p / "f", 0o600),
        lambda: os.chown(p / "f", 1, 1),
        lambda: os.utime(p / "f", ns=(1, 1)),
        lambda: os.truncate(p / "f", 0),
        lambda: os.setxattr(p / "f", "user.b", b"2"),
        lambda: os.removexattr(p / "f", "user.a"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS
    assert sorted(os.listdir(vol.cipherdir)) == before
    assert (p / "f").read_bytes() == b"content"


def test_master_key_mount_without_conf(tmp_path: Path, mount_factory: MountFactory) -> None:
    vol = make_volume(tmp_path / "mk")
    a = mount_factory(vol)
    (a.path / "f").write_bytes(b"via conf")
    a.unmount()
    b = mount_factory(vol, use_conf=False)
    assert (b.path / "f").read_bytes() == b"via conf"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_mknod_fifo(m: Mount, cr: Crypto, d: Path) -> None:
    os.mkfifo(d / "pipe", 0o640)
    assert stat.S_ISFIFO(os.lstat(d / "pipe").st_mode)
    assert stat.S_ISFIFO(os.lstat(cr.cpath(rel(m, d / "pipe"))).st_mode)
    os.mknod(d / "regular", 0o600 | stat.S_IFREG)
    assert (d / "regular").read_bytes() == b""
    assert sorted(os.listdir(d)) == ["pipe", "regular"]


# -- lifecycle, variants, interop ------------------------------------------------------


def test_sigterm_unmounts_cleanly(tmp_path: Path, mount_factory: MountFactory) -> None:
    vol = make_volume(tmp_path / "sig")
    mt = mount_factory(vol)
    (mt.path / "f").write_bytes(b"x")
    mt.proc.terminate()
    assert mt.proc.wait(15) == 0
    assert not os.path.ismount(mt.path)
    assert "event=unmounted" in mt.log()


def test_mount_prints_no_libfuse_thread_warning(mnt: Mount) -> None:
    """libfuse 3.14 complains about its own idle-thread default unless serve() passes
    explicit max_threads/max_idle_threads; the daemon's stderr must stay clean."""
    (mnt.path / "f").write_bytes(b"x" * 5000)
    assert "Ignoring invalid max threads" not in mnt.log()


@pytest.mark.parametrize(
    "variant",
    [
        {"deterministic_names": True},
        {"long_name_max": 62},
        {"aessiv": True},
    ],
    ids=["deterministic", "longnamemax62", "aessiv"],
)
def test_volume_variants(tmp_path: Path, mount_factory: MountFactory, variant: dict) -> None:
    vol = make_volume(tmp_path / "var", **variant)
    mt = mount_factory(vol)
    p = mt.path
    (p / "dir").mkdir()
    data = os.urandom(3 * PLAIN_BS + 7)
    (p / "dir" / ("n" * 80)).write_bytes(data)
    with open(p / "dir" / ("n" * 80), "r+b") as fh:
        fh.seek(5000)
        fh.write(b"patch")
    data = data[:5000] + b"patch" + data[5005:]
    os.rename(p / "dir", p / "dir2")
    os.symlink("target", p / "dir2" / "l")
    (p / "gone").mkdir()
    (p / "gone").rmdir()
    assert (p / "dir2" / ("n" * 80)).read_bytes() == data
    assert os.readlink(p / "dir2" / "l") == "target"
    assert sorted(os.listdir(p)) == ["dir2"]
    cv = Crypto(vol)
    assert cv.decrypt_file(cv.cpath("dir2/" + "n" * 80)) == data
    has_diriv = (cv.cpath("dir2") / DIRIV_NAME).exists()
    assert has_diriv == (not variant.get("deterministic_names"))
    longs = [n for n in os.listdir(cv.cpath("dir2")) if n.startswith("gocryptfs.longname.")]
    assert bool(longs) == (variant.get("long_name_max") == 62)


def _gocryptfs_mount(cipher: Path, mnt: Path, password: bytes, *extra: str) -> None:
    pw = cipher.parent / "pw"
    pw.write_bytes(password + b"\n")
    mnt.mkdir(exist_ok=True)
    subprocess.run(
        ["gocryptfs", "-q", *extra, "-passfile", str(pw), str(cipher), str(mnt)],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("gocryptfs") is None, reason="gocryptfs not installed")
def test_interop_with_gocryptfs(tmp_path: Path, mount_factory: MountFactory) -> None:
    """What we write gocryptfs reads, and the other way round (holes, truncate,
    long names, symlinks, xattrs)."""
    vol = make_volume(tmp_path / "io")
    ours = mount_factory(vol)
    p = ours.path
    blob = os.urandom(10000)
    (p / "f").write_bytes(blob)
    os.truncate(p / "f", 9000)
    with open(p / "sparse", "wb") as fh:
        fh.seek(3 * PLAIN_BS + 5)
        fh.write(b"Z")
    (p / "d").mkdir()
    (p / "d" / ("ü" * 100)).write_bytes(b"long")
    os.symlink("/a/b/c/d", p / "abs")
    os.setxattr(p / "f", "user.comment", b"secret xattr")
    ours.unmount()
    g = tmp_path / "gmnt"
    _gocryptfs_mount(vol.cipherdir, g, vol.password)
    try:
        assert (g / "f").read_bytes() == blob[:9000]
        assert (g / "sparse").read_bytes() == bytes(3 * PLAIN_BS + 5) + b"Z"
        assert (g / "d" / ("ü" * 100)).read_bytes() == b"long"
        assert os.readlink(g / "abs") == "/a/b/c/d"
        assert os.getxattr(g / "f", "user.comment") == b"secret xattr"
        (g / "from_go").write_bytes(blob * 3)
        with open(g / "from_go", "r+b") as fh:
            fh.truncate(20001)
        (g / "go_dir").mkdir()
        (g / "go_dir" / ("y" * 220)).write_bytes(b"y")
        os.symlink("rel/target", g / "go_link")
    finally:
        subprocess.run(["fusermount3", "-u", str(g)], check=True)
    again = mount_factory(vol)
    q = again.path
    assert (q / "from_go").read_bytes() == (blob * 3)[:20001]
    assert os.listdir(q / "go_dir") == ["y" * 220]
    assert os.readlink(q / "go_link") == "rel/target"
    assert sorted(os.listdir(q)) == sorted(
        ["f", "sparse", "d", "abs", "from_go", "go_dir", "go_link"]
    )


def test_failed_rename_leaves_no_long_name_file(m: Mount, cr: Crypto, d: Path) -> None:
    with pytest.raises(FileNotFoundError):
        os.rename(d / "missing", d / ("m" * 200))
    assert [n for n in os.listdir(cr.cpath(rel(m, d))) if n != DIRIV_NAME] == []


def test_large_directory_listing(m: Mount, cr: Crypto, d: Path) -> None:
    names = {f"entry-{i:04d}" + ("-" + "x" * 190 if i % 10 == 0 else "") for i in range(400)}
    for n in names:
        os.close(os.open(d / n, os.O_CREAT | os.O_WRONLY, 0o644))
    assert set(os.listdir(d)) == names
    with os.scandir(d) as it:
        kinds = {e.name: e.is_file(follow_symlinks=False) for e in it}
    assert all(kinds.values()) and set(kinds) == names
    assert len(os.listdir(cr.cpath(rel(m, d)))) == 400 + 40 + 1  # + .name files + diriv


def test_serve_rejects_bad_mountpoint_and_cipherdir(tmp_path: Path) -> None:
    from fuse_crypt.backend import LocalDirBackend
    from fuse_crypt.errors import ConfigError
    from fuse_crypt.fusefrontend import serve

    vol = make_volume(tmp_path / "c")
    backend = LocalDirBackend(str(vol.cipherdir))
    called: list[bool] = []
    with pytest.raises(OSError) as ei:
        serve(
            backend,
            vol.master_key,
            None,
            str(tmp_path / "nope"),
            on_ready=lambda: called.append(True),
        )
    assert ei.value.errno == errno.ENOTDIR
    (vol.cipherdir / DIRIV_NAME).unlink()
    (tmp_path / "mp").mkdir()
    with pytest.raises(ConfigError):
        serve(
            backend,
            vol.master_key,
            None,
            str(tmp_path / "mp"),
            on_ready=lambda: called.append(True),
        )
    assert not called and not os.path.ismount(tmp_path / "mp")
    assert vol.master_key.hex() not in repr(ei.value)
    backend.destroy()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_allow_other_creates_as_caller(tmp_path: Path, mount_factory: MountFactory) -> None:
    vol = make_volume(tmp_path / "ao")
    # The other user must be able to reach the mount point (pytest's tmp is 0700).
    public = Path(tempfile.mkdtemp(prefix="fc-ao-", dir="/tmp"))
    os.chmod(public, 0o755)
    mt = mount_factory(vol, mountpoint=public / "m", allow_other=True)
    try:
        _allow_other_checks(vol, mt)
    finally:
        mt.unmount()
        shutil.rmtree(public, ignore_errors=True)


def _allow_other_checks(vol: Volume, mt: Mount) -> None:
    shared_dir = mt.path / "shared"
    shared_dir.mkdir(mode=0o777)
    os.chmod(shared_dir, 0o777)
    (mt.path / "private").write_bytes(b"root only")
    os.chmod(mt.path / "private", 0o600)
    script = (
        "import os, sys\n"
        "os.setgid(4242); os.setuid(4242)\n"
        "p = sys.argv[1]\n"
        "open(p + '/shared/mine', 'wb').write(b'user data')\n"
        "os.mkdir(p + '/shared/mydir')\n"
        "try:\n"
        "    open(p + '/private', 'rb')\n"
        "    print('READ-OK')\n"
        "except PermissionError:\n"
        "    print('EACCES')\n"
    )
    r = subprocess.run(
        ["python3", "-c", script, str(mt.path)], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "EACCES"  # default_permissions: the kernel checks modes
    cv = Crypto(vol)
    for name in ("mine", "mydir"):
        st = os.stat(mt.path / "shared" / name)
        assert (st.st_uid, st.st_gid) == (4242, 4242)
        cst = cv.cpath(f"shared/{name}").stat()
        assert (cst.st_uid, cst.st_gid) == (4242, 4242)
    assert (mt.path / "shared" / "mine").read_bytes() == b"user data"


def test_listing_attributes_are_plaintext(tmp_path: Path, mount_factory: MountFactory) -> None:
    """What a listing reports (types, inodes) and the attributes looked up right
    after it on a fresh mount (no cached dentries) are the plaintext ones: sizes
    of files and symlink targets, modes, inodes."""
    vol = make_volume(tmp_path / "rdp")
    first = mount_factory(vol)
    sizes = {f"f{i}": i * 1000 for i in range(10)}
    for name, size in sizes.items():
        (first.path / name).write_bytes(b"s" * size)
    os.symlink("t" * 77, first.path / "link")
    (first.path / "sub").mkdir()
    first.unmount()
    d = mount_factory(vol).path
    with os.scandir(d) as it:
        got = {e.name: e.stat(follow_symlinks=False) for e in it}
    for name, size in sizes.items():
        assert got[name].st_size == size
        assert stat.S_ISREG(got[name].st_mode)
    assert got["link"].st_size == 77 and stat.S_ISLNK(got["link"].st_mode)
    assert stat.S_ISDIR(got["sub"].st_mode)
    assert got["f3"].st_ino == os.stat(d / "f3").st_ino
