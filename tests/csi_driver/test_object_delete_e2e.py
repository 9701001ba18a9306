"""DeleteVolume of object-store volumes end to end: real ``coco-csi controller`` and
``coco-csi node`` processes over gRPC on unix sockets, an S3 volume on a moto server and an
OSS volume on the signature-checking OSS peer (over TLS, its CA pinned with
``--object-ca-bundle``). The controller is configured like the node (same resolver, same
``--allowed-*`` flags), as a confidential controller pod would be.

A volume is created by the controller, published and written by the node (real FUSE),
filled past one listing page, surrounded by objects that must survive (the class root's,
a sibling volume whose id extends this one's), then deleted: the prefix is empty, the
neighbours are intact, and a second DeleteVolume is OK.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.volume_key import new_volume_key_jwk
from sealed_secrets.keys import generate_signing_key, public_jwk
from sealed_secrets.seal import seal_vault
from tests.csi_driver.conftest import cleanup_mounts
from tests.csi_driver.helpers import (
    COCO_CSI,
    object_controller_argv,
    object_node_argv,
    start_plugin,
    stop_plugins,
)
from tests.peers.moto_s3 import MotoS3
from tests.peers.oss_server import OssServer, StoredObject

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY_RESOURCE = KEY_PREFIX + "volume-root"
SIGNING_PREFIX = "kbs:///default/signing-key/"
SIGNING_KID = SIGNING_PREFIX + "del-e2e"
OSS_AK, OSS_SK = "LTAI-del-e2e-ak-01", "del-e2e-oss-secret-W3e4"
S3_AK, S3_SK = "AKIADELE2ETESTKEY01", "del-e2e-s3-secret-R5t6"
OSS_BUCKET = "coco-del-e2e"
PASSPHRASE = "del-e2e passphrase Vb7n"
FILLER = 1100  # more than one 1,000-key listing page and one DeleteObjects batch


@dataclass
class Env:
    work: Path
    moto: MotoS3
    oss: OssServer
    signing_key: Any
    node: CsiClient | None = None
    ctrl: CsiClient | None = None
    procs: list[Any] = field(default_factory=list)
    s3_bucket: str = ""

    def seal(self, name: str) -> str:
        return seal_vault(
            f"kbs:///default/objcreds/{name}",
            "kbs",
            signing_key=self.signing_key,
            signing_kid=SIGNING_KID,
        )

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.work.glob("*.log"))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    work = Path(tempfile.mkdtemp(prefix="objdel", dir="/tmp"))
    sk = generate_signing_key(SIGNING_KID)
    res = {
        "default/objcreds/oss-ak": OSS_AK.encode(),
        "default/objcreds/oss-sk": OSS_SK.encode(),
        "default/objcreds/s3-ak": S3_AK.encode(),
        "default/objcreds/s3-sk": S3_SK.encode(),
        "default/objcreds/pass": PASSPHRASE.encode(),
        "default/coco-csi/volume-root": new_volume_key_jwk().encode(),
        "default/signing-key/del-e2e": public_jwk(sk).export().encode(),
    }
    (work / "resources.json").write_text(
        json.dumps({k: base64.b64encode(v).decode() for k, v in res.items()})
    )
    (work / "kubelet").mkdir()
    (work / "tls").mkdir()
    try:
        moto = MotoS3()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        oss = OssServer(tls_dir=str(work / "tls"))
        oss.__enter__()
    except BaseException:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
        raise
    oss.add_credentials(OSS_AK, OSS_SK)
    oss.create_bucket(OSS_BUCKET)
    assert oss.ca_path is not None
    e = Env(work, moto, oss, sk)
    try:
        e.s3_bucket = moto.new_bucket("del")
        node_sock, ctrl_sock = str(work / "node.sock"), str(work / "ctrl.sock")
        ca = ("--object-ca-bundle", oss.ca_path)
        node_argv = object_node_argv(work, node_sock, "del-node", KEY_PREFIX, SIGNING_PREFIX, *ca)
        ctrl_argv = object_controller_argv(work, ctrl_sock, SIGNING_PREFIX, *ca)
        e.procs.append(start_plugin(node_argv, node_sock, str(work / "node.log")))
        e.procs.append(start_plugin(ctrl_argv, ctrl_sock, str(work / "ctrl.log")))
        e.node = CsiClient(f"unix://{node_sock}")
        e.ctrl = CsiClient(f"unix://{ctrl_sock}")
        yield e
    finally:
        for c in (e.node, e.ctrl):
            if c is not None:
                c.close()
        stop_plugins(e.procs)
        cleanup_mounts(str(work))
        oss.__exit__(None, None, None)
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


def klass(e: Env, kind: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(StorageClass parameters, provisioner secret, node-publish secret)."""
    if kind == "oss":  # CDH's option names; credentials in the secrets
        params = {
            "bucket": OSS_BUCKET,
            "path": "pvcs",
            "url": e.oss.endpoint,  # https: the peer's CA is --object-ca-bundle
            "region": "cn-hangzhou",
            "encrypted": "gocryptfs",
            "keyResource": KEY_RESOURCE,
            "onDelete": "delete",
        }
        secrets = {"akId": e.seal("oss-ak"), "akSecret": e.seal("oss-sk")}
        return params, secrets, secrets
    params = {  # S3 names; sealed credentials in the class itself
        "objectStore": "s3",
        "bucket": e.s3_bucket,
        "prefix": "tenant/pvcs",
        "endpoint": e.moto.url,
        "keyResource": KEY_RESOURCE,
        "accessKeyId": e.seal("s3-ak"),
        "secretAccessKey": e.seal("s3-sk"),
        "onDelete": "delete",
    }
    return params, {}, {}


