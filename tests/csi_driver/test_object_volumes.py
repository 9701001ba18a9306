"""Bucket prefixes as CSI volumes, end to end: a real ``coco-csi node`` process over real
gRPC, real FUSE mounts, an S3 volume on a moto server and an OSS volume on the
signature-checking OSS peer. Credentials are sealed (vault references resolved by the
offline KBS resources), the volume key derived from a KBS key resource per volume."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.volume_key import new_volume_key_jwk, parse_volume_key
from sealed_secrets.keys import generate_signing_key, public_jwk
from sealed_secrets.seal import seal_vault
from tests.csi_driver.conftest import cleanup_mounts
from tests.csi_driver.helpers import (
    object_node_argv,
    publish_request,
    restart_plugin,
    start_plugin,
    stop_plugins,
)
from tests.peers.moto_s3 import MotoS3
from tests.peers.oss_server import OssServer

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY_RESOURCE = KEY_PREFIX + "volume-root"
SIGNING_PREFIX = "kbs:///default/signing-key/"
SIGNING_KID = SIGNING_PREFIX + "obj-test"
OSS_AK, OSS_SK = "LTAI-e2e-ak-0001", "e2e-oss-secret-Q7w8e9r0"
S3_AK, S3_SK = "AKIAE2ETESTKEY00001", "e2e-s3-secret-P1o2i3u4"
OSS_BUCKET = "coco-e2e"
MARKERS = ("MarkerNameZebra", "MarkerBodyOkapi", "MarkerLinkQuokka", "MarkerXattrNarwhal")
RESOURCES = {
    "default/objcreds/oss-ak": OSS_AK.encode(),
    "default/objcreds/oss-sk": OSS_SK.encode(),
    "default/objcreds/oss-bad-sk": b"not-the-right-secret",
    "default/objcreds/s3-ak": S3_AK.encode(),
    "default/objcreds/s3-sk": S3_SK.encode(),
    "default/objcreds/enc-passwd": b"a tenant gocryptfs password",
    "default/objcreds/sts-ak": b"STS.e2e-ak-0002",
    "default/objcreds/sts-sk": b"e2e-sts-secret-Mn4b3v",
    "default/objcreds/sts-token": b"CAIS-e2e-token-Xy9+/=abc",
}


@dataclass
class Node:
    work: Path
    endpoint: str
    client: CsiClient
    moto: MotoS3
    oss: OssServer
    signing_key: object
    other_key: object
    procs: list = field(default_factory=list)  # type: ignore[type-arg]
    argv: list[str] = field(default_factory=list)
    root_key: bytes = b""  # the volume root key (the KBS key resource's 32 bytes)

    def seal(self, name: str, *, key: object | None = None, kid: str = SIGNING_KID) -> str:
        return seal_vault(
            f"kbs:///default/objcreds/{name}",
            "kbs",
            signing_key=key or self.signing_key,  # type: ignore[arg-type]
            signing_kid=kid,
        )

    def target(self, name: str) -> str:
        parent = self.work / "kubelet" / "pods" / name / "volumes"
        parent.mkdir(parents=True, exist_ok=True)
        return str(parent / "mount")

    def logs(self) -> bytes:
        blob = b""
        for dirpath, _dirs, files in os.walk(self.work):
            for name in files:
                if name.endswith(".log"):
                    blob += (Path(dirpath) / name).read_bytes()
        return blob


@contextlib.contextmanager
def object_node(*extra: str) -> Iterator[Node]:
    """A ``coco-csi node`` process (``extra`` added to its argv) with moto, the OSS peer
    and the offline KBS resources; everything stopped and removed on exit."""
    work = Path(tempfile.mkdtemp(prefix="objv", dir="/tmp"))
    sk = generate_signing_key(SIGNING_KID)
    other = generate_signing_key("kbs:///default/other/kid")
    root_jwk = new_volume_key_jwk()
    res = {
        **RESOURCES,
        "default/coco-csi/volume-root": root_jwk.encode(),
        "default/signing-key/obj-test": public_jwk(sk).export().encode(),
    }
    (work / "resources.json").write_text(
        json.dumps({k: base64.b64encode(v).decode() for k, v in res.items()})
    )
    (work / "kubelet").mkdir()
    moto = MotoS3()
    oss = OssServer()
    oss.__enter__()
    oss.add_credentials(OSS_AK, OSS_SK)
    oss.add_credentials("STS.e2e-ak-0002", "e2e-sts-secret-Mn4b3v", "CAIS-e2e-token-Xy9+/=abc")
    oss.create_bucket(OSS_BUCKET)
    sock = str(work / "node.sock")
    argv = object_node_argv(work, sock, "obj-node", KEY_PREFIX, SIGNING_PREFIX, *extra)
    n = Node(work, f"unix://{sock}", None, moto, oss, sk, other)  # type: ignore[arg-type]
    n.root_key = parse_volume_key(root_jwk.encode())
    try:
        n.argv = argv
        n.procs.append(start_plugin(argv, sock, str(work / "node.log")))
        n.client = CsiClient(n.endpoint)
        yield n
    finally:
        if n.client is not None:
            n.client.close()
        stop_plugins(n.procs)
        cleanup_mounts(str(work))
        oss.__exit__(None, None, None)
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with object_node() as n:
        yield n


def volume(node: Node, kind: str, path: str, **extra: str) -> tuple[dict[str, str], dict[str, str]]:
    """(volume_context, secrets) as a StorageClass + its node-publish secret would give."""
    if kind == "oss":
        ctx = {
            "bucket": OSS_BUCKET,
            "path": path,
            "url": node.oss.endpoint,
            "region": "cn-hangzhou",
            "encrypted": "gocryptfs",
            "keyResource": KEY_RESOURCE,
        }
        secrets = {"akId": node.seal("oss-ak"), "akSecret": node.seal("oss-sk")}
    else:
        bucket = getattr(node, "_s3_bucket", None) or node.moto.new_bucket("e2e")
        node._s3_bucket = bucket  # type: ignore[attr-defined]
        ctx = {
            "objectStore": "s3",
            "bucket": bucket,
            "prefix": path,
            "endpoint": node.moto.url,
            "keyResource": KEY_RESOURCE,
        }
        secrets = {"accessKeyId": node.seal("s3-ak"), "secretAccessKey": node.seal("s3-sk")}
    for k, v in extra.items():
        if v == "":
            ctx.pop(k, None)
            secrets.pop(k, None)
        elif k in secrets:
            secrets[k] = v
        else:
            ctx[k] = v
    return ctx, secrets


def publish(
    node: Node, vid: str, target: str, ctx: dict[str, str], secrets: dict[str, str]
) -> None:
    node.client.node.NodePublishVolume(
        publish_request(None, target, volume_id=vid, context=ctx, secrets=secrets),
        timeout=120,
    )


def unpublish(node: Node, vid: str, target: str) -> None:
    node.client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target), timeout=60
    )


def bucket_blobs(node: Node, kind: str, ctx: dict[str, str]) -> list[bytes]:
    """Every key, metadata value and body in the volume's bucket."""
    out: list[bytes] = []
    if kind == "oss":
        for key, obj in node.oss.objects(OSS_BUCKET).items():
            out += [key.encode(), obj.data, *(f"{k}={v}".encode() for k, v in obj.meta.items())]
    else:
        for key, obj in node.moto.objects(ctx["bucket"]).items():
            out += [
                key.encode(),
                obj["body"],
                *(f"{k}={v}".encode() for k, v in obj["meta"].items()),
            ]
    return out


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_publish_write_unpublish_republish_intact(node: Node, kind: str) -> None:
    vid = f"pvc-{kind}-e2e"
    ctx, secrets = volume(node, kind, f"vols/{vid}")
    t1 = node.target(f"{kind}-a")
    publish(node, vid, t1, ctx, secrets)
    root = Path(t1)
    (root / MARKERS[0]).mkdir()
    (root / MARKERS[0] / "data.bin").write_bytes((MARKERS[1] + "\n").encode() * 5000)
    os.symlink(MARKERS[2], root / "link")
    with pytest.raises(OSError) as info:
        os.setxattr(root / "link", "user.test", MARKERS[3].encode(), follow_symlinks=False)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.EPERM)
    publish(node, vid, t1, ctx, secrets)  # idempotent
    state = json.loads((node.work / "state" / "node-state.json").read_text())
    pids = [p["pid"] for p in state["publications"] if p["target_path"] == t1]
    assert pids and pids[0] > 0
    for what in ("cmdline", "environ"):  # the daemon got its credentials on stdin only
        seen = Path(f"/proc/{pids[0]}/{what}").read_bytes()
        assert OSS_SK.encode() not in seen and S3_SK.encode() not in seen
        assert OSS_AK.encode() not in seen and S3_AK.encode() not in seen
    stats = node.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=t1)
    )
    assert stats.usage and stats.usage[0].total > 0
    unpublish(node, vid, t1)
    assert not os.path.exists(t1)

    t2 = node.target(f"{kind}-b")
    publish(node, vid, t2, ctx, secrets)  # the prefix holds a volume: mounted, not re-initialised
    root = Path(t2)
    assert (root / MARKERS[0] / "data.bin").read_bytes() == (MARKERS[1] + "\n").encode() * 5000
    assert os.readlink(root / "link") == MARKERS[2]
    unpublish(node, vid, t2)
    unpublish(node, vid, t2)  # idempotent

    blobs = bucket_blobs(node, kind, ctx)
    assert any(b.endswith(b"gocryptfs.conf") for b in blobs)
    for marker in MARKERS:
        assert not any(marker.encode() in b for b in blobs), marker
    logs = node.logs()
    for secret in (OSS_SK, S3_SK, *MARKERS):
        assert secret.encode() not in logs, secret


