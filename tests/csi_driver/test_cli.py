"""`coco-csi` as a process: demo, one-line errors, metrics, kill -9 of the node plugin."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.core.controller import LocalBackend

from .conftest import KEY_PREFIX, KEY_RESOURCE, PASSPHRASE, SIGNING_PREFIX, Keys, cleanup_mounts
from .helpers import mount_capability, plain_capability

EXE = [sys.executable, "-m", "csi_driver.cli"]


@pytest.mark.parametrize("mounter", ["fuse-crypt-prefork", "fuse-crypt", "gocryptfs"])
def test_demo(mounter: str) -> None:
    res = subprocess.run(
        [*EXE, "demo", "--mounter", mounter], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("demo: OK")
    assert "only ciphertext" in res.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["node", "--endpoint", "tcp://127.0.0.1:1", "--node-id", "n", "--state-dir", "{tmp}/s"],
        [
            "node",
            "--endpoint",
            "unix://{tmp}/n.sock",
            "--node-id",
            "n",
            "--resolver",
            "bogus:x",
            "--state-dir",
            "{tmp}/s",
        ],
        ["controller", "--endpoint", "relative.sock", "--backend-root", "{tmp}/b"],
        ["node", "--endpoint", "unix://{tmp}/n.sock", "--node-id", "n", "--with-controller"],
    ],
)
def test_errors_are_one_line(args: list[str], tmp_path: pathlib.Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = subprocess.run([*EXE, *argv], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if "level=" not in ln]
    assert len(lines) == 1 and lines[0].startswith("coco-csi"), res.stderr
    assert "Traceback" not in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_node(
    tmp: pathlib.Path, keys: Keys, sock: str, port: int, mounter: str = "gocryptfs"
) -> subprocess.Popen[bytes]:
    log = open(tmp / "node.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [
            *EXE,
            "node",
            "--endpoint",
            f"unix://{sock}",
            "--node-id",
            "n1",
            "--resolver",
            keys.spec,
            "--state-dir",
            str(tmp / "state"),
            "--mounter",
            "gocryptfs",
            "--metrics-addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "debug",
            "--kubelet-dir",
            str(tmp),
            "--cipher-dir-root",
            str(tmp / "backend"),
            "--allowed-key-resource",
            KEY_PREFIX,
            "--allowed-signing-kid",
            SIGNING_PREFIX,
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "node.log").read_text()
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("mounter", ["gocryptfs", "fuse-crypt-prefork"])
def test_node_process_kill9_keeps_mounts_and_metrics(
    tmp_path: pathlib.Path, sockdir: str, keys: Keys, mounter: str
) -> None:
    sock = f"{sockdir}/node.sock"
    port = _free_port()
    backend = LocalBackend(str(tmp_path / "backend"))
    rec, ctx = backend.create("pvc", [plain_capability()], {"keyResource": KEY_RESOURCE})
    sealed = keys.seal_passphrase()
    target = str(tmp_path / "pods" / "uid" / "mount")
    os.makedirs(os.path.dirname(target))
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=rec.volume_id,
        target_path=target,
        volume_capability=mount_capability(),
        volume_context={**ctx, "csi.storage.k8s.io/serviceAccount.tokens": "tok-SECRET-123"},
        secrets={"passphrase": sealed},
    )
    proc = _start_node(tmp_path, keys, sock, port, mounter)
    proc2 = None
    try:
        with CsiClient(f"unix://{sock}") as c:
            c.node.NodePublishVolume(req)
        pathlib.Path(target, "f").write_bytes(b"data")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        text = metrics.decode()
        assert 'coco_csi_node_publish_total{result="ok"} 1.0' in text
        assert "coco_csi_mounted_volumes 1.0" in text
        assert "coco_csi_node_publish_seconds_bucket" in text

        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert pathlib.Path(target, "f").read_bytes() == b"data"  # mount outlives the plugin

        proc2 = _start_node(tmp_path, keys, sock, _free_port(), mounter)
        with CsiClient(f"unix://{sock}") as c:
            c.node.NodePublishVolume(req)  # kubelet's periodic republish: idempotent
            assert pathlib.Path(target, "f").read_bytes() == b"data"
            c.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=rec.volume_id, target_path=target)
            )
        assert not os.path.exists(target)
        proc2.send_signal(signal.SIGTERM)
        assert proc2.wait(timeout=20) == 0
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        cleanup_mounts(str(tmp_path))
    logs = (tmp_path / "node.log").read_text()
    assert "published" in logs and rec.volume_id in logs
    for secret in (sealed, sealed.split(".")[2][:24], PASSPHRASE.decode(), "tok-SECRET-123"):
        assert secret not in logs
