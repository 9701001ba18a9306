"""Checking a ``--masterkey`` against the volume's own ciphertext.

Why: with a master key the password-wrapped copy in gocryptfs.conf cannot vouch for it,
so gocryptfs happily mounts (or ``-passwd``-resets) with a wrong key and shows an empty
tree of undecryptable names. File contents and symlink targets are AEAD-sealed, so one
successful decryption proves the key, and failures on every sample prove it wrong.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

_MAX_ENTRIES = 400
_MAX_SAMPLES = 8


def _crypto_for(master_key: bytes, conf: Any | None) -> tuple[Any, Any, Any]:
    from fuse_crypt.contentenc import ContentEnc
    from fuse_crypt.cryptocore import CryptoCore
    from fuse_crypt.nametransform import NameTransform

    if conf is not None:
        core = conf.new_core(master_key)
        names = conf.name_transform(core)
    else:
        core = CryptoCore(master_key)
        names = NameTransform(core)
    return core, ContentEnc(core), names


def _sample_file(path: str, content: Any) -> bool | None:
    from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN
    from fuse_crypt.errors import CorruptDataError
    from fuse_crypt.safeio import SMALL_OPEN_FLAGS, check_regular

    try:  # host storage: never block on a FIFO or follow a link planted here
        fd = os.open(path, SMALL_OPEN_FLAGS)
        try:
            check_regular(fd)
            data = os.pread(fd, HEADER_LEN + CIPHER_BS, 0)
        finally:
            os.close(fd)
    except OSError:
        return None
    if len(data) <= HEADER_LEN:
        return None
    block = data[HEADER_LEN:]
    if not any(block):
        return None  # a hole proves nothing
    try:
        file_id = content.parse_header(data[:HEADER_LEN])
        content.decrypt_blocks(0, block, file_id)
    except CorruptDataError:
        return False
    return True


def _sample_symlink(path: str, names: Any) -> bool | None:
    from fuse_crypt.errors import CorruptDataError, InvalidNameError

    try:
        stored = os.readlink(path)
    except OSError:
        return None
    if not stored:
        return None
    try:
        names.decrypt_symlink(stored)
    except (CorruptDataError, InvalidNameError, ValueError):
        return False
    return True


def verify_master_key(cipherdir: str, master_key: bytes, conf: Any | None) -> bool | None:
    """True if the key decrypts sampled data, False if every sample fails, None if the
    volume holds nothing to check against (empty or only holes)."""
    from fuse_crypt.nametransform import NameTransform

    core, content, names = _crypto_for(master_key, conf)
    verdicts: list[bool] = []
    seen = 0
    queue: deque[str] = deque([cipherdir])
    try:
        while queue and seen < _MAX_ENTRIES and len(verdicts) < _MAX_SAMPLES:
            d = queue.popleft()
            try:
                it = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for entry in it:
                seen += 1
                if NameTransform.is_reserved(entry.name) or entry.name.startswith("gocryptfs.conf"):
                    continue
                verdict: bool | None = None
                if entry.is_symlink():
                    verdict = _sample_symlink(entry.path, names)
                elif entry.is_dir(follow_symlinks=False):
                    queue.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    verdict = _sample_file(entry.path, content)
                if verdict is True:
                    return True
                if verdict is False:
                    verdicts.append(False)
                if len(verdicts) >= _MAX_SAMPLES:
                    break
    finally:
        wipe = getattr(core, "wipe", None)
        if callable(wipe):
            wipe()
    return False if verdicts else None
