"""The host moves or swaps cipher files while the volume is mounted (issue 7, "beyond").

What gocryptfs's format binds, and so what we can detect (docs/fuse_crypt.md, "Host
attacks on a mounted volume"):

* a name is encrypted with its directory's IV: moved into another directory (a file,
  a long-name pair, a whole directory with its own IV) it no longer decrypts there
  and is hidden from listings and lookups; never a wrong name, never a crash;
* content blocks are bound to the file ID in the header and to their block number:
  a block or header spliced from another file gives EIO;
* content is *not* bound to the name or directory: swapping two whole cipher files
  (header included), or putting one under another's cipher name in another
  directory, reads as the other file's genuine content.  A known gocryptfs limit,
  tested here so that a change in it is noticed.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN
from tests.fuse_env import needs_fuse

from .conftest import CipherView, Mount

pytestmark = needs_fuse

#: Kernel entry/attribute caches last 1 s (operations.CACHE_TIMEOUT); wait them out
#: so every check after a host change reaches the daemon.
CACHE_WAIT = 1.2
LONG = "L" * 200  # needs a gocryptfs.longname.* file plus its .name companion


def _errno(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as e:
        return e.errno or 0
    return 0


def _host_move(src: Path, dst_dir: Path) -> Path:
    """What the host can do: move a cipher entry, keeping its on-disk name."""
    dst = dst_dir / src.name
    os.rename(src, dst)
    return dst


def _host_swap(x: Path, y: Path) -> None:
    tmp = x.with_name("host-tmp")
    os.rename(x, tmp)
    os.rename(y, x)
    os.rename(tmp, y)


def _moved_entry_hidden(directory: Path, moved: str, rest: list[str]) -> bool:
    """``directory`` lists ``rest`` and never ``moved``; True if the moved entry is hidden.

    Names are EME-encrypted, not authenticated: under the wrong directory IV the moved
    cipher name decrypts to random bytes, which pass the PKCS#7 padding check about once in
    256 (a last byte of 0x01) and then show as one garbage name (docs/fuse_crypt.md).
    Never the original name, never more than that one entry.
    """
    names = os.listdir(directory)
    assert moved not in names
    assert sorted(n for n in names if n in rest) == sorted(rest)
    extra = [n for n in names if n not in rest]
    assert len(extra) <= 1, extra
    return not extra


def _still_serves(mnt: Mount) -> None:
    assert mnt.proc.poll() is None, "daemon died"
    f = mnt.path / "after"
    f.write_bytes(b"still fine")
    assert f.read_bytes() == b"still fine"


@pytest.fixture
def two_dirs(mnt: Mount) -> tuple[Mount, CipherView]:
    (mnt.path / "a").mkdir()
    (mnt.path / "b").mkdir()
    (mnt.path / "b" / "resident").write_bytes(b"b's own file")
    return mnt, CipherView(mnt.volume)


def test_file_moved_to_another_directory_is_hidden(two_dirs: tuple[Mount, CipherView]) -> None:
    mnt, cv = two_dirs
    (mnt.path / "a" / "secret").write_bytes(b"top secret")
    _host_move(cv.cpath("a/secret"), cv.cpath("b"))
    time.sleep(CACHE_WAIT)
    assert os.listdir(mnt.path / "a") == []
    hidden = _moved_entry_hidden(mnt.path / "b", "secret", ["resident"])
    assert _errno(lambda: (mnt.path / "a" / "secret").read_bytes()) == errno.ENOENT
    assert _errno(lambda: (mnt.path / "b" / "secret").read_bytes()) == errno.ENOENT
    if hidden:
        assert "event=undecryptable_name" in mnt.log()
    _still_serves(mnt)


def test_long_name_pair_moved_to_another_directory_is_hidden(
    two_dirs: tuple[Mount, CipherView],
) -> None:
    mnt, cv = two_dirs
    (mnt.path / "a" / LONG).write_bytes(b"long-named secret")
    cfile = cv.cpath(f"a/{LONG}")
    assert cfile.name.startswith("gocryptfs.longname.")
    _host_move(cfile, cv.cpath("b"))
    _host_move(cfile.with_name(cfile.name + ".name"), cv.cpath("b"))
    time.sleep(CACHE_WAIT)
    assert os.listdir(mnt.path / "a") == []
    _moved_entry_hidden(mnt.path / "b", LONG, ["resident"])
    assert _errno(lambda: (mnt.path / "b" / LONG).read_bytes()) == errno.ENOENT
    _still_serves(mnt)


def test_long_name_file_without_its_name_file_is_hidden(
    two_dirs: tuple[Mount, CipherView],
) -> None:
    mnt, cv = two_dirs
    (mnt.path / "a" / LONG).write_bytes(b"long-named secret")
    _host_move(cv.cpath(f"a/{LONG}"), cv.cpath("b"))  # the .name file stays behind
    time.sleep(CACHE_WAIT)
    assert os.listdir(mnt.path / "a") == []
    assert os.listdir(mnt.path / "b") == ["resident"]
    assert "event=bad_long_name" in mnt.log()
    _still_serves(mnt)


def test_directory_moved_into_another_directory_is_hidden(
    two_dirs: tuple[Mount, CipherView],
) -> None:
    mnt, cv = two_dirs
    (mnt.path / "a" / "sub").mkdir()
    (mnt.path / "a" / "sub" / "inner").write_bytes(b"inner secret")
    _host_move(cv.cpath("a/sub"), cv.cpath("b"))
    time.sleep(CACHE_WAIT)
    assert os.listdir(mnt.path / "a") == []
    _moved_entry_hidden(mnt.path / "b", "sub", ["resident"])
    assert _errno(lambda: (mnt.path / "b" / "sub" / "inner").read_bytes()) == errno.ENOENT
    _still_serves(mnt)


def test_whole_file_swap_in_one_directory_is_not_detected(
    two_dirs: tuple[Mount, CipherView],
) -> None:
    """Documented limit: header and blocks travel together, so each name now reads
    the other file's genuine content (no EIO, no error)."""
    mnt, cv = two_dirs
    (mnt.path / "a" / "x").write_bytes(b"X" * 5000)
    (mnt.path / "a" / "y").write_bytes(b"Y" * 7000)
    _host_swap(cv.cpath("a/x"), cv.cpath("a/y"))
    time.sleep(CACHE_WAIT)
    assert (mnt.path / "a" / "x").read_bytes() == b"Y" * 7000
    assert (mnt.path / "a" / "y").read_bytes() == b"X" * 5000


