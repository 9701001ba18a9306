"""setup.py's build outputs (coco_proto's stubs, the XTS sector loop): generated at build
time, never committed, never stale."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_stubs_match_regeneration(tmp_path: pathlib.Path) -> None:
    """The editable install wrote the stubs into the tree; a .proto edited since then
    (or a generator other than the pinned one) shows here, not as a confusing gRPC error."""
    generated = _load_generator().generate(tmp_path)
    assert generated, "proto/ holds no .proto files"
    for path in generated:
        installed = ROOT / "coco_proto" / path.name
        assert installed.exists(), f"{path.name} is missing; reinstall (pip install -e .)"
        assert installed.read_bytes() == path.read_bytes(), f"{path.name} is stale; reinstall"
    installed_names = {p.name for p in (ROOT / "coco_proto").glob("*_pb2*.py*")}
    assert installed_names == {p.name for p in generated}, "coco_proto holds stubs of no proto"


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout: nothing to say about what is committed",
)
def test_stubs_are_not_committed() -> None:
    """They are build outputs: git tracks only the package's __init__.py and ignores the
    rest, so a stub can never be committed by accident."""
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "coco_proto"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked == ["coco_proto/__init__.py"], tracked
    stub = next((ROOT / "coco_proto").glob("*_pb2.py"))
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", str(stub)], capture_output=True
    )
    assert ignored.returncode == 0, f"{stub.name} is not ignored by git"


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout: nothing to say about what is committed",
)
def test_the_compiled_sector_loop_is_not_committed() -> None:
    """setup.py's other build output, the XTS sector loop: built at install, ignored by git
    (a committed binary could not be reviewed, and would not match this machine's build)."""
    loop = ROOT / "fuse_crypt" / "luks2" / "xts_sectors.so.0"
    assert loop.is_file(), "the install did not build the sector loop"
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "fuse_crypt/luks2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "fuse_crypt/luks2/xts_sectors.c" in tracked
    assert not [t for t in tracked if ".so" in t], tracked
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", str(loop)], capture_output=True
    )
    assert ignored.returncode == 0, f"{loop.name} is not ignored by git"
