"""Two-way interoperability with Debian's gocryptfs 2.3, through real FUSE mounts.

Direction A: ``gocryptfs -init`` + a gocryptfs mount write a tree; ``fuse-crypt mount``
must show exactly the same tree (names, contents, sizes, modes, symlinks, xattrs, hard
links). Direction B: the other way round, plus ``gocryptfs -fsck`` on our volume. In
both directions the reader then changes the tree and the original writer must see those
changes too, so both implementations also agree on updates (renames, truncates, writes
into existing files, deletes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuse_crypt.cli_helpers import (
    FC,
    fuse_crypt_mount,
    gocryptfs_init,
    gocryptfs_mount,
    init_volume,
)

MIB = 1 << 20


pytestmark = [
    pytest.mark.skipif(shutil.which("gocryptfs") is None, reason="gocryptfs not installed"),
    pytest.mark.timeout(300),
]

LONG_176 = "L" * 172 + ".176"  # first length that needs a gocryptfs.longname file
LONG_200 = "long-" + "n" * 191 + ".txt"
LONG_255 = "z" * 251 + ".max"
LONG_UTF8 = "ü" * 100  # 200 bytes
LONG_DIR = "d" * 180
LONG_TARGET = "/" + "/".join(["segment"] * 37) + "/end"  # ~300 chars


def _blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------- tree


def populate(root: Path) -> None:
    """Everything the format has to get right, written through a mount."""
    (root / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    for i, size in enumerate([0, 1, 4095, 4096, 4097, MIB + 1]):
        (root / "a" / "b" / f"size-{size}").write_bytes(_blob(size, i))
    (root / "a" / "b" / "c" / "d" / "e" / "deep.txt").write_text("deep inside\n")
    for name in (LONG_176, LONG_200, LONG_255, LONG_UTF8):
        (root / name).write_bytes(name.encode() * 3)
    (root / LONG_DIR).mkdir()
    (root / LONG_DIR / LONG_200).write_text("long name inside long dir")
    # symlinks: relative, absolute, long target, dangling
    os.symlink("a/b/size-4097", root / "link-rel")
    os.symlink("/a/b/c/d", root / "link-abs")
    os.symlink(LONG_TARGET, root / "link-long")
    os.symlink("does/not/exist", root / "a" / "dangling")
    # sparse files
    with open(root / "sparse-tail", "wb") as f:
        f.seek(12293)
        f.write(b"X")
    with open(root / "sparse-trunc", "wb") as f:
        f.truncate(MIB)
        f.seek(MIB // 2)
        f.write(b"middle")
    with open(root / "sparse-gap", "wb") as f:
        f.write(b"head")
        f.seek(3 * MIB + 7)
        f.write(b"tail")
    # truncate and overwrite across a block boundary
    (root / "trunc").write_bytes(_blob(10000, 7))
    os.truncate(root / "trunc", 9000)
    (root / "patch").write_bytes(_blob(8192, 8))
    with open(root / "patch", "r+b") as f:
        f.seek(4000)
        f.write(b"P" * 500)
    # renames: file across dirs, whole dir, rename over an existing file
    (root / "tmp-name").write_text("renamed file")
    os.rename(root / "tmp-name", root / "a" / "renamed")
    (root / "olddir").mkdir()
    (root / "olddir" / "inner").write_text("moved with its dir")
    os.rename(root / "olddir", root / "newdir")
    (root / "victim").write_text("overwritten")
    (root / "winner").write_text("rename winner")
    os.rename(root / "winner", root / "victim")
    # xattrs on a file and a directory, empty and larger values
    os.setxattr(root / "a" / "renamed", "user.comment", b"secret xattr")
    os.setxattr(root / "a" / "renamed", "user.empty", b"")
    os.setxattr(root / "a" / "renamed", "user.big", _blob(1000, 9))
    os.setxattr(root / "newdir", "user.dirattr", b"on a directory")
    # hard links
    (root / "hl-a").write_bytes(_blob(5000, 10))
    os.link(root / "hl-a", root / "a" / "b" / "hl-b")
    # permissions
    (root / "private").write_text("mode 600")
    os.chmod(root / "private", 0o600)
    (root / "restricted").mkdir()
    os.chmod(root / "restricted", 0o750)


def modify(root: Path) -> None:
    """A second round of changes, made by the *reading* implementation."""
    with open(root / "a" / "b" / "size-4096", "ab") as f:
        f.write(b"appended by the other side")
    with open(root / "a" / "b" / f"size-{MIB + 1}", "r+b") as f:
        f.seek(MIB - 10)
        f.write(b"R" * 20)  # crosses into the last (1-byte) block
    os.truncate(root / "a" / "b" / "size-4097", 1)
    os.rename(root / LONG_200, root / "short-again")
    os.rename(root / "newdir", root / "a" / LONG_DIR[:100])
    (root / "a" / "b" / "size-0").unlink()
    shutil.rmtree(root / "a" / "b" / "c")
    os.symlink(LONG_TARGET[:100], root / "link-new")
    os.setxattr(root / "hl-a", "user.added", b"later")
    with open(root / "a" / "b" / "hl-b", "r+b") as f:  # through the other hard link
        f.seek(4090)
        f.write(b"via the second link")
    os.removexattr(root / "a" / "renamed", "user.big")
    (root / "restricted" / LONG_UTF8).write_bytes(b"")


def _xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in sorted(names)
        if n.startswith("user.")
    }


def snapshot(root: Path) -> dict[str, tuple]:
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p), st.st_size)
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", stat.S_IMODE(st.st_mode), _xattrs(p))
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                snap[rel] = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    st.st_size,
                    digest,
                    st.st_nlink,
                    _xattrs(p),
                )
    return snap


def check_expected(snap: dict[str, tuple]) -> None:
    """Spot checks that the tree really holds what populate() meant (not just equal)."""
    assert snap["a/b/size-0"][2] == 0
    assert snap[f"a/b/size-{MIB + 1}"][2] == MIB + 1
    assert snap["link-long"][1] == LONG_TARGET
    assert snap["sparse-tail"][2] == 12294
    assert snap["sparse-gap"][2] == 3 * MIB + 11
    assert snap["a/renamed"][5] == {
        "user.big": _blob(1000, 9),
        "user.comment": b"secret xattr",
        "user.empty": b"",
    }
    assert snap["hl-a"][4] == 2 and snap["a/b/hl-b"][3] == snap["hl-a"][3]
    assert snap["private"][1] == 0o600 and snap["restricted"][1] == 0o750
    assert LONG_255 in snap and LONG_UTF8 in snap and f"{LONG_DIR}/{LONG_200}" in snap
    assert "tmp-name" not in snap and "olddir" not in snap and "winner" not in snap


def read_sparse(root: Path) -> None:
    with open(root / "sparse-tail", "rb") as f:
        assert f.read() == bytes(12293) + b"X"
    with open(root / "sparse-trunc", "rb") as f:
        data = f.read()
    assert data == bytes(MIB // 2) + b"middle" + bytes(MIB // 2 - 6)
    with open(root / "sparse-gap", "rb") as f:
        assert f.read() == b"head" + bytes(3 * MIB + 3) + b"tail"


# --------------------------------------------------------------------------- mounts


Mounter = Callable[[Path, Path, Path], contextlib.AbstractContextManager[Path]]


def _round_trip(
    cipher: Path, mountpoint: Path, passfile: Path, writer: Mounter, reader: Mounter
) -> dict[str, tuple]:
    with writer(cipher, mountpoint, passfile) as root:
        populate(root)
        written = snapshot(root)
    check_expected(written)
    with reader(cipher, mountpoint, passfile) as root:
        read = snapshot(root)
        assert read == written
        read_sparse(root)
        modify(root)
        modified = snapshot(root)
    assert modified != written
    assert modified["hl-a"][3] == modified["a/b/hl-b"][3] != written["hl-a"][3]
    assert modified["a/b/hl-b"][5] == {"user.added": b"later"}
    with writer(cipher, mountpoint, passfile) as root:
        assert snapshot(root) == modified
        assert (root / "a" / "b" / "size-4097").read_bytes() == _blob(4097, 4)[:1]
    return modified


def _gocryptfs_fsck(cipher: Path, passfile: Path) -> None:
    proc = subprocess.run(
        ["gocryptfs", "-fsck", "-q", "-passfile", str(passfile), "--", str(cipher)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _backing_allocated(cipher: Path, plain_size: int) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of the one backing file of a given plain size."""
    cipher_size = 18 + plain_size + 32 * -(-plain_size // 4096)
    for p in cipher.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.stat().st_size == cipher_size:
            st = p.stat()
            return st.st_blocks * 512, st.st_size
    raise AssertionError(f"no backing file of {cipher_size} bytes")


def test_gocryptfs_writes_fuse_crypt_reads(
    tmp_path: Path, passfile: Path, mountpoint: Path
) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    gocryptfs_init(cipher, passfile)
    _round_trip(cipher, mountpoint, passfile, writer=gocryptfs_mount, reader=fuse_crypt_mount)
    _gocryptfs_fsck(cipher, passfile)


def test_fuse_crypt_writes_gocryptfs_reads(
    tmp_path: Path, passfile: Path, mountpoint: Path
) -> None:
    cipher = init_volume(tmp_path / "cipher", passfile)
    with fuse_crypt_mount(cipher, mountpoint, passfile) as root, open(root / "holes", "wb") as f:
        f.truncate(4 * MIB)
        f.seek(4 * MIB - 1)
        f.write(b"!")
    allocated, apparent = _backing_allocated(cipher, 4 * MIB)
    assert allocated < apparent // 4, "holes were written out as ciphertext"
    _round_trip(cipher, mountpoint, passfile, writer=fuse_crypt_mount, reader=gocryptfs_mount)
    _gocryptfs_fsck(cipher, passfile)
    with gocryptfs_mount(cipher, mountpoint, passfile) as root:
        assert (root / "holes").read_bytes() == bytes(4 * MIB - 1) + b"!"


def test_volume_from_gocryptfs_long_names_on_disk(
    tmp_path: Path, passfile: Path, mountpoint: Path
) -> None:
    """Both implementations store a >175-byte name as longname + .name, readable by the other."""
    cipher = init_volume(tmp_path / "cipher", passfile)
    with fuse_crypt_mount(cipher, mountpoint, passfile) as root:
        (root / LONG_200).write_text("ours")
        (root / ("s" * 175)).write_text("short enough")
    with gocryptfs_mount(cipher, mountpoint, passfile) as root:
        (root / LONG_255).write_text("theirs")
    disk = sorted(os.listdir(cipher))
    longs = [n for n in disk if n.startswith("gocryptfs.longname.") and not n.endswith(".name")]
    assert len(longs) == 2
    assert all(n + ".name" in disk for n in longs)
    with fuse_crypt_mount(cipher, mountpoint, passfile) as root:
        assert (root / LONG_255).read_text() == "theirs"
        assert (root / LONG_200).read_text() == "ours"
        assert sorted(os.listdir(root)) == sorted([LONG_200, LONG_255, "s" * 175])


@pytest.mark.parametrize(
    "init_args",
    [["-aessiv"], ["-deterministic-names"], ["-longnamemax", "100"]],
    ids=["aessiv", "deterministic-names", "longnamemax-100"],
)
def test_gocryptfs_variants_both_ways(
    tmp_path: Path, passfile: Path, mountpoint: Path, init_args: list[str]
) -> None:
    """Non-default gocryptfs 2.3 volumes: fuse-crypt reads theirs, they read our writes."""
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    gocryptfs_init(cipher, passfile, *init_args)
    info = subprocess.run([*FC, "info", str(cipher)], capture_output=True, text=True, check=False)
    assert info.returncode == 0, info.stderr

    def fill(root: Path, tag: str) -> None:
        (root / tag / "sub").mkdir(parents=True)
        (root / tag / "sub" / LONG_200).write_bytes(_blob(9000, 1))
        (root / tag / "small").write_bytes(b"x")
        os.symlink("sub/" + LONG_200, root / tag / "link")
        with open(root / tag / "sparse", "wb") as f:
            f.seek(20000)
            f.write(b"end")

    with gocryptfs_mount(cipher, mountpoint, passfile) as root:
        fill(root, "theirs")
    with fuse_crypt_mount(cipher, mountpoint, passfile) as root:
        fill(root, "ours")
        ours = snapshot(root)
    with gocryptfs_mount(cipher, mountpoint, passfile) as root:
        assert snapshot(root) == ours
    assert {k.split("/", 1)[1] for k in ours if k.startswith("ours/")} == {
        k.split("/", 1)[1] for k in ours if k.startswith("theirs/")
    }
    assert ours["ours/sub/" + LONG_200][3] == ours["theirs/sub/" + LONG_200][3]
    _gocryptfs_fsck(cipher, passfile)


def _random_edits(root: Path, models: dict[str, bytearray], rng: random.Random, n: int) -> None:
    """Apply ``n`` random writes / truncates / appends to files under ``root`` and to
    in-memory models of them (offsets chosen around 4 KiB block edges on purpose)."""
    edges = [0, 1, 4095, 4096, 4097, 8191, 8192, 12288, 20000]
    for _ in range(n):
        name = rng.choice(sorted(models))
        model = models[name]
        path = root / name
        op = rng.random()
        if op < 0.6:
            off = max(0, rng.choice(edges) + rng.randint(-3, 3))
            data = rng.randbytes(rng.choice([1, 15, 4096, 5000, 9000]))
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        elif op < 0.8:
            size = max(0, rng.choice(edges) + rng.randint(-2, 2))
            os.truncate(path, size)
            del model[size:]
            model.extend(bytes(size - len(model)))
        else:
            data = rng.randbytes(rng.randint(1, 6000))
            with open(path, "ab") as f:
                f.write(data)
            model.extend(data)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_edits_agree_both_ways(
    tmp_path: Path, passfile: Path, mountpoint: Path, seed: int
) -> None:
    """Read-modify-write, holes and truncation: each side edits what the other wrote."""
    cipher = init_volume(tmp_path / "cipher", passfile)
    rng = random.Random(seed)
    models = {f"f{i}": bytearray() for i in range(3)}
    for rnd, mounter in enumerate([fuse_crypt_mount, gocryptfs_mount, fuse_crypt_mount]):
        with mounter(cipher, mountpoint, passfile) as root:
            for name, model in models.items():
                if rnd == 0:
                    (root / name).write_bytes(b"")
                assert (root / name).read_bytes() == bytes(model), (rnd, name)
            _random_edits(root, models, rng, 25)
            for name, model in models.items():
                assert (root / name).read_bytes() == bytes(model), (rnd, name)
    with gocryptfs_mount(cipher, mountpoint, passfile) as root:
        for name, model in models.items():
            assert (root / name).read_bytes() == bytes(model)
    _gocryptfs_fsck(cipher, passfile)
