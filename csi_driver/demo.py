"""`coco-csi demo`: the whole life of one encrypted volume, driven over real CSI sockets.

It plays external-provisioner (CreateVolume/DeleteVolume against the controller) and kubelet
(NodePublishVolume/NodeUnpublishVolume against the node plugin) with a CSI gRPC client, and
checks at each step that the storage only ever holds ciphertext.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import uuid

import grpc

from coco_proto import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.constants import DRIVER_NAME

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY_RESOURCE = KEY_PREFIX + "volume-root"


class DemoFailure(Exception):
    pass


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise DemoFailure(what)


def _backend_bytes(root: str) -> bytes:
    blob = b""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            blob += name.encode()
            with open(os.path.join(dirpath, name), "rb") as f:
                blob += f.read()
    return blob


def run_demo(*, mounter: str) -> int:
    from csi_driver.core.controller import LocalBackend
    from csi_driver.core.node import NodeCore
    from csi_driver.resolver import build
    from csi_driver.server import start_controller, start_node
    from csi_driver.volume_key import new_volume_key_jwk

    work = tempfile.mkdtemp(prefix="coco-csi-demo-")
    node = ctrl = None
    try:
        # The guest image's offline-fs KBC file holds one 256-bit root key, typed as a
        # coco-csi volume key (what `coco-csi volume-key new` prints).
        resources = os.path.join(work, "aa-offline_fs_kbc-resources.json")
        with open(resources, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "default/coco-csi/volume-root": base64.b64encode(
                        new_volume_key_jwk().encode()
                    ).decode()
                },
                f,
            )
        backend_root = os.path.join(work, "storage")
        os.makedirs(backend_root)
        node_core = NodeCore(
            "demo-node",
            os.path.join(work, "node-state"),
            build(f"offline-fs:{resources}"),
            mounter=mounter,
            kubelet_dir=os.path.join(work, "kubelet"),
            # The node's own configuration decides where volumes and keys may come from.
            cipher_roots=[backend_root],
            allowed_key_resources=[KEY_PREFIX],
        )
        node = start_node(f"unix://{work}/node.sock", node_core)
        ctrl = start_controller(f"unix://{work}/controller.sock", LocalBackend(backend_root))
        print(f"coco-csi demo  (driver {DRIVER_NAME}, mounter {mounter})")
        print(f"  workdir {work}")

        with (
            CsiClient(f"unix://{work}/controller.sock") as cc,
            CsiClient(f"unix://{work}/node.sock") as nc,
        ):
            info = nc.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
            ready = nc.identity.Probe(csi_pb2.ProbeRequest()).ready.value
            _check(ready, "node plugin is not ready (is /dev/fuse usable?)")
            print(f"1. node plugin {info.name} {info.vendor_version} ready")

            pvc = f"pvc-{uuid.uuid4()}"
            vol = cc.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name=pvc,
                    capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20),
                    volume_capabilities=[mount_capability()],
                    parameters={"keyResource": KEY_RESOURCE},
                )
            ).volume
            print(f"2. CreateVolume {pvc} -> {vol.volume_id} ({vol.capacity_bytes >> 20} MiB)")

            pod_uid = str(uuid.uuid4())
            target = os.path.join(
                work, "kubelet/pods", pod_uid, "volumes/kubernetes.io~csi", pvc, "mount"
            )
            os.makedirs(os.path.dirname(target))  # kubelet creates only the parent
            ctx = dict(vol.volume_context)
            ctx.update(
                {
                    "csi.storage.k8s.io/pod.name": "demo",
                    "csi.storage.k8s.io/pod.namespace": "default",
                    "csi.storage.k8s.io/pod.uid": pod_uid,
                    "csi.storage.k8s.io/ephemeral": "false",
                }
            )
            publish = csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.volume_id,
                target_path=target,
                volume_capability=mount_capability(),
                volume_context=ctx,
            )
            nc.node.NodePublishVolume(publish)
            nc.node.NodePublishVolume(publish)  # kubelet retries: must be idempotent
            print(
                "3. NodePublishVolume: key derived in the guest from the KBS resource, "
                "volume initialised and mounted"
            )

            secret = b"patient record 4711: confidential\n"
            with open(os.path.join(target, "records.txt"), "wb") as f:
                f.write(secret)
            os.makedirs(os.path.join(target, "reports"))
            with open(os.path.join(target, "reports", "q3.csv"), "wb") as f:
                f.write(b"quarter,revenue\nq3,1000000\n" * 100)
            with open(os.path.join(target, "records.txt"), "rb") as f:
                _check(f.read() == secret, "read-back through the mount differs")
            print("4. wrote records.txt and reports/q3.csv through the mount; read back OK")

            cipher_dir = ctx["cipherDir"]
            blob = _backend_bytes(cipher_dir)
            _check(b"patient record" not in blob, "plaintext found in the backend!")
            _check(
                b"records.txt" not in blob and b"reports" not in blob,
                "plaintext file name found in the backend!",
            )
            names = sorted(os.listdir(cipher_dir))
            print(f"5. backend holds only ciphertext: {', '.join(names)}")

            stats = nc.node.NodeGetVolumeStats(
                csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
            )
            used = {csi_pb2.VolumeUsage.Unit.Name(u.unit): u.used for u in stats.usage}
            print(
                f"6. NodeGetVolumeStats: used bytes={used.get('BYTES')} inodes={used.get('INODES')}"
            )

            unpublish = csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vol.volume_id, target_path=target
            )
            nc.node.NodeUnpublishVolume(unpublish)
            _check(not os.path.exists(target), "target path still exists after unpublish")
            nc.node.NodePublishVolume(publish)
            with open(os.path.join(target, "records.txt"), "rb") as f:
                _check(f.read() == secret, "data did not survive a remount")
            nc.node.NodeUnpublishVolume(unpublish)
            nc.node.NodeUnpublishVolume(unpublish)  # idempotent
            print("7. NodeUnpublishVolume; a fresh publish decrypted the same data; unpublished")

            cc.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
            _check(not os.path.exists(cipher_dir), "backend directory remains after DeleteVolume")
            print(f"8. DeleteVolume {vol.volume_id}: backend directory released")
        print("demo: OK")
        return 0
    except grpc.RpcError as exc:
        print(f"demo: FAILED: {exc.code().name}: {exc.details()}")
        return 1
    except (DemoFailure, OSError, ValueError) as exc:
        print(f"demo: FAILED: {exc}")
        return 1
    finally:
        if node is not None:
            node.stop(unmount=True)
        if ctrl is not None:
            ctrl.stop()
        shutil.rmtree(work, ignore_errors=True)