def keys(e: Env, kind: str) -> set[str]:
    if kind == "oss":
        return set(e.oss.objects(OSS_BUCKET))
    return set(e.moto.objects(e.s3_bucket))


def plant(e: Env, kind: str, names: list[str]) -> None:
    if kind == "oss":
        with e.oss.state.lock:
            bucket = e.oss.objects(OSS_BUCKET)
            for k in names:
                etag = hashlib.md5(b"x").hexdigest()  # noqa: S324 - an ETag
                bucket[k] = StoredObject(b"x", {}, "application/octet-stream", etag, time.time())
        return
    c = e.moto.client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: c.put_object(Bucket=e.s3_bucket, Key=k, Body=b"x"), names))


def create(e: Env, name: str, params: dict[str, str], secrets: dict[str, str]) -> csi_pb2.Volume:
    assert e.ctrl is not None
    return e.ctrl.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_capability()],
            parameters={**params, "csi.storage.k8s.io/pvc/name": name},
            secrets=secrets,
        ),
        timeout=30,
    ).volume


def delete(e: Env, vid: str, secrets: dict[str, str]) -> None:
    assert e.ctrl is not None
    e.ctrl.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=vid, secrets=secrets), timeout=120
    )


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_delete_volume_empties_exactly_its_prefix(env: Env, kind: str) -> None:
    e = env
    assert e.node is not None
    params, prov_secrets, publish_secrets = klass(e, kind)
    vol = create(e, f"pvc-del-{kind}", params, prov_secrets)
    vid = vol.volume_id
    base = params.get("path") or params["prefix"]
    assert vol.volume_context["path"] == f"{base}/{vid}" and "onDelete" not in vol.volume_context
    target = e.work / "kubelet" / "pods" / kind / "volumes" / "mount"
    target.parent.mkdir(parents=True)
    e.node.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            target_path=str(target),
            volume_capability=mount_capability(),
            volume_context=dict(vol.volume_context),
            secrets=publish_secrets,
        ),
        timeout=120,
    )
    (target / "dir" / "sub").mkdir(parents=True)
    for i in range(20):
        (target / "dir" / "sub" / f"file{i}").write_bytes(os.urandom(5000))
    (target / "top").write_text("data")
    e.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)), timeout=60
    )
    prefix = f"{base}/{vid}/"
    assert f"{prefix}gocryptfs.conf" in keys(e, kind)
    plant(e, kind, [f"{prefix}filler/{i:05d}" for i in range(FILLER)])
    neighbours = [
        f"{base}/gocryptfs.conf",
        f"{base}/{vid}",
        f"{base}/{vid}0/kept",
        f"{base}/{vid}-sibling/kept",
        f"{base}",
        "outside",
    ]
    plant(e, kind, neighbours)
    before = keys(e, kind)
    assert len([k for k in before if k.startswith(prefix)]) > FILLER + 20
    delete(e, vid, prov_secrets)
    after = keys(e, kind)
    assert not [k for k in after if k.startswith(prefix)]
    assert after == {k for k in before if not k.startswith(prefix)}
    assert set(neighbours) <= after
    delete(e, vid, prov_secrets)  # idempotent
    for secret in (OSS_SK, S3_SK, OSS_AK, S3_AK):
        assert secret not in e.logs()
    assert "deleted object-store volume prefix" in e.logs()


