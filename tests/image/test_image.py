"""The driver image, built from Debian packages and wheels, run for real under podman.

The node and controller containers are started exactly as the rendered chart describes them
(image name and tag, args, user, privileges, mounts and their propagation; see pod.py), and
this test plays kubelet and external-provisioner from outside over the CSI sockets on the
host side of the bind mounts: a published volume's plaintext view must appear at the target
path on the host (mount propagation out of the container), and the backend must hold only
ciphertext.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from coco_proto import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.volume_key import new_volume_key_jwk
from tests.charts.conftest import CHART_DIR, only, parse_manifests, render_raw

from .conftest import BuiltImage, Podman
from .pod import pod_info, podman_args

NODE_NAME = "tdx-node-1"
FIELDS = {"spec.nodeName": NODE_NAME, "status.podIP": "127.0.0.1"}
SECRET_TEXT = b"only the TEE may read this line\n"


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    chart = helm.Chart.load(CHART_DIR)
    try:
        return parse_manifests(render_raw(chart, {"resolver": {"kind": "offline-fs"}}))
    finally:
        chart.close()


def _config(built: BuiltImage) -> dict[str, Any]:
    blob = built.layout / "blobs" / str(built.summary["digest"]).replace(":", "/", 1)
    manifest = json.loads(blob.read_text())
    cfg = built.layout / "blobs" / manifest["config"]["digest"].replace(":", "/", 1)
    return dict(json.loads(cfg.read_text()))


def test_image_is_what_the_chart_deploys(built_image: BuiltImage, rendered) -> None:
    """Name and tag match the rendered pods; entrypoint is the CLI the chart's args call."""
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    for kind, part in (("DaemonSet", "-node"), ("Deployment", "-controller")):
        c = only(rendered, kind, part)["spec"]["template"]["spec"]["containers"][0]
        assert c["image"] == built_image.name
        assert "command" not in c  # so the image's entrypoint runs: coco-csi
    assert built_image.summary["tag"] == chart["appVersion"]
    cfg = _config(built_image)
    assert cfg["config"]["Entrypoint"] == ["/opt/coco-csi/bin/coco-csi"]
    labels = cfg["config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == chart["appVersion"]
    assert labels["org.opencontainers.image.revision"].startswith(
        subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    assert cfg["created"] == labels["org.opencontainers.image.created"]


def test_debian_lock_current(built_image: BuiltImage) -> None:
    """The image holds exactly the locked Debian packages, at the locked or newer versions.

    A package added or removed, or a version older than the lock, fails. Debian's own updates
    of locked packages (deb.debian.org keeps only the newest) are shown as a warning: they
    are reviewed with `./run image --update-lock`, which `./run image` itself demands, and
    must not turn CI red on the day Debian publishes a security fix.
    """
    changes = built_image.summary["debian_lock_set_changes"]
    assert not changes, (
        "Debian package set changed; review, then `./run image --update-lock`:\n"
        + ("\n".join(changes))
    )
    updates = [d for d in built_image.summary["debian_lock_drift"] if d not in changes]
    if updates:
        warnings.warn(
            "Debian updated locked packages; review, then `./run image --update-lock`:\n"
            + "\n".join(updates),
            stacklevel=1,
        )


def test_sbom_lists_every_package(built_image: BuiltImage, podman: Podman) -> None:
    """The SBOM next to the image is the one inside, and names every deb and Python dist."""
    outside = json.loads((built_image.out / "sbom.cdx.json").read_text())

    def inside(entrypoint: str, *args: str) -> str:
        p = podman.run(f"--entrypoint={entrypoint}", built_image.name, *args)
        assert p.returncode == 0, p.stderr
        return p.stdout

    assert json.loads(inside("cat", "/usr/share/doc/coco-csi/sbom.cdx.json")) == outside
    debs = inside("dpkg-query", "-W", "-f", "${Package}=${Version}\\n")
    pys = inside(
        "python",
        "-c",
        "import importlib.metadata as m\n"
        "for d in m.distributions(): print(d.metadata['Name'] + '=' + d.version)",
    )
    listed = {(c["name"], c["version"]) for c in outside["components"]}
    for line in (debs + pys).split():
        name, version = line.split("=", 1)
        assert (name, version) in listed, f"{name} {version} missing from the SBOM"
    assert ("coco-csi", built_image.summary["tag"]) in listed
    assert outside["bomFormat"] == "CycloneDX"


def test_gocryptfs_mounts_inside(built_image: BuiltImage, podman: Podman) -> None:
    """/dev/fuse and CAP_SYS_ADMIN are enough for a FUSE mount in the container."""
    script = (
        "set -e; mkdir /tmp/c /tmp/p; echo pw > /tmp/pw;"
        " gocryptfs -q -init -passfile /tmp/pw /tmp/c;"
        " gocryptfs -q -passfile /tmp/pw /tmp/c /tmp/p;"
        " echo hello > /tmp/p/f; cat /tmp/p/f; ! grep -rq hello /tmp/c;"
        " fusermount3 -u /tmp/p; echo unmounted"
    )
    p = podman.run(
        "--device=/dev/fuse",
        "--cap-add=SYS_ADMIN",
        "--entrypoint=/bin/sh",
        built_image.name,
        "-c",
        script,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["hello", "unmounted"]


# ---------------------------------------------------------------------------------- pods


@pytest.fixture
def host_root() -> Iterator[Path]:
    """A fake node filesystem, bind-mounted onto itself and made rshared (as kubelet's root
    is on systemd hosts) so mounts made in the node container propagate back out."""
    root = Path(tempfile.mkdtemp(prefix="cci", dir="/tmp"))  # short: unix socket path limit
    subprocess.run(["mount", "--bind", str(root), str(root)], check=True)
    subprocess.run(["mount", "--make-rshared", str(root)], check=True)
    try:
        yield root
    finally:
        _unmount_under(root)
        subprocess.run(["umount", "-l", str(root)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=False)


def _unmount_under(root: Path) -> None:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for mp in sorted(points, key=len, reverse=True):
        if mp.startswith(str(root) + "/"):
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)


class Pod:
    """One container of a rendered workload, running under podman."""

    def __init__(self, podman: Podman, name: str, argv: list[str]) -> None:
        self.podman, self.name = podman, name
        podman("run", "-d", "--name", name, *podman.run_flags, *argv)

    def logs(self) -> str:
        p = subprocess.run(
            [*self.podman.base, "logs", self.name], capture_output=True, text=True, check=False
        )
        return p.stdout + p.stderr

    def wait_socket(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if path.is_socket():
                return
            state = self.podman("inspect", "-f", "{{.State.Running}}", self.name, check=False)
            if state.strip() == "false":
                raise AssertionError(f"{self.name} exited: {self.logs()}")
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no socket at {path}: {self.logs()}")

    def stop(self) -> None:
        self.podman("stop", "-t", "20", self.name, check=False, timeout=60)
        self.podman("rm", "-f", self.name, check=False)


def test_chart_pods_provision_and_publish(
    built_image: BuiltImage, podman: Podman, rendered, host_root: Path
) -> None:
    """Node and controller containers as the chart runs them, driven over their sockets."""
    ds = only(rendered, "DaemonSet", "-node")
    dep = only(rendered, "Deployment", "-controller")
    sc = only(rendered, "StorageClass")
    csidriver = only(rendered, "CSIDriver")
    key_ref = sc["parameters"]["keyResource"]

    # The offline-fs resources file the (guest) node image would carry, at the chart's path.
    resources = next(
        host_root / v["hostPath"]["path"].lstrip("/")
        for v in ds["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "offline-fs"
    )
    resources.parent.mkdir(parents=True)
    resources.write_text(
        json.dumps(
            {
                key_ref.removeprefix("kbs:///"): base64.b64encode(
                    new_volume_key_jwk().encode()
                ).decode()
            }
        )
    )
    node_argv, node_src = podman_args(ds, "coco-csi", host_root, FIELDS)
    ctrl_argv, ctrl_src = podman_args(dep, "coco-csi", host_root, FIELDS)
    # The pods' args name their sockets in-container; the host side is the socket-dir source.
    node_sock = node_src["socket-dir"] / "csi.sock"
    ctrl_sock = ctrl_src["socket-dir"] / "csi.sock"
    backend = node_src["backend"]
    assert ctrl_src["backend"] == backend
    kubelet_pods = node_src["mountpoint-dir"]
    in_pods = next(
        m["mountPath"]
        for m in ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        if m["name"] == "mountpoint-dir"
    )

    tag = os.urandom(4).hex()
    pods: list[Pod] = []
    try:
        node = Pod(podman, f"coco-node-{tag}", node_argv)
        pods.append(node)
        ctrl = Pod(podman, f"coco-ctrl-{tag}", ctrl_argv)
        pods.append(ctrl)
        node.wait_socket(node_sock)
        ctrl.wait_socket(ctrl_sock)
        with CsiClient(f"unix://{node_sock}") as n, CsiClient(f"unix://{ctrl_sock}") as c:
            info = n.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=30)
            assert info.name == csidriver["metadata"]["name"]
            assert c.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()).name == info.name
            node_info = n.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=30)
            assert node_info.node_id == NODE_NAME

            # external-provisioner: the StorageClass parameters (+ --extra-create-metadata).
            cap = mount_capability()
            params = dict(sc["parameters"]) | {
                "csi.storage.k8s.io/pvc/name": "data",
                "csi.storage.k8s.io/pvc/namespace": "apps",
                "csi.storage.k8s.io/pv/name": "pvc-img",
            }
            vol = c.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-img", volume_capabilities=[cap], parameters=params
                ),
                timeout=60,
            ).volume
            assert (backend / vol.volume_id).is_dir()  # made in the container, seen here

            # kubelet: it creates the target's parent and passes the in-container path.
            rel = f"uid-1/volumes/kubernetes.io~csi/{vol.volume_id}/mount"
            (kubelet_pods / rel).parent.mkdir(parents=True)
            target_in = f"{in_pods}/{rel}"
            ctx = dict(vol.volume_context) | pod_info("app", "uid-1")
            n.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=vol.volume_id,
                    target_path=target_in,
                    volume_capability=cap,
                    volume_context=ctx,
                ),
                timeout=120,
            )
            # The plaintext view, OUTSIDE the container: propagated through the rshared mount.
            target = kubelet_pods / rel
            assert os.path.ismount(target), node.logs()
            (target / "note.txt").write_bytes(SECRET_TEXT)
            assert (target / "note.txt").read_bytes() == SECRET_TEXT
            cipher = [p for p in (backend / vol.volume_id).rglob("*") if p.is_file()]
            blob = b"".join(p.read_bytes() for p in cipher)
            assert blob and SECRET_TEXT.strip() not in blob
            assert not any("note" in p.name for p in cipher)

            n.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target_in),
                timeout=60,
            )
            assert not os.path.ismount(target)
            c.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=60
            )
            assert not (backend / vol.volume_id).exists()
    finally:
        for pod in pods:
            pod.stop()


