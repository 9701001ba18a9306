"""Each package states what callers may import (``__all__``), and nothing else is imported.

Why: with a stated surface, everything else in a package is internal and can move without
a hunt through the tree. The exact lists are pinned here so a change to a surface is a
deliberate, reviewed edit; the import scan (product code and bench/, by ast) catches a module
that reaches past a package's surface. Tests may import internals: they are not scanned.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("fuse_crypt", "sealed_secrets", "csi_driver", "bench")

SURFACES: dict[str, list[str]] = {
    "fuse_crypt": [
        "backend",
        "blockfront",
        "cli",
        "configfile",
        "errors",
        "fusefrontend",
        "hardening",
        "luks2",
        "metricsserver",
        "mounttable",
        "safeio",
        "strictjson",
    ],
    "fuse_crypt.backend": [
        "DirEntry",
        "RENAME_EXCHANGE",
        "RENAME_NOREPLACE",
        "XATTR_CREATE",
        "XATTR_REPLACE",
        "LocalDirBackend",
        "ObjectStoreBackend",
        "Stat",
        "StorageBackend",
        "credentials",
        "oss",
        "retrying",
        "s3",
        "transport",
    ],
    "fuse_crypt.blockfront": [
        "DISK_NAME",
        "FSNAME",
        "CryptDevice",
        "DeviceError",
        "cli",
        "device_size",
        "open_device",
        "serve_block",
    ],
    "fuse_crypt.fusefrontend": ["MAX_IO", "CryptFUSE", "StopSignals", "run_fuse_loop", "serve"],
    "fuse_crypt.luks2": [
        "DataSegment",
        "HeaderError",
        "KdfCost",
        "Luks2Error",
        "Opened",
        "SegmentError",
        "XtsSegment",
        "add_passphrase",
        "bind_volume",
        "format_volume",
        "inspect_header",
        "is_luks",
        "open_volume",
        "remove_passphrase",
    ],
    "sealed_secrets": ["cli", "errors", "kubectl_plugin", "resolver", "resource_uri", "seal"],
    "sealed_secrets.providers": [
        "ASYM",
        "ENVELOPE_PROVIDERS",
        "VAULT_PROVIDERS",
        "ProviderOptions",
        "aliyun",
        "asym",
        "get_vault_value",
        "normalise",
        "unwrap_data_key",
    ],
    "csi_driver": ["cli", "client", "convert", "core", "keys"],
    "csi_driver.core": ["controller", "node", "store", "volcap"],
}

# (importing module, imported dotted name) pairs that may pass a surface, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {
    (
        "bench.object_delete",
        "csi_driver.volumes.objectdelete.delete_prefix",
    ): "the benchmark times DeleteVolume's bucket loop alone, without a resolver or gRPC",
    (
        "bench.object_delete",
        "csi_driver.volumes.objectdelete.abort_uploads",
    ): "the benchmark times DeleteVolume's abort loop alone, without a resolver or gRPC",
    (
        "bench.object_delete",
        "csi_driver.volumes.objectdelete.ABORT_PARALLEL",
    ): "the benchmark compares DeleteVolume's abort concurrency with one at a time",
    (
        "bench.object_delete",
        "csi_driver.volumes.objectdelete.BATCHES_IN_FLIGHT",
    ): "the benchmark compares DeleteVolume's batch pipeline with one at a time",
    ("bench.object_delete", "csi_driver.deadline.Deadline"): "delete_prefix's time bound",
}


_PROBE = """
import importlib, json, sys
out = {}
for package in sys.argv[1:]:
    module = importlib.import_module(package)
    names = list(getattr(module, "__all__", []))
    missing = []
    for name in names:
        if not hasattr(module, name):  # a public submodule, not yet imported
            try:
                importlib.import_module(package + "." + name)
            except ImportError:
                pass
        if not hasattr(module, name):
            missing.append(name)
    out[package] = {"all": names, "missing": missing, "file": module.__file__}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def surfaces() -> dict[str, dict[str, Any]]:
    """Each package's ``__all__``, imported in a fresh interpreter from the repo root.

    A subprocess, because under pytest's default import mode ``tests/csi_driver`` can shadow
    the product package of the same name.
    """
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, *SURFACES],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(run.stdout)


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_surface_is_exactly_the_stated_list(surfaces: dict, package: str) -> None:
    found = surfaces[package]
    assert Path(found["file"]).is_relative_to(ROOT / package.split(".")[0])
    assert sorted(found["all"]) == sorted(SURFACES[package])
    assert len(set(found["all"])) == len(found["all"])


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_every_surface_name_is_importable(surfaces: dict, package: str) -> None:
    assert surfaces[package]["missing"] == []


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def _imported_names(path: Path) -> list[str]:
    """Every dotted name ``path`` imports (``from a.b import c`` gives ``a.b.c``)."""
    me, is_package = _module_name(path)
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_package else me.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.extend(f"{source}.{alias.name}" for alias in node.names)
    return names


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_passes_a_package_surface() -> None:
    offences = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            me, _ = _module_name(path)
            for name in _imported_names(path):
                if (me, name) in ALLOWED:
                    continue
                for package, surface in SURFACES.items():
                    if _inside(me, package) or not name.startswith(package + "."):
                        continue
                    first = name[len(package) + 1 :].split(".")[0]
                    if first not in surface:
                        offences.append(f"{me} imports {name}: {first!r} not in {package}")
    assert not offences, "\n".join(offences)


def test_allowed_exceptions_are_still_needed() -> None:
    """A stale exception would silently widen a surface."""
    used = set()
    for top in SCANNED:
        for path in (ROOT / top).rglob("*.py"):
            me, _ = _module_name(path)
            used.update((me, name) for name in _imported_names(path))
    assert set(ALLOWED) <= used
