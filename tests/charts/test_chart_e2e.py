"""The chart's rendered command lines, run for real.

The node and controller containers' args are taken from the rendered chart, their in-container
paths are mapped into a temporary directory (as the hostPath/emptyDir mounts would), and the
real ``coco-csi`` processes are started. The test then plays kubelet and external-provisioner
over the rendered socket: GetPluginInfo must name the CSIDriver object, the StorageClass
parameters must provision a volume, and the published volume must be a working encrypted
mount whose backend holds no plaintext. No cluster; FUSE and gRPC are real.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coco_proto import csi_pb2, csi_pb2_grpc
from csi_driver.volume_key import new_volume_key_jwk
from tests.console_scripts import console_script
from tests.fuse_env import fuse_skip_reason
from tests.image.pod import env_of, pod_info

from .conftest import arg_value, container, mount_of, only

REPO = Path(__file__).resolve().parents[2]
NODE_NAME = "tdx-node-1"
SECRET_TEXT = b"only the TEE may read this line\n"


def _coco_csi() -> str:
    return console_script("coco-csi")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: What kubelet's downward API would give this test's "pod" (it runs on loopback).
_FIELD_VALUES = {"spec.nodeName": NODE_NAME, "status.podIP": "127.0.0.1"}


def new_key() -> bytes:
    """A typed coco-csi volume key, as `coco-csi volume-key new` prints it."""
    return new_volume_key_jwk().encode()


def _map_args(args: list[str], mapping: dict[str, str], env: dict[str, str]) -> list[str]:
    """Rewrite in-container paths to their temp-dir stand-ins, and expand $(VAR) the way
    kubelet does for container args."""
    out = []
    for a in args:
        for var, value in env.items():
            a = a.replace(f"$({var})", value)
        # longest prefixes first so /csi does not shadow /csi-something
        for src in sorted(mapping, key=len, reverse=True):
            a = a.replace(src, mapping[src])
        out.append(a)
    return out


class Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._f = log.open("wb")
        self.p = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT)

    def wait_socket(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise AssertionError(f"plugin exited {self.p.returncode}: {self.log.read_text()}")
            if os.path.exists(path):
                return
            time.sleep(0.05)
        raise AssertionError(f"no socket at {path}: {self.log.read_text()}")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=10)
        self._f.close()


@pytest.fixture
def sockroot() -> Iterator[Path]:
    # unix socket paths are limited to 108 bytes: keep this one short.
    d = Path(tempfile.mkdtemp(prefix="cch", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _unmount_under(root: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted(points, key=len, reverse=True):
        if mp.startswith(str(root) + "/"):
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)


def test_rendered_plugins_provision_and_publish(render, tmp_path: Path, sockroot: Path) -> None:
    reason = fuse_skip_reason()
    if reason:
        pytest.skip(reason)
    exe = _coco_csi()
    metrics_port = _free_port()
    docs = render({"resolver": {"kind": "offline-fs"}, "node": {"metricsPort": metrics_port}})
    ds = only(docs, "DaemonSet", "-node")
    dep = only(docs, "Deployment", "-controller")
    sc = only(docs, "StorageClass")
    csidriver = only(docs, "CSIDriver")
    node_c = container(ds, "coco-csi")
    ctrl_c = container(dep, "coco-csi")

    # The offline-fs resources file the demo image would carry: the key StorageClass names.
    key_ref = sc["parameters"]["keyResource"]
    resources = tmp_path / "resources.json"
    resources.write_text(
        json.dumps({key_ref.removeprefix("kbs:///"): base64.b64encode(new_key()).decode()})
    )
    backend = tmp_path / "backend"  # shared by both, like the backend volume
    backend.mkdir()
    node_map = {
        mount_of(node_c, "socket-dir")["mountPath"]: str(sockroot / "node"),
        mount_of(node_c, "state-dir")["mountPath"]: str(tmp_path / "state"),
        mount_of(node_c, "backend")["mountPath"]: str(backend),
        mount_of(node_c, "offline-fs")["mountPath"]: str(resources),
        # kubelet's root (--kubelet-dir): its pods/ is what the node container mounts
        mount_of(node_c, "mountpoint-dir")["mountPath"].removesuffix("/pods"): str(tmp_path),
    }
    ctrl_map = {
        mount_of(ctrl_c, "socket-dir")["mountPath"]: str(sockroot / "ctrl"),
        mount_of(ctrl_c, "backend")["mountPath"]: str(backend),
    }
    for d in (sockroot / "node", sockroot / "ctrl"):
        d.mkdir()
    node_argv = [exe, *_map_args(node_c["args"], node_map, env_of(node_c, _FIELD_VALUES))]
    ctrl_argv = [exe, *_map_args(ctrl_c["args"], ctrl_map, env_of(ctrl_c, _FIELD_VALUES))]
    node_sock = arg_value({"name": "n", "args": node_argv}, "--endpoint").removeprefix("unix://")
    ctrl_sock = arg_value({"name": "c", "args": ctrl_argv}, "--endpoint").removeprefix("unix://")

    procs: list[Proc] = []
    channels: list[Any] = []
    target = tmp_path / "pods" / "uid-1" / "volumes" / "data" / "mount"
    try:
        node = Proc(node_argv, tmp_path / "node.log")
        procs.append(node)
        ctrl = Proc(ctrl_argv, tmp_path / "ctrl.log")
        procs.append(ctrl)
        node.wait_socket(node_sock)
        ctrl.wait_socket(ctrl_sock)
        nch = grpc.insecure_channel(f"unix://{node_sock}")
        cch = grpc.insecure_channel(f"unix://{ctrl_sock}")
        channels += [nch, cch]
        grpc.channel_ready_future(nch).result(timeout=15)
        grpc.channel_ready_future(cch).result(timeout=15)

        # What node-driver-registrar and kubelet learn.
        info = csi_pb2_grpc.IdentityStub(nch).GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        assert info.name == csidriver["metadata"]["name"]
        assert info.vendor_version
        ctrl_info = csi_pb2_grpc.IdentityStub(cch).GetPluginInfo(csi_pb2.GetPluginInfoRequest())
        assert ctrl_info.name == sc["provisioner"]
        node_info = csi_pb2_grpc.NodeStub(nch).NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert node_info.node_id == NODE_NAME

        # The rendered metrics port serves Prometheus text.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200 and b"# TYPE" in r.read()

        # external-provisioner: StorageClass parameters (+ --extra-create-metadata keys).
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        params = dict(sc["parameters"]) | {
            "csi.storage.k8s.io/pvc/name": "data",
            "csi.storage.k8s.io/pvc/namespace": "apps",
            "csi.storage.k8s.io/pv/name": "pvc-e2e",
        }
        vol = (
            csi_pb2_grpc.ControllerStub(cch)
            .CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-e2e", volume_capabilities=[cap], parameters=params
                ),
                timeout=60,
            )
            .volume
        )
        assert (backend / vol.volume_id).is_dir()

        # kubelet: publish with the PV's volume context plus pod info (podInfoOnMount).
        ctx = dict(vol.volume_context) | pod_info("app", "uid-1")
        target.parent.mkdir(parents=True)
        nstub = csi_pb2_grpc.NodeStub(nch)
        nstub.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.volume_id,
                target_path=str(target),
                volume_capability=cap,
                volume_context=ctx,
            ),
            timeout=120,
        )
        (target / "note.txt").write_bytes(SECRET_TEXT)
        assert (target / "note.txt").read_bytes() == SECRET_TEXT
        blob = b"".join(p.read_bytes() for p in (backend / vol.volume_id).rglob("*") if p.is_file())
        assert blob and SECRET_TEXT.strip() not in blob
        assert not any("note" in p.name for p in (backend / vol.volume_id).rglob("*"))

        nstub.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(target)),
            timeout=60,
        )
        assert not os.path.ismount(target)
        # The inline ephemeral volume from NOTES.txt / README: volumeAttributes only, no
        # controller; its ciphertext lives under the rendered state dir.
        eph_target = tmp_path / "pods" / "uid-2" / "volumes" / "secure" / "mount"
        eph_target.parent.mkdir(parents=True)
        eph_id = "csi-" + "ab" * 32
        nstub.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=eph_id,
                target_path=str(eph_target),
                volume_capability=cap,
                volume_context={
                    "keyResource": key_ref,
                    **pod_info("app2", "uid-2", ephemeral=True),
                },
            ),
            timeout=120,
        )
        (eph_target / "scratch").write_bytes(SECRET_TEXT)
        state_dir = Path(node_map[mount_of(node_c, "state-dir")["mountPath"]])
        eph_files = [p for p in state_dir.rglob("*") if p.is_file()]
        assert any(eph_id in str(p) for p in eph_files), "ephemeral ciphertext not in state dir"
        assert not any(SECRET_TEXT.strip() in p.read_bytes() for p in eph_files)
        nstub.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=eph_id, target_path=str(eph_target)),
            timeout=60,
        )
        assert not os.path.ismount(eph_target)

        csi_pb2_grpc.ControllerStub(cch).DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60
        )
        assert not (backend / vol.volume_id).exists()
    finally:
        for ch in channels:
            ch.close()
        for p in procs:
            p.stop()
        with contextlib.suppress(OSError):
            _unmount_under(tmp_path)


def test_rendered_confidential_controller_deletes_an_object_volume(
    render, tmp_path: Path, sockroot: Path
) -> None:
    """controller.confidential: the controller's rendered args (the node's resolver,
    object-store flags and key resource list) run for real against moto; CreateVolume
    initialises the prefix (conf + diriv), an onDelete: delete volume's prefix is emptied by
    DeleteVolume, its neighbour kept."""
    from csi_driver.volume_key import new_volume_key_jwk
    from sealed_secrets.keys import generate_signing_key, public_jwk
    from sealed_secrets.seal import seal_vault
    from tests.peers.moto_s3 import MotoS3

    kid = "kbs:///default/signing-key/chart-e2e"
    docs = render(
        {
            "resolver": {"kind": "offline-fs"},
            "controller": {"confidential": {"enabled": True, "runtimeClassName": "kata-qemu"}},
            "node": {
                "allowedObjectEndpoints": ["127.0.0.1"],
                "allowedSigningKids": ["kbs:///default/signing-key/"],
                "allowInsecureObjectEndpoint": True,
            },
        }
    )
    ctrl_c = container(only(docs, "Deployment", "-controller"), "coco-csi")
    sk = generate_signing_key(kid)
    resources = tmp_path / "resources.json"
    resources.write_text(
        json.dumps(
            {
                "default/signing-key/chart-e2e": base64.b64encode(
                    public_jwk(sk).export().encode()
                ).decode(),
                "default/creds/ak": base64.b64encode(b"AKIACHARTE2E000001").decode(),
                "default/creds/sk": base64.b64encode(b"chart-e2e-secret-Kj7").decode(),
                "default/coco-csi/volume-key": base64.b64encode(
                    new_volume_key_jwk().encode()
                ).decode(),
            }
        )
    )
    (sockroot / "ctrl").mkdir()
    ctrl_map = {
        mount_of(ctrl_c, "socket-dir")["mountPath"]: str(sockroot / "ctrl"),
        mount_of(ctrl_c, "backend")["mountPath"]: str(tmp_path / "backend"),
        mount_of(ctrl_c, "offline-fs")["mountPath"]: str(resources),
    }
    argv = [_coco_csi(), *_map_args(ctrl_c["args"], ctrl_map, env_of(ctrl_c, _FIELD_VALUES))]
    sock = arg_value({"name": "c", "args": argv}, "--endpoint").removeprefix("unix://")
    moto = MotoS3()
    ctrl = Proc(argv, tmp_path / "ctrl.log")
    try:
        ctrl.wait_socket(sock)
        bucket = moto.new_bucket("chart")

        def seal(name: str) -> str:
            return seal_vault(
                f"kbs:///default/creds/{name}", "kbs", signing_key=sk, signing_kid=kid
            )

        params = {
            "objectStore": "s3",
            "bucket": bucket,
            "prefix": "pvcs",
            "endpoint": moto.url,
            "keyResource": "kbs:///default/coco-csi/volume-key",
            "onDelete": "delete",
        }
        secrets = {"accessKeyId": seal("ak"), "secretAccessKey": seal("sk")}
        cap = csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        )
        with grpc.insecure_channel(f"unix://{sock}") as ch:
            stub = csi_pb2_grpc.ControllerStub(ch)
            vol = stub.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-obj", volume_capabilities=[cap], parameters=params, secrets=secrets
                ),
                timeout=60,
            ).volume
            prefix = f"pvcs/{vol.volume_id}/"
            assert set(moto.objects(bucket)) == {
                prefix + "gocryptfs.conf",
                prefix + "gocryptfs.diriv",
            }  # initialised by the controller (it got the node's --allowed-key-resource)
            client = moto.client()
            for k in (prefix + "x", "pvcs/k"):
                client.put_object(Bucket=bucket, Key=k, Body=b"x")
            stub.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id, secrets=secrets), timeout=60
            )
        assert set(moto.objects(bucket)) == {"pvcs/k"}
        log = (tmp_path / "ctrl.log").read_text()
        assert "deleted by this controller" in log and "chart-e2e-secret" not in log
    finally:
        ctrl.stop()
        moto.stop()
