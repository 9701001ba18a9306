"""Request builders shared by the csi_driver tests (kubelet/provisioner shaped)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient, Mode, mount_capability
from csi_driver.core.volcap import AccessType, Capability

from .conftest import KEY_RESOURCE, Env


def plain_capability(mode: int = Mode.SINGLE_NODE_WRITER) -> Capability:
    """The core's (protocol-free) form of mount_capability(mode), for direct core calls."""
    return Capability(AccessType.MOUNT, int(mode))


__all__ = [
    "Mode",
    "mount_capability",
    "plain_capability",
    "create_volume",
    "publish_request",
    "expect_code",
    "backend_blob",
    "COCO_CSI",
    "start_plugin",
    "stop_plugins",
]

COCO_CSI = str(Path(sys.executable).with_name("coco-csi"))  # this venv's entry point


def create_volume(env: Env, name: str = "pvc-1", **params: str) -> csi_pb2.Volume:
    parameters = {"keyResource": KEY_RESOURCE, **params}
    return env.ctrl.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[mount_capability()], parameters=parameters
        )
    ).volume


def publish_request(
    vol: csi_pb2.Volume | None,
    target: str,
    *,
    volume_id: str | None = None,
    readonly: bool = False,
    mode: int = Mode.SINGLE_NODE_WRITER,
    context: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
) -> csi_pb2.NodePublishVolumeRequest:
    ctx = dict(vol.volume_context) if vol is not None else {}
    ctx.update(context or {})
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id or (vol.volume_id if vol is not None else ""),
        target_path=target,
        volume_capability=mount_capability(mode),
        readonly=readonly,
        volume_context=ctx,
        secrets=secrets or {},
    )


def expect_code(code: grpc.StatusCode, call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    assert info.value.code() == code, info.value.details()
    return info.value


def backend_blob(path: str) -> bytes:
    """Every file name and byte under ``path``."""
    blob = b""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            blob += name.encode() + b"\0"
            with open(os.path.join(dirpath, name), "rb") as f:
                blob += f.read()
    return blob


def object_node_argv(
    work: Path, sock: str, node_id: str, key_prefix: str, signing_prefix: str, *extra: str
) -> list[str]:
    """``coco-csi node`` for the object-store end-to-end tests: offline-fs resolver from
    ``work/resources.json``, state and kubelet dirs under ``work``, object stores on
    loopback only (plain http: moto and the OSS peer), then ``extra``."""
    return [
        COCO_CSI,
        "node",
        "--endpoint",
        f"unix://{sock}",
        "--node-id",
        node_id,
        "--resolver",
        f"offline-fs:{work / 'resources.json'}",
        "--state-dir",
        str(work / "state"),
        "--kubelet-dir",
        str(work / "kubelet"),
        "--allowed-key-resource",
        key_prefix,
        "--allowed-signing-kid",
        signing_prefix,
        "--allowed-object-endpoint",
        "127.0.0.1",
        "--allow-insecure-object-endpoint",
        "--unmount-on-exit",
        *extra,
    ]


def object_controller_argv(
    work: Path, sock: str, signing_prefix: str, *extra: str, backend_root: Path | None = None
) -> list[str]:
    """``coco-csi controller`` as a confidential controller for the object-store end-to-end
    tests: the same resolver and object-store policy as :func:`object_node_argv`, records
    under ``backend_root`` (default ``work/ctrl``), then ``extra``."""
    return [
        COCO_CSI,
        "controller",
        "--endpoint",
        f"unix://{sock}",
        "--backend-root",
        str(backend_root or work / "ctrl"),
        "--resolver",
        f"offline-fs:{work / 'resources.json'}",
        "--allowed-signing-kid",
        signing_prefix,
        "--allowed-object-endpoint",
        "127.0.0.1",
        "--allow-insecure-object-endpoint",
        *extra,
    ]


def start_plugin(argv: list[str], sock: str, log: str) -> subprocess.Popen[bytes]:
    """Start a plugin process (output to ``log``) and wait until it listens on ``sock``."""
    with open(log, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=logf)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            with open(log, encoding="utf-8", errors="replace") as f:
                pytest.fail(f"plugin did not start: {f.read()[-2000:]}")
        time.sleep(0.05)
    return proc


def restart_plugin(procs: list[subprocess.Popen[bytes]], argv: list[str], work: Path) -> CsiClient:
    """Kill the last plugin in ``procs`` (its daemons live on) and start it again on
    ``work/node.sock``, logging to ``work/node.log``; returns a client for it."""
    proc = procs.pop()
    proc.kill()
    proc.wait()
    sock = str(work / "node.sock")
    os.unlink(sock)
    procs.append(start_plugin(argv, sock, str(work / "node.log")))
    return CsiClient(f"unix://{sock}")


def stop_plugins(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM, then SIGKILL whatever has not exited 20 s later."""
    procs = list(procs)
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
