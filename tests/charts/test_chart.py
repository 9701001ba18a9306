"""Offline tests of the coco-csi Helm chart.

Rendering and linting use the real Helm v4 engine bundled in ``helm-python-sdk``; every
rendered object is validated against the Kubernetes 1.32 OpenAPI schemas in strict mode by
``kubernetes-validate``. No cluster is contacted.
"""

from __future__ import annotations

import ast
import os
import posixpath
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from csi_driver.core.controller import LocalBackend
from sealed_secrets.resolver import build_resolver
from tests.console_scripts import console_script

from .conftest import (
    CHART_DIR,
    KUBE_VERSION,
    NAMESPACE,
    REPO,
    Manifest,
    arg_value,
    container,
    helm,
    host_path_of,
    mount_of,
    only,
    parse_manifests,
    render_raw,
    strip_source,
    walk,
    with_kbs,
)

# Value sets that between them switch every template branch on at least once.
EVERYTHING_ON: dict[str, Any] = {
    "node": {
        "runtimeClassName": "kata-qemu-tdx",
        "extraArgs": ["--log-level=debug"],
        "podAnnotations": {"example.com/a": "b"},
        "podLabels": {"team": "storage"},
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "tee", "operator": "In", "values": ["tdx", "snp"]}
                            ]
                        }
                    ]
                }
            }
        },
    },
    "controller": {"replicas": 2, "extraArgs": ["--log-level=debug"]},
    "backend": {"volume": {"persistentVolumeClaim": {"claimName": "coco-backend"}}},
    "imagePullSecrets": ["regcred"],
    "resolver": {
        "kind": "kbs",
        "kbs": {
            "url": "https://kbs.example:8080",
            "caConfigMap": {"name": "kbs-ca", "key": "ca.pem"},
        },
    },
    "storageClass": {
        "isDefault": True,
        "reclaimPolicy": "Retain",
        "volumeBindingMode": "WaitForFirstConsumer",
        "nodePublishSecret": {"name": "${pvc.name}-sealed", "namespace": "${pvc.namespace}"},
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
}
# Every object-store / block node opt-in on (security-weakening ones included).
NODE_OPT_INS: dict[str, Any] = {
    "node": {
        "allowedObjectEndpoints": ["minio.example.com"],
        "objectCaBundle": {"hostPath": "/etc/coco/object-ca.pem"},
        "allowPlaintextObjectCredentials": True,
        "allowInsecureObjectEndpoint": True,
        "blockAcceptUnboundHeader": True,
    }
}
# A confidential controller (issue 10: DeleteVolume with onDelete: delete), configured from
# the node's values, every object-store setting on.
CONFIDENTIAL_CONTROLLER: dict[str, Any] = {
    "controller": {"confidential": {"enabled": True, "runtimeClassName": "kata-qemu-tdx"}},
    "node": {
        "allowedSigningKids": ["kbs:///default/signing-key/"],
        "allowedObjectEndpoints": ["*.aliyuncs.com", "s3.example.com"],
        "allowedObjectBuckets": ["tenant-bucket/pvcs"],
        "objectCaBundle": {"configMap": {"name": "object-ca"}},
    },
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},  # i.e. KBS_MINIMAL: the chart has no working KBS default (see conftest)
    "confidential-controller": CONFIDENTIAL_CONTROLLER,
    "node-opt-ins": NODE_OPT_INS,
    "object-ca-configmap": {"node": {"objectCaBundle": {"configMap": {"name": "object-ca"}}}},
    "everything-on": EVERYTHING_ON,
    "cdh": {"resolver": {"kind": "cdh"}},
    "offline-fs-demo": {"resolver": {"kind": "offline-fs"}},
    "ephemeral-only": {
        "controller": {"enabled": False},
        "storageClass": {"create": False},
        "csiDriver": {"volumeLifecycleModes": ["Ephemeral"], "fsGroupPolicy": "None"},
        "metrics": {"service": {"enabled": False}},
    },
    "microk8s": {"kubeletRootDir": "/var/snap/microk8s/common/var/lib/kubelet/"},
    "shared-backend": {
        "backend": {
            "mountPath": "/srv/coco",
            "volume": {"persistentVolumeClaim": {"claimName": "coco-backend"}},
        },
    },
}
DEFAULT_KINDS = Counter(
    {
        "CSIDriver": 1,
        "DaemonSet": 1,
        "Deployment": 1,
        "StorageClass": 1,
        "ServiceAccount": 2,
        "ClusterRole": 1,
        "ClusterRoleBinding": 1,
        "Role": 1,
        "RoleBinding": 1,
        "Service": 1,
    }
)


def _architecture_driver_name() -> str:
    text = (REPO / "docs" / "architecture.md").read_text()
    m = re.search(r"Driver name: `([^`]+)`", text)
    assert m, "docs/architecture.md no longer states the driver name"
    return m.group(1)


def _csi_driver_constants() -> dict[str, str]:
    """String constants of csi_driver/constants.py, read with ast (no import side effects)."""
    path = REPO / "csi_driver" / "constants.py"
    found: dict[str, str] = {}
    for node in ast.parse(path.read_text()).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found[node.targets[0].id] = node.value.value
    return found


def _node(docs: list[Manifest]) -> Manifest:
    return only(docs, "DaemonSet", "-node")


def _controller(docs: list[Manifest]) -> Manifest:
    return only(docs, "Deployment", "-controller")


# --- the engine itself --------------------------------------------------------------------


def test_chart_metadata(chart: Any) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "coco-csi" == CHART_DIR.name
    assert meta["type"] == "application"
    assert chart.schema is not None, "values.schema.json must ship with the chart"


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_lint_strict_is_clean(case: str) -> None:
    report = helm.lint(
        CHART_DIR,
        with_kbs(VALUE_SETS[case]),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_lint_reports_problems() -> None:
    # Guards the guard: the same lint call must flag a chart problem, or "clean" means nothing.
    report = helm.lint(
        CHART_DIR,
        with_kbs({"storageClass": {"reclaimPolicy": "Recycle"}}),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}",
    )
    assert any("/storageClass/reclaimPolicy" in e for e in report["errors"]), report


# --- Kubernetes schema validation ----------------------------------------------------------


def _validate(doc: Manifest) -> None:
    kubernetes_validate.validate(strip_source(doc), KUBE_VERSION, strict=True)


