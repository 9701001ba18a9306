"""FileTable without FUSE: the cached cipher size stays exact across handles."""

from __future__ import annotations

import os
import random
from pathlib import Path

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
    fh1 = ft.open("f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, "/f", True, keep_stat=True)
    assert ft.fstat(fh1).size == 0  # the create-time attributes, handed out once
    fh2 = ft.open("f", os.O_RDWR, 0, "/f", True)
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
    fh3 = ft.open("f", os.O_RDWR, 0, "/f", True)
    assert ft.get(fh3).entry.csize == enc.cipher_size(len(model))
    assert ft.get(fh3).open_stat is None
    ft.release(fh3)