def test_cdh_spec_with_sealed_encpasswd(node: Node) -> None:
    """CDH's alibaba-cloud-oss option names unchanged, encPasswd as the gocryptfs password."""
    ctx, secrets = volume(node, "oss", "cdh/vol", keyResource="", otherOpts="-o allow_other")
    ctx["encPasswd"] = node.seal("enc-passwd")
    t = node.target("cdh")
    publish(node, "pvc-cdh", t, ctx, secrets)
    Path(t, "f").write_text("cdh")
    unpublish(node, "pvc-cdh", t)
    publish(node, "pvc-cdh", t, ctx, secrets)
    assert Path(t, "f").read_text() == "cdh"
    unpublish(node, "pvc-cdh", t)


def expect(node: Node, code: grpc.StatusCode, vid: str, ctx: dict, secrets: dict) -> str:  # type: ignore[type-arg]
    t = node.target(f"err-{vid}")
    with pytest.raises(grpc.RpcError) as info:
        publish(node, vid, t, ctx, secrets)
    assert info.value.code() == code, info.value.details()
    assert not os.path.ismount(t)
    details = info.value.details() or ""
    for secret in (OSS_SK, S3_SK, "not-the-right-secret"):
        assert secret not in details
    return details


def test_refusals_have_csi_codes(node: Node) -> None:
    inv, denied = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED
    ctx, secrets = volume(node, "oss", "err/absent", akSecret="")
    expect(node, inv, "e1", ctx, secrets)  # absent secret
    ctx, secrets = volume(node, "oss", "err/plain", akSecret=OSS_SK)
    expect(node, inv, "e2", ctx, secrets)  # plaintext without the operator's opt-in
    bad_sig = node.seal("oss-sk", key=node.other_key, kid="kbs:///default/other/kid")
    ctx, secrets = volume(node, "oss", "err/kid", akSecret=bad_sig)
    expect(node, denied, "e3", ctx, secrets)  # signed with a key this node does not allow
    ctx, secrets = volume(node, "oss", "err/wrong", akSecret=node.seal("oss-bad-sk"))
    expect(node, denied, "e4", ctx, secrets)  # the store refuses the unsealed credential
    ctx, secrets = volume(node, "oss", "err/ep", url="https://evil.example.com")
    expect(node, denied, "e5", ctx, secrets)  # endpoint not allowed by the node
    ctx, secrets = volume(node, "oss", "err/down", url="http://127.0.0.1:9")
    expect(node, grpc.StatusCode.UNAVAILABLE, "e6", ctx, secrets)
    ctx, secrets = volume(node, "s3", "err/nokey", keyResource="")
    expect(node, inv, "e7", ctx, secrets)  # no key source