def _check_service_monitor(sm: Manifest, docs: list[Manifest]) -> None:
    """No ServiceMonitor schema ships with kubernetes-validate (it is a CRD), so check the
    fields Prometheus Operator needs and that it really selects the metrics Service."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = only(docs, "Service", "-node-metrics")
    labels = svc["metadata"]["labels"]
    for k, v in sm["spec"]["selector"]["matchLabels"].items():
        assert labels.get(k) == v, f"ServiceMonitor selector {k}={v} misses the Service"
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    port_names = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep["interval"])


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_every_object_validates_against_kubernetes_1_32_strict(render, case: str) -> None:
    docs = render(VALUE_SETS[case])
    assert docs
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            _check_service_monitor(doc, docs)
            continue
        try:
            _validate(doc)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{case}: {doc['__source__']} {doc['kind']}: {path}: {e.message}")


def test_strict_validation_catches_an_unknown_field(render) -> None:
    # Guards the guard: a typo'd field must not pass the strict schemas.
    ds = strip_source(_node(render()))
    ds["spec"]["template"]["spec"]["containers"][0]["mountPropogation"] = "Bidirectional"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, KUBE_VERSION, strict=True)


OVERLAYS = sorted((CHART_DIR / "values").glob("*.yaml"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[o.name for o in OVERLAYS])
def test_platform_overlays_lint_and_validate(render, overlay: Path) -> None:
    values = yaml.safe_load(overlay.read_text())
    report = helm.lint(
        CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == [], report
    for doc in render(values):
        if doc["kind"] != "ServiceMonitor":
            _validate(doc)


def test_packaged_chart_renders_the_same(chart: Any, tmp_path: Path) -> None:
    archive = helm.package(CHART_DIR, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        assert packaged.schema == chart.schema
        assert render_raw(packaged, EVERYTHING_ON) == render_raw(chart, EVERYTHING_ON)


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_object_names_are_unique_and_valid(render, case: str) -> None:
    seen: set[tuple[str, str, str]] = set()
    for doc in render(VALUE_SETS[case]):
        meta = doc["metadata"]
        key = (doc["kind"], meta.get("namespace", ""), meta["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        assert len(meta["name"]) <= 253
        for k, v in meta.get("labels", {}).items():
            assert re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", v), (k, v)
            assert len(v) <= 63, (k, v)


def test_long_release_names_are_shortened(chart: Any) -> None:
    name = "a-very-long-release-name-that-goes-on-and-on-x"
    rendered = chart.render(values=with_kbs({}), name=name, namespace=NAMESPACE)
    for doc in parse_manifests(rendered):
        if doc["kind"] in ("DaemonSet", "Deployment", "Service", "ServiceAccount"):
            assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_default_render_has_exactly_the_expected_kinds(render) -> None:
    assert Counter(d["kind"] for d in render()) == DEFAULT_KINDS


def test_namespaced_objects_land_in_the_release_namespace(render) -> None:
    cluster_scoped = {"CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
    for doc in render(EVERYTHING_ON):
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], doc["kind"]
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


# --- CSIDriver -----------------------------------------------------------------------------


def test_csidriver_name_matches_the_driver(render) -> None:
    csidriver = only(render(), "CSIDriver")
    name = csidriver["metadata"]["name"]
    assert name == _architecture_driver_name()
    # csi_driver/constants.py is the code-side source of truth
    assert name == _csi_driver_constants()["DRIVER_NAME"]
    # The StorageClass must point at the same driver.
    assert only(render(), "StorageClass")["provisioner"] == name


def test_csidriver_fields(render) -> None:
    spec = only(render(), "CSIDriver")["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Persistent", "Ephemeral"]
    assert spec["fsGroupPolicy"] == "File"
    assert spec["requiresRepublish"] is True  # STS credentials refreshed on republish
    spec2 = only(
        render({"csiDriver": {"fsGroupPolicy": "None", "requiresRepublish": False}}), "CSIDriver"
    )["spec"]
    assert spec2["fsGroupPolicy"] == "None" and spec2["requiresRepublish"] is False


# --- node plugin ---------------------------------------------------------------------------


def test_node_plugin_has_fuse_bidirectional_and_privileged(render) -> None:
    ds = _node(render())
    plugin = container(ds, "coco-csi")
    assert plugin["securityContext"]["privileged"] is True
    fuse = mount_of(plugin, "fuse-device")
    assert fuse["mountPath"] == "/dev/fuse"
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["fuse-device"]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    pods = mount_of(plugin, "mountpoint-dir")
    assert pods["mountPath"] == "/var/lib/kubelet/pods"
    assert pods["mountPropagation"] == "Bidirectional"
    assert host_path_of(ds, "mountpoint-dir") == "/var/lib/kubelet/pods"
    # Only the plugin container may be privileged or propagate mounts back to the host.
    for c in ds["spec"]["template"]["spec"]["containers"]:
        if c["name"] == "coco-csi":
            continue
        assert not c.get("securityContext", {}).get("privileged", False), c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        for m in c.get("volumeMounts", []):
            assert m.get("mountPropagation", "None") != "Bidirectional", (c["name"], m)


def test_node_plugin_command_line_follows_the_cli_contract(render) -> None:
    plugin = container(_node(render()), "coco-csi")
    assert plugin["args"][0] == "node"
    assert arg_value(plugin, "--endpoint") == "unix:///csi/csi.sock"
    assert arg_value(plugin, "--node-id") == "$(NODE_NAME)"
    env = {e["name"]: e for e in plugin["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert arg_value(plugin, "--state-dir") == mount_of(plugin, "state-dir")["mountPath"]
    assert arg_value(plugin, "--backend-root") == mount_of(plugin, "backend")["mountPath"]
    assert arg_value(plugin, "--resolver").startswith("kbs:")


def _args(c: dict[str, Any], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in c["args"] if a.startswith(flag + "=")]


def test_node_plugin_gets_kubelet_root_and_allow_lists(render) -> None:
    """Issue 7: targets only below kubelet's root; keys only from allowed resources."""
    plugin = container(_node(render()), "coco-csi")
    kubelet = arg_value(plugin, "--kubelet-dir")
    assert kubelet == "/var/lib/kubelet"
    assert mount_of(plugin, "mountpoint-dir")["mountPath"] == kubelet + "/pods"
    # By default exactly the chart's own StorageClass key is allowed, nothing else.
    assert _args(plugin, "--allowed-key-resource") == ["kbs:///default/coco-csi/volume-key"]
    assert _args(plugin, "--allowed-signing-kid") == []
    assert _args(plugin, "--allowed-object-endpoint") == []  # object volumes off by default
    micro = container(
        _node(render({"kubeletRootDir": "/var/snap/microk8s/common/var/lib/kubelet"})), "coco-csi"
    )
    assert arg_value(micro, "--kubelet-dir") == "/var/snap/microk8s/common/var/lib/kubelet"
    custom = container(
        _node(
            render(
                {
                    "node": {
                        "allowedKeyResources": ["kbs:///team-a/", "kbs:///team-b/k"],
                        "allowedSigningKids": ["kbs:///default/signing-key/"],
                        "allowedObjectEndpoints": ["*.aliyuncs.com", "minio.example.com"],
                        "allowedObjectBuckets": ["tenant-data/volumes"],
                        "metricsBindAddress": "127.0.0.1",
                    }
                }
            )
        ),
        "coco-csi",
    )
    assert _args(custom, "--allowed-key-resource") == ["kbs:///team-a/", "kbs:///team-b/k"]
    assert _args(custom, "--allowed-signing-kid") == ["kbs:///default/signing-key/"]
    assert _args(custom, "--allowed-object-endpoint") == ["*.aliyuncs.com", "minio.example.com"]
    assert _args(custom, "--allowed-object-bucket") == ["tenant-data/volumes"]
    assert arg_value(custom, "--metrics-addr") == "127.0.0.1:8095"


