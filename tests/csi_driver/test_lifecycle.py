"""Mount lifecycle: plugin restarts, crashed daemons, stale ENOTCONN mounts."""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import subprocess

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient
from csi_driver.core.controller import LocalBackend
from csi_driver.core.node import NodeCore, PublishRequest
from csi_driver.proc import alive as pid_alive
from csi_driver.server import start_node
from fuse_crypt import mounttable
from fuse_crypt.daemon import wait_until

from .conftest import KEY_RESOURCE, Keys, cleanup_mounts, make_node
from .helpers import mount_capability, plain_capability

DATA = b"survives restarts\n"


def _volume(backend: LocalBackend, name: str) -> tuple[str, dict[str, str]]:
    rec, ctx = backend.create(name, [plain_capability()], {"keyResource": KEY_RESOURCE})
    return rec.volume_id, ctx


def _publish(client: CsiClient, vid: str, ctx: dict[str, str], target: str) -> None:
    client.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            target_path=target,
            volume_capability=mount_capability(),
            volume_context=ctx,
        )
    )


def _unpublish(client: CsiClient, vid: str, target: str) -> None:
    client.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target)
    )


# Poll until true or the time is up (fuse_crypt.daemon's own helper).
_wait = functools.partial(wait_until, timeout=10.0)


@pytest.fixture
def node_world(tmp_path: pathlib.Path, sockdir: str, keys: Keys):
    backend = LocalBackend(str(tmp_path / "backend"))
    plugins = []

    def start(mounter: str = "gocryptfs") -> tuple[CsiClient, NodeCore]:
        core = make_node(tmp_path, keys, mounter)
        plugin = start_node(f"unix://{sockdir}/node.sock", core)
        plugins.append(plugin)
        return CsiClient(f"unix://{sockdir}/node.sock"), core

    yield backend, start, tmp_path
    for p in plugins:
        p.stop(unmount=True)
    cleanup_mounts(str(tmp_path))


@pytest.mark.parametrize("mounter", ["gocryptfs", "fuse-crypt-prefork"])
def test_restarted_plugin_adopts_live_mounts(node_world, mounter: str) -> None:
    backend, start, tmp = node_world
    client, core = start(mounter)
    vols = [_volume(backend, f"pvc-{i}") for i in range(2)]
    targets = [str(tmp / f"t{i}") for i in range(2)]
    for (vid, ctx), t in zip(vols, targets, strict=True):
        _publish(client, vid, ctx, t)
        pathlib.Path(t, "f").write_bytes(DATA)
    pids = sorted(p.pid for p in core.publications())
    client.close()
    # The plugin goes away (upgrade, crash); the mounts must keep working meanwhile.
    core.supervisor.shutdown()
    for t in targets:
        assert pathlib.Path(t, "f").read_bytes() == DATA

    client2, core2 = start(mounter)
    assert sorted(p.pid for p in core2.publications()) == pids
    for (vid, ctx), t in zip(vols, targets, strict=True):
        _publish(client2, vid, ctx, t)  # kubelet re-publishing: idempotent, no new daemon
    assert sorted(p.pid for p in core2.publications()) == pids
    stats = client2.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vols[0][0], volume_path=targets[0])
    )
    assert stats.usage
    assert stats.HasField("volume_condition") and not stats.volume_condition.abnormal
    for (vid, _ctx), t in zip(vols, targets, strict=True):
        _unpublish(client2, vid, t)
        assert not os.path.exists(t)
    assert _wait(lambda: not any(pid_alive(p) for p in pids))  # adopted daemons stopped


