"""examples/: every manifest validates against the Kubernetes schemas and fits the chart.

Strict schema validation (kubernetes-validate, the chart tests' Kubernetes version), the
driver name against the chart's driverName and the plugin's own, every cross-reference
(PVC -> StorageClass, pod -> PVC, StorageClass -> sealed Secret), sealed values that parse,
and StorageClass parameters the real controller core accepts. Placeholder files (object
storage, block) must say so and hold no object.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from csi_driver.constants import DRIVER_NAME
from csi_driver.core import volcap
from csi_driver.core.controller import LocalBackend
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
    if not docs:
        assert "PLACEHOLDER" in path.read_text(), f"{path.name}: no object and no PLACEHOLDER"
        return
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        if doc["kind"] != "StorageClass":
            assert doc["metadata"].get("namespace"), f"{path.name}: {doc['kind']} needs one"


def test_placeholders_for_object_storage_and_block() -> None:
    for name in ("storageclass-object-storage.yaml", "storageclass-block.yaml"):
        assert "PLACEHOLDER" in (EXAMPLES / name).read_text()


def test_driver_name_is_the_charts() -> None:
    assert VALUES["driverName"] == DRIVER_NAME
    for sc in _kind("StorageClass"):
        assert sc["provisioner"] == VALUES["driverName"]
    inline = [v["csi"] for p in _kind("Pod") for v in p["spec"]["volumes"] if "csi" in v]
    assert inline and all(v["driver"] == VALUES["driverName"] for v in inline)


def test_key_resource_is_allowed_by_a_default_install() -> None:
    """The chart's node allows exactly storageClass.keyResource unless told otherwise."""
    refs = [sc["parameters"]["keyResource"] for sc in _kind("StorageClass")]
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
    for c in _kind("PersistentVolumeClaim"):
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
        assert (tmp_path / rec.volume_id).is_dir()
        assert ctx["keyResource"] == sc["parameters"]["keyResource"]
