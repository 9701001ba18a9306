"""Expiring STS credentials refreshed from their sealed source without a remount, through
the node path: a real ``coco-csi node`` process over gRPC, real FUSE mounts, the OSS peer
whose STS triples expire. The credentials are ``vault`` sealed secrets naming offline-fs
resources that the test rotates, as a tenant rotates them in the KBS; kubelet's periodic
NodePublishVolume (CSIDriver ``requiresRepublish``) is the trigger."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.volume_key import new_volume_key_jwk
from sealed_secrets.keys import generate_signing_key, public_jwk
from sealed_secrets.seal import seal_vault
from tests.csi_driver.conftest import cleanup_mounts
from tests.csi_driver.helpers import (
    object_node_argv,
    publish_request,
    restart_plugin,
    start_plugin,
    stop_plugins,
)
from tests.peers.oss_server import OssServer

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY_RESOURCE = KEY_PREFIX + "volume-root"
SIGNING_PREFIX = "kbs:///default/signing-key/"
SIGNING_KID = SIGNING_PREFIX + "rot-test"
BUCKET = "coco-republish"


@dataclass
class Node:
    work: Path
    oss: OssServer
    signing_key: object
    resources: dict[str, bytes]
    argv: list[str] = field(default_factory=list)
    procs: list = field(default_factory=list)  # type: ignore[type-arg]
    client: CsiClient | None = None

    def seal(self, name: str) -> str:
        return seal_vault(
            f"kbs:///default/objcreds/{name}",
            "kbs",
            signing_key=self.signing_key,  # type: ignore[arg-type]
            signing_kid=SIGNING_KID,
        )

    def write_resources(self) -> None:
        path = self.work / "resources.json"
        tmp = self.work / "resources.json.tmp"
        tmp.write_text(
            json.dumps({k: base64.b64encode(v).decode() for k, v in self.resources.items()})
        )
        os.replace(tmp, path)

    def rotate(self, prefix: str, triple: tuple[str, str, str]) -> None:
        """The tenant puts a new STS triple into the KBS resources the sealed secrets name."""
        for suffix, value in zip(("ak", "sk", "token"), triple, strict=True):
            self.resources[f"default/objcreds/{prefix}-{suffix}"] = value.encode()
        self.write_resources()

    def target(self, name: str) -> str:
        parent = self.work / "kubelet" / "pods" / name / "volumes"
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "mount")

    def volume(self, prefix: str, path: str) -> tuple[dict[str, str], dict[str, str]]:
        ctx = {
            "bucket": BUCKET,
            "path": path,
            "url": self.oss.endpoint,
            "region": "cn-hangzhou",
            "encrypted": "gocryptfs",
            "keyResource": KEY_RESOURCE,
        }
        secrets = {
            "akId": self.seal(f"{prefix}-ak"),
            "akSecret": self.seal(f"{prefix}-sk"),
            "securityToken": self.seal(f"{prefix}-token"),
        }
        return ctx, secrets

    def publish(self, vid: str, target: str, ctx: dict[str, str], secrets: dict[str, str]) -> None:
        assert self.client is not None
        self.client.node.NodePublishVolume(
            publish_request(None, target, volume_id=vid, context=ctx, secrets=secrets),
            timeout=120,
        )

    def unpublish(self, vid: str, target: str) -> None:
        assert self.client is not None
        self.client.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target), timeout=60
        )

    def logs(self) -> str:
        blob = b""
        for dirpath, _dirs, files in os.walk(self.work):
            for name in files:
                if name.endswith(".log"):
                    blob += (Path(dirpath) / name).read_bytes()
        return blob.decode("utf-8", "replace")

    def restart_plugin(self) -> None:
        assert self.client is not None
        self.client.close()
        self.client = restart_plugin(self.procs, self.argv, self.work)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    work = Path(tempfile.mkdtemp(prefix="objr", dir="/tmp"))
    sk = generate_signing_key(SIGNING_KID)
    oss = OssServer()
    oss.__enter__()
    oss.create_bucket(BUCKET)
    n = Node(
        work,
        oss,
        sk,
        {
            "default/coco-csi/volume-root": new_volume_key_jwk().encode(),
            "default/coco-csi/other-root": new_volume_key_jwk().encode(),
            "default/signing-key/rot-test": public_jwk(sk).export().encode(),
        },
    )
    n.write_resources()
    (work / "kubelet").mkdir()
    sock = str(work / "node.sock")
    n.argv = object_node_argv(
        work,
        sock,
        "rot-node",
        KEY_PREFIX,
        SIGNING_PREFIX,
        "--object-control-dir",
        str(work / "ctl"),
    )
    try:
        n.procs.append(start_plugin(n.argv, sock, str(work / "node.log")))
        n.client = CsiClient(f"unix://{sock}")
        yield n
    finally:
        if n.client is not None:
            n.client.close()
        stop_plugins(n.procs)
        cleanup_mounts(str(work))
        oss.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


def _daemon_pid(node: Node, target: str) -> int:
    state = json.loads((node.work / "state" / "node-state.json").read_text())
    return int(next(p["pid"] for p in state["publications"] if p["target_path"] == target))


def test_republish_refreshes_expiring_sts_without_remount(node: Node) -> None:
    first = node.oss.issue_sts(3600)
    node.rotate("rot", first)
    ctx, secrets = node.volume("rot", "rot/vol")
    t = node.target("rot")
    node.publish("pvc-rot", t, ctx, secrets)
    pid = _daemon_pid(node, t)
    Path(t, "before.txt").write_text("first token")

    # Nothing changed: the republish is OK, cheap, and the daemon is left alone.
    t0 = time.monotonic()
    for _ in range(5):
        node.publish("pvc-rot", t, ctx, secrets)
    per_call = (time.monotonic() - t0) / 5
    assert per_call < 2.0, per_call

    # The tenant rotates the sealed source; kubelet's republish (same sealed strings: they
    # name the resources) hands the new triple over; then the old token expires.
    second = node.oss.issue_sts(3600)
    node.rotate("rot", second)
    t0 = time.monotonic()
    node.publish("pvc-rot", t, ctx, secrets)
    refresh = time.monotonic() - t0
    print(f"\nrepublish, unchanged: {per_call * 1000:.0f} ms; with new credentials: "
          f"{refresh * 1000:.0f} ms")  # fmt: skip
    node.oss.expire(first[0])
    assert _daemon_pid(node, t) == pid, "no remount"
    assert Path(t, "before.txt").read_text() == "first token"
    Path(t, "after.txt").write_text("second token")
    os.sync()
    assert Path(t, "after.txt").read_text() == "second token"
    recent = node.oss.state.requests[-10:]
    assert all(r["status"] != 403 for r in recent), recent

    # A daemon crash is restarted with the refreshed credentials (the first ones expired).
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if _daemon_pid(node, t) != pid and Path(t, "after.txt").read_text() == "second token":
                break
        except (OSError, StopIteration, ValueError):
            pass
        assert time.monotonic() < deadline, "daemon not restarted with the new credentials"
        time.sleep(0.2)

    # After a plugin restart the adopted daemon still takes refreshed credentials.
    node.restart_plugin()
    pid = _daemon_pid(node, t)
    third = node.oss.issue_sts(3600)
    node.rotate("rot", third)
    node.publish("pvc-rot", t, ctx, secrets)
    node.oss.expire(second[0])
    Path(t, "third.txt").write_text("third token")
    os.sync()
    assert Path(t, "third.txt").read_text() == "third token"
    assert _daemon_pid(node, t) == pid

    logs = node.logs()
    for triple in (first, second, third):
        for secret in triple[1:]:
            assert secret not in logs
    node.unpublish("pvc-rot", t)


def test_republish_cannot_move_the_volume(node: Node) -> None:
    """Only credentials may change: another prefix, endpoint or volume key is the CSI
    spec's "already published but incompatible", ALREADY_EXISTS, and nothing is swapped."""
    creds = node.oss.issue_sts(3600)
    node.rotate("mv", creds)
    ctx, secrets = node.volume("mv", "mv/vol")
    t = node.target("mv")
    node.publish("pvc-mv", t, ctx, secrets)
    try:
        Path(t, "f").write_text("stays here")
        other_port = node.oss.endpoint.rsplit(":", 1)[0] + ":1"
        for change in (
            {"path": "mv/elsewhere"},
            {"url": other_port},
            {"keyResource": KEY_PREFIX + "other-root"},
        ):
            with pytest.raises(grpc.RpcError) as info:
                node.publish("pvc-mv", t, {**ctx, **change}, secrets)
            assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, change
        assert Path(t, "f").read_text() == "stays here"
    finally:
        node.unpublish("pvc-mv", t)
