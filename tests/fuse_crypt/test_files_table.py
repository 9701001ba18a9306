"""FileTable without FUSE: the cached cipher size stays exact across handles."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from fuse_crypt.backend.base import Stat
from fuse_crypt.backend.local import LocalDirBackend
from fuse_crypt.contentenc import PLAIN_BS, ContentEnc
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.fusefrontend.files import FileTable


def test_cached_cipher_size_tracks_writes_and_truncates(tmp_path: Path) -> None:
    """Writes and truncates through two handles of one file (like two opens or a
    hard link) against a plain model; after every step the backend's real size,
    the cached size and the decrypted content must all agree."""
    be = LocalDirBackend(str(tmp_path))
    enc = ContentEnc(CryptoCore(os.urandom(32)))
    ft = FileTable(be, enc)
    fh1 = ft.open("f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, True, keep_stat=True)
    assert ft.fstat(fh1).size == 0  # the create-time attributes, handed out once
    fh2 = ft.open("f", os.O_RDWR, 0, True)
    entry = ft.get(fh1).entry
    assert ft.get(fh2).entry is entry
    model = bytearray()
    rnd = random.Random(7)
    for step in range(60):
        fh = rnd.choice((fh1, fh2))
        if rnd.random() < 0.25:
            size = rnd.randrange(0, 5 * PLAIN_BS)
            ft.truncate(fh, size)
            model[size:] = b""
            model.extend(bytes(size - len(model)))
        else:
            off = rnd.randrange(0, 4 * PLAIN_BS)
            data = rnd.randbytes(rnd.randrange(1, 2 * PLAIN_BS))
            ft.write(fh, data, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + len(data)] = data
        real = be.fstat(ft.get(fh1).handle).size
        assert entry.csize == real == enc.cipher_size(len(model)), step
        assert ft.read(fh2, len(model) + 10, 0) == bytes(model), step
    ft.release(fh1)
    ft.release(fh2)
    # A fresh open re-reads the size from the backend.
    fh3 = ft.open("f", os.O_RDWR, 0, True)
    assert ft.get(fh3).entry.csize == enc.cipher_size(len(model))
    assert ft.get(fh3).open_stat is None
    ft.release(fh3)


class _RacingBackend(LocalDirBackend):
    """Runs ``hook`` once, right after the next fstat: the window between
    ``FileTable.open``'s size read and its table lock, where another FUSE thread
    can write through (and release) an older handle of the same file."""

    hook: Callable[[], None] | None = None

    def fstat(self, handle: int) -> Stat:
        st = super().fstat(handle)
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return st


def _racing_table(tmp_path: Path) -> tuple[_RacingBackend, FileTable]:
    be = _RacingBackend(str(tmp_path))
    return be, FileTable(be, ContentEnc(CryptoCore(os.urandom(32))))


def test_open_racing_a_growing_writer_keeps_no_stale_size(tmp_path: Path) -> None:
    """Finding 8, appends: the other handle grows the file across a block boundary
    and is released inside the window; the new handle's append must not zero the
    bytes it did not see (silent NULs before the fix)."""
    be, ft = _racing_table(tmp_path)
    fa = ft.open("f", os.O_RDWR | os.O_CREAT, 0o600, True)
    ft.write(fa, b"a" * 4000, 0)

    def grow_and_release() -> None:
        ft.write(fa, b"b" * 200, 4000)  # now 4200 bytes: a second block
        ft.release(fa)

    be.hook = grow_and_release
    fb = ft.open("f", os.O_RDWR, 0, True)
    ft.write(fb, b"c" * 100, 4200)  # O_APPEND: the kernel's offset is the real EOF
    assert ft.read(fb, 10000, 0) == b"a" * 4000 + b"b" * 200 + b"c" * 100
    ft.release(fb)


def test_open_racing_a_shrinking_truncate_tears_no_block(tmp_path: Path) -> None:
    """Finding 8, regrow: the other handle shrinks the file inside the window; a
    write beyond the real EOF must zero-pad the real last block (before the fix
    it was left partial in the middle of the file: EIO on the next read)."""
    be, ft = _racing_table(tmp_path)
    fa = ft.open("f", os.O_RDWR | os.O_CREAT, 0o600, True)
    ft.write(fa, b"a" * 3 * PLAIN_BS, 0)

    def shrink_and_release() -> None:
        ft.truncate(fa, 100)
        ft.release(fa)

    be.hook = shrink_and_release
    fb = ft.open("f", os.O_RDWR, 0, True)
    ft.write(fb, b"c" * 10, 2 * PLAIN_BS + 5)
    want = b"a" * 100 + bytes(2 * PLAIN_BS + 5 - 100) + b"c" * 10
    assert ft.read(fb, 4 * PLAIN_BS, 0) == want
    ft.release(fb)


def test_open_racing_nothing_still_trusts_its_size(tmp_path: Path) -> None:
    """The fast path stays: with no entry dropped in the window, the open's size
    seeds the cache (no extra fstat on the first write)."""
    be, ft = _racing_table(tmp_path)
    fa = ft.open("f", os.O_RDWR | os.O_CREAT, 0o600, True, keep_stat=True)
    assert ft.get(fa).entry.csize == 0
    assert ft.get(fa).open_stat is not None
    ft.release(fa)


def test_append_handle_writes_at_its_own_end_of_file(tmp_path: Path) -> None:
    """An O_APPEND handle ignores the offset it is given (the kernel's, which for a
    second hard-link name can be stale) and appends at the real end of file."""
    be, ft = _racing_table(tmp_path)
    fa = ft.open("f", os.O_RDWR | os.O_CREAT, 0o600, True, append=True)
    fb = ft.open("f", os.O_RDWR, 0, True, append=True)
    ft.write(fa, b"a" * 3000, 0)
    ft.write(fb, b"b" * 3000, 0)  # stale offset 0: must not overwrite
    ft.write(fa, b"c" * 10, 3000)  # stale offset 3000: must not overwrite either
    assert ft.read(fa, 10000, 0) == b"a" * 3000 + b"b" * 3000 + b"c" * 10
    ft.release(fa)
    ft.release(fb)
