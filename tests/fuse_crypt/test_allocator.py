"""Allocator tuning is the mount daemon's business, never a side effect of the crypto.

``mallopt`` changes the whole process: a key check, a test or any library caller that
builds a ContentEnc must find its allocator as it left it, while every mount still gets
the thresholds and the arena bound that its throughput depends on.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.backend import LocalDirBackend
from fuse_crypt.configfile import ConfFile
from fuse_crypt.contentenc import ContentEnc
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.fusefrontend import allocator, mount
from fuse_crypt.nametransform import CONF_NAME

from .conftest import make_volume

MK = bytes(range(1, 33))


class _Libc:
    """Stands for ``ctypes.CDLL(None)``: records every C call made through it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        calls = self.calls

        class _Fn:
            argtypes: list[Any] = []
            restype: Any = None

            def __call__(self, *args: int) -> int:
                calls.append((name, *args))
                return 1

        return _Fn()


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> _Libc:
    fake = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: fake)
    monkeypatch.setattr(allocator, "_allocator_tuned", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return fake


def test_building_and_using_content_enc_leaves_the_allocator_alone(libc: _Libc) -> None:
    ce = ContentEnc(CryptoCore(MK))
    fid = os.urandom(16)
    assert ce.decrypt_blocks(0, ce.encrypt_blocks(0, b"x" * 5000, fid), fid) == b"x" * 5000
    assert libc.calls == []
    assert allocator._allocator_tuned is None


def test_a_mount_tunes_the_allocator(libc: _Libc, tmp_path: Path, monkeypatch: Any) -> None:
    """serve()'s own path up to the libfuse loop (the loop itself is stubbed: the
    recorder must see the calls, and a real mount runs in another process)."""
    looped: list[str] = []

    def fake_loop(ops: Any, mountpoint: str, **kw: Any) -> None:
        looped.append(mountpoint)

    monkeypatch.setattr(mount, "CryptFUSE", fake_loop)
    vol = make_volume(tmp_path / "cipher")
    (tmp_path / "mnt").mkdir()
    conf = ConfFile.read(str(vol.cipherdir / CONF_NAME))
    mount._serve(
        LocalDirBackend(str(vol.cipherdir)),
        vol.master_key,
        conf,
        str(tmp_path / "mnt"),
        None,
        read_only=False,
        fsname="t",
        on_ready=None,
        allow_other=False,
    )
    assert looped == [str(tmp_path / "mnt")]
    assert libc.calls == [
        ("mallopt", allocator._M_MMAP_THRESHOLD, 4 << 20),
        ("mallopt", allocator._M_TRIM_THRESHOLD, 32 << 20),
        ("mallopt", allocator._M_ARENA_MAX, 2),
    ]
    assert allocator._allocator_tuned is True


def test_user_malloc_settings_win_over_the_thresholds(
    libc: _Libc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert allocator.tune_process() is False
    assert libc.calls == [("mallopt", allocator._M_ARENA_MAX, 2)]


def test_tuning_is_real_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the real libc: mallopt accepts both thresholds (the mocks above would
    not notice a wrong constant that glibc refuses)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc tuning only applies to glibc")
    monkeypatch.setattr(allocator, "_allocator_tuned", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert allocator.tune_allocator() is True
    trim = allocator.malloc_trim()
    assert trim is not None
    trim()