def test_dead_mount_after_restart_is_cleaned_and_republished(node_world) -> None:
    backend, start, tmp = node_world
    client, core = start()
    vid, ctx = _volume(backend, "pvc")
    target = str(tmp / "t")
    _publish(client, vid, ctx, target)
    pathlib.Path(target, "f").write_bytes(DATA)
    pid = core.publications()[0].pid
    core.supervisor.shutdown()  # plugin gone, daemon left running
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: mounttable.is_dead_mount(target))

    client2, core2 = start()  # recovery cleans the ENOTCONN mount
    assert not mounttable.is_dead_mount(target)
    assert mounttable.find_mount(target, resolve=True) is None
    _publish(client2, vid, ctx, target)  # kubelet's retry succeeds
    assert pathlib.Path(target, "f").read_bytes() == DATA
    _unpublish(client2, vid, target)
    assert not os.path.exists(target)


@pytest.mark.parametrize("mounter", ["gocryptfs", "fuse-crypt", "fuse-crypt-prefork"])
def test_supervisor_restarts_crashed_daemon(node_world, mounter: str) -> None:
    backend, start, tmp = node_world
    client, core = start(mounter)
    vid, ctx = _volume(backend, "pvc")
    target = str(tmp / "t")
    _publish(client, vid, ctx, target)
    pathlib.Path(target, "f").write_bytes(DATA)
    old = core.publications()[0].pid
    os.kill(old, signal.SIGKILL)

    def restarted() -> bool:
        h = core.supervisor.get(target)
        return bool(
            h
            and h.pid != old
            and not mounttable.is_dead_mount(target)
            and mounttable.find_mount(target, resolve=True)
        )

    assert _wait(restarted, timeout=15)
    assert pathlib.Path(target, "f").read_bytes() == DATA
    assert core.metrics.mount_restarts._value.get() == 1
    _unpublish(client, vid, target)


def test_stale_mount_without_state_is_cleaned_on_publish(node_world, keys: Keys) -> None:
    backend, start, tmp = node_world
    client, _core = start()
    vid, ctx = _volume(backend, "pvc")
    target = tmp / "t"
    target.mkdir()
    # A gocryptfs mount of an unrelated volume that then dies: ENOTCONN at the target.
    other = tmp / "other"
    other.mkdir()
    subprocess.run(
        ["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", "/dev/stdin", str(other)],
        input=b"pw",
        check=True,
    )
    proc = subprocess.Popen(
        ["gocryptfs", "-fg", "-q", "-passfile", "/dev/stdin", str(other), str(target)],
        stdin=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(b"pw")
    proc.stdin.close()
    assert _wait(lambda: mounttable.find_mount(str(target), resolve=True) is not None)
    proc.kill()
    proc.wait()
    assert _wait(lambda: mounttable.is_dead_mount(str(target)))
    _publish(client, vid, ctx, str(target))
    pathlib.Path(target, "f").write_bytes(DATA)
    assert pathlib.Path(target, "f").read_bytes() == DATA


def test_live_foreign_mount_is_already_exists(node_world) -> None:
    backend, start, tmp = node_world
    client, _core = start()
    vid, ctx = _volume(backend, "pvc")
    target = tmp / "t"
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)], check=True)
    try:
        with pytest.raises(grpc.RpcError) as info:
            _publish(client, vid, ctx, str(target))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as info:
            _unpublish(client, vid, str(target))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert os.path.ismount(target)
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_dead_zygote_is_replaced(node_world) -> None:
    backend, start, tmp = node_world
    client, core = start("fuse-crypt-prefork")
    vid, ctx = _volume(backend, "a")
    _publish(client, vid, ctx, str(tmp / "a"))
    zygote = core.mounters["fuse-crypt-prefork"]._zygote._proc
    assert zygote is not None
    zygote.kill()
    zygote.wait()
    assert pathlib.Path(tmp / "a").is_mount()  # its daemon does not depend on the zygote
    vid2, ctx2 = _volume(backend, "b")
    _publish(client, vid2, ctx2, str(tmp / "b"))  # a fresh zygote serves the next mount
    pathlib.Path(tmp / "b" / "f").write_bytes(DATA)
    assert pathlib.Path(tmp / "b" / "f").read_bytes() == DATA


