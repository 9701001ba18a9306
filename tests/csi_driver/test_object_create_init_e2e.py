"""CreateVolume initialises an object-store prefix when the controller is confidential: real
``coco-csi controller`` and ``coco-csi node`` processes over gRPC on unix sockets, S3 volumes
on a moto server, the controller configured like the node (same resolver, same
``--allowed-*`` flags, ``--allowed-key-resource`` included).

* CreateVolume writes ``gocryptfs.conf`` and the root ``gocryptfs.diriv`` at
  ``<path>/<volume_id>/`` before any publish, and the conf opens with the volume's key in
  Debian's gocryptfs over Debian's s3fs (CDH's stack) with the password the node derives;
* the node then publishes without initialising again (the conf's ETag is unchanged) and
  reads and writes through it;
* a repeated CreateVolume is idempotent (same volume, same conf);
* a pre-existing conf that the key does not open, or a prefix holding objects but no conf,
  fails CreateVolume with FAILED_PRECONDITION and is never overwritten;
* a controller without ``--allowed-key-resource`` leaves the init to the node, as before;
* no credential, key or password in either plugin's log.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient, mount_capability
from csi_driver.keys import derive_volume_password, root_key_from_resource
from csi_driver.volume_key import new_volume_key_jwk
from fuse_crypt.configfile import ConfFile
from sealed_secrets.keys import generate_signing_key, public_jwk
from sealed_secrets.seal import seal_vault
from tests.csi_driver.conftest import cleanup_mounts
from tests.csi_driver.helpers import (
    object_controller_argv,
    object_node_argv,
    start_plugin,
    stop_plugins,
)
from tests.fuse_crypt.conftest import fuse_available
from tests.fuse_crypt.objectstore_helpers import S3Vol, have_s3fs_gocryptfs, mount_theirs
from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY, MotoS3

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY_RESOURCE = KEY_PREFIX + "volume-root"
SIGNING_PREFIX = "kbs:///default/signing-key/"
SIGNING_KID = SIGNING_PREFIX + "init-e2e"
PASSPHRASE = "init-e2e passphrase Kp3l9"


@dataclass
class Env:
    work: Path
    moto: MotoS3
    signing_key: Any
    root_jwk: bytes
    bucket: str = ""
    node: CsiClient | None = None
    ctrl: CsiClient | None = None
    procs: list[Any] = field(default_factory=list)

    def seal(self, name: str) -> str:
        return seal_vault(
            f"kbs:///default/objcreds/{name}",
            "kbs",
            signing_key=self.signing_key,
            signing_kid=SIGNING_KID,
        )

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.work.glob("*.log"))

    def params(self, **extra: str) -> dict[str, str]:
        base = {
            "objectStore": "s3",
            "bucket": self.bucket,
            "prefix": "tenant/pvcs",
            "endpoint": self.moto.url,
            "keyResource": KEY_RESOURCE,
            "accessKeyId": self.seal("s3-ak"),
            "secretAccessKey": self.seal("s3-sk"),
        }
        base.update(extra)
        return {k: v for k, v in base.items() if v}

    def password(self, vid: str) -> bytes:
        root = root_key_from_resource(self.root_jwk, KEY_RESOURCE)
        return derive_volume_password(root, vid)

    def objects(self) -> dict[str, Any]:
        return self.moto.objects(self.bucket)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    work = Path(tempfile.mkdtemp(prefix="objinit", dir="/tmp"))
    sk = generate_signing_key(SIGNING_KID)
    root_jwk = new_volume_key_jwk().encode()
    res = {
        "default/objcreds/s3-ak": ACCESS_KEY.encode(),
        "default/objcreds/s3-sk": SECRET_KEY.encode(),
        "default/objcreds/pass": PASSPHRASE.encode(),
        "default/coco-csi/volume-root": root_jwk,
        "default/signing-key/init-e2e": public_jwk(sk).export().encode(),
    }
    (work / "resources.json").write_text(
        json.dumps({k: base64.b64encode(v).decode() for k, v in res.items()})
    )
    (work / "kubelet").mkdir()
    try:
        moto = MotoS3()
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    e = Env(work, moto, sk, root_jwk)
    try:
        e.bucket = moto.new_bucket("init")
        node_sock, ctrl_sock = str(work / "node.sock"), str(work / "ctrl.sock")
        node_argv = object_node_argv(work, node_sock, "init-node", KEY_PREFIX, SIGNING_PREFIX)
        ctrl_argv = object_controller_argv(
            work, ctrl_sock, SIGNING_PREFIX, "--allowed-key-resource", KEY_PREFIX
        )
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
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)


def create(
    client: CsiClient, name: str, params: dict[str, str], secrets: dict[str, str] | None = None
) -> csi_pb2.Volume:
    return client.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            volume_capabilities=[mount_capability()],
            parameters=params,
            secrets=secrets or {},
        ),
        timeout=60,
    ).volume


def publish(e: Env, vol: csi_pb2.Volume, name: str) -> Path:
    assert e.node is not None
    target = e.work / "kubelet" / "pods" / name / "volumes" / "mount"
    target.parent.mkdir(parents=True)
    e.node.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id,
            target_path=str(target),
            volume_capability=mount_capability(),
            volume_context=dict(vol.volume_context),
        ),
        timeout=120,
    )
    return target


def unpublish(e: Env, vol: csi_pb2.Volume, target: Path) -> None:
    assert e.node is not None
    e.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=str(target)),
        timeout=60,
    )


def test_create_volume_initialises_the_prefix_the_node_then_mounts(
    env: Env, tmp_path: Path
) -> None:
    e = env
    assert e.ctrl is not None
    params = e.params()  # sealed values are new each time: one class, one set
    vol = create(e.ctrl, "pvc-init", params)
    vid = vol.volume_id
    prefix = f"tenant/pvcs/{vid}/"
    objs = e.objects()
    assert {prefix + "gocryptfs.conf", prefix + "gocryptfs.diriv"} <= set(objs)
    conf = bytes(objs[prefix + "gocryptfs.conf"]["body"])
    password = e.password(vid)
    ConfFile.loads(conf).unlock(password)  # opens with the key the node derives
    # Idempotent: the same volume, the same conf, nothing rewritten.
    again = create(e.ctrl, "pvc-init", params)
    assert again.volume_id == vid
    assert bytes(e.objects()[prefix + "gocryptfs.conf"]["body"]) == conf
    # The node mounts it without initialising again, and works through it.
    target = publish(e, vol, "init")
    (target / "hello.txt").write_text("written through the node")
    unpublish(e, vol, target)
    assert bytes(e.objects()[prefix + "gocryptfs.conf"]["body"]) == conf
    node_log = (e.work / "node.log").read_text()
    assert "initialised volume" not in node_log
    assert "initialised object-store volume prefix" in (e.work / "ctrl.log").read_text()
    # Debian's gocryptfs over Debian's s3fs (CDH's two-hop stack) opens the same prefix.
    why = fuse_available() or have_s3fs_gocryptfs()
    if why is not None:
        pytest.fail(f"the interop check needs s3fs + gocryptfs: {why}")
    creds = tmp_path / "creds"
    creds.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
    creds.chmod(0o600)
    passfile = tmp_path / "pass"
    passfile.write_bytes(password + b"\n")
    vol3 = S3Vol(e.moto, e.bucket, prefix.rstrip("/"), creds, passfile)
    with mount_theirs(vol3, tmp_path) as plain:
        assert (plain / "hello.txt").read_text() == "written through the node"
    # Secrets never in the logs: credentials, the volume password, the root key.
    logs = e.logs()
    for secret in (SECRET_KEY, ACCESS_KEY, password.decode("ascii", "replace")):
        assert secret not in logs
    assert json.loads(e.root_jwk)["k"] not in logs


def test_a_passphrase_class_is_initialised_with_the_passphrase(env: Env, tmp_path: Path) -> None:
    e = env
    assert e.ctrl is not None
    vol = create(e.ctrl, "pvc-pass", e.params(keyResource="", encPasswd=e.seal("pass")))
    conf = bytes(e.objects()[f"tenant/pvcs/{vol.volume_id}/gocryptfs.conf"]["body"])
    parsed = ConfFile.loads(conf)
    parsed.unlock(PASSPHRASE.encode())
    assert parsed.scrypt_logn == 16  # the node's scrypt cost for passphrases
    assert PASSPHRASE not in e.logs()


def test_a_conf_the_key_does_not_open_is_refused_and_kept(env: Env) -> None:
    e = env
    assert e.ctrl is not None
    params = e.params()
    vol = create(e.ctrl, "pvc-hostile", params)
    key = f"tenant/pvcs/{vol.volume_id}/gocryptfs.conf"
    foreign, _ = ConfFile.create(b"someone else's password", scrypt_logn=10)
    c = e.moto.client()
    c.put_object(Bucket=e.bucket, Key=key, Body=foreign.dumps())
    with pytest.raises(grpc.RpcError) as info:
        create(e.ctrl, "pvc-hostile", params)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not open" in (info.value.details() or "")
    assert bytes(e.objects()[key]["body"]) == foreign.dumps()  # never overwritten
    c.put_object(Bucket=e.bucket, Key=key, Body=b'{"not": "a conf"')
    with pytest.raises(grpc.RpcError) as info:
        create(e.ctrl, "pvc-hostile", params)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert bytes(e.objects()[key]["body"]) == b'{"not": "a conf"'


def test_a_prefix_with_data_but_no_conf_is_not_initialised(env: Env) -> None:
    e = env
    assert e.ctrl is not None
    params = e.params()
    vol = create(e.ctrl, "pvc-lost", params)
    prefix = f"tenant/pvcs/{vol.volume_id}/"
    c = e.moto.client()
    c.delete_object(Bucket=e.bucket, Key=prefix + "gocryptfs.conf")
    c.put_object(Bucket=e.bucket, Key=prefix + "SomeCipherName", Body=b"data")
    with pytest.raises(grpc.RpcError) as info:
        create(e.ctrl, "pvc-lost", params)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert prefix + "gocryptfs.conf" not in e.objects()
    assert prefix + "SomeCipherName" in e.objects()


def test_without_allowed_key_resources_the_node_initialises(env: Env, tmp_path: Path) -> None:
    e = env
    sock = str(tmp_path / "plain.sock")
    argv = object_controller_argv(e.work, sock, SIGNING_PREFIX, backend_root=tmp_path / "root")
    proc = start_plugin(argv, sock, str(tmp_path / "plain.log"))
    try:
        with CsiClient(f"unix://{sock}") as c:
            vol = create(c, "pvc-node-init", e.params())
    finally:
        stop_plugins([proc])
    prefix = f"tenant/pvcs/{vol.volume_id}/"
    assert not [k for k in e.objects() if k.startswith(prefix)]
    assert "left for the node to initialise" in (tmp_path / "plain.log").read_text()
    target = publish(e, vol, "node-init")
    (target / "f").write_text("x")
    unpublish(e, vol, target)
    assert prefix + "gocryptfs.conf" in e.objects()