def test_prefix_with_data_but_no_conf_is_not_reinitialised(node: Node) -> None:
    ctx, secrets = volume(node, "oss", "taken/vol")
    with node.oss.state.lock:
        from tests.peers.oss_server import StoredObject

        node.oss.objects(OSS_BUCKET)["taken/vol/somebodys-data"] = StoredObject(
            b"x", {}, "application/octet-stream", "0" * 32, 0.0
        )
    details = expect(node, grpc.StatusCode.FAILED_PRECONDITION, "taken", ctx, secrets)
    assert "not re-initialised" in details
    assert "taken/vol/gocryptfs.conf" not in node.oss.objects(OSS_BUCKET)


def test_inline_ephemeral_names_a_bucket(node: Node) -> None:
    """Two pods' inline volumes (different volume ids) on one prefix see the same data."""
    ctx, secrets = volume(node, "s3", "inline/shared")
    ctx["csi.storage.k8s.io/ephemeral"] = "true"
    t1 = node.target("eph1")
    publish(node, "csi-eph-pod1", t1, ctx, secrets)
    Path(t1, "scratch").write_text("kept in the bucket")
    unpublish(node, "csi-eph-pod1", t1)
    t2 = node.target("eph2")
    publish(node, "csi-eph-pod2", t2, ctx, secrets)
    assert Path(t2, "scratch").read_text() == "kept in the bucket"
    unpublish(node, "csi-eph-pod2", t2)


