"""examples/: every manifest validates against the Kubernetes schemas and fits the chart.

Strict schema validation (kubernetes-validate, the chart tests' Kubernetes version), the
driver name against the chart's driverName and the plugin's own, every cross-reference
(PVC -> StorageClass, pod -> PVC, StorageClass -> sealed Secret), sealed values that parse,
and parameters the real parsers accept: the controller core for StorageClasses,
``parse_object_volume`` for what an object-store volume reaches the node with, and the block
stage checks (``blockdev.stage_parameters``, the device resolver, the key URI) for the static
block PV. So the examples cannot drift from the code.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from csi_driver import errors, validate
from csi_driver.constants import DRIVER_NAME
from csi_driver.core import volcap
from csi_driver.core.controller import LocalBackend, is_object_parameters
from csi_driver.keys import check_key_uri
from csi_driver.volumes import blockdev
from csi_driver.volumes.objectstore import ObjectStorePolicy, parse_object_volume
from sealed_secrets import jws
from tests.charts.conftest import KUBE_VERSION

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
VALUES = yaml.safe_load((REPO / "charts" / "coco-csi" / "values.yaml").read_text())
FILES = sorted(EXAMPLES.glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> list[dict[str, Any]]:
    return [d for f in FILES for d in _docs(f)]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _all() if d["kind"] == kind]


def test_there_are_examples() -> None:
    kinds = {d["kind"] for d in _all()}
    assert {"Secret", "StorageClass", "PersistentVolumeClaim", "Pod"} <= kinds
    assert any("csi" in v for p in _kind("Pod") for v in p["spec"]["volumes"])  # inline volume


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path.name}: no object"
    assert "PLACEHOLDER" not in path.read_text()
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        if doc["kind"] not in ("StorageClass", "PersistentVolume"):
            assert doc["metadata"].get("namespace"), f"{path.name}: {doc['kind']} needs one"


def test_object_storage_and_block_examples() -> None:
    """The OSS and S3 classes and the block PV exist (no placeholders)."""
    object_classes = [sc for sc in _kind("StorageClass") if is_object_parameters(sc["parameters"])]
    kinds = {sc["parameters"].get("objectStore", "oss") for sc in object_classes}
    assert kinds == {"oss", "s3"}
    assert any(
        blockdev.CTX_DEVICE_PATH in pv["spec"]["csi"]["volumeAttributes"]
        for pv in _kind("PersistentVolume")
    )


def test_driver_name_is_the_charts() -> None:
    assert VALUES["driverName"] == DRIVER_NAME
    for sc in _kind("StorageClass"):
        assert sc["provisioner"] == VALUES["driverName"]
    pvs = _kind("PersistentVolume")
    assert pvs and all(pv["spec"]["csi"]["driver"] == VALUES["driverName"] for pv in pvs)
    inline = [v["csi"] for p in _kind("Pod") for v in p["spec"]["volumes"] if "csi" in v]
    assert inline and all(v["driver"] == VALUES["driverName"] for v in inline)


def test_key_resource_is_allowed_by_a_default_install() -> None:
    """The chart's node allows exactly storageClass.keyResource unless told otherwise."""
    refs = [sc["parameters"]["keyResource"] for sc in _kind("StorageClass")
            if "keyResource" in sc["parameters"]]  # fmt: skip
    refs += [
        pv["spec"]["csi"]["volumeAttributes"]["keyResource"] for pv in _kind("PersistentVolume")
    ]
    refs += [
        v["csi"]["volumeAttributes"]["keyResource"]
        for p in _kind("Pod")
        for v in p["spec"]["volumes"]
        if "csi" in v
    ]
    assert refs and set(refs) == {VALUES["storageClass"]["keyResource"]}