def test_retain_keeps_the_objects(env: Env) -> None:
    params, secrets, _ = klass(env, "s3")
    vol = create(env, "pvc-retain", {**params, "onDelete": "retain"}, secrets)
    prefix = f"{params['prefix']}/{vol.volume_id}/"
    plant(env, "s3", [prefix + "a", prefix + "b"])
    delete(env, vol.volume_id, secrets)
    assert {prefix + "a", prefix + "b"} <= keys(env, "s3")


def test_wrong_credentials_fail_and_keep_the_volume(env: Env) -> None:
    params, secrets, _ = klass(env, "oss")
    vol = create(env, "pvc-badcreds", params, secrets)
    prefix = f"pvcs/{vol.volume_id}/"
    plant(env, "oss", [prefix + "a"])
    wrong = {**secrets, "akSecret": env.seal("s3-sk")}  # a valid seal, the wrong secret
    assert env.ctrl is not None
    with pytest.raises(grpc.RpcError) as info:
        delete(env, vol.volume_id, wrong)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert S3_SK not in (info.value.details() or "")
    assert prefix + "a" in keys(env, "oss")
    delete(env, vol.volume_id, secrets)
    assert prefix + "a" not in keys(env, "oss")


def test_a_controller_without_a_resolver_says_so_and_refuses_delete_classes(
    env: Env, tmp_path: Path
) -> None:
    sock = str(tmp_path / "plain.sock")
    argv = [
        COCO_CSI,
        "controller",
        "--endpoint",
        f"unix://{sock}",
        "--backend-root",
        str(tmp_path / "root"),
    ]
    proc = start_plugin(argv, sock, str(tmp_path / "plain.log"))
    try:
        with CsiClient(f"unix://{sock}") as c:
            params, secrets, _ = klass(env, "s3")
            with pytest.raises(grpc.RpcError) as info:
                c.controller.CreateVolume(
                    csi_pb2.CreateVolumeRequest(
                        name="pvc-x",
                        volume_capabilities=[mount_capability()],
                        parameters=params,
                        secrets=secrets,
                    ),
                    timeout=30,
                )
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "resolver" in (info.value.details() or "")
            vol = c.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="pvc-y",
                    volume_capabilities=[mount_capability()],
                    parameters={**params, "onDelete": "retain"},
                ),
                timeout=30,
            ).volume
            c.controller.DeleteVolume(
                csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=30
            )
    finally:
        stop_plugins([proc])
    log = (tmp_path / "plain.log").read_text()
    assert "never deletes object-store volumes" in log


