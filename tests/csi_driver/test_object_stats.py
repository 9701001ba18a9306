"""NodeGetVolumeStats of bucket volumes: the plugin asks the volume's mount daemon over its
control socket (STATS), the daemon lists the prefix (cached) and answers the ciphertext
bytes and objects stored.

In process: ``ObjectStoreMounter.volume_usage`` against a real control socket whose daemon
side is a real ``ObjectStoreBackend`` over the fake transport, and every failure mapped to
its CSI code. End to end: a real ``coco-csi node`` over gRPC, real FUSE mounts, an S3
volume on moto and an OSS volume on the OSS peer; the numbers are compared with what the
bucket holds, object by object.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver import errors
from csi_driver.volumes.objectmount import ObjectStoreMounter
from fuse_crypt.backend.credentials import CredentialBox
from fuse_crypt.backend.objectstore import ObjectStoreBackend
from fuse_crypt.cli.credsocket import CredentialSocket, VolumeUsage
from fuse_crypt.cli.usagecache import UsageCache
from tests.csi_driver.helpers import restart_plugin
from tests.csi_driver.test_object_volumes import (
    OSS_AK,
    OSS_BUCKET,
    OSS_SK,
    S3_AK,
    S3_SK,
    Node,
    expect,
    node,
    publish,
    unpublish,
    volume,
)
from tests.fuse_crypt.fake_transport import FakeTransport

__all__ = ["node"]  # the module-scoped plugin fixture, shared with test_object_volumes

LOC = "s3://bkt/vols/v1"
IDENT = (LOC, "http://127.0.0.1:9", "us-east-1")
Unit = csi_pb2.VolumeUsage.Unit


# -- in process: the mounter's client side and its error mapping -----------------------------


@pytest.fixture
def mounter(tmp_path: Path) -> ObjectStoreMounter:
    ctl = tmp_path / "ctl"
    ctl.mkdir(mode=0o700)
    return ObjectStoreMounter(control_dir=str(ctl))


TARGET = "/var/lib/kubelet/pods/p/volumes/x/mount"


@pytest.fixture
def daemon(mounter: ObjectStoreMounter) -> Iterator[tuple[CredentialSocket, FakeTransport]]:
    path = mounter.control_socket(TARGET)
    assert path is not None
    t = FakeTransport()
    t.put_raw("vols/v1/gocryptfs.conf", b"c" * 400)
    t.put_raw("vols/v1/gocryptfs.diriv", b"i" * 16)
    t.put_raw("vols/v1/abc/", b"", content_type="application/x-directory")
    t.put_raw("vols/v1/abc/gocryptfs.diriv", b"i" * 16)
    t.put_raw("vols/v1/abc/file", b"f" * 4130)
    t.put_raw("vols/v10/not-ours", b"n" * 999)
    srv = CredentialSocket(path, CredentialBox("AK", "SK", None), bucket="bkt", identity=IDENT)
    srv.usage = UsageCache(ObjectStoreBackend(t, "vols/v1").usage)
    try:
        yield srv, t
    finally:
        srv.close()


def test_usage_from_a_real_socket_and_backend(
    mounter: ObjectStoreMounter, daemon: tuple[CredentialSocket, FakeTransport]
) -> None:
    got = mounter.volume_usage(TARGET, LOC)
    assert got == VolumeUsage(400 + 16 + 0 + 16 + 4130, 5, 0, 0)
    # Another target's socket does not exist: no daemon says anything for it.
    assert mounter.volume_usage(TARGET + "2", LOC) is None


def test_the_daemon_checks_the_location(
    mounter: ObjectStoreMounter, daemon: tuple[CredentialSocket, FakeTransport]
) -> None:
    with pytest.raises(errors.Unavailable) as ei:
        mounter.volume_usage(TARGET, "s3://bkt/vols/v2")
    assert "another volume location" in str(ei.value)


def test_no_control_dir_means_no_answer() -> None:
    assert ObjectStoreMounter(control_dir=None).volume_usage(TARGET, LOC) is None


def _fake_daemon(path: str, answer: bytes | None) -> socket.socket:
    """A socket at ``path`` that answers ``answer`` to one request (None: never answers)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.recv(4096)
            if answer is None:
                time.sleep(3)
                return
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"ERR malformed request\n", None),  # a daemon from before STATS: statfs as before
        (b"ERR too many objects to measure\n", errors.FailedPrecondition),
        (b"ERR the listing took too long\n", errors.Unavailable),
        (b"ERR the listing is still running\n", errors.Unavailable),
        (b"ERR the object store failed (AccessDenied)\n", errors.Unavailable),
        (b"ERR busy\n", errors.Unavailable),
        (b"OK bytes=1\n", errors.Unavailable),
        (None, errors.Unavailable),  # no answer in time
    ],
)
def test_answers_map_to_csi_codes(
    mounter: ObjectStoreMounter, answer: bytes | None, expected: type[Exception] | None
) -> None:
    path = mounter.control_socket(TARGET)
    assert path is not None
    srv = _fake_daemon(path, answer)
    try:
        if expected is None:
            assert mounter.volume_usage(TARGET, LOC, timeout=1.0) is None
        else:
            t0 = time.monotonic()
            with pytest.raises(expected):
                mounter.volume_usage(TARGET, LOC, timeout=1.0)
            assert time.monotonic() - t0 < 2.5
    finally:
        srv.close()


