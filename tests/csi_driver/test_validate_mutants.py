"""csi_driver.validate: every check on both sides of its bound, every refusal by its text.

What a CSI request carries is host-controlled; these checks are the node's first line, so
a mutation run (tools/mutation.py) judges validate.py by these in-process tests.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from csi_driver import errors, validate


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


# -- volume ids -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "good", ["a", "A", "0", "pvc-1234_x.y", "a" * 128, "a..", "0-", "XX.XX", "XX..XX"]
)
def test_volume_ids_that_pass(good: str) -> None:
    assert validate.volume_id(good) == good


@pytest.mark.parametrize(
    "bad",
    [".", "..", "-a", "_a", ".a", "a/b", "/a", "a b", "a\n", "\na", "a" * 129, "\u00e9", "a\0"],
)
def test_volume_ids_that_do_not(bad: str) -> None:
    with pytest.raises(
        errors.InvalidArgument, match=_exactly("volume_id has invalid characters or length")
    ):
        validate.volume_id(bad)
    with pytest.raises(
        errors.InvalidArgument, match=_exactly("vid has invalid characters or length")
    ):
        validate.volume_id(bad, "vid")


@pytest.mark.parametrize("missing", ["", None, 5, b"a"])
def test_missing_volume_id(missing: object) -> None:
    with pytest.raises(errors.InvalidArgument, match=_exactly("volume_id is required")):
        validate.volume_id(missing)
    with pytest.raises(errors.InvalidArgument, match=_exactly("vid is required")):
        validate.volume_id(missing, "vid")


# -- path text -----------------------------------------------------------------------------


def test_path_text_refusals_are_exact() -> None:
    for missing in ("", None, 1, b"/a"):
        with pytest.raises(errors.InvalidArgument, match=_exactly("p is required")):
            validate.path_text(missing, "p")
    with pytest.raises(errors.InvalidArgument, match=_exactly("p contains a NUL byte")):
        validate.path_text("/a\0b", "p")
    with pytest.raises(errors.InvalidArgument, match=_exactly("p is not valid UTF-8")):
        validate.path_text("/a\udcff", "p")
    with pytest.raises(errors.InvalidArgument, match=_exactly("p is longer than 4095 bytes")):
        validate.path_text("/" + "a" * 4095, "p")
    with pytest.raises(errors.InvalidArgument, match=_exactly("p is longer than 4095 bytes")):
        validate.path_text("/" + "\u00e9" * 2048, "p")  # 4097 bytes, 2049 characters


def test_path_text_edges_pass() -> None:
    assert validate.path_text("/" + "a" * 4094, "p") == "/" + "a" * 4094
    assert validate.path_text("rel\x01tive", "p") == "rel\x01tive"


# -- absolute paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("a/b", "p must be absolute"),
        ("./a", "p must be absolute"),
        ("/a//b", "p must be normalised (no '.', '..' or '//')"),
        ("/a/./b", "p must be normalised (no '.', '..' or '//')"),
        ("/a/../b", "p must be normalised (no '.', '..' or '//')"),
        ("/..", "p must be normalised (no '.', '..' or '//')"),
        ("/a/.", "p must be normalised (no '.', '..' or '//')"),
        ("/a//X", "p must be normalised (no '.', '..' or '//')"),
        ("/a/../X", "p must be normalised (no '.', '..' or '//')"),
        ("/" + "a" * 256, "p has a component longer than 255 bytes"),
        ("/x/" + "\u00e9" * 128 + "/y", "p has a component longer than 255 bytes"),
    ],
)
def test_absolute_path_refusals_are_exact(path: str, text: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        validate.absolute_path(path, "p")


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/", "/"),
        ("//", "/"),
        ("/a", "/a"),
        ("/a/b/", "/a/b"),
        ("/a/b//", "/a/b"),
        ("/a/...", "/a/..."),
        ("/a/.b/c..", "/a/.b/c.."),
        ("/aX/X", "/aX/X"),
        ("/X/", "/X"),
        ("/a/..X", "/a/..X"),
        ("/" + "a" * 255, "/" + "a" * 255),
    ],
)
def test_absolute_paths_that_pass(path: str, normal: str) -> None:
    assert validate.absolute_path(path, "p") == normal


def test_absolute_path_checks_the_text_first() -> None:
    with pytest.raises(errors.InvalidArgument, match=_exactly("p is required")):
        validate.absolute_path("", "p")


# -- is_below ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root", "below"),
    [
        ("/a/b", "/a", True),
        ("/a/b/c", "/a", True),
        ("/a/b", "/a/", True),
        ("/x", "/", True),
        ("/a", "/a", False),
        ("/a/", "/a", False),
        ("/ab", "/a", False),
        ("/", "/", False),
        ("/a", "/a/b", False),
        ("/aX/b", "/aX", True),
        ("/a/b", "/aX", False),  # a root is taken as it is written
    ],
)
def test_is_below_is_strict_and_on_a_component_boundary(path: str, root: str, below: bool) -> None:
    assert validate.is_below(path, root) is below


# -- resolve_under -------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "kubelet"
    (r / "pods").mkdir(parents=True)
    return r


def test_resolve_under_returns_the_resolved_path(root: Path, tmp_path: Path) -> None:
    roots = (str(root),)
    assert validate.resolve_under(str(root / "pods" / "t"), roots, "t") == str(root / "pods/t")
    assert validate.resolve_under(str(root / "pods") + "/", roots, "t") == str(root / "pods")
    # the parent is resolved: kubelet's root may be reached through a symlink
    (tmp_path / "link").symlink_to(root)
    got = validate.resolve_under(str(tmp_path / "link" / "pods" / "t"), roots, "t")
    assert got == str(root / "pods" / "t")
    # a file where a directory should be: the path cannot be a symlink we would follow
    (root / "file").write_bytes(b"")
    assert validate.resolve_under(str(root / "file" / "x"), roots, "t") == str(root / "file/x")
    # the first root that holds it is enough
    other = str(tmp_path / "other")
    assert validate.resolve_under(str(root / "x"), (other, str(root)), "t") == str(root / "x")


def test_resolve_under_refusals_are_exact(root: Path, tmp_path: Path) -> None:
    roots = (str(root),)
    with pytest.raises(errors.InvalidArgument, match=_exactly("t must not be /")):
        validate.resolve_under("/", roots, "t")
    with pytest.raises(errors.InvalidArgument, match=_exactly("t must not be /")):
        validate.resolve_under("//", roots, "t")
    link = root / "pods" / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(
        errors.InvalidArgument, match=_exactly(f"t {link} is a symlink; refusing to follow it")
    ):
        validate.resolve_under(str(link), roots, "t")
    dangling = root / "pods" / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(errors.InvalidArgument, match="is a symlink; refusing to follow it$"):
        validate.resolve_under(str(dangling), roots, "t")
    outside = str(tmp_path / "elsewhere")
    text = f"t {outside} is not below the directories this node serves ({root})"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        validate.resolve_under(outside, roots, "t")
    with pytest.raises(
        errors.InvalidArgument,
        match=_exactly(f"t {root} is not below the directories this node serves ({root})"),
    ):
        validate.resolve_under(str(root), roots, "t")
    two = (str(root), str(tmp_path / "b"))
    text = f"t {outside} is not below the directories this node serves ({root}, {tmp_path}/b)"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        validate.resolve_under(outside, two, "t")
    text = f"t {outside} is not below the directories this node serves (none configured)"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        validate.resolve_under(outside, (), "t")
    # a symlinked parent that leads out of the root is judged where it leads
    (root / "pods" / "out").symlink_to(tmp_path)
    escaped = str(root / "pods" / "out" / "x")
    text = f"t {escaped} is not below the directories this node serves ({root})"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        validate.resolve_under(escaped, roots, "t")


def test_resolve_under_does_not_lstat_a_mount_point(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lstat of a FUSE mount root asks its daemon, which may hang: a mount point is taken
    as it is (mounting follows links, so it is never a symlink)."""
    target = str(root / "pods" / "mnt")
    monkeypatch.setattr(validate.mounttable, "mounts_by_point", lambda: {target: object()})

    def _no_lstat(path: str, name: str) -> os.stat_result:
        raise AssertionError(f"lstat({path})")

    monkeypatch.setattr(validate, "_lstat", _no_lstat)
    assert validate.resolve_under(target, (str(root),), "t") == target