def test_hostile_s3_listing_on_the_wire_deletes_nothing_outside(env: Env) -> None:
    """moto's real ListObjectsV2 answer, rewritten on the wire by the fault proxy to name a
    key outside the prefix: the real S3 client parses it, the page is refused before its
    DeleteObjects request, and the neighbour is still there."""
    from csi_driver import errors
    from csi_driver.deadline import Deadline
    from csi_driver.volumes.objectdelete import delete_prefix
    from fuse_crypt.backend.retrying import RetryingTransport
    from fuse_crypt.backend.s3 import S3Transport
    from tests.peers.fault_proxy import Fault, FaultProxy
    from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY

    bucket = env.moto.new_bucket("hostile")
    plant_to = env.moto.client()
    for k in ("pvcs/coco-7/a", "pvcs/coco-7/b", "pvcs/coco-70/kept", "pvcs/kept"):
        plant_to.put_object(Bucket=bucket, Key=k, Body=b"x")
    foreign = (
        b"</Contents><Contents><Key>pvcs/kept</Key><LastModified>2026-01-01T00:00:00.000Z"
        b"</LastModified><ETag>&quot;9dd4e461268c8034f5c8564e155c67a6&quot;</ETag><Size>1"
        b"</Size><StorageClass>STANDARD</StorageClass></Contents>"
    )
    with FaultProxy(("127.0.0.1", env.moto.port)) as proxy:
        proxy.always = Fault.rewrite(b"</Contents>", foreign)
        t = S3Transport(
            bucket,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_url=proxy.endpoint,
            allow_insecure_http=True,
        )
        with pytest.raises(errors.FailedPrecondition, match="outside"):
            delete_prefix(RetryingTransport(t), "pvcs/coco-7/", Deadline(30))
        assert not [m for m, p, _ in proxy.log if m == "POST"]  # no DeleteObjects at all
        proxy.always = None
        assert delete_prefix(RetryingTransport(t), "pvcs/coco-7/", Deadline(30)) == 2
    assert set(env.moto.objects(bucket)) == {"pvcs/coco-70/kept", "pvcs/kept"}


def start_uploads(e: Env, kind: str, keys: list[str]) -> None:
    """Unfinished multipart uploads, as a daemon killed mid-upload leaves them."""
    if kind == "oss":
        from tests.peers.oss_server import Upload

        with e.oss.state.lock:
            for k in keys:
                uid = os.urandom(16).hex().upper()
                e.oss.state.uploads[uid] = (OSS_BUCKET, Upload(k, {}, "", False))
        return
    c = e.moto.client()
    for k in keys:
        up = c.create_multipart_upload(Bucket=e.s3_bucket, Key=k)
        c.upload_part(
            Bucket=e.s3_bucket, Key=k, UploadId=up["UploadId"], PartNumber=1, Body=b"cipher"
        )


def uploads(e: Env, kind: str) -> list[str]:
    if kind == "oss":
        with e.oss.state.lock:
            return sorted(u.key for b, u in e.oss.state.uploads.values() if b == OSS_BUCKET)
    r = e.moto.client().list_multipart_uploads(Bucket=e.s3_bucket)
    return sorted(u["Key"] for u in r.get("Uploads", []))


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_delete_volume_aborts_its_unfinished_uploads(env: Env, kind: str) -> None:
    """Uploads under the prefix (on OSS more than one 1,000-upload page) are aborted, the
    objects deleted; uploads of the neighbours stay; a second DeleteVolume is OK."""
    e = env
    params, prov_secrets, _ = klass(e, kind)
    vol = create(e, f"pvc-up-{kind}", params, prov_secrets)
    base = params.get("path") or params["prefix"]
    prefix = f"{base}/{vol.volume_id}/"
    mine = [f"{prefix}big{i:04d}" for i in range(1005 if kind == "oss" else 6)]
    neighbours = [f"{base}/{vol.volume_id}0/x", f"{base}/{vol.volume_id}", f"{base}/other/y"]
    before = set(uploads(e, kind))
    start_uploads(e, kind, mine + neighbours)
    plant(e, kind, [prefix + "gocryptfs.conf"])
    started = time.monotonic()
    delete(e, vol.volume_id, prov_secrets)
    took = time.monotonic() - started
    left = set(uploads(e, kind))
    assert not [k for k in left if k.startswith(prefix)]
    assert left == before | set(neighbours)
    assert not [k for k in keys(e, kind) if k.startswith(prefix)]
    delete(e, vol.volume_id, prov_secrets)  # idempotent
    assert f"uploads_aborted={len(mine)}" in e.logs()
    print(f"{kind}: aborted {len(mine)} uploads in {took:.2f}s (DeleteVolume, loaded machine)")


