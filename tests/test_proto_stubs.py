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


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


# (directory, what git may track there, one build output that must exist and be ignored)
BUILD_OUTPUTS = [
    # the stubs: git tracks only the package's __init__.py
    ("coco_proto", ["coco_proto/__init__.py"], next((ROOT / "coco_proto").glob("*_pb2.py"), None)),
    # the XTS sector loop: its source only (a committed binary could not be reviewed, and
    # would not match this machine's build)
    (
        "fuse_crypt/luks2",
        None,
        ROOT / "fuse_crypt" / "luks2" / "xts_sectors.so.0",
    ),
    # the block daemon's request loop, likewise
    (
        "fuse_crypt/blockfront",
        None,
        ROOT / "fuse_crypt" / "blockfront" / "blockloop.so.0",
    ),
]


@pytest.mark.skipif(
    not (ROOT / ".git").exists() or shutil.which("git") is None,
    reason="not a git checkout: nothing to say about what is committed",
)
@pytest.mark.parametrize(("folder", "tracked_only", "output"), BUILD_OUTPUTS)
def test_build_outputs_are_not_committed(
    folder: str, tracked_only: list[str] | None, output: pathlib.Path | None
) -> None:
    """Build outputs exist after the install, and git ignores them, so one can never be
    committed by accident."""
    assert output is not None and output.is_file(), f"the install did not build {folder}'s"
    tracked = _git("ls-files", folder).stdout.split()
    if tracked_only is not None:
        assert tracked == tracked_only, tracked
    else:
        assert any(t.endswith(".c") for t in tracked), tracked  # the source is committed
        assert not [t for t in tracked if ".so" in t], tracked
    ignored = _git("check-ignore", "-q", str(output))
    assert ignored.returncode == 0, f"{output.name} is not ignored by git"
