"""Fuzz the CSI request path: hostile ids, paths, volume_context and secrets.

The servicers run in-process (the same objects gRPC calls) with a real NodeCore, the real
sealed-secret resolver (offline-fs) and a fake mounter whose daemon "dies" at once, so every
request that passes validation walks locate → key → init → target → spawn → undo. Only CSI
status codes may come back: never an exception escaping the servicer, never the INTERNAL of
an unexpected crash (csi_rpc logs those as "unexpected failure"), and never a deleted file.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coco_proto import csi_pb2
from csi_driver.client import Mode, mount_capability
from csi_driver.controller import ControllerServicer
from csi_driver.core.controller import LocalBackend
from csi_driver.core.node import NodeCore
from csi_driver.deadline import Deadline
from csi_driver.keys import VolumeKey
from csi_driver.metrics import Metrics
from csi_driver.mounter import CONF_NAME, Mounter
from csi_driver.node import NodeServicer
from csi_driver.volume_key import new_volume_key_jwk
from tests.fuzzing import fuzz, long_fuzz

KEY_PREFIX = "kbs:///default/coco-csi/"
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.INTERNAL,  # only typed (MountError of the fake daemon); crashes are caught
}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class _Context:
    """What the servicers use of grpc.ServicerContext."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Abort(code, details)

    def time_remaining(self) -> float:
        return 5.0


class _DeadProc:
    pid = 2**22 + 1

    def poll(self) -> int:
        return 1

    def wait(self, timeout: float | None = None) -> int:
        return 1


class FakeMounter(Mounter):
    """Init writes a placeholder conf; the daemon exits at once (a typed MountError)."""

    name = "fake"
    fs_type = "fuse.fake"

    def _bin(self) -> str:
        return "/bin/true"

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        pathlib.Path(cipher_dir, CONF_NAME).write_bytes(b"{}")

    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ):
        return ["/bin/true"]

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        return b""

    def spawn(self, argv, stdin_data, log_path):
        return _DeadProc()


class _Crashes(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "unexpected failure":
            self.seen.append(str(getattr(record, "fields", {})))


class World:
    def __init__(self, root: str) -> None:
        self.root = root
        self.kubelet = os.path.join(root, "kubelet")
        self.backend_root = os.path.join(root, "backend")
        os.makedirs(os.path.join(self.kubelet, "pods"))
        res = os.path.join(root, "res.json")
        data = {
            "default/coco-csi/root": new_volume_key_jwk().encode(),
            "default/coco-csi/raw": os.urandom(32),
        }
        with open(res, "w", encoding="utf-8") as f:
            json.dump({k: base64.b64encode(v).decode() for k, v in data.items()}, f)
        from sealed_secrets.resolver import build_resolver

        self.backend = LocalBackend(self.backend_root)
        self.core = NodeCore(
            "fuzz-node",
            os.path.join(root, "state"),
            build_resolver(f"offline-fs:{res}"),
            mounter="fake",
            mounters={"fake": FakeMounter()},
            metrics=Metrics(),
            monitor_interval=30,
            kubelet_dir=self.kubelet,
            cipher_roots=[self.backend_root],
            allowed_key_resources=[KEY_PREFIX],
        )
        self.node = NodeServicer(self.core)
        self.ctrl = ControllerServicer(self.backend, Metrics())
        # Data that no request may ever delete: a pod's files and an existing volume.
        self.sentinels = [
            os.path.join(self.kubelet, "pods", "keep", "data.txt"),
            os.path.join(self.backend_root, "coco-keep", "gocryptfs.conf"),
            os.path.join(root, "outside", "data.txt"),
        ]
        for p in self.sentinels:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            pathlib.Path(p).write_bytes(b"keep")
        os.symlink(
            os.path.join(self.kubelet, "pods", "keep"), os.path.join(self.kubelet, "pods", "ln")
        )
        for name in ("coco-a", "coco-b"):
            os.makedirs(os.path.join(self.backend_root, name))
        self.crashes = _Crashes()
        logging.getLogger("csi_driver.rpc").addHandler(self.crashes)

    def close(self) -> None:
        logging.getLogger("csi_driver.rpc").removeHandler(self.crashes)
        self.core.shutdown()

    def call(self, method, request):
        try:
            method(request, _Context())
        except _Abort as exc:
            assert exc.code in ALLOWED, (exc.code, str(exc))
        assert not self.crashes.seen, self.crashes.seen
        for p in self.sentinels:
            assert pathlib.Path(p).read_bytes() == b"keep", p


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = tempfile.mkdtemp(prefix="csifuzz")
    w = World(root)
    try:
        yield w
    finally:
        w.close()
        shutil.rmtree(root, ignore_errors=True)


# -- strategies -----------------------------------------------------------------------------

_ID_CHARS = st.sampled_from(list("aZ09._-/\n\r\0 \\\u2028é~$") + [".."])
volume_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    st.sampled_from(["coco-keep", "volnl\n", "..", ".", "a/b", "x" * 129, "", "vol\0"]),
    st.lists(_ID_CHARS, max_size=12).map("".join),
    st.text(max_size=40),
)
_components = st.one_of(
    st.sampled_from(["pods", "keep", "ln", "..", ".", "", "mount", "volumes", "x\0y", "d" * 300]),
    st.text(min_size=1, max_size=12),
)