def test_a_dead_daemons_socket_is_unavailable(mounter: ObjectStoreMounter) -> None:
    path = mounter.control_socket(TARGET)
    assert path is not None
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    with pytest.raises(errors.Unavailable):
        mounter.volume_usage(TARGET, LOC)


def test_create_volume_records_the_capacity_for_an_object_volume(tmp_path: Path) -> None:
    """No bucket I/O: the controller only names the prefix and the requested size."""
    from csi_driver.core.controller import LocalBackend
    from tests.csi_driver.helpers import plain_capability

    ctrl = LocalBackend(str(tmp_path / "ctrl"))
    params = {"bucket": "b-1", "url": "https://oss-cn-hangzhou.aliyuncs.com"}
    _, ctx = ctrl.create("pvc-cap", [plain_capability()], params, required_bytes=3 << 30)
    assert ctx["capacityBytes"] == str(3 << 30)


# -- end to end: coco-csi node, real mounts, moto and the OSS peer ---------------------------


def _objects(node: Node, kind: str, ctx: dict[str, str], prefix: str) -> dict[str, int]:
    if kind == "oss":
        objs = node.oss.objects(OSS_BUCKET)
        return {k: len(o.data) for k, o in objs.items() if k.startswith(prefix)}
    return {
        k: len(o["body"])
        for k, o in node.moto.objects(ctx["bucket"]).items()
        if k.startswith(prefix)
    }


def _stats(node: Node, vid: str, target: str) -> dict[int, csi_pb2.VolumeUsage]:
    resp = node.client.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vid, volume_path=target), timeout=30
    )
    return {u.unit: u for u in resp.usage}


SIZES = [0, 1, 4095, 4096, 4097, 65_536, 300_001] * 3  # 21 files


