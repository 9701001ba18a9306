"""The upstream CSI conformance suite, csi-sanity, against the real `coco-csi` processes.

`../shared/tools/csi-sanity` (from the repository root) is a static linux/amd64 build of
kubernetes-csi/csi-test's `cmd/csi-sanity` (commit and build line in shared/tools/README.md).
It runs against the plugins exactly as a CO would reach them, on unix sockets:

* ``combined``: one `coco-csi node --with-controller` process. csi-sanity runs its node
  lifecycle specs (create → publish → stats → unpublish → delete, once and ten times) only
  when the ``--csi.endpoint`` also advertises CONTROLLER_SERVICE, so this layout is the one
  that exercises real FUSE mounts end to end; run with the default mounter and with gocryptfs.
* ``separate``: `coco-csi node` and `coco-csi controller` as two processes
  (``--csi.endpoint`` + ``--csi.controllerendpoint``), the production layout; its Identity
  specs are also run against the controller's socket.

Volumes are keyed through an offline-fs resolver: ``--csi.testvolumeparameters`` carries
``keyResource: kbs:///…`` to CreateVolume, and the node derives each volume's key from it.

The JSON report is parsed: no spec may fail, and every skipped spec must be one whose
capability the plugin does not advertise (checked against what the plugin answers, by skip
reason); anything else fails the test, so a new upstream skip has to be looked at.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.volume_key import new_volume_key_jwk
from fuse_crypt import mounttable

from .conftest import KEY_PREFIX, KEY_RESOURCE, cleanup_mounts
from .helpers import COCO_CSI, start_plugin, stop_plugins

REPO = Path(__file__).resolve().parents[2]
# Beside the clone (CI); COCO_CSI_SANITY overrides it (a git worktree elsewhere, say).
SANITY = Path(os.environ.get("COCO_CSI_SANITY") or REPO.parent / "shared/tools/csi-sanity")
TEST_VOLUME_SIZE = 64 << 20  # csi-sanity's default 10 GiB would depend on the disk's free space

CtrlRPC = csi_pb2.ControllerServiceCapability.RPC.Type
NodeRPC = csi_pb2.NodeServiceCapability.RPC.Type
Service = csi_pb2.PluginCapability.Service.Type

FAILED_STATES = {"failed", "panicked", "interrupted", "aborted", "timedout"}
LIFECYCLE = ("Node Service | should work", "Node Service | should be idempotent")


def _sanity_missing() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "amd64"):
        return (
            f"csi-sanity is a linux/amd64 build; this is {platform.system()}/{platform.machine()}"
        )
    if not os.access(SANITY, os.X_OK):
        return f"csi-sanity not found at {SANITY} (see shared/tools/README.md)"
    return None


needs_sanity = pytest.mark.skipif(_sanity_missing() is not None, reason=str(_sanity_missing()))


@dataclass(frozen=True)
class Advertised:
    """What the plugin advertises to csi-sanity."""

    services: frozenset[int]  # GetPluginCapabilities at --csi.endpoint
    controller: frozenset[int]  # ControllerGetCapabilities at the controller endpoint
    node: frozenset[int]  # NodeGetCapabilities


def _lacks_ctrl(*caps: int) -> Callable[[Advertised], bool]:
    return lambda a: not set(caps) & a.controller


def _lacks_node(cap: int) -> Callable[[Advertised], bool]:
    return lambda a: cap not in a.node


# Every skip message csi-sanity gives for a missing capability, and the check that the plugin
# really does not advertise it. A skip not listed here fails the test.
SKIP_REASONS: dict[str, Callable[[Advertised], bool]] = {
    "Controller Service not provided: CreateVolume not supported": (
        lambda a: Service.CONTROLLER_SERVICE not in a.services
    ),
    "CreateVolume not supported": _lacks_ctrl(CtrlRPC.CREATE_DELETE_VOLUME),
    "GetCapacity not supported": _lacks_ctrl(CtrlRPC.GET_CAPACITY),
    "ListVolumes not supported": _lacks_ctrl(CtrlRPC.LIST_VOLUMES),
    "ControllerPublishVolume not supported": _lacks_ctrl(CtrlRPC.PUBLISH_UNPUBLISH_VOLUME),
    "ControllerUnpublishVolume not supported": _lacks_ctrl(CtrlRPC.PUBLISH_UNPUBLISH_VOLUME),
    "Controller Publish, UnpublishVolume not supported": _lacks_ctrl(
        CtrlRPC.PUBLISH_UNPUBLISH_VOLUME
    ),
    "Snapshot not supported": _lacks_ctrl(CtrlRPC.CREATE_DELETE_SNAPSHOT),
    "CreateSnapshot not supported": _lacks_ctrl(CtrlRPC.CREATE_DELETE_SNAPSHOT),
    "DeleteSnapshot not supported": _lacks_ctrl(CtrlRPC.CREATE_DELETE_SNAPSHOT),
    "ListSnapshots not supported": _lacks_ctrl(CtrlRPC.LIST_SNAPSHOTS),
    "GetSnapshot not supported": _lacks_ctrl(CtrlRPC.GET_SNAPSHOT),
    "Volume Cloning not supported": _lacks_ctrl(CtrlRPC.CLONE_VOLUME),
    "ControllerExpandVolume not supported": _lacks_ctrl(CtrlRPC.EXPAND_VOLUME),
    "Modify volume not supported": _lacks_ctrl(CtrlRPC.MODIFY_VOLUME),
    "Modify Volume not supported": _lacks_ctrl(CtrlRPC.MODIFY_VOLUME),
    "ControllerModifyVolume not supported": _lacks_ctrl(CtrlRPC.MODIFY_VOLUME),
    "GroupControllerService not supported": (
        lambda a: Service.GROUP_CONTROLLER_SERVICE not in a.services
    ),
    "NodeStageVolume not supported": _lacks_node(NodeRPC.STAGE_UNSTAGE_VOLUME),
    "NodeUnstageVolume not supported": _lacks_node(NodeRPC.STAGE_UNSTAGE_VOLUME),
    "NodeExpandVolume not supported": _lacks_node(NodeRPC.EXPAND_VOLUME),
    "NodeGetVolume not supported": _lacks_node(NodeRPC.GET_VOLUME_STATS),
    # csi-sanity needs the capability on both the node and the controller.
    "Service does not have single node multi writer capability": (
        lambda a: (
            NodeRPC.SINGLE_NODE_MULTI_WRITER not in a.node
            or CtrlRPC.SINGLE_NODE_MULTI_WRITER not in a.controller
        )
    ),
}


@dataclass
class Deployment:
    """Running plugin processes and the paths csi-sanity is given."""

    work: Path
    endpoint: str
    controller_endpoint: str | None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def kubelet(self) -> Path:
        """The kubelet root: csi-sanity's mount and staging dirs lie below it."""
        return self.work / "kubelet"

    def advertised(self) -> Advertised:
        ctrl_ep = self.controller_endpoint or self.endpoint
        with CsiClient(self.endpoint) as c, CsiClient(ctrl_ep) as cc:
            plugin = c.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
            ctrl = cc.controller.ControllerGetCapabilities(
                csi_pb2.ControllerGetCapabilitiesRequest()
            )
            node = c.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
        return Advertised(
            frozenset(x.service.type for x in plugin.capabilities if x.HasField("service")),
            frozenset(x.rpc.type for x in ctrl.capabilities),
            frozenset(x.rpc.type for x in node.capabilities),
        )