def test_file_put_under_a_name_in_another_directory_is_not_detected(
    two_dirs: tuple[Mount, CipherView],
) -> None:
    """Documented limit: the host replaces b/resident with a/secret's cipher file
    under b/resident's cipher name; the content is a/secret's, undetected."""
    mnt, cv = two_dirs
    (mnt.path / "a" / "secret").write_bytes(b"a's secret")
    os.replace(cv.cpath("a/secret"), cv.cpath("b/resident"))
    time.sleep(CACHE_WAIT)
    assert (mnt.path / "b" / "resident").read_bytes() == b"a's secret"
    assert os.listdir(mnt.path / "a") == []


def test_block_spliced_from_another_file_is_eio(two_dirs: tuple[Mount, CipherView]) -> None:
    """Blocks are bound to their file's ID: block 1 of y copied into x fails."""
    mnt, cv = two_dirs
    (mnt.path / "a" / "x").write_bytes(b"X" * 3 * 4096)
    (mnt.path / "a" / "y").write_bytes(b"Y" * 3 * 4096)
    cx, cy = cv.cpath("a/x"), cv.cpath("a/y")
    off = HEADER_LEN + CIPHER_BS
    blk = cy.read_bytes()[off : off + CIPHER_BS]
    raw = bytearray(cx.read_bytes())
    raw[off : off + CIPHER_BS] = blk
    os.chmod(cx, 0o600)
    cx.write_bytes(bytes(raw))
    time.sleep(CACHE_WAIT)
    with open(mnt.path / "a" / "x", "rb") as f:
        assert f.read(4096) == b"X" * 4096  # block 0 is still x's own
        assert _errno(lambda: f.read(4096)) == errno.EIO
    _still_serves(mnt)


def test_header_swapped_between_files_is_eio(two_dirs: tuple[Mount, CipherView]) -> None:
    mnt, cv = two_dirs
    (mnt.path / "a" / "x").write_bytes(b"X" * 100)
    (mnt.path / "a" / "y").write_bytes(b"Y" * 100)
    cx, cy = cv.cpath("a/x"), cv.cpath("a/y")
    raw = bytearray(cx.read_bytes())
    raw[:HEADER_LEN] = cy.read_bytes()[:HEADER_LEN]
    os.chmod(cx, 0o600)
    cx.write_bytes(bytes(raw))
    time.sleep(CACHE_WAIT)
    assert _errno(lambda: (mnt.path / "a" / "x").read_bytes()) == errno.EIO
    _still_serves(mnt)


def test_directory_swap_in_one_parent_is_not_detected(
    two_dirs: tuple[Mount, CipherView], mount_factory: Callable[..., Mount]
) -> None:
    """Documented limit, like a file swap: each directory name now leads to the
    other directory's genuine entries (after a remount, at least)."""
    mnt, cv = two_dirs
    (mnt.path / "a" / "fa").write_bytes(b"in a")
    (mnt.path / "b" / "resident").unlink()
    (mnt.path / "b" / "fb").write_bytes(b"in b")
    _host_swap(cv.cpath("a"), cv.cpath("b"))
    mnt.unmount()
    again = mount_factory(mnt.volume)
    assert os.listdir(again.path / "a") == ["fb"]
    assert (again.path / "a" / "fb").read_bytes() == b"in b"


def test_file_created_after_a_host_directory_swap_survives_remount(
    two_dirs: tuple[Mount, CipherView], mount_factory: Callable[..., Mount]
) -> None:
    mnt, cv = two_dirs
    (mnt.path / "a" / "fa").write_bytes(b"in a")
    assert os.listdir(mnt.path / "a") == ["fa"]  # IVs of a and b now cached
    assert os.listdir(mnt.path / "b") == ["resident"]
    _host_swap(cv.cpath("a"), cv.cpath("b"))
    time.sleep(CACHE_WAIT)
    (mnt.path / "a" / "new").write_bytes(b"written after the swap")
    mnt.unmount()
    again = mount_factory(mnt.volume)
    assert "new" in os.listdir(again.path / "a")  # a stale IV would hide it for good