def test_controller_allocates_a_prefix_node_initialises_delete_keeps_data(node: Node) -> None:
    """CreateVolume (outside the TEE) only names a prefix; the first publish initialises it
    in the guest; DeleteVolume forgets the record and leaves the objects."""
    from csi_driver.core.controller import LocalBackend
    from tests.csi_driver.helpers import plain_capability

    ctrl = LocalBackend(str(node.work / "ctrl"))
    params = {
        "bucket": OSS_BUCKET,
        "path": "pvcs",
        "url": node.oss.endpoint,
        "region": "cn-hangzhou",
        "encrypted": "gocryptfs",
        "keyResource": KEY_RESOURCE,
        "akId": node.seal("oss-ak"),  # sealed values may sit in the StorageClass
        "csi.storage.k8s.io/node-publish-secret-name": "oss-creds",
    }
    before = set(node.oss.objects(OSS_BUCKET))
    rec, ctx = ctrl.create("pvc-ctrl", [plain_capability()], params)
    assert ctx["path"] == f"pvcs/{rec.volume_id}" and "cipherDir" not in ctx
    assert set(node.oss.objects(OSS_BUCKET)) == before  # no bucket I/O in the controller
    assert ctrl.create("pvc-ctrl", [plain_capability()], params)[0] == rec  # idempotent
    t = node.target("ctrl")
    publish(node, rec.volume_id, t, ctx, {"akSecret": node.seal("oss-sk")})
    Path(t, "kept").write_text("after delete")
    unpublish(node, rec.volume_id, t)
    ctrl.delete(rec.volume_id)
    ctrl.delete(rec.volume_id)  # idempotent
    assert f"pvcs/{rec.volume_id}/gocryptfs.conf" in node.oss.objects(OSS_BUCKET)


