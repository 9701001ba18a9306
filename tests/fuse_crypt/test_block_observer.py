"""Block crypto metrics arrive through an injected observer, never by patching classes.

The mount daemon's ``--metrics-addr`` counters see every batch exactly once, whichever
entry point the frontend uses (the bytes forms or BlockCrypt's zero-copy ones), and a
ContentEnc built without an observer (every other caller) counts nothing.
"""

from __future__ import annotations

import os

import pytest

from fuse_crypt.cli import metrics
from fuse_crypt.contentenc import CIPHER_BS, PLAIN_BS, ContentEnc
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.errors import CorruptDataError
from fuse_crypt.fusefrontend.blockio import BlockCrypt

MK = bytes(range(1, 33))


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, int]] = []

    def encrypted(self, blocks: int, plain_bytes: int) -> None:
        self.events.append(("enc", blocks, plain_bytes))

    def decrypted(self, blocks: int, plain_bytes: int) -> None:
        self.events.append(("dec", blocks, plain_bytes))

    def auth_failed(self) -> None:
        self.events.append(("fail", 0, 0))


def test_every_batch_is_seen_once_from_either_entry_point() -> None:
    rec = Recorder()
    ce = ContentEnc(CryptoCore(MK), rec)
    fid = os.urandom(16)
    plain = os.urandom(2 * PLAIN_BS + 10)
    ct = ce.encrypt_blocks(3, plain, fid)
    assert ce.decrypt_blocks(3, ct, fid) == plain
    bc = BlockCrypt(ce)
    out = bytearray(len(ct))
    assert bc.encrypt_into(3, memoryview(plain), fid, out) == len(ct)
    back = bytearray(len(plain))
    assert bc.decrypt_into(3, memoryview(out), fid, back) == len(plain)
    seen = ("enc", 3, len(plain)), ("dec", 3, len(plain))
    assert rec.events == [*seen, *seen]


def test_holes_count_as_decrypted_blocks() -> None:
    rec = Recorder()
    ce = ContentEnc(CryptoCore(MK), rec)
    assert ce.decrypt_blocks(0, bytes(2 * CIPHER_BS), os.urandom(16)) == bytes(2 * PLAIN_BS)
    assert rec.events == [("dec", 2, 2 * PLAIN_BS)]


def test_a_refused_batch_is_an_auth_failure_and_nothing_else() -> None:
    rec = Recorder()
    ce = ContentEnc(CryptoCore(MK), rec)
    fid = os.urandom(16)
    ct = bytearray(ce.encrypt_blocks(0, b"x" * 100, fid))
    ct[20] ^= 1
    rec.events.clear()
    with pytest.raises(CorruptDataError):
        ce.decrypt_blocks(0, bytes(ct), fid)
    assert rec.events == [("fail", 0, 0)]


def test_without_an_observer_nothing_is_counted_and_no_class_is_patched() -> None:
    before = (ContentEnc.__dict__.copy(), BlockCrypt.__dict__.copy())
    counters = metrics.BlockCounters()
    value = metrics.BLOCKS_DECRYPTED._value.get()
    ce = ContentEnc(CryptoCore(MK))
    fid = os.urandom(16)
    ce.decrypt_blocks(0, ce.encrypt_blocks(0, b"y" * 5000, fid), fid)
    assert metrics.BLOCKS_DECRYPTED._value.get() == value
    counters.decrypted(2, 5000)  # the daemon's observer does count
    assert metrics.BLOCKS_DECRYPTED._value.get() == value + 2
    assert (ContentEnc.__dict__, BlockCrypt.__dict__) == before