OPT_IN_FLAGS = {
    "allowPlaintextObjectCredentials": "--allow-plaintext-object-credentials",
    "allowInsecureObjectEndpoint": "--allow-insecure-object-endpoint",
    "blockAcceptUnboundHeader": "--block-accept-unbound-header",
}


def test_node_opt_ins_are_off_by_default_and_rendered_only_when_set(render) -> None:
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["node"]
    assert all(defaults[v] is False for v in OPT_IN_FLAGS)
    plain = container(_node(render()), "coco-csi")
    rendered = " ".join(plain["args"])
    assert not any(f in rendered for f in [*OPT_IN_FLAGS.values(), "--object-ca-bundle"])
    assert "--block-image-root" not in rendered  # tests only: never a value
    assert "object-ca" not in {m["name"] for m in plain["volumeMounts"]}
    for value, flag in OPT_IN_FLAGS.items():
        args = container(_node(render({"node": {value: True}})), "coco-csi")["args"]
        assert args.count(flag) == 1
        assert not set(OPT_IN_FLAGS.values()) - {flag} & set(args)  # one value, one flag


def test_volume_metrics_on_by_default_and_no_port_of_their_own(render) -> None:
    """The daemons' metrics reach Prometheus through the plugin's one port: the default
    passes no flag (on, because --metrics-addr is), false passes --no-volume-metrics, and
    either way the pod exposes the same ports."""
    on = container(_node(render()), "coco-csi")
    off = container(_node(render({"node": {"volumeMetrics": False}})), "coco-csi")
    assert not [a for a in on["args"] if "volume-metrics" in a]
    assert arg_value(on, "--metrics-addr") == "$(POD_IP):8095"
    assert [a for a in off["args"] if "volume-metrics" in a] == ["--no-volume-metrics"]
    assert on["ports"] == off["ports"]


def test_object_ca_bundle_from_the_node_or_a_configmap(render, chart: Any) -> None:
    ds = _node(render({"node": {"objectCaBundle": {"hostPath": "/etc/coco/object-ca.pem"}}}))
    plugin = container(ds, "coco-csi")
    assert arg_value(plugin, "--object-ca-bundle") == "/etc/coco-csi/object-ca/ca.pem"
    assert mount_of(plugin, "object-ca") == {
        "name": "object-ca", "mountPath": "/etc/coco-csi/object-ca/ca.pem", "readOnly": True,
    }  # fmt: skip
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["object-ca"]["hostPath"] == {"path": "/etc/coco/object-ca.pem", "type": "File"}

    cm = {"configMap": {"name": "oss-ca", "key": "bundle.pem"}}
    ds = _node(render({"node": {"objectCaBundle": cm}}))
    plugin = container(ds, "coco-csi")
    assert arg_value(plugin, "--object-ca-bundle") == "/etc/coco-csi/object-ca/bundle.pem"
    assert mount_of(plugin, "object-ca")["mountPath"] == "/etc/coco-csi/object-ca"
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert vols["object-ca"]["configMap"] == {
        "name": "oss-ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}],
    }  # fmt: skip

    both = {"objectCaBundle": {"hostPath": "/etc/ca.pem", "configMap": {"name": "x"}}}
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render_raw(chart, {"node": both})


def test_node_can_stage_block_volumes(render) -> None:
    """Staging paths below kubelet's plugins dir propagate both ways; the node's own /dev
    (by-id links, hot-plugged disks, the loop nodes losetup makes) replaces the runtime's."""
    ds = _node(render())
    plugin = container(ds, "coco-csi")
    assert plugin["securityContext"]["privileged"] is True  # losetup, mount, /sys/dev/block
    assert mount_of(plugin, "staging-dir") == {
        "name": "staging-dir",
        "mountPath": "/var/lib/kubelet/plugins/kubernetes.io/csi",
        "mountPropagation": "Bidirectional",
    }
    assert host_path_of(ds, "staging-dir") == "/var/lib/kubelet/plugins/kubernetes.io/csi"
    assert mount_of(plugin, "host-dev")["mountPath"] == "/dev"
    assert host_path_of(ds, "host-dev") == "/dev"
    names = [m["name"] for m in plugin["volumeMounts"]]
    assert names.index("host-dev") < names.index("fuse-device")


@pytest.mark.parametrize(
    "node",
    [
        {"allowPlaintextObjectCredentials": "yes"},
        {"blockAcceptUnboundHeader": 1},
        {"objectCaBundle": {"hostPath": "relative/ca.pem"}},
        {"objectCaBundle": {"configMap": {"name": "Bad_Name"}}},
        {"objectCaBundle": {"other": "x"}},
        {"allowedKeyResources": ["https://evil/key"]},
        {"allowedKeyResources": ["kbs:///a b"]},
        {"allowedSigningKids": ["has space"]},
        {"allowedObjectEndpoints": ["evil.example.com --allow-plaintext-object-credentials"]},
        {"allowedObjectBuckets": ["Bad_Bucket"]},
        {"metricsBindAddress": "0.0.0.0; rm"},
    ],
)
def test_schema_refuses_bad_allow_lists(chart: Any, node: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values({"node": node}))