def _node_policy_flags(kubelet: Path, backend: Path) -> list[str]:
    """Node flags that bound what the control plane may ask for, set as a deployment sets
    them: target paths under ``kubelet`` (csi-sanity's mount dir lies there), cipher dirs
    under ``backend``, key resources allowed."""
    return [
        "--kubelet-dir",
        str(kubelet),
        "--cipher-dir-root",
        str(backend),
        "--allowed-key-resource",
        KEY_PREFIX,
    ]


def _node_argv(work: Path, sock: str, mounter: str) -> list[str]:
    return [
        COCO_CSI,
        "node",
        "--endpoint",
        f"unix://{sock}",
        "--node-id",
        "sanity-node",
        "--resolver",
        f"offline-fs:{work / 'resources.json'}",
        "--state-dir",
        str(work / "state"),
        "--mounter",
        mounter,
        "--unmount-on-exit",
        *_node_policy_flags(work / "kubelet", work / "backend"),
    ]


@pytest.fixture(
    params=["combined/fuse-crypt-prefork", "combined/gocryptfs", "separate/fuse-crypt-prefork"]
)
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    layout, mounter = request.param.split("/")
    work = Path(tempfile.mkdtemp(prefix="csisan", dir="/tmp"))  # short: socket paths
    root_key = base64.b64encode(new_volume_key_jwk().encode()).decode()
    (work / "resources.json").write_text(json.dumps({KEY_RESOURCE[len("kbs:///") :]: root_key}))
    (work / "params.yaml").write_text(f'keyResource: "{KEY_RESOURCE}"\n')
    backend = str(work / "backend")
    os.mkdir(backend)  # exists before the node starts, as a deployment's storage would
    node_sock, ctrl_sock = str(work / "node.sock"), str(work / "ctrl.sock")
    node_argv = _node_argv(work, node_sock, mounter)
    dep = Deployment(work, f"unix://{node_sock}", None)
    try:
        if layout == "combined":
            argv = [*node_argv, "--with-controller", "--backend-root", backend]
            dep.procs.append(start_plugin(argv, node_sock, str(work / "node.log")))
        else:
            dep.controller_endpoint = f"unix://{ctrl_sock}"
            dep.procs.append(start_plugin(node_argv, node_sock, str(work / "node.log")))
            ctrl_argv = [COCO_CSI, "controller", "--endpoint", dep.controller_endpoint]
            ctrl_argv += ["--backend-root", backend]
            dep.procs.append(start_plugin(ctrl_argv, ctrl_sock, str(work / "ctrl.log")))
        yield dep
    finally:
        stop_plugins(dep.procs)
        cleanup_mounts(str(work))
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class SanityRun:
    seconds: float
    specs: list[dict]  # ginkgo SpecReports

    def name(self, spec: dict) -> str:
        return " / ".join(spec["ContainerHierarchyTexts"]) + " | " + spec["LeafNodeText"]

    def states(self) -> Counter[str]:
        return Counter(s["State"] for s in self.specs)

    def with_state(self, *states: str) -> list[dict]:
        return [s for s in self.specs if s["State"] in states]

    def skip_reasons(self) -> Counter[str]:
        """Why csi-sanity skipped each spec ("" for specs a focus filtered out)."""
        return Counter(
            (s.get("Failure") or {}).get("Message", "") for s in self.with_state("skipped")
        )

    def summary(self) -> str:
        st = self.states()
        lines = [
            f"csi-sanity: {st['passed']} passed, {sum(st[x] for x in FAILED_STATES)} failed, "
            f"{st['skipped']} skipped, {st['pending']} pending in {self.seconds:.1f} s"
        ]
        lines += [f"  skipped {n:2d}: {why}" for why, n in sorted(self.skip_reasons().items())]
        lines += [
            f"  FAILED: {self.name(s)}: {(s.get('Failure') or {}).get('Message', '')[:300]}"
            for s in self.with_state(*FAILED_STATES)
        ]
        return "\n".join(lines)


