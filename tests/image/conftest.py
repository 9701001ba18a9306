"""The driver image, built once per session (cached by tree) and run under Debian's podman.

``built_image`` runs ``tools/image.py`` (mmdebstrap + umoci) into build/image-cache/<key>/,
where the key hashes the commit plus any uncommitted change, so a rerun on one tree reuses it.
``podman`` gives a podman on a private, throw-away storage root with the image loaded under
the name the chart renders; its flags are the ones that work on these kernels (runc, not crun;
cgroupfs; vfs storage; bounded ulimits).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "image-cache"
TOOLS = ("mmdebstrap", "umoci", "podman", "runc", "dpkg-query")
BUILD_TIMEOUT = 900


def tools_skip_reason() -> str | None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"image tools missing: {', '.join(missing)} (`./run test` installs them)"
    import os

    if os.geteuid() != 0:
        return "building and running the image needs root"
    return None


# What goes into the image; edits elsewhere (tests, docs) reuse the cached build.
IMAGE_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "proto", "tools/image.py", "image") + (
    "README.md",
    "fuse_crypt",
    "sealed_secrets",
    "csi_driver",
    "coco_proto",
)


def tree_key() -> str:
    """The commit plus a hash of uncommitted changes to the image's inputs."""

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, check=True
        ).stdout

    h = hashlib.sha256(git("rev-parse", "HEAD"))
    h.update(git("diff", "HEAD", "--binary", "--", *IMAGE_INPUTS))
    new = git("ls-files", "-z", "-o", "--exclude-standard", "--", *IMAGE_INPUTS)
    for rel in sorted(new.split(b"\0")):
        p = REPO / rel.decode()
        if rel and p.is_file():
            h.update(rel + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def load_image_tool() -> ModuleType:
    """tools/image.py as a module (it is a script, not a package)."""
    name = "coco_image_tool"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "image.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class BuiltImage:
    out: Path
    summary: dict[str, Any]

    @property
    def layout(self) -> Path:
        return self.out / "oci"

    @property
    def name(self) -> str:
        return str(self.summary["image"])


def build_image(out: Path) -> BuiltImage:
    """tools/image.py into ``out`` (drift is recorded, and failed by test_debian_lock_current)."""
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "image.py"), "--out", str(out), "--allow-drift"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    if p.returncode != 0:
        pytest.fail(f"image build failed:\n{p.stderr[-3000:]}", pytrace=False)
    return BuiltImage(out, json.loads((out / "build.json").read_text()))


@pytest.fixture(scope="session")
def built_image() -> BuiltImage:
    reason = tools_skip_reason()
    if reason:
        pytest.skip(reason)
    out = CACHE / tree_key()
    if (out / "build.json").is_file():
        return BuiltImage(out, json.loads((out / "build.json").read_text()))
    if CACHE.is_dir():  # keep only the newest tree's image
        for old in CACHE.iterdir():
            shutil.rmtree(old, ignore_errors=True)
    return build_image(out)


class Podman:
    """Debian's podman with flags that work here, on its own storage (nothing shared)."""

    def __init__(self, root: Path) -> None:
        self.base = [
            "podman",
            "--root",
            str(root / "storage"),
            "--runroot",
            str(root / "run"),
            "--tmpdir",
            str(root / "tmp"),
            "--storage-driver=vfs",
            "--runtime",
            "runc",
            "--cgroup-manager=cgroupfs",
            "--events-backend=file",
        ]
        # Every `podman run` gets these; the rest is per test.
        self.run_flags = [
            "--pull=never",
            "--network=none",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
        ]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        p = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and p.returncode != 0:
            raise AssertionError(f"podman {args[0]} failed ({p.returncode}): {p.stderr[-2000:]}")
        return p.stdout

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`podman run --rm ...`: the finished process (not checked)."""
        return subprocess.run(
            [*self.base, "run", "--rm", *self.run_flags, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="session")
def podman(built_image: BuiltImage) -> Iterator[Podman]:
    root = Path(tempfile.mkdtemp(prefix="coco-podman-", dir="/var/tmp"))
    pm = Podman(root)
    try:
        image_id = pm("pull", "-q", f"oci:{built_image.layout}:{built_image.summary['tag']}")
        pm("tag", image_id.strip(), built_image.name)
        yield pm
    finally:
        with contextlib.suppress(Exception):
            pm("rm", "-af", "-t", "5", check=False)
        with contextlib.suppress(Exception):
            # not `system reset`: as root that also drops host-wide podman networks
            pm("rmi", "-af", check=False, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