def _python_in(image: BuiltImage, podman: Podman, script: str) -> str:
    """What ``script`` prints run by the image's own Python (it must exit 0)."""
    p = podman.run("--entrypoint=python", image.name, "-c", script)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_every_module_imports_in_the_image(built_image: BuiltImage, podman: Podman) -> None:
    """The image's venv has every dependency the product modules import (the lock leaves
    some out on purpose: image/requirements.lock)."""
    script = (
        "import importlib, pkgutil\n"
        "n = 0\n"
        "for top in ('fuse_crypt', 'sealed_secrets', 'csi_driver', 'coco_proto'):\n"
        "    pkg = importlib.import_module(top)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, top + '.'):\n"
        "        if not m.name.endswith('.__main__'):  # that one runs the CLI\n"
        "            importlib.import_module(m.name)\n"
        "            n += 1\n"
        "print(n)\n"
    )
    assert int(_python_in(built_image, podman, script)) > 50


def test_sdist_built_deps_work_in_the_image(built_image: BuiltImage, podman: Podman) -> None:
    """oss2 and crcmod ship only as sdists; the build makes wheels of them. crcmod's C
    extension is the one loaded (oss2 CRC-64s every body; pure Python does ~10 MB/s), and
    it computes OSS's CRC-64 (ECMA-182 reflected) correctly."""
    script = (
        "import sys, oss2.utils\n"
        "assert sys.modules['crcmod.crcmod']._usingExtension, 'crcmod C extension not loaded'\n"
        "crc = oss2.utils.Crc64(0); crc.update(b'123456789')\n"
        "print(hex(crc.crc))\n"
    )
    assert _python_in(built_image, podman, script) == "0x995dc9bbdf1939fa"  # CRC-64/XZ check value