@pytest.mark.parametrize("kind", ["s3", "oss"])
def test_stats_are_the_ciphertext_bytes_and_objects_in_the_bucket(node: Node, kind: str) -> None:
    vid = f"pvc-stats-{kind}"
    prefix = f"stats/{vid}/"
    ctx, secrets = volume(node, kind, prefix.rstrip("/"), capacityBytes=str(1 << 30))
    t = node.target(f"stats-{kind}")
    publish(node, vid, t, ctx, secrets)
    try:
        root = Path(t)
        (root / "sub").mkdir()
        for i, size in enumerate(SIZES):
            (root / ("sub" if i % 2 else "") / f"f{i}").write_bytes(os.urandom(size))
        t0 = time.monotonic()
        got = _stats(node, vid, t)
        first = time.monotonic() - t0
        t0 = time.monotonic()
        assert _stats(node, vid, t) == got  # the daemon's cached answer
        cached = time.monotonic() - t0
        print(
            f"\n{kind}: stats with a listing {first * 1000:.0f} ms, cached {cached * 1000:.1f} ms"
        )
        objs = _objects(node, kind, ctx, prefix)
        # conf, two dir IVs, the sub/ marker, 21 files
        assert len(objs) == 1 + 2 + 1 + len(SIZES)
        by, ino = got[Unit.BYTES], got[Unit.INODES]
        assert by.used == sum(objs.values())
        assert by.used > sum(SIZES)  # ciphertext: headers and per-block tags
        assert ino.used == len(objs)
        assert by.total == 1 << 30 and by.available == by.total - by.used
        assert ino.total > ino.used and ino.available == ino.total - ino.used
        # The capacity is recorded with the publication (a restarted plugin reports it too).
        state = json.loads((node.work / "state" / "node-state.json").read_text())
        rec = next(p for p in state["publications"] if p["target_path"] == t)
        assert rec["capacity_bytes"] == 1 << 30
    finally:
        unpublish(node, vid, t)
    logs = node.logs()
    for secret in (OSS_SK, S3_SK, OSS_AK, S3_AK):
        assert secret.encode() not in logs, secret


@pytest.mark.parametrize("bad", ["12x", "-1", "1" * 19, "１２", ""])
def test_a_malformed_capacity_is_invalid_argument(node: Node, bad: str) -> None:
    ctx, secrets = volume(node, "s3", "stats/badcap")
    ctx["capacityBytes"] = bad
    details = expect(node, grpc.StatusCode.INVALID_ARGUMENT, "pvc-stats-badcap", ctx, secrets)
    assert "capacityBytes" in details


def test_without_a_capacity_total_is_the_synthetic_size(node: Node) -> None:
    vid = "pvc-stats-nocap"
    prefix = f"stats/{vid}/"
    ctx, secrets = volume(node, "s3", prefix.rstrip("/"))
    t = node.target("stats-nocap")
    publish(node, vid, t, ctx, secrets)
    try:
        Path(t, "f").write_bytes(b"x" * 10_000)
        by = _stats(node, vid, t)[Unit.BYTES]
        assert by.used == sum(_objects(node, "s3", ctx, prefix).values())
        assert by.total == 256 << 40 and by.available == by.total - by.used
    finally:
        unpublish(node, vid, t)


def test_a_stopped_daemon_is_unavailable_then_answers_again(node: Node) -> None:
    vid = "pvc-stats-stop"
    ctx, secrets = volume(node, "oss", "stats/stop")
    t = node.target("stats-stop")
    publish(node, vid, t, ctx, secrets)
    state = json.loads((node.work / "state" / "node-state.json").read_text())
    pid = next(p["pid"] for p in state["publications"] if p["target_path"] == t)
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as ei:
            _stats(node, vid, t)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 15
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 30
        while True:  # the stuck probe thread of the stopped mount has to finish first
            try:
                used = _stats(node, vid, t)[Unit.INODES].used
                assert used == len(_objects(node, "oss", ctx, "stats/stop/")) >= 2
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
    finally:
        unpublish(node, vid, t)


def test_an_adopted_daemon_answers_a_restarted_plugin(node: Node) -> None:
    """Last in the module: restarts the plugin. The location comes from the record, so
    the plugin asks a daemon it did not start (and holds no key for)."""
    vid = "pvc-stats-adopt"
    prefix = "stats/adopt/"
    ctx, secrets = volume(node, "s3", prefix.rstrip("/"), capacityBytes="5000000")
    t = node.target("stats-adopt")
    publish(node, vid, t, ctx, secrets)
    Path(t, "f").write_bytes(b"y" * 50_000)
    node.client.close()
    node.client = restart_plugin(node.procs, node.argv, node.work)
    try:
        by = _stats(node, vid, t)[Unit.BYTES]
        assert by.used == sum(_objects(node, "s3", ctx, prefix).values())
        assert by.total == 5_000_000
    finally:
        unpublish(node, vid, t)