def run_sanity(dep: Deployment, name: str, *extra: str, endpoint: str | None = None) -> SanityRun:
    """Run csi-sanity against ``endpoint`` (default: the deployment's, with its controller
    endpoint if separate), parse its JSON report, print a summary, require success."""
    report = dep.work / f"report-{name}.json"
    argv = [str(SANITY), "--csi.endpoint", endpoint or dep.endpoint]
    if endpoint is None and dep.controller_endpoint:
        argv += ["--csi.controllerendpoint", dep.controller_endpoint]
    # csi-sanity creates the mount and staging dirs, but not their parents (like kubelet).
    mount_dir, staging_dir = dep.kubelet / "pods/sanity/mount", dep.kubelet / "plugins/staging"
    for d in (mount_dir, staging_dir):
        d.parent.mkdir(parents=True, exist_ok=True)
    argv += [
        "--csi.mountdir",
        str(mount_dir),
        "--csi.stagingdir",
        str(staging_dir),
        "--csi.testvolumeparameters",
        str(dep.work / "params.yaml"),
        "--csi.testvolumesize",
        str(TEST_VOLUME_SIZE),
        "--ginkgo.no-color",
        "--ginkgo.timeout",
        "4m",
        "--ginkgo.json-report",
        str(report),
        *extra,
    ]
    start = time.monotonic()
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=dep.work)
    seconds = time.monotonic() - start
    assert report.exists(), f"no report (exit {res.returncode}):\n{res.stdout[-4000:]}"
    (suite,) = json.loads(report.read_text())
    run = SanityRun(seconds, suite["SpecReports"])
    print(f"[{name}] {run.summary()}")
    assert res.returncode == 0 and suite["SuiteSucceeded"], (
        run.summary() + "\n" + res.stdout[-6000:]
    )
    assert not run.with_state(*FAILED_STATES), run.summary()
    return run