def test_lstat_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import errno

    def _too_long(path: str) -> os.stat_result:
        raise OSError(errno.ENAMETOOLONG, "File name too long")

    monkeypatch.setattr(validate.os.path, "realpath", lambda p: p)
    monkeypatch.setattr(validate.os, "lstat", _too_long)
    with pytest.raises(errors.InvalidArgument, match=_exactly("t is too long")):
        validate.resolve_under(str(tmp_path / "x"), (str(tmp_path),), "t")

    def _eacces(path: str) -> os.stat_result:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(validate.os, "lstat", _eacces)
    assert validate.resolve_under(str(tmp_path / "x"), (str(tmp_path),), "t") == str(tmp_path / "x")


def test_resolved_path_longer_than_path_max_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The request text is bounded, but resolving its parent can make it longer."""
    deep = "/r/" + "/".join(["d" * 200] * 21)  # 4223 bytes
    monkeypatch.setattr(validate.os.path, "realpath", lambda p: deep)
    with pytest.raises(errors.InvalidArgument, match=_exactly("t is too long")):
        validate.resolve_under("/r/link/" + "x" * 100, ("/r",), "t")
    # the same bound when lstat has nothing to say (e.g. a mount point, never lstat'ed)
    monkeypatch.setattr(validate, "_lstat", lambda path, name: None)
    with pytest.raises(errors.InvalidArgument, match=_exactly("t is too long")):
        validate.resolve_under("/r/link/" + "x" * 100, ("/r",), "t")
    monkeypatch.setattr(validate.os.path, "realpath", lambda p: deep[: 4095 - 10])
    got = validate.resolve_under("/r/link/" + "x" * 9, ("/r",), "t")
    assert len(got.encode()) == 4095


def test_real_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert validate.real_root(str(tmp_path / "link")) == str(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert validate.real_root("link/") == str(tmp_path / "real")