def test_random_key_ephemeral_volume_after_restart_starts_afresh(node_world) -> None:
    _backend, start, tmp = node_world
    client, core = start()
    target = str(tmp / "eph")
    ctx = {"csi.storage.k8s.io/ephemeral": "true"}
    _publish(client, "csi-abc123", ctx, target)
    pathlib.Path(target, "f").write_bytes(DATA)
    pid = core.publications()[0].pid
    core.supervisor.shutdown()
    os.kill(pid, signal.SIGKILL)  # plugin and daemon gone: the random key is lost
    assert _wait(lambda: mounttable.is_dead_mount(target))
    client2, core2 = start()
    _publish(client2, "csi-abc123", ctx, target)  # kubelet's retry: a fresh scratch volume
    assert os.listdir(target) == []
    pathlib.Path(target, "g").write_bytes(DATA)
    _unpublish(client2, "csi-abc123", target)
    assert not os.path.exists(os.path.join(core2.ephemeral_root, "csi-abc123"))


class _Killed(BaseException):
    """Stands for kill -9 of the plugin: nothing after the raise point runs."""


@pytest.mark.parametrize("mounter", ["gocryptfs", "fuse-crypt-prefork"])
def test_restart_after_supervisor_restart_adopts_the_new_daemon(node_world, mounter: str) -> None:
    """The supervisor's restart of a crashed daemon is saved: the state file used to keep the
    dead pid, so a restarted plugin could not adopt (nor supervise) the live daemon."""
    backend, start, tmp = node_world
    client, core = start(mounter)
    vid, ctx = _volume(backend, "pvc")
    target = str(tmp / "t")
    _publish(client, vid, ctx, target)
    old = core.publications()[0].pid
    os.kill(old, signal.SIGKILL)
    h = None

    def restarted() -> bool:
        nonlocal h
        h = core.supervisor.get(target)
        return bool(h and h.pid != old and not mounttable.is_dead_mount(target))

    assert _wait(restarted, timeout=15)
    assert h is not None
    assert _wait(lambda: core.store.get(target).pid == h.pid)
    core.supervisor.shutdown()  # the plugin goes; the new daemon stays
    core2 = NodeCore(
        "test-node", str(tmp / "node-state"), None, mounter=mounter, kubelet_dir=str(tmp)
    )
    try:
        adopted = core2.supervisor.get(target)
        assert adopted is not None and adopted.pid == h.pid
    finally:
        core2.shutdown()


@pytest.mark.parametrize("mounter", ["gocryptfs", "fuse-crypt-prefork"])
def test_kill_between_mounted_and_saved_is_recovered(
    node_world, keys: Keys, mounter: str, monkeypatch
) -> None:
    """A plugin killed after its daemon mounted but before the mount was recorded used to
    leave a live mount that the restarted plugin answered with ALREADY_EXISTS forever."""
    from csi_driver.core.store import PublicationStore

    backend, _, tmp = node_world
    vid, ctx = _volume(backend, "pvc")
    target = str(tmp / "t")
    req = PublishRequest(vid, target, plain_capability(), volume_context=ctx)
    real_update = PublicationStore.update

    def killed(self, target, **changes):
        raise _Killed

    core = make_node(tmp, keys, mounter)
    try:
        monkeypatch.setattr(PublicationStore, "update", killed)
        with pytest.raises(_Killed):
            core.publish(req)  # "dies" just before recording the live mount
        assert mounttable.find_mount(target) is not None  # a live mount without a record
    finally:
        monkeypatch.setattr(PublicationStore, "update", real_update)
        core.supervisor.shutdown()
    core2 = make_node(tmp, keys, mounter)  # restarted on the same state dir
    try:
        core2.publish(req)  # kubelet's retry succeeds
        core2.publish(req)  # and stays idempotent
        pathlib.Path(target, "f").write_bytes(DATA)
        assert [(p.target_path, p.phase) for p in core2.publications()] == [(target, "mounted")]
        assert [m.mountpoint for m in mounttable.mount_entries()].count(target) == 1
        core2.unpublish(vid, target)
        assert core2.publications() == [] and not os.path.exists(target)
    finally:
        core2.shutdown()