def _check_skips(run: SanityRun, adv: Advertised) -> None:
    unexplained = {
        why: n
        for why, n in run.skip_reasons().items()
        if why not in SKIP_REASONS or not SKIP_REASONS[why](adv)
    }
    assert not unexplained, f"skips not explained by an unadvertised capability: {unexplained}"


def _leaves_nothing_behind(dep: Deployment) -> None:
    """csi-sanity's cleanup (NodeUnpublish + DeleteVolume) must leave no mount and no volume."""
    mounts = [m for m in mounttable.mounts_by_point() if m.startswith(str(dep.work) + "/")]
    assert mounts == []
    backend = dep.work / "backend"
    assert sorted(p.name for p in backend.iterdir()) == [".coco-csi"]
    index = json.loads((backend / ".coco-csi" / "volumes.json").read_text())
    assert index["volumes"] == []


@needs_sanity
def test_csi_sanity(deployment: Deployment) -> None:
    adv = deployment.advertised()
    run = run_sanity(deployment, "all")
    _check_skips(run, adv)
    passed = {run.name(s) for s in run.with_state("passed")}
    if deployment.controller_endpoint is None:
        # The point of the combined mode: the node lifecycle specs ran, with real mounts.
        assert Service.CONTROLLER_SERVICE in adv.services
        assert set(LIFECYCLE) <= passed, run.summary()
    else:
        assert not set(LIFECYCLE) & passed
        # Upstream runs its Identity specs against --csi.endpoint only: the controller's too.
        ident = run_sanity(
            deployment,
            "identity-ctrl",
            "--ginkgo.focus",
            "Identity Service",
            endpoint=deployment.controller_endpoint,
        )
        assert ident.states()["passed"] == 3, ident.summary()
    _leaves_nothing_behind(deployment)


def test_unexplained_skips_fail() -> None:
    """The skip check itself: a skip for an advertised capability, or one it does not know,
    must fail the conformance test."""
    run = SanityRun(
        0.0, [{"State": "skipped", "Failure": {"Message": "NodeStageVolume not supported"}}]
    )
    _check_skips(run, Advertised(frozenset(), frozenset(), frozenset()))
    with pytest.raises(AssertionError, match="NodeStageVolume"):
        _check_skips(
            run, Advertised(frozenset(), frozenset(), frozenset({NodeRPC.STAGE_UNSTAGE_VOLUME}))
        )
    odd = SanityRun(
        0.0, [{"State": "skipped", "Failure": {"Message": "Required bytes not supported"}}]
    )
    with pytest.raises(AssertionError, match="Required bytes"):
        _check_skips(odd, Advertised(frozenset(), frozenset(), frozenset()))