def test_oss_create_volume_initialises_the_prefix_with_the_passphrase(env: Env) -> None:
    """On OSS (TLS, V4 signatures verified): a class whose passphrase and credentials reach
    the controller (provisioner secret) is initialised in CreateVolume, by the controller;
    CreateVolume again is idempotent; the node publishes without initialising again."""
    from fuse_crypt.configfile import ConfFile

    e = env
    assert e.node is not None
    params, secrets, _ = klass(e, "oss")
    params = {k: v for k, v in params.items() if k != "keyResource"}
    secrets = {**secrets, "encPasswd": e.seal("pass")}
    vol = create(e, "pvc-oss-init", params, secrets)
    conf_key = f"pvcs/{vol.volume_id}/gocryptfs.conf"
    found = e.oss.objects(OSS_BUCKET)
    assert conf_key in found and f"pvcs/{vol.volume_id}/gocryptfs.diriv" in found
    conf = found[conf_key].data
    ConfFile.loads(conf).unlock(PASSPHRASE.encode())
    assert create(e, "pvc-oss-init", params, secrets).volume_id == vol.volume_id
    assert e.oss.objects(OSS_BUCKET)[conf_key].data == conf
    target = e.work / "kubelet" / "pods" / "oss-init" / "volumes" / "mount"
    target.parent.mkdir(parents=True)
    e.node.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            target_path=str(target),
            volume_capability=mount_capability(),
            volume_context=dict(vol.volume_context),
            secrets=secrets,
        ),
        timeout=120,
    )
    (target / "f").write_text("through the node")
    e.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(target)),
        timeout=60,
    )
    assert e.oss.objects(OSS_BUCKET)[conf_key].data == conf
    node_log = (e.work / "node.log").read_text().splitlines()
    assert not [ln for ln in node_log if "initialised volume" in ln and vol.volume_id in ln]
    assert PASSPHRASE not in e.logs()
    delete(e, vol.volume_id, secrets)
    assert conf_key not in e.oss.objects(OSS_BUCKET)


def test_a_delete_that_fails_half_way_through_the_aborts_is_finished_by_the_retry(
    env: Env,
) -> None:
    """The S3 class's endpoint is the fault proxy in front of moto.  DeleteVolume's 12th
    request (ListMultipartUploads, then aborts 8 at a time) is refused with 403: the call
    is PERMISSION_DENIED as when aborts ran one at a time, only the aborts already in
    flight were sent after it, nothing was deleted (uploads go first), and the record is
    kept; the provisioner's retry then aborts the rest and deletes the objects."""
    from tests.peers.fault_proxy import Fault, FaultProxy

    e = env
    with FaultProxy(("127.0.0.1", e.moto.port)) as proxy:
        params, secrets, _ = klass(e, "s3")
        params = {**params, "endpoint": proxy.endpoint}
        vol = create(e, "pvc-half", params, secrets)
        base = params["prefix"]
        prefix = f"{base}/{vol.volume_id}/"
        mine = [f"{prefix}big{i:03d}" for i in range(40)]
        neighbours = [f"{base}/{vol.volume_id}0/x"]
        before = set(uploads(e, "s3"))
        start_uploads(e, "s3", mine + neighbours)  # straight to moto, not through the proxy
        plant(e, "s3", [prefix + "obj"])
        proxy.reset()
        proxy.queue(*([None] * 11), Fault.error(403, "AccessDenied"))
        with pytest.raises(grpc.RpcError) as info:
            delete(e, vol.volume_id, secrets)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        sent = list(proxy.log)
        assert sent[0][0] == "GET" and "uploads" in sent[0][1]
        aborts = [p for m, p, _ in sent if m == "DELETE"]
        assert all("uploadId=" in p for p in aborts)
        assert 11 <= len(aborts) <= 11 + 8  # the refused one and at most the rest in flight
        assert not [m for m, _, _ in sent if m == "POST"]  # no DeleteObjects
        left = [k for k in uploads(e, "s3") if k.startswith(prefix)]
        assert len(left) == len(mine) - (len(aborts) - 1)
        assert prefix + "obj" in keys(e, "s3")
        delete(e, vol.volume_id, secrets)  # the provisioner's retry: same record, same proxy
    assert not [k for k in uploads(e, "s3") if k.startswith(prefix)]
    assert set(uploads(e, "s3")) == before | set(neighbours)
    assert not [k for k in keys(e, "s3") if k.startswith(prefix)]
    assert S3_SK not in e.logs()