def test_xts_sector_loop_runs_in_the_image(built_image: BuiltImage, podman: Podman) -> None:
    """The block daemon's default XTS backend in the image is the C sector loop (the wheel's
    one compiled file, linked against the image's libcrypto.so.3), and it encrypts sectors
    as `cryptography`'s XTS does there."""
    script = (
        "from fuse_crypt.luks2.segment import XtsSegment\n"
        "key, data = bytes(range(64)), bytes(range(256)) * 16\n"
        "fast = XtsSegment(key, iv_tweak=8)\n"
        "ref = XtsSegment(key, iv_tweak=8, backend='cryptography')\n"
        "assert fast.encrypt(4096, data * 3) == ref.encrypt(4096, data * 3) != data * 3\n"
        "print(fast.backend)\n"
    )
    assert _python_in(built_image, podman, script) == "libcrypto-evp-batch"


@pytest.mark.parametrize(
    ("url", "said"),
    [("oss://bkt-a/p", "OSS: connection failed"), ("s3://bkt-a/p", "EndpointConnectionError")],
)
def test_object_store_mount_reaches_the_sdk(
    built_image: BuiltImage, podman: Podman, url: str, said: str
) -> None:
    """`fuse-crypt mount oss://` and `s3://` parse their arguments, build the SDK client
    (oss2 with CRC checks, boto3) and fail with one readable line when the endpoint is
    unreachable (no network in the container): every import on that path is in the image."""
    p = podman.run(
        "--entrypoint=sh",
        "-e=OSS_ACCESS_KEY_ID=AK",
        "-e=OSS_ACCESS_KEY_SECRET=SK",
        "-e=AWS_ACCESS_KEY_ID=AK",
        "-e=AWS_SECRET_ACCESS_KEY=SK",
        built_image.name,
        "-c",
        "mkdir /tmp/m && echo 00 | fuse-crypt mount -f "
        + url
        + " /tmp/m --endpoint https://127.0.0.1:9 --region cn-hangzhou --masterkey stdin",
    )
    assert p.returncode == 6, p.stderr
    assert said in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