def test_references_resolve() -> None:
    classes = {sc["metadata"]["name"] for sc in _kind("StorageClass")}
    claims = {
        (c["metadata"]["namespace"], c["metadata"]["name"]) for c in _kind("PersistentVolumeClaim")
    }
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in _kind("Secret")}
    volumes = {pv["metadata"]["name"]: pv for pv in _kind("PersistentVolume")}
    for c in _kind("PersistentVolumeClaim"):
        if c["spec"]["storageClassName"] == "":  # static: binds the PV it names, both ways
            pv = volumes[c["spec"]["volumeName"]]
            assert pv["spec"]["storageClassName"] == ""
            ref = pv["spec"]["claimRef"]
            assert (ref["namespace"], ref["name"]) == (
                c["metadata"]["namespace"],
                c["metadata"]["name"],
            )
        else:
            assert c["spec"]["storageClassName"] in classes
    used = [
        (p["metadata"]["namespace"], v["persistentVolumeClaim"]["claimName"])
        for p in _kind("Pod")
        for v in p["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert used and set(used) <= claims
    for sc in _kind("StorageClass"):
        params = sc["parameters"]
        name = params.get("csi.storage.k8s.io/node-publish-secret-name")
        if name:
            ns = params["csi.storage.k8s.io/node-publish-secret-namespace"]
            assert (ns, name) in secrets
    for p in _kind("Pod"):
        for v in p["spec"]["volumes"]:
            ref = v.get("csi", {}).get("nodePublishSecretRef")
            if ref:
                assert (p["metadata"]["namespace"], ref["name"]) in secrets


def test_secrets_hold_only_sealed_values() -> None:
    """Every value is base64 of a well-formed, signed sealed string (never plaintext)."""
    secrets = _kind("Secret")
    assert secrets
    for s in secrets:
        assert "stringData" not in s
        for key, value in s["data"].items():
            sealed = jws.parse(base64.b64decode(value, validate=True).decode("ascii"))
            assert not sealed.legacy, key
            assert sealed.header is not None and sealed.header["kid"].startswith(
                "kbs:///default/signing-key/"
            )
            assert json.loads(sealed.payload)["provider"]


def test_storageclass_parameters_are_accepted_by_the_controller(tmp_path: Path) -> None:
    """What external-provisioner sends for each example class provisions a volume."""
    cap = volcap.Capability(volcap.AccessType.MOUNT, volcap.AccessMode.SINGLE_NODE_WRITER)
    for i, sc in enumerate(_kind("StorageClass")):
        # The provisioner consumes the secret-reference keys itself.
        params = {k: v for k, v in sc["parameters"].items() if "-secret-" not in k}
        rec, ctx = LocalBackend(str(tmp_path)).create(f"pvc-{i}", [cap], params)
        if is_object_parameters(params):
            assert rec.kind == "object" and not (tmp_path / rec.volume_id).exists()
        else:
            assert (tmp_path / rec.volume_id).is_dir()
        assert ctx.get("keyResource") == sc["parameters"].get("keyResource")


def _secret_values(namespace: str, name: str) -> dict[str, str]:
    for s in _kind("Secret"):
        if (s["metadata"]["namespace"], s["metadata"]["name"]) == (namespace, name):
            return {k: base64.b64decode(v).decode("ascii") for k, v in s["data"].items()}
    raise AssertionError(f"no Secret {namespace}/{name}")


# What examples/README.md tells the operator to allow (chart: node.allowedObjectEndpoints).
README_ENDPOINTS = ("oss-cn-hangzhou.aliyuncs.com", "s3.eu-west-1.amazonaws.com")


def test_object_volumes_are_accepted_by_the_node_parser(tmp_path: Path) -> None:
    """CreateVolume's volume_context plus the node-publish Secret, as kubelet hands them to
    NodePublishVolume, parse under the node policy the README asks for (sealed values only:
    no plaintext opt-in, https only), and under no other endpoint allow-list."""
    assert all(e in (EXAMPLES / "README.md").read_text() for e in README_ENDPOINTS)
    cap = volcap.Capability(volcap.AccessType.MOUNT, volcap.AccessMode.SINGLE_NODE_WRITER)
    policy = ObjectStorePolicy(allowed_endpoints=README_ENDPOINTS)
    seen = set()
    for sc in _kind("StorageClass"):
        params = sc["parameters"]
        if not is_object_parameters(params):
            continue
        rec, ctx = LocalBackend(str(tmp_path)).create(
            sc["metadata"]["name"], [cap], {k: v for k, v in params.items() if "-secret-" not in k}
        )
        secrets = _secret_values(
            params["csi.storage.k8s.io/node-publish-secret-namespace"],
            params["csi.storage.k8s.io/node-publish-secret-name"],
        )
        spec = parse_object_volume(ctx, secrets, policy)
        seen.add(spec.kind)
        assert spec.prefix.endswith(f"/{rec.volume_id}/") and spec.endpoint.startswith("https://")
        assert spec.access_key_id.sealed and spec.access_key_secret.sealed
        # The key: a sealed gocryptfs password, or else the (allowed) keyResource.
        assert (spec.passphrase is not None and spec.passphrase.sealed) or ctx["keyResource"]
        with pytest.raises(errors.PermissionDenied):
            parse_object_volume(ctx, secrets, ObjectStorePolicy(allowed_endpoints=("x.invalid",)))
    assert seen == {"oss", "s3"}


def test_block_pv_is_accepted_by_the_stage_checks() -> None:
    """The block PV's attributes pass the node's stage checks; its device resolves up to the
    device's existence (NotFound here: no such disk on the test machine, never a syntax
    refusal), and a devicePath outside /dev would be refused."""
    pvs = [pv for pv in _kind("PersistentVolume") if "volumeAttributes" in pv["spec"]["csi"]]
    assert pvs
    for pv in pvs:
        csi = pv["spec"]["csi"]
        ctx = csi["volumeAttributes"]
        validate.volume_id(csi["volumeHandle"])
        readonly = pv["spec"]["accessModes"] == ["ReadOnlyMany"]
        for source in (ctx["sourceType"], blockdev.SOURCE_EMPTY):  # mkfsOpts checked as well
            _, fs, _ = blockdev.stage_parameters(
                {**ctx, "sourceType": source}, csi["fsType"], readonly
            )
            assert fs == csi["fsType"]
        check_key_uri(ctx["keyResource"])
        with pytest.raises(errors.NotFound):
            blockdev.resolve_device(ctx)
        with pytest.raises(errors.InvalidArgument):
            blockdev.resolve_device({**ctx, "devicePath": "/tmp/disk.img"})
