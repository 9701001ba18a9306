"""Fixtures: real node/controller plugins on real unix sockets, real FUSE mounts.

Sockets live in a short /tmp directory (unix socket paths are limited to 108 bytes);
everything else under pytest's tmp_path. Every fixture unmounts what it mounted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from csi_driver.client import CsiClient
from csi_driver.core.controller import LocalBackend
from csi_driver.core.node import NodeCore
from csi_driver.metrics import Metrics
from csi_driver.server import Plugin, start_controller, start_node
from fuse_crypt import mounttable
from tests.fuse_env import fuse_skip_reason

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY_RESOURCE = KEY_PREFIX + "volume-root"
PASS_RESOURCE = "kbs:///default/passphrases/vol"
SIGNING_PREFIX = "kbs:///default/signing-key/"
SIGNING_KID = SIGNING_PREFIX + "csi-test"
PASSPHRASE = b"correct horse battery staple"


# Modules that need neither root nor FUSE (the controller, pure logic, the in-process fakes
# of fakes.py): they run everywhere and are never skipped.
NO_FUSE_MODULES = frozenset(
    {
        "test_controller.py",
        "test_core_boundary.py",
        "test_crash_matrix.py",
        "test_keys.py",
        "test_mounter.py",
        "test_objectmount.py",
        "test_proc.py",
        "test_rpc.py",
        "test_store.py",
        "test_supervisor.py",
        "test_usage.py",
        "test_volume_metrics.py",
        "test_zygote.py",  # its one mount test is marked needs_fuse itself
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reason = fuse_skip_reason("FUSE mounts with allow_other")
    if reason is None:
        return
    here = pathlib.Path(__file__).parent
    for item in items:
        path = pathlib.Path(str(item.fspath))
        if here in path.parents and path.name not in NO_FUSE_MODULES:
            item.add_marker(pytest.mark.skip(reason=reason))


def cleanup_mounts(root: str) -> None:
    """Lazy-unmount anything still mounted under ``root`` (a failed test must not leak)."""
    for mp in sorted(mounttable.mounts_by_point(), key=len, reverse=True):
        if mp.startswith(root.rstrip("/") + "/"):
            with contextlib.suppress(OSError):
                mounttable.detach(mp, lazy=True)


@dataclass
class Keys:
    resources_file: str
    spec: str
    signing_key: object
    root_key: bytes

    def seal_passphrase(self) -> str:
        from sealed_secrets.seal import seal_vault

        return seal_vault(
            PASS_RESOURCE, "kbs", signing_key=self.signing_key, signing_kid=SIGNING_KID
        )


@pytest.fixture
def keys(tmp_path: pathlib.Path) -> Keys:
    from csi_driver.volume_key import new_volume_key_jwk, parse_volume_key
    from sealed_secrets.keys import generate_signing_key, public_jwk

    sk = generate_signing_key(SIGNING_KID)
    root_jwk = new_volume_key_jwk().encode()
    root = parse_volume_key(root_jwk)
    res = {
        "default/coco-csi/volume-root": root_jwk,
        # Raw bytes and the public signing JWK are not volume keys, even under the prefix.
        "default/coco-csi/raw-bytes": os.urandom(32),
        "default/coco-csi/signing-jwk": public_jwk(sk).export().encode(),
        "default/passphrases/vol": PASSPHRASE,
        "default/signing-key/csi-test": public_jwk(sk).export().encode(),
        "default/coco-csi/short": b"tiny",
    }
    path = tmp_path / "resources.json"
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in res.items()}))
    return Keys(str(path), f"offline-fs:{path}", sk, root)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="csit", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Env:
    """A running node + controller pair and clients for both."""

    tmp: pathlib.Path
    sockdir: str
    node_plugin: Plugin
    ctrl_plugin: Plugin
    node: CsiClient
    ctrl: CsiClient
    core: NodeCore
    backend: LocalBackend
    keys: Keys
    mounter: str

    @property
    def node_endpoint(self) -> str:
        return f"unix://{self.sockdir}/node.sock"

    def target(self, name: str = "vol") -> str:
        """A kubelet-like target path whose parent exists (kubelet creates only the parent)."""
        parent = self.tmp / "pods" / name / "volumes"
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "mount")


def make_node(tmp: pathlib.Path, keys: Keys, mounter: str, **kw: object) -> NodeCore:
    from sealed_secrets.resolver import build_resolver

    opts: dict[str, object] = {
        "kubelet_dir": str(tmp),  # env.target() paths lie below tmp/pods
        "cipher_roots": [str(tmp / "backend")],
        "allowed_key_resources": [KEY_PREFIX],
        "allowed_signing_kids": [SIGNING_PREFIX],
    }
    opts.update(kw)
    return NodeCore(
        "test-node",
        str(tmp / "node-state"),
        build_resolver(keys.spec),
        mounter=mounter,
        metrics=Metrics(),
        monitor_interval=0.1,
        **opts,  # type: ignore[arg-type]
    )


def _env(tmp: pathlib.Path, sockdir: str, keys: Keys, mounter: str) -> Iterator[Env]:
    core = make_node(tmp, keys, mounter)
    backend = LocalBackend(str(tmp / "backend"))
    node_plugin = start_node(f"unix://{sockdir}/node.sock", core)
    ctrl_plugin = start_controller(f"unix://{sockdir}/ctrl.sock", backend)
    node = CsiClient(f"unix://{sockdir}/node.sock")
    ctrl = CsiClient(f"unix://{sockdir}/ctrl.sock")
    try:
        yield Env(tmp, sockdir, node_plugin, ctrl_plugin, node, ctrl, core, backend, keys, mounter)
    finally:
        node.close()
        ctrl.close()
        node_plugin.stop(unmount=True)
        ctrl_plugin.stop()
        cleanup_mounts(str(tmp))


@pytest.fixture
def env(tmp_path: pathlib.Path, sockdir: str, keys: Keys) -> Iterator[Env]:
    """Plugins using Debian's gocryptfs as the mount daemon (fast to start)."""
    yield from _env(tmp_path, sockdir, keys, "gocryptfs")


@pytest.fixture(params=["gocryptfs", "fuse-crypt", "fuse-crypt-prefork"])
def any_env(request: pytest.FixtureRequest, tmp_path: pathlib.Path, sockdir: str, keys: Keys):
    """Plugins with each mounter in turn."""
    yield from _env(tmp_path, sockdir, keys, request.param)