def test_metrics_port_is_consistent_end_to_end(render) -> None:
    docs = render({"node": {"metricsPort": 9100}})
    plugin = container(_node(docs), "coco-csi")
    assert arg_value(plugin, "--metrics-addr") == "$(POD_IP):9100"
    env = {e["name"]: e for e in plugin["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    assert ports["metrics"] == 9100
    svc = only(docs, "Service", "-node-metrics")
    (svc_port,) = svc["spec"]["ports"]
    assert svc_port["port"] == 9100 and svc_port["targetPort"] == "metrics"
    assert svc["spec"]["clusterIP"] == "None"
    pod_labels = _node(docs)["spec"]["template"]["metadata"]["labels"]
    for k, v in svc["spec"]["selector"].items():
        assert pod_labels.get(k) == v, "metrics Service does not select the node pods"


@pytest.mark.parametrize("case", ["default", "microk8s"])
def test_sidecar_sockets_line_up(render, case: str) -> None:
    values = VALUE_SETS[case]
    kubelet_dir = values.get("kubeletRootDir", "/var/lib/kubelet").rstrip("/")
    ds = _node(render(values))
    plugin = container(ds, "coco-csi")
    registrar = container(ds, "node-driver-registrar")
    probe = container(ds, "liveness-probe")

    endpoint = arg_value(plugin, "--endpoint")
    assert endpoint.startswith("unix://")
    socket_in_pod = endpoint.removeprefix("unix://")
    sock_dir, sock_name = posixpath.split(socket_in_pod)
    # All three containers see the same socket-dir at the endpoint's directory.
    for c in (plugin, registrar, probe):
        assert mount_of(c, "socket-dir")["mountPath"] == sock_dir, c["name"]
    for c in (registrar, probe):
        assert arg_value(c, "--csi-address") == socket_in_pod, c["name"]
    # What the registrar tells kubelet is the host path of that very socket.
    reg_path = arg_value(registrar, "--kubelet-registration-path")
    host_dir = host_path_of(ds, "socket-dir")
    assert reg_path == posixpath.join(host_dir, sock_name)
    assert host_dir.startswith(kubelet_dir + "/plugins/")
    assert host_path_of(ds, "registration-dir") == kubelet_dir + "/plugins_registry"
    assert mount_of(registrar, "registration-dir")["mountPath"] == "/registration"
    pods = mount_of(plugin, "mountpoint-dir")
    assert pods["mountPath"] == host_path_of(ds, "mountpoint-dir") == kubelet_dir + "/pods"


def test_health_endpoints_are_wired(render) -> None:
    ds = _node(render())
    plugin = container(ds, "coco-csi")
    probe = container(ds, "liveness-probe")
    registrar = container(ds, "node-driver-registrar")
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    # The plugin's livenessProbe hits the livenessprobe sidecar (same pod network).
    assert plugin["livenessProbe"]["httpGet"]["port"] == "healthz"
    assert arg_value(probe, "--http-endpoint") == f":{ports['healthz']}"
    reg_ports = {p["name"]: p["containerPort"] for p in registrar["ports"]}
    assert registrar["livenessProbe"]["httpGet"]["port"] == "registrar-hz"
    assert arg_value(registrar, "--http-endpoint") == f":{reg_ports['registrar-hz']}"
    assert len(set(ports.values()) | set(reg_ports.values())) == 3


def test_port_collisions_are_refused(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match="must be different ports"):
        render_raw(chart, {"node": {"metricsPort": 9808}})


def test_runtime_class_is_configurable_and_only_on_the_node_plugin(render) -> None:
    assert "runtimeClassName" not in _node(render())["spec"]["template"]["spec"]
    docs = render({"node": {"runtimeClassName": "kata-qemu-tdx"}})
    assert _node(docs)["spec"]["template"]["spec"]["runtimeClassName"] == "kata-qemu-tdx"
    assert "runtimeClassName" not in _controller(docs)["spec"]["template"]["spec"]


def test_node_service_account_has_no_api_access(render) -> None:
    docs = render(EVERYTHING_ON)
    ds = _node(docs)
    sa_name = ds["spec"]["template"]["spec"]["serviceAccountName"]
    assert ds["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    sa = only(docs, "ServiceAccount", "-node")
    assert sa["metadata"]["name"] == sa_name and sa["automountServiceAccountToken"] is False
    for b in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert sa_name not in {s["name"] for s in b["subjects"]}, b["metadata"]["name"]


# --- resolver ------------------------------------------------------------------------------


def test_kbs_resolver_uses_the_configured_aa_socket(render) -> None:
    sock = "unix:///run/coco/aa/attestation-agent.sock"
    ds = _node(render({"resolver": {"kbs": {"aaSocket": sock, "url": "https://kbs:8080"}}}))
    plugin = container(ds, "coco-csi")
    assert arg_value(plugin, "--resolver") == (
        f"kbs:https://kbs:8080?aa={sock}&ca=/etc/coco-csi/kbs-ca/ca.pem"
    )
    m = mount_of(plugin, "guest-sockets")
    assert m["mountPath"] == "/run/coco/aa" == host_path_of(ds, "guest-sockets")
    assert m["readOnly"] is True


@pytest.mark.parametrize("transport", ["grpc+", "ttrpc+"])
def test_aa_and_cdh_transport_in_the_socket_url(render, transport: str) -> None:
    """``grpc+unix://`` / ``ttrpc+unix://`` reach the spec; the mounted dir is the path's."""
    sock = f"{transport}unix:///run/coco/aa/attestation-agent.sock"
    ds = _node(render({"resolver": {"kbs": {"aaSocket": sock, "url": "https://kbs:8080"}}}))
    plugin = container(ds, "coco-csi")
    assert f"?aa={sock}&" in arg_value(plugin, "--resolver")
    assert mount_of(plugin, "guest-sockets")["mountPath"] == "/run/coco/aa"
    assert host_path_of(ds, "guest-sockets") == "/run/coco/aa"
    cdh = f"{transport}unix:///run/coco/cdh/cdh.sock"
    ds = _node(render({"resolver": {"kind": "cdh", "cdh": {"socket": cdh}}}))
    plugin = container(ds, "coco-csi")
    assert arg_value(plugin, "--resolver") == f"cdh:{cdh}"
    assert host_path_of(ds, "guest-sockets") == "/run/coco/cdh"


def test_kbs_ca_configmap_is_mounted_and_passed(render) -> None:
    ds = _node(render(EVERYTHING_ON))
    plugin = container(ds, "coco-csi")
    spec = arg_value(plugin, "--resolver")
    assert spec.endswith("&ca=/etc/coco-csi/kbs-ca/ca.pem")
    assert mount_of(plugin, "kbs-ca")["mountPath"] == "/etc/coco-csi/kbs-ca"
    vol = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "kbs-ca")
    assert vol["configMap"]["name"] == "kbs-ca"


# Issue 7 finding 1: no working insecure default; the KBS is always authenticated.

KBS_REQUIRED = "resolver.kbs.url is required with resolver.kind=kbs"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({}, KBS_REQUIRED),
        ({"resolver": {"kind": "kbs"}}, KBS_REQUIRED),
        (
            {"resolver": {"kbs": {"url": "https://kbs.example:8443"}}},
            "resolver.kbs.caConfigMap.name (or resolver.kbs.certSha256) is required",
        ),
        ({"resolver": {"kbs": {"url": "http://kbs:8080"}}}, "plain http://"),
        (
            {"resolver": {"kbs": {"url": "http://kbs:8080", "insecureHttp": True,
                                  "caConfigMap": {"name": "x"}}}},
            "need an https://",
        ),
        (
            {"resolver": {"kbs": {"url": "https://kbs", "insecureHttp": True,
                                  "certSha256": "a" * 64}}},
            "applies only to an http://",
        ),
        (
            {"resolver": {"kbs": {"cdhConfig": "/run/cdh.toml", "url": "https://kbs"}}},
            "one source of trust",
        ),
    ],
    ids=["defaults", "kind-only", "https-no-anchor", "http", "http-with-ca", "https-insecure",
         "cdh-and-url"],
)  # fmt: skip
def test_kbs_without_a_pinned_kbs_fails_to_render_and_says_why(
    chart: Any, values: dict[str, Any], needle: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        render_raw(chart, values, bare=True)
    assert needle in str(err.value)  # helm install/template stop here, with this reason


def test_values_yaml_has_no_http_kbs_default() -> None:
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    kbs = defaults["resolver"]["kbs"]
    assert defaults["resolver"]["kind"] == "kbs"
    assert kbs["url"] == "" and kbs["insecureHttp"] is False and kbs["cdhConfig"] == ""


def test_kbs_cert_fingerprint_pin(render) -> None:
    pin = "AB" * 32
    values = {"resolver": {"kbs": {"url": "https://kbs:8443", "certSha256": pin}}}
    plugin = container(_node(render(values, bare=True)), "coco-csi")
    spec = arg_value(plugin, "--resolver")
    assert spec.endswith(f"&cert-sha256={pin.lower()}") and "&ca=" not in spec
    assert "kbs-ca" not in {m["name"] for m in plugin["volumeMounts"]}


def test_kbs_insecure_http_is_explicit_and_spelled_out(render) -> None:
    values = {"resolver": {"kbs": {"url": "http://kbs:8080", "insecureHttp": True}}}
    plugin = container(_node(render(values, bare=True)), "coco-csi")
    assert arg_value(plugin, "--resolver").endswith("&insecure-http=true")


def test_kbs_from_cocos_cdh_config(render) -> None:
    values = {"resolver": {"kbs": {"cdhConfig": "/run/confidential-containers/cdh.toml"}}}
    ds = _node(render(values, bare=True))
    plugin = container(ds, "coco-csi")
    spec = arg_value(plugin, "--resolver")
    assert spec.startswith("kbs:cdh-config:/etc/coco-csi/cdh-config/cdh.toml?aa=unix:///")
    assert mount_of(plugin, "cdh-config") == {
        "name": "cdh-config",
        "mountPath": "/etc/coco-csi/cdh-config/cdh.toml",
        "readOnly": True,
    }
    vol = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "cdh-config")
    assert vol["hostPath"] == {"path": "/run/confidential-containers/cdh.toml", "type": "File"}


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"resolver": {"kbs": {"certSha256": "xyz"}}}, "/resolver/kbs/certSha256"),
        ({"resolver": {"kbs": {"cdhConfig": "relative.toml"}}}, "/resolver/kbs/cdhConfig"),
        ({"resolver": {"kbs": {"url": "https://u:p@kbs"}}}, "/resolver/kbs/url"),
        ({"resolver": {"kbs": {"insecureHttp": "yes"}}}, "/resolver/kbs/insecureHttp"),
    ],
    ids=["pin", "cdh-path", "url-credentials", "insecure-bool"],
)
def test_kbs_schema(chart: Any, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(values))
    assert where in str(err.value)


