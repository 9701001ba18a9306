"""tools/image.py's pure parts: the Debian lock check, the SBOM, the image's Python deps."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import load_image_tool


@pytest.fixture(scope="module")
def tool() -> ModuleType:
    return load_image_tool()


def _locked(tool: ModuleType) -> list[tuple[str, str, str]]:
    rows = []
    for line in tool.DEBIAN_LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("=", 1)
            rows.append((name, version, "amd64"))
    return rows


def test_debian_lock_matches_itself(tool: ModuleType) -> None:
    assert tool.check_debian_lock(_locked(tool), update=False) == []


def test_debian_drift_is_named(tool: ModuleType) -> None:
    """A newer version, a new package and a vanished one are each reported, and the build
    error says how to proceed."""
    rows = _locked(tool)
    name, version, arch = rows[0]
    drifted = [(name, version + "+1", arch), *rows[2:], ("evil-extra", "1.0", "amd64")]
    drift = tool.check_debian_lock(drifted, update=False)
    assert any(d.strip().startswith(f"{name}: locked {version}, got {version}+1") for d in drift)
    assert any("evil-extra: locked (absent), got 1.0" in d for d in drift)
    assert any(f"{rows[1][0]}: locked {rows[1][1]}, got (absent)" in d for d in drift)
    assert "--update-lock" in str(tool.drift_error(drift))


def test_only_debian_updates_are_not_set_changes(tool: ModuleType) -> None:
    """A newer version of a locked package is Debian's update; an added or vanished package
    and an older version (a mirror rolled back) are changes to the image's contents."""
    rows = _locked(tool)
    (n0, v0, a0), (n1, v1, _), (n2, v2, a2) = rows[0], rows[1], rows[2]
    drifted = [(n0, v0 + "+deb12u99", a0), (n2, "0:" + v2 + "~", a2), *rows[3:]]
    drifted.append(("evil-extra", "1.0", "amd64"))
    changes = tool.set_changes(tool.check_debian_lock(drifted, update=False))
    assert not any(c.strip().startswith(f"{n0}:") for c in changes)
    assert any(c.strip().startswith(f"{n1}: locked {v1}, got (absent)") for c in changes)
    assert any(c.strip().startswith(f"{n2}:") for c in changes)
    assert any("evil-extra" in c for c in changes)
    assert len(changes) == 3


def test_apt_packages_cover_the_plugins_needs(tool: ModuleType) -> None:
    wanted = {"python3", "python3-venv", "fuse3", "gocryptfs", "mount", "ca-certificates"}
    wanted |= {"cryptsetup-bin", "e2fsprogs", "util-linux"}
    assert wanted <= set(tool.apt_packages())
    locked = {n for n, _, _ in _locked(tool)}
    assert set(tool.apt_packages()) <= locked


def _pins(lock: Path) -> dict[str, str]:
    """name -> version; every line == pinned with one sha256."""
    pins = {}
    for line in lock.read_text().replace("\\\n", " ").splitlines():
        if line.strip() and not line.startswith("#"):
            req, _, hashes = line.partition("--hash=sha256:")
            name, version = req.strip().split("==")
            assert len(hashes.strip()) == 64, line
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_build_backend_is_hash_pinned(tool: ModuleType) -> None:
    assert {"setuptools", "wheel"} <= set(_pins(tool.BUILD_LOCK))


def test_python_lock_is_hash_pinned_and_complete(tool: ModuleType) -> None:
    """Every locked requirement is == pinned with a sha256; every image dependency is locked;
    the excluded ones are not."""
    pins = _pins(tool.PY_LOCK)
    for dep in tool.image_requirements():
        name = dep.split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("_", "-")
        assert name in pins, f"{name} is not locked"
    assert not set(tool.IMAGE_EXCLUDED) & set(pins)


def test_sbom_is_cyclonedx_and_deterministic(tool: ModuleType) -> None:
    src = tool.Source("0.1.0", "abc", 1700000000)
    debs = [("libc6", "2.36-9+deb12u13", "amd64")]
    pys = [("coco-csi", "0.1.0"), ("typing_extensions", "4.16.0")]
    one, two = tool.sbom(src, debs, pys), tool.sbom(src, debs, pys)
    assert one == two
    doc = json.loads(one)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.5"
    assert doc["serialNumber"].startswith("urn:uuid:")
    purls = {c["purl"] for c in doc["components"]}
    assert "pkg:pypi/typing-extensions@4.16.0" in purls
    assert "pkg:deb/debian/libc6@2.36-9%2Bdeb12u13?arch=amd64&distro=debian-bookworm" in purls
    assert doc["metadata"]["timestamp"] == "2023-11-14T22:13:20Z"


def test_sdist_only_is_short_and_locked(tool: ModuleType) -> None:
    """Exactly the allow-listed packages come as sdists (everything else is --only-binary);
    each is locked by its sdist's sha256 like the wheels, and the lock marks it."""
    assert {"oss2", "crcmod"} == tool.SDIST_ONLY
    assert set(_pins(tool.PY_LOCK)) >= tool.SDIST_ONLY
    text = tool.PY_LOCK.read_text()
    for name in tool.SDIST_ONLY:
        assert f"SDIST_ONLY): built into a wheel per build\n{name}==" in text
    flags = tool.binary_flags()
    assert "--only-binary=:all:" in flags and "--no-binary=crcmod,oss2" in flags


def test_wheel_lock_drops_only_the_sdists(tool: ModuleType, tmp_path: Path) -> None:
    """The in-image --require-hashes install gets the lock minus the sdist entries (their
    built wheels cannot match the sdist hashes) and keeps every other pin and hash."""
    out = tmp_path / "lock"
    tool.wheel_lock(out)
    kept = _pins(out)
    assert set(kept) == set(_pins(tool.PY_LOCK)) - tool.SDIST_ONLY
    assert {"boto3", "botocore", "s3transfer", "jmespath", "requests", "six"} <= set(kept)
    assert {"aliyun-python-sdk-core", "aliyun-python-sdk-kms", "pycryptodome"} <= set(kept)
