"""csi_driver.usage: the volume's own usage, walked without following links."""

from __future__ import annotations

import os
import pathlib

import pytest

from csi_driver import usage


def test_counts_allocated_bytes_and_entries(tmp_path: pathlib.Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "e" / "f").write_bytes(os.urandom(100_000))
    (tmp_path / "g").write_bytes(b"x")
    used, entries = usage.tree_usage(str(tmp_path))
    assert entries == 4 and used >= 100_000


def test_links_are_not_followed(tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(os.urandom(1 << 20))
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "ln").symlink_to(outside)
    used, entries = usage.tree_usage(str(vol))
    assert entries == 1 and used < 1 << 20
    with pytest.raises(OSError):
        usage.tree_usage(str(vol / "ln"))  # the root itself must not be a link


def test_walk_is_bounded(tmp_path: pathlib.Path) -> None:
    for i in range(20):
        (tmp_path / str(i)).touch()
    with pytest.raises(usage.TooManyEntries):
        usage.tree_usage(str(tmp_path), max_entries=10)