def test_cdh_resolver(render) -> None:
    ds = _node(render(VALUE_SETS["cdh"]))
    plugin = container(ds, "coco-csi")
    assert arg_value(plugin, "--resolver") == "cdh:unix:///run/confidential-containers/cdh.sock"
    assert host_path_of(ds, "guest-sockets") == "/run/confidential-containers"


def test_offline_fs_resolver_reads_a_node_file_and_warns(chart: Any, render) -> None:
    ds = _node(render(VALUE_SETS["offline-fs-demo"]))
    plugin = container(ds, "coco-csi")
    path = "/etc/coco-csi/offline-fs/resources.json"
    assert arg_value(plugin, "--resolver") == f"offline-fs:{path}"
    assert mount_of(plugin, "offline-fs") == {
        "name": "offline-fs",
        "mountPath": path,
        "readOnly": True,
    }
    vol = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "offline-fs")
    assert vol["hostPath"]["type"] == "File"
    assert "guest-sockets" not in {m["name"] for m in plugin["volumeMounts"]}
    notes = render_raw(chart, VALUE_SETS["offline-fs-demo"])["coco-csi/templates/NOTES.txt"]
    assert "WARNING: resolver.kind=offline-fs" in notes


def test_controller_never_gets_key_material_or_attestation(render) -> None:
    for case in ("default", "everything-on", "cdh", "offline-fs-demo"):
        dep = _controller(render(VALUE_SETS[case]))
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            assert not any(a.startswith("--resolver") for a in c["args"]), (case, c["name"])
        names = {v["name"] for v in spec["volumes"]}
        assert names == {"socket-dir", "backend"}, (case, names)
        assert spec["volumes"][0]["emptyDir"] == {}


# --- controller ----------------------------------------------------------------------------


