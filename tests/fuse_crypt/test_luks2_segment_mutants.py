"""Fast in-process checks of ``luks2/segment.py`` that mutation testing runs first.

Each test pins one behaviour whose change would silently corrupt or expose a data sector:
the tweak arithmetic, the key and sector-size checks, the whole-sector rule, and both XTS
backends against the independent reference in ``test_luks2_segment.py``.
"""

from __future__ import annotations

import os

import pytest

from fuse_crypt.luks2.segment import XtsSegment
from tests.fuse_crypt.test_luks2_segment import reference_xts

BACKENDS = ("libcrypto-evp", "cryptography")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_equals_the_reference_per_sector(backend: str) -> None:
    key = bytes(range(64))
    seg = XtsSegment(key, sector_size=512, iv_tweak=5, backend=backend)
    data = os.urandom(3 * 512)
    ct = seg.encrypt(1024, data)
    want = b"".join(
        reference_xts(key, 5 + 2 + i, data[i * 512 : (i + 1) * 512], encrypt=True) for i in range(3)
    )
    assert ct == want
    assert seg.decrypt(1024, ct) == data
