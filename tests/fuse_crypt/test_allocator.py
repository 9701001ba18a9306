"""Allocator tuning is the mount daemon's business, never a side effect of the crypto.

``mallopt`` changes the whole process: a key check, a test or any library caller that
builds a ContentEnc must find its allocator as it left it, while every mount still gets
the thresholds and the arena bound that its throughput depends on.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
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


def _serve_once(tmp_path: Path, backend: Callable[[str], LocalDirBackend]) -> None:
    """serve()'s own path up to the libfuse loop, over a fresh volume in ``tmp_path``
    (the caller stubs the loop)."""
    vol = make_volume(tmp_path / "cipher")
    (tmp_path / "mnt").mkdir()
    conf = ConfFile.read(str(vol.cipherdir / CONF_NAME))
    mount._serve(
        backend(str(vol.cipherdir)),
        vol.master_key,
        conf,
        str(tmp_path / "mnt"),
        None,
        read_only=False,
        fsname="t",
        on_ready=None,
        allow_other=False,
    )


def test_a_mount_tunes_the_allocator(libc: _Libc, tmp_path: Path, monkeypatch: Any) -> None:
    """serve()'s own path up to the libfuse loop (the loop itself is stubbed: the
    recorder must see the calls, and a real mount runs in another process)."""
    looped: list[str] = []

    def fake_loop(ops: Any, mountpoint: str, **kw: Any) -> None:
        looped.append(mountpoint)

    monkeypatch.setattr(mount, "CryptFUSE", fake_loop)
    _serve_once(tmp_path, LocalDirBackend)
    assert looped == [str(tmp_path / "mnt")]
    assert libc.calls == [
        ("mallopt", allocator._M_MMAP_THRESHOLD, 4 << 20),
        ("mallopt", allocator._M_TRIM_THRESHOLD, 32 << 20),
        ("mallopt", allocator._M_ARENA_MAX, 2),
    ]
    assert allocator._allocator_tuned is True


def test_an_object_store_mount_gets_the_bounded_heap_profile(
    libc: _Libc, tmp_path: Path, monkeypatch: Any
) -> None:
    """A backend that says ``bounded_heap`` (the object store: its daemon has an RSS
    budget) gets the small thresholds; the local one keeps the throughput ones."""

    class Bounded(LocalDirBackend):
        bounded_heap = True

    monkeypatch.setattr(mount, "CryptFUSE", lambda ops, mountpoint, **kw: None)
    _serve_once(tmp_path, Bounded)
    assert libc.calls == [
        ("mallopt", allocator._M_MMAP_THRESHOLD, 1 << 20),
        ("mallopt", allocator._M_TRIM_THRESHOLD, 4 << 20),
        ("mallopt", allocator._M_ARENA_MAX, 2),
        ("malloc_trim", 0),  # the set-up's garbage handed back once, before serving
    ]
    from fuse_crypt.backend import ObjectStoreBackend

    assert ObjectStoreBackend.bounded_heap is True
    assert LocalDirBackend.bounded_heap is False


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


# -- tune_allocator against a stand-in for mallopt (from the mutation run) --------------


class _FakeLibc:
    def __init__(self, answer: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer
        outer = self

        class _Mallopt:
            argtypes: object = None
            restype: object = None

            def __call__(self, param: int, value: int) -> int:
                outer.calls.append((param, value))
                return outer.answer

        self.mallopt = _Mallopt()


@pytest.fixture
def fresh_tuning(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Un-cache the process-wide answer and clear the user's malloc overrides."""
    monkeypatch.setattr(allocator, "_allocator_tuned", None)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return monkeypatch


def test_tuning_sets_both_thresholds_once(fresh_tuning: pytest.MonkeyPatch) -> None:
    libc = _FakeLibc(1)
    fresh_tuning.setattr(ctypes, "CDLL", lambda name: libc if name is None else None)
    assert allocator.tune_allocator() is True
    assert libc.calls == [(-3, 4 << 20), (-1, 32 << 20)]
    assert libc.mallopt.argtypes == [ctypes.c_int, ctypes.c_int]
    assert libc.mallopt.restype is ctypes.c_int
    assert allocator._allocator_tuned is True
    assert allocator.tune_allocator() is True and len(libc.calls) == 2  # cached


def test_tuning_refused_by_libc_is_reported(fresh_tuning: pytest.MonkeyPatch) -> None:
    libc = _FakeLibc(0)
    fresh_tuning.setattr(ctypes, "CDLL", lambda name: libc)
    assert allocator.tune_allocator() is False
    assert libc.calls == [(-3, 4 << 20)]  # the second is not tried
    assert allocator._allocator_tuned is False
    libc.answer = 1
    assert allocator.tune_allocator() is False and len(libc.calls) == 1  # the answer is cached


@pytest.mark.parametrize("var", ["MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"])
def test_user_malloc_settings_are_left_alone(fresh_tuning: pytest.MonkeyPatch, var: str) -> None:
    libc = _FakeLibc(1)
    fresh_tuning.setattr(ctypes, "CDLL", lambda name: libc)
    fresh_tuning.setenv(var, "")
    assert allocator.tune_allocator() is False
    assert libc.calls == [] and allocator._allocator_tuned is False


@pytest.mark.parametrize("exc", [OSError, AttributeError])
def test_no_mallopt_means_no_tuning(fresh_tuning: pytest.MonkeyPatch, exc: type) -> None:
    def _no_libc(name: object) -> object:
        raise exc("no mallopt here")

    fresh_tuning.setattr(ctypes, "CDLL", _no_libc)
    assert allocator.tune_allocator() is False and allocator._allocator_tuned is False