def test_controller_and_provisioner(render) -> None:
    docs = render(EVERYTHING_ON)
    dep = _controller(docs)
    assert dep["spec"]["replicas"] == 2
    plugin = container(dep, "coco-csi")
    assert plugin["args"][0] == "controller"
    assert arg_value(plugin, "--endpoint") == "unix:///csi/csi.sock"
    backend_root = arg_value(plugin, "--backend-root")
    assert mount_of(plugin, "backend")["mountPath"] == backend_root
    prov = container(dep, "csi-provisioner")
    assert arg_value(prov, "--csi-address") == "/csi/csi.sock"
    assert arg_value(prov, "--leader-election") == "true"
    assert arg_value(prov, "--leader-election-namespace") == NAMESPACE
    assert mount_of(prov, "socket-dir")["mountPath"] == "/csi"
    # The node plugin mounts the same backend at the same path.
    ds = _node(docs)
    assert mount_of(container(ds, "coco-csi"), "backend")["mountPath"] == backend_root
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is True


_POLICY_FLAGS = (
    "--resolver",
    "--allowed-signing-kid",
    "--allowed-object-endpoint",
    "--allowed-object-bucket",
    "--object-ca-bundle",
    "--allow-plaintext-object-credentials",
    "--allow-insecure-object-endpoint",
)


def _policy_args(c: dict[str, Any]) -> list[str]:
    return [a for a in c["args"] if a.split("=", 1)[0] in _POLICY_FLAGS]


@pytest.mark.parametrize(
    "extra",
    [
        {},
        NODE_OPT_INS,
        {"resolver": {"kind": "cdh"}},
        {"resolver": {"kind": "kbs", "kbs": {"cdhConfig": "/run/initdata/cdh.toml"}}},
    ],
    ids=["kbs", "opt-ins", "cdh", "cdh-config"],
)
def test_confidential_controller_is_configured_exactly_like_the_node(render, extra) -> None:
    values = with_kbs(extra)
    values = {**values, "controller": CONFIDENTIAL_CONTROLLER["controller"]}
    values["node"] = {**CONFIDENTIAL_CONTROLLER["node"], **values.get("node", {})}
    if extra.get("resolver", {}).get("kbs", {}).get("cdhConfig"):
        values["resolver"] = extra["resolver"]
    docs = render(values, bare=True)
    node, ctrl = container(_node(docs), "coco-csi"), container(_controller(docs), "coco-csi")
    assert _policy_args(ctrl) == _policy_args(node)
    assert any(a.startswith("--allowed-object-endpoint=") for a in _policy_args(ctrl))
    spec = _controller(docs)["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "kata-qemu-tdx"
    node_spec = _node(docs)["spec"]["template"]["spec"]
    node_vols = {v["name"]: v for v in node_spec["volumes"]}
    for m in ctrl["volumeMounts"]:
        if m["name"] in ("socket-dir", "backend"):
            continue
        assert m == mount_of(node, m["name"])  # same path, same read-only mount
        assert next(v for v in spec["volumes"] if v["name"] == m["name"]) == node_vols[m["name"]]
    resolver_mounts = {m["name"] for m in node["volumeMounts"]} & {
        "guest-sockets", "kbs-ca", "cdh-config", "offline-fs", "object-ca",
    }  # fmt: skip
    assert resolver_mounts <= {m["name"] for m in ctrl["volumeMounts"]}
    # Nothing else of the node's: no FUSE, no kubelet dirs, not privileged; the node's key
    # resource list exactly (CreateVolume derives the key to initialise object prefixes).
    assert {"mountpoint-dir", "fuse-device", "host-dev"}.isdisjoint(
        {v["name"] for v in spec["volumes"]}
    )
    assert ctrl["securityContext"].get("privileged") is not True
    keys = [a for a in ctrl["args"] if a.startswith("--allowed-key-resource")]
    assert keys and keys == [a for a in node["args"] if a.startswith("--allowed-key-resource")]


def test_confidential_controller_refuses_to_render_without_a_tee_or_endpoints(chart: Any) -> None:
    on = {"controller": {"confidential": {"enabled": True}}}
    with pytest.raises(helm.HelmRenderError, match="runtimeClassName"):
        render_raw(chart, {**on, "node": {"allowedObjectEndpoints": ["s3.example.com"]}})
    on = {"controller": {"confidential": {"enabled": True, "runtimeClassName": "kata-qemu-tdx"}}}
    with pytest.raises(helm.HelmRenderError, match="allowedObjectEndpoints"):
        render_raw(chart, on)
    with pytest.raises(helm.HelmValuesError):
        render_raw(chart, {"controller": {"confidential": {"enabled": True, "bogus": 1}}})


def test_provisioner_rbac_is_least_privilege(render) -> None:
    docs = render()
    dep = _controller(docs)
    sa_name = dep["spec"]["template"]["spec"]["serviceAccountName"]
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for role in roles:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], role
            assert "*" not in rule["apiGroups"], role
            assert "secrets" not in rule["resources"], "nothing here may read Secrets"
            assert "pods" not in rule["resources"], role
    cluster = only(docs, "ClusterRole")
    granted = {
        (g, r): set(rule["verbs"])
        for rule in cluster["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert granted == {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        ("", "events"): {"list", "watch", "create", "update", "patch"},
    }
    role = only(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert [(r["apiGroups"], r["resources"]) for r in role["rules"]] == [
        (["coordination.k8s.io"], ["leases"])
    ]
    for binding in (only(docs, "ClusterRoleBinding"), only(docs, "RoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}
        ]
        target = only(docs, binding["roleRef"]["kind"])
        assert binding["roleRef"]["name"] == target["metadata"]["name"]


# --- StorageClass, toggles -----------------------------------------------------------------


def test_storageclass(render) -> None:
    sc = only(render(), "StorageClass")
    assert sc["metadata"]["name"] == "coco"
    assert sc["reclaimPolicy"] == "Delete"
    params = sc["parameters"]
    assert params == {"keyResource": "kbs:///default/coco-csi/volume-key"}
    assert _csi_driver_constants()["PARAM_KEY_RESOURCE"] in params  # the name the driver reads
    assert "annotations" not in sc["metadata"]


def _mount_capability() -> Any:
    """The controller core's (protocol-free) form of a single-node-writer mount."""
    from csi_driver.core import volcap

    return volcap.Capability(volcap.AccessType.MOUNT, volcap.AccessMode.SINGLE_NODE_WRITER)


@pytest.mark.parametrize("case", ["default", "everything-on"])
def test_storageclass_parameters_are_accepted_by_the_driver(render, tmp_path, case) -> None:
    """Cross-check with the real controller core: what external-provisioner would send for
    this StorageClass must provision a volume (unknown parameters are InvalidArgument)."""
    sc = only(render(VALUE_SETS[case]), "StorageClass")
    # The provisioner consumes the secret-reference keys itself and, with
    # --extra-create-metadata, adds the claim's identity under the reserved prefix.
    params = {k: v for k, v in sc["parameters"].items() if "-secret-" not in k} | {
        "csi.storage.k8s.io/pvc/name": "data",
        "csi.storage.k8s.io/pvc/namespace": "apps",
        "csi.storage.k8s.io/pv/name": "pvc-1234",
    }
    backend = LocalBackend(str(tmp_path))
    rec, ctx = backend.create("pvc-1234", [_mount_capability()], params)
    assert (tmp_path / rec.volume_id).is_dir()
    assert ctx.get("keyResource") == sc["parameters"]["keyResource"]


def _self_signed_ca_pem() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test kbs ca")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("case", ["default", "everything-on", "cdh", "offline-fs-demo"])
def test_resolver_spec_is_accepted_by_sealed_secrets(render, tmp_path, case) -> None:
    """Cross-check with the real sealed_secrets.build_resolver (construction only: no
    attestation agent, KBS or CDH is contacted)."""
    plugin = container(_node(render(VALUE_SETS[case])), "coco-csi")
    spec = arg_value(plugin, "--resolver")
    if "&ca=" in spec:
        # The CA path in the spec is where the ConfigMap is mounted; swap in a real PEM file
        # at a host path because the test cannot create /etc/coco-csi/.
        ca_path = spec.rsplit("&ca=", 1)[1]
        mount = mount_of(plugin, "kbs-ca")["mountPath"]
        assert posixpath.dirname(ca_path) == mount
        local = tmp_path / "ca.pem"
        local.write_bytes(_self_signed_ca_pem())
        spec = spec.replace(ca_path, str(local))
    resolver = build_resolver(spec)
    assert hasattr(resolver, "get_resource") and hasattr(resolver, "unseal")


def test_storageclass_sealed_secret_reference(render) -> None:
    sc = only(render(EVERYTHING_ON), "StorageClass")
    assert sc["parameters"]["csi.storage.k8s.io/node-publish-secret-name"] == "${pvc.name}-sealed"
    assert sc["parameters"]["csi.storage.k8s.io/node-publish-secret-namespace"] == (
        "${pvc.namespace}"
    )
    assert sc["reclaimPolicy"] == "Retain"
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["metadata"]["annotations"] == {"storageclass.kubernetes.io/is-default-class": "true"}


def test_storageclass_toggle(render) -> None:
    docs = render({"storageClass": {"create": False}})
    assert "StorageClass" not in {d["kind"] for d in docs}
    assert Counter(d["kind"] for d in docs) == DEFAULT_KINDS - Counter({"StorageClass": 1})


def test_servicemonitor_only_when_enabled(render) -> None:
    assert "ServiceMonitor" not in {d["kind"] for d in render()}
    docs = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "p"}}}})
    sm = only(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "p"
    _check_service_monitor(sm, docs)


def test_metrics_service_toggle_and_dependency(chart: Any, render) -> None:
    assert "Service" not in {
        d["kind"] for d in render({"metrics": {"service": {"enabled": False}}})
    }
    with pytest.raises(helm.HelmRenderError, match="needs metrics.service.enabled=true"):
        render_raw(
            chart, {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}}
        )