def _paths(world_kubelet: str) -> st.SearchStrategy[str]:
    rel = st.lists(_components, max_size=6).map("/".join)
    return st.one_of(
        rel.map(lambda r: f"{world_kubelet}/{r}"),
        rel.map(lambda r: f"{world_kubelet}/pods/{r}"),
        rel,
        rel.map(lambda r: "/" + r),
        st.sampled_from(["", "/", "/tmp", "pods", "\0", "/" + "a/" * 3000]),
        st.text(max_size=60),
    )


_ctx_keys = st.sampled_from(
    [
        "keyResource",
        "passphrase",
        "cipherDir",
        "csi.storage.k8s.io/ephemeral",
        "csi.storage.k8s.io/pod.name",
        "other",
    ]
)
_ctx_values = st.one_of(
    st.sampled_from(
        [
            KEY_PREFIX + "root",
            KEY_PREFIX + "raw",
            KEY_PREFIX + "../x",
            "kbs:///default/other/k",
            "kbs+evil:///a/b?x=1",
            "sealed.fakejwsheader.eyJ4IjoxfQ.sig",
            "sealed." + "A" * 3000,
            "true",
            "True",
            "/etc",
            "backend/x",
        ]
    ),
    st.text(max_size=40),
)


def _cipher_dirs(world: World) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(_components, max_size=3).map(lambda r: f"{world.backend_root}/" + "/".join(r)),
        st.sampled_from([f"{world.backend_root}/coco-{n}" for n in ("a", "b", "keep")]),
        st.just(world.backend_root),
        st.just(f"{world.kubelet}/pods/keep"),
    )


def _capability(data: st.DataObject, valid: bool = False) -> csi_pb2.VolumeCapability | None:
    if valid:
        return mount_capability(data.draw(st.sampled_from([1, 2, 3, 6, 7])))
    kind = data.draw(st.sampled_from(["mount", "block", "none", "unset"]))
    if kind == "unset":
        return None
    mode = data.draw(st.sampled_from(list(Mode.values())))
    cap = mount_capability(mode)
    if kind == "block":
        cap.ClearField("mount")
        cap.block.SetInParent()
    elif kind == "none":
        cap.ClearField("mount")
    return cap


@long_fuzz
@fuzz(quick=200)
@given(data=st.data())
def test_node_requests_only_return_csi_codes(world: World, data: st.DataObject) -> None:
    # Half the cases are well-formed up to the part under test, so they get deep (key,
    # init, target, spawn, undo); the rest are hostile everywhere.
    deep = data.draw(st.booleans())
    if deep:
        vid = data.draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
        leaf = data.draw(st.lists(_components, min_size=1, max_size=3).map("/".join))
        path = f"{world.kubelet}/pods/{leaf}"
    else:
        vid = data.draw(volume_ids)
        path = data.draw(_paths(world.kubelet))
    rpc = data.draw(st.sampled_from(["publish", "publish", "unpublish", "stats"]))
    if rpc == "publish":
        ctx = data.draw(st.dictionaries(_ctx_keys, _ctx_values, max_size=4))
        if deep or data.draw(st.booleans()):
            ctx["cipherDir"] = data.draw(_cipher_dirs(world))
        if deep and data.draw(st.booleans()):
            ctx["keyResource"] = KEY_PREFIX + "root"
        secrets = data.draw(st.dictionaries(_ctx_keys, _ctx_values, max_size=2))
        req = csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            target_path=path,
            readonly=data.draw(st.booleans()),
            volume_context=ctx,
            secrets=secrets,
        )
        cap = _capability(data, valid=deep)
        if cap is not None:
            req.volume_capability.CopyFrom(cap)
        world.call(world.node.NodePublishVolume, req)
    elif rpc == "unpublish":
        req2 = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=path)
        world.call(world.node.NodeUnpublishVolume, req2)
    else:
        req3 = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=path)
        world.call(world.node.NodeGetVolumeStats, req3)
    assert world.core.publications() == []  # the fake daemon never comes up


@long_fuzz
@fuzz(quick=100)
@given(data=st.data())
def test_create_volume_requests_only_return_csi_codes(world: World, data: st.DataObject) -> None:
    params = data.draw(st.dictionaries(_ctx_keys, _ctx_values, max_size=3))
    req = csi_pb2.CreateVolumeRequest(
        name=data.draw(st.one_of(volume_ids, st.text(max_size=1100))),
        parameters=params,
    )
    caps = data.draw(st.lists(st.just(None), max_size=2))
    for _ in caps:
        cap = _capability(data)
        if cap is not None:
            req.volume_capabilities.append(cap)
    req.capacity_range.required_bytes = data.draw(st.integers(-(2**63), 2**63 - 1))
    req.capacity_range.limit_bytes = data.draw(st.integers(-(2**63), 2**63 - 1))
    ctx = _Context()
    try:
        resp = world.ctrl.CreateVolume(req, ctx)
    except _Abort as exc:
        assert exc.code in ALLOWED, (exc.code, str(exc))
    else:  # keep the index small: delete what was made
        world.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=resp.volume.volume_id), ctx)
    assert not world.crashes.seen, world.crashes.seen
    vid = data.draw(volume_ids)
    try:
        world.ctrl.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid), ctx)
    except _Abort as exc:
        assert exc.code in ALLOWED, (exc.code, str(exc))
    assert not world.crashes.seen, world.crashes.seen
    for p in world.sentinels:
        assert pathlib.Path(p).read_bytes() == b"keep", p
