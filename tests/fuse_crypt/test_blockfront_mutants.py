"""Fast in-process checks of ``blockfront/device.py`` that mutation testing runs first.

The device is an image file; each test compares what ``CryptDevice`` does with the
ciphertext an independent ``XtsSegment`` gives for the same plaintext, so a wrong offset,
span or read-modify-write shows as a byte difference, not only as a failed round trip.
"""

from __future__ import annotations

import os
from pathlib import Path

from fuse_crypt.blockfront import CryptDevice, open_device
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