def test_ephemeral_only_install_has_no_controller(render) -> None:
    kinds = Counter(d["kind"] for d in render(VALUE_SETS["ephemeral-only"]))
    assert kinds == Counter({"CSIDriver": 1, "DaemonSet": 1, "ServiceAccount": 1})


def test_replicated_controller_needs_shared_backend(chart: Any, render) -> None:
    with pytest.raises(helm.HelmRenderError, match="needs a shared backend.volume"):
        render_raw(chart, {"controller": {"replicas": 2}})
    shared = {"persistentVolumeClaim": {"claimName": "coco-backend"}}
    docs = render({"controller": {"replicas": 2}, "backend": {"volume": shared}})
    for workload in (_controller(docs), _node(docs)):
        vols = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert vols["backend"] == {"name": "backend", **shared}


def test_storageclass_without_controller_is_refused_clearly(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        render_raw(chart, {"controller": {"enabled": False}})
    assert "storageClass.create=true needs controller.enabled=true" in str(err.value)


# --- schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"resolver": {"kind": "vault"}},
            "at '/resolver/kind': value must be one of 'kbs', 'cdh', 'offline-fs'",
        ),
        ({"csiDriver": {"fsGroupPolicy": "Everything"}}, "/csiDriver/fsGroupPolicy"),
        (
            {"csiDriver": {"volumeLifecycleModes": ["Persistent", "Persistent"]}},
            "/csiDriver/volumeLifecycleModes",
        ),
        ({"node": {"metricsPort": 70000}}, "/node/metricsPort"),
        ({"kubeletRootDir": "var/lib/kubelet"}, "/kubeletRootDir"),
        ({"resolver": {"kbs": {"aaSocket": "/run/aa.sock"}}}, "/resolver/kbs/aaSocket"),
        ({"resolver": {"kbs": {"aaSocket": "unix:///a.sock&ca=/x"}}}, "/resolver/kbs/aaSocket"),
        ({"resolver": {"kbs": {"aaSocket": "http+unix:///a.sock"}}}, "/resolver/kbs/aaSocket"),
        ({"resolver": {"kbs": {"url": "https://kbs?aa=x"}}}, "/resolver/kbs/url"),
        ({"storageClass": {"reclaimPolicy": "Recycle"}}, "/storageClass/reclaimPolicy"),
        ({"resolvr": {"kind": "kbs"}}, "resolvr"),
        ({"storageClass": {"nodePublishSecret": {"name": "x"}}}, "/storageClass/nodePublishSecret"),
    ],
    ids=[
        "resolver-kind",
        "fsgrouppolicy",
        "duplicate-modes",
        "port",
        "relative-dir",
        "aa-socket-not-unix-url",
        "aa-socket-injects-query",
        "aa-socket-unknown-transport",
        "kbs-url-with-query",
        "reclaim",
        "typo-key",
        "secret-without-namespace",
    ],
)
def test_schema_rejects_bad_values_with_a_clear_error(chart: Any, values, expected: str) -> None:
    with pytest.raises(helm.HelmValuesError) as err:
        chart.validate_schema(chart.merge_values(values))
    assert expected in str(err.value)
    # helm install/template applies the same schema before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        render_raw(chart, values)


def test_schema_accepts_every_value_set(chart: Any) -> None:
    for values in VALUE_SETS.values():
        chart.validate_schema(chart.merge_values(with_kbs(values)))