def test_controller_refuses_plaintext_credentials_and_unknown_parameters(tmp_path: Path) -> None:
    from csi_driver import errors
    from csi_driver.core.controller import LocalBackend
    from tests.csi_driver.helpers import plain_capability

    ctrl = LocalBackend(str(tmp_path / "ctrl"))
    base = {"bucket": "b-1", "url": "https://oss-cn-hangzhou.aliyuncs.com"}
    for bad in ({"akSecret": "plain"}, {"encPasswd": "plain"}, {"cipherDir": "/x"}, {"bogus": "1"}):
        with pytest.raises(errors.InvalidArgument) as info:
            ctrl.create("v", [plain_capability()], {**base, **bad})
        assert "plain" not in str(info.value).replace("plaintext", "")
    with pytest.raises(errors.InvalidArgument):
        ctrl.create("v", [plain_capability()], {"objectStore": "s3"})  # no bucket


def _daemon_pid(node: Node, target: str) -> int:
    state = json.loads((node.work / "state" / "node-state.json").read_text())
    return next(p["pid"] for p in state["publications"] if p["target_path"] == target)


def test_sts_credentials_and_a_readonly_volume(node: Node) -> None:
    """STS credentials (securityToken, sealed) sign every request; readonly: true in the
    attributes mounts read-only (EROFS), and is the same publish on a retry."""
    ctx, _ = volume(node, "oss", "sts/vol")
    secrets = {
        "akId": node.seal("sts-ak"),
        "akSecret": node.seal("sts-sk"),
        "securityToken": node.seal("sts-token"),
    }
    t = node.target("sts")
    publish(node, "pvc-sts", t, ctx, secrets)
    Path(t, "f").write_text("via sts")
    unpublish(node, "pvc-sts", t)
    ro = {**ctx, "readonly": "true"}
    publish(node, "pvc-sts", t, ro, secrets)
    publish(node, "pvc-sts", t, ro, secrets)  # idempotent with the attribute's readonly
    assert Path(t, "f").read_text() == "via sts"
    with pytest.raises(OSError) as info:
        Path(t, "g").write_text("no")
    assert info.value.errno == errno.EROFS
    unpublish(node, "pvc-sts", t)
    assert "CAIS-e2e-token" not in node.logs().decode("utf-8", "replace")


def test_two_volume_ids_cannot_write_one_prefix(node: Node) -> None:
    ctx, secrets = volume(node, "oss", "shared/vol")
    t = node.target("share1")
    publish(node, "pvc-share-a", t, ctx, secrets)
    try:
        details = expect(node, grpc.StatusCode.FAILED_PRECONDITION, "pvc-share-b", ctx, secrets)
        assert "already published" in details
    finally:
        unpublish(node, "pvc-share-a", t)


def test_daemon_crash_is_restarted_with_the_key_in_memory(node: Node) -> None:
    import signal
    import time

    ctx, secrets = volume(node, "s3", "crash/vol")
    t = node.target("crash")
    publish(node, "pvc-crash", t, ctx, secrets)
    Path(t, "f").write_text("survives")
    old = _daemon_pid(node, t)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            if _daemon_pid(node, t) != old and Path(t, "f").read_text() == "survives":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "daemon not restarted"
        time.sleep(0.2)
    unpublish(node, "pvc-crash", t)


def test_plugin_restart_adopts_the_mount(node: Node) -> None:
    """Last in the module: restarts the node plugin process."""
    ctx, secrets = volume(node, "oss", "restart/vol")
    t = node.target("restart")
    publish(node, "pvc-restart", t, ctx, secrets)
    Path(t, "f").write_text("adopted")
    node.client.close()
    node.client = restart_plugin(node.procs, node.argv, node.work)
    assert Path(t, "f").read_text() == "adopted"  # the daemon outlived the plugin
    publish(node, "pvc-restart", t, ctx, secrets)  # idempotent on the adopted mount
    unpublish(node, "pvc-restart", t)
    assert not os.path.exists(t)