def test_values_yaml_and_schema_describe_the_same_keys(chart: Any) -> None:
    schema = chart.schema
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    def check(node: dict[str, Any], value: Any, path: str) -> None:
        props = node.get("properties")
        if props is None:
            return
        assert isinstance(value, dict), path
        missing = set(props) - set(value) - {"global"}
        assert not missing, f"{path or '<root>'}: schema keys without a default {missing}"
        for k, v in value.items():
            assert k in props, f"{path}.{k} has no schema"
            check(props[k], v, f"{path}.{k}" if path else k)

    check(schema, defaults, "")


# --- secrets -------------------------------------------------------------------------------

PLAINTEXT_KEYS = [
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",  # hex master key
    "hunter2",
    "kbs://kbs.example/default/key/1",  # host form: the key would come from elsewhere
    "sealed.eyJhbGciOi.eyJ2ZXJzaW9u.sig",  # even sealed values belong in a Secret
]


@pytest.mark.parametrize("value", PLAINTEXT_KEYS)
def test_schema_refuses_anything_but_a_kbs_reference_as_key(chart: Any, value: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="/storageClass/keyResource"):
        render_raw(chart, {"storageClass": {"keyResource": value}})


@pytest.mark.parametrize(
    "volume",
    [
        {"secret": {"secretName": "keys"}},
        {"configMap": {"name": "keys"}},
        {"projected": {"sources": []}},
    ],
    ids=["secret", "configMap", "projected"],
)
def test_backend_cannot_be_fed_from_a_secret_or_configmap(chart: Any, volume) -> None:
    with pytest.raises(helm.HelmValuesError, match="/backend/volume"):
        render_raw(chart, {"backend": {"volume": volume}})


@pytest.mark.parametrize(
    "arg",
    [
        "--masterkey=00112233",
        "--passphrase=x",
        "--secret-file=/k",
        # opt-ins that weaken the trust boundary go through their own, named values
        "--allow-plaintext-object-credentials",
        "--allow-insecure-object-endpoint",
        "--block-accept-unbound-header",
    ],
)
def test_extra_args_cannot_carry_keys(chart: Any, arg: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="extraArgs"):
        render_raw(chart, {"node": {"extraArgs": [arg]}})


@pytest.mark.parametrize("case", sorted(VALUE_SETS))
def test_no_secret_material_is_templated(render, case: str) -> None:
    docs = render(VALUE_SETS[case])
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Secret", "ConfigMap", "SealedSecret"}, kinds
    for doc in docs:
        for path, value in walk(strip_source(doc)):
            leaf = path.rsplit(".", 1)[-1]
            assert leaf not in {"data", "stringData", "binaryData"}, (doc["kind"], path)
            if leaf == "env":
                for e in value:  # only downward-API values, never literals
                    assert set(e) == {"name", "valueFrom"}, e
                    assert "secretKeyRef" not in e["valueFrom"], e
            if isinstance(value, str):
                assert not value.startswith("sealed."), (doc["kind"], path)
                assert not re.search(r"\b[0-9a-fA-F]{64}\b", value), (doc["kind"], path)
                assert "BEGIN" not in value, (doc["kind"], path)
    sc = [d for d in docs if d["kind"] == "StorageClass"]
    for s in sc:
        assert s["parameters"]["keyResource"].startswith("kbs:///")


# --- NOTES, docs, versions, CLI ------------------------------------------------------------


def test_notes(chart: Any) -> None:
    notes = render_raw(chart)["coco-csi/templates/NOTES.txt"]
    assert "CSI driver: coco.csi.confidentialcontainers.org" in notes
    assert "storageClassName: coco" in notes
    assert "WARNING" not in notes
    warned = render_raw(chart, {"node": {"runtimeClassName": "kata-qemu-tdx"}})
    assert "WARNING: node.runtimeClassName=kata-qemu-tdx" in warned["coco-csi/templates/NOTES.txt"]


def _schema_paths(node: dict[str, Any], path: str = "") -> list[str]:
    props = node.get("properties")
    if not props:
        return [path]
    out: list[str] = []
    for k, v in props.items():
        if k == "global":
            continue
        out += _schema_paths(v, f"{path}.{k}" if path else k)
    return out


def test_readme_documents_every_value(chart: Any) -> None:
    readme = (CHART_DIR / "README.md").read_text()
    missing = [p for p in _schema_paths(chart.schema) if f"`{p}`" not in readme]
    assert not missing, f"charts/coco-csi/README.md values table lacks {missing}"
    assert "helm install" in readme


def _version(tag: str) -> tuple[int, ...]:
    return tuple(int(x) for x in tag.lstrip("v").split("."))


def test_sidecar_versions_are_csi_1_12_era(chart: Any) -> None:
    sc = chart.values["sidecars"]
    prov = _version(sc["provisioner"]["image"]["tag"])
    assert prov[0] == 5, "external-provisioner v5.x (RBAC above is written for it)"
    assert _version(sc["nodeDriverRegistrar"]["image"]["tag"]) >= (2, 13, 0)
    assert _version(sc["livenessProbe"]["image"]["tag"]) >= (2, 15, 0)
    for s in ("provisioner", "nodeDriverRegistrar", "livenessProbe"):
        assert sc[s]["image"]["repository"].startswith("registry.k8s.io/sig-storage/")


def _coco_csi_help(sub: str) -> str:
    proc = subprocess.run(
        [console_script("coco-csi"), sub, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert proc.returncode == 0, f"coco-csi {sub} --help failed: {proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("sub", ["node", "controller"])
def test_rendered_flags_exist_in_the_coco_csi_cli(render, sub: str) -> None:
    help_text = _coco_csi_help(sub)
    flags: set[str] = set()
    for values in ({}, NODE_OPT_INS, CONFIDENTIAL_CONTROLLER, {"node": {"volumeMetrics": False}}):
        docs = render(values)
        workload = _node(docs) if sub == "node" else _controller(docs)
        flags |= {a.split("=", 1)[0] for a in container(workload, "coco-csi")["args"][1:]}
    missing = [f for f in sorted(flags) if f not in help_text]
    assert not missing, f"coco-csi {sub} does not know {missing}"


def test_docs_deploy_exists_and_names_the_chart() -> None:
    text = (REPO / "docs" / "deploy.md").read_text()
    assert "charts/coco-csi" in text and "runtimeClassName" in text
    assert Path(CHART_DIR / "values.schema.json").is_file()
