"""Node plugin over a real unix socket with real FUSE mounts (gocryptfs and fuse-crypt)."""

from __future__ import annotations

import errno
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.keys import derive_volume_password

from .conftest import KEY_PREFIX, KEY_RESOURCE, PASSPHRASE, Env
from .helpers import (
    Mode,
    backend_blob,
    create_volume,
    expect_code,
    mount_capability,
    publish_request,
)

OK_TEXT = b"confidential payload 0123456789\n"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _mountinfo() -> str:
    return _read("/proc/self/mountinfo").decode()


def _write_read(target: str) -> None:
    os.makedirs(os.path.join(target, "dir"))
    with open(os.path.join(target, "dir", "secret.txt"), "wb") as f:
        f.write(OK_TEXT * 50)
    with open(os.path.join(target, "dir", "secret.txt"), "rb") as f:
        assert f.read() == OK_TEXT * 50


def test_publish_write_read_ciphertext_only(any_env: Env) -> None:
    env = any_env
    vol = create_volume(env)
    target = env.target()
    assert not os.path.exists(target)
    env.node.node.NodePublishVolume(publish_request(vol, target))
    assert os.path.isdir(target)
    _write_read(target)
    cipher_dir = vol.volume_context["cipherDir"]
    assert os.path.exists(os.path.join(cipher_dir, "gocryptfs.conf"))
    blob = backend_blob(cipher_dir)
    assert b"confidential payload" not in blob
    assert b"secret.txt" not in blob and b"dir\0" not in blob
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    assert not os.path.exists(target)
    assert os.path.exists(os.path.join(cipher_dir, "gocryptfs.conf"))


def test_volume_opens_with_gocryptfs_using_derived_key(any_env: Env) -> None:
    """Whatever mounter wrote it, Debian gocryptfs opens it with HKDF(root, volume_id)."""
    env = any_env
    vol = create_volume(env)
    target = env.target()
    env.node.node.NodePublishVolume(publish_request(vol, target))
    _write_read(target)
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    mnt = env.tmp / "check"
    mnt.mkdir()
    password = derive_volume_password(env.keys.root_key, vol.volume_id)
    subprocess.run(
        ["gocryptfs", "-q", "-passfile", "/dev/stdin", vol.volume_context["cipherDir"], str(mnt)],
        input=password,
        check=True,
    )
    try:
        assert (mnt / "dir" / "secret.txt").read_bytes() == OK_TEXT * 50
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_publish_is_idempotent_and_conflicts_are_already_exists(env: Env) -> None:
    vol = create_volume(env)
    other = create_volume(env, "pvc-2")
    target = env.target()
    req = publish_request(vol, target)
    env.node.node.NodePublishVolume(req)
    pid = env.core.publications()[0].pid
    env.node.node.NodePublishVolume(req)
    assert [p.pid for p in env.core.publications()] == [pid]  # no second daemon
    expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        env.node.node.NodePublishVolume,
        publish_request(vol, target, readonly=True),
    )
    expect_code(
        grpc.StatusCode.ALREADY_EXISTS,
        env.node.node.NodePublishVolume,
        publish_request(other, target),
    )
    _write_read(target)  # the original mount is untouched


def test_readonly_and_reader_only_modes_mount_read_only(env: Env) -> None:
    vol = create_volume(env)
    rw = env.target("rw")
    env.node.node.NodePublishVolume(publish_request(vol, rw))
    _write_read(rw)
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=rw)
    )
    for i, req_kw in enumerate(
        (
            {"readonly": True},
            {"mode": Mode.SINGLE_NODE_READER_ONLY},
            {"mode": Mode.MULTI_NODE_READER_ONLY},
        )
    ):
        target = env.target(f"ro{i}")
        env.node.node.NodePublishVolume(publish_request(vol, target, **req_kw))
        with open(os.path.join(target, "dir", "secret.txt"), "rb") as f:
            assert f.read() == OK_TEXT * 50
        with pytest.raises(OSError) as info, open(os.path.join(target, "new.txt"), "wb"):
            pass
        assert info.value.errno == errno.EROFS
    # Several read-only publications of one volume may coexist.
    assert len(env.core.publications()) == 3


def test_second_writable_target_of_same_volume_is_refused(env: Env) -> None:
    vol = create_volume(env)
    env.node.node.NodePublishVolume(publish_request(vol, env.target("a")))
    expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.node.node.NodePublishVolume,
        publish_request(vol, env.target("b")),
    )


def test_missing_fields_are_invalid_argument(env: Env) -> None:
    vol = create_volume(env)
    target = env.target()
    full = publish_request(vol, target)
    for field in ("volume_id", "target_path", "volume_capability"):
        req = csi_pb2.NodePublishVolumeRequest()
        req.CopyFrom(full)
        req.ClearField(field)
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.node.node.NodePublishVolume, req)
    for field in ("volume_id", "target_path"):
        req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
        req.ClearField(field)
        expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.node.node.NodeUnpublishVolume, req)
    assert not os.path.exists(target)


def test_unknown_volume_is_not_found(env: Env) -> None:
    req = publish_request(
        None,
        env.target(),
        volume_id="coco-nope",
        context={
            "cipherDir": str(env.tmp / "backend" / "coco-nope"),
            "keyResource": "kbs:///default/coco-csi/volume-root",
        },
    )
    expect_code(grpc.StatusCode.NOT_FOUND, env.node.node.NodePublishVolume, req)
    req = publish_request(None, env.target(), volume_id="coco-nope")
    expect_code(grpc.StatusCode.NOT_FOUND, env.node.node.NodePublishVolume, req)


def test_unsupported_capabilities_are_failed_precondition(env: Env) -> None:
    vol = create_volume(env)
    block = publish_request(vol, env.target())
    block.volume_capability.ClearField("mount")
    block.volume_capability.block.SetInParent()
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, env.node.node.NodePublishVolume, block)
    multi = publish_request(vol, env.target(), mode=Mode.MULTI_NODE_MULTI_WRITER)
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, env.node.node.NodePublishVolume, multi)
    assert not os.path.exists(env.target())


def test_unpublish_is_idempotent_and_removes_target(env: Env) -> None:
    vol = create_volume(env)
    target = env.target()
    env.node.node.NodePublishVolume(publish_request(vol, target))
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    env.node.node.NodeUnpublishVolume(req)
    assert not os.path.exists(target)
    assert target not in _mountinfo()
    env.node.node.NodeUnpublishVolume(req)  # already gone: OK
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="never", target_path=str(env.tmp / "x"))
    )


def test_unpublish_of_a_busy_target_fails_and_loses_nothing(any_env: Env) -> None:
    """A pod process still holds a file in the target: NodeUnpublishVolume waits
    BUSY_WAIT, then FAILED_PRECONDITION naming the target, with the mount, its daemon and
    its record left serving; what the holder writes afterwards is stored (the old lazy
    detach stopped the daemon under it). Once closed, the same call succeeds."""
    import time

    from csi_driver.mounts import BUSY_WAIT

    env = any_env
    vol = create_volume(env)
    target = env.target()
    env.node.node.NodePublishVolume(publish_request(vol, target))
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    held = open(os.path.join(target, "held"), "wb")  # noqa: SIM115 (held across the call)
    try:
        held.write(b"before ")
        held.flush()
        started = time.monotonic()
        err = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION, env.node.node.NodeUnpublishVolume, req
        )
        took = time.monotonic() - started
        assert target in err.details() and "busy" in err.details(), err.details()
        assert BUSY_WAIT <= took < BUSY_WAIT + 10, took
        assert f" {target} " in _mountinfo()
        held.write(b"after")  # the daemon still serves the holder
        held.flush()
        os.fsync(held.fileno())
    finally:
        held.close()
    assert _read(os.path.join(target, "held")) == b"before after"
    env.node.node.NodeUnpublishVolume(req)
    assert not os.path.exists(target) and f" {target} " not in _mountinfo()
    again = env.target("again")
    env.node.node.NodePublishVolume(publish_request(vol, again))
    assert _read(os.path.join(again, "held")) == b"before after"
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=again)
    )


def test_volume_stats(env: Env) -> None:
    vol = create_volume(env)
    target = env.target()
    env.node.node.NodePublishVolume(publish_request(vol, target))
    _write_read(target)
    resp = env.node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    )
    units = {u.unit: u for u in resp.usage}
    by = units[csi_pb2.VolumeUsage.Unit.BYTES]
    assert by.total > 0 and by.available > 0 and by.used > 0
    # The volume's own numbers (it used to report the host filesystem's).
    assert by.total == vol.capacity_bytes and by.used + by.available == by.total
    assert by.used < 1 << 20  # the conf, the dir IV and one small file
    assert units[csi_pb2.VolumeUsage.Unit.INODES].total > 0
    expect_code(
        grpc.StatusCode.NOT_FOUND,
        env.node.node.NodeGetVolumeStats,
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=str(env.tmp / "no")),
    )
    expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.node.node.NodeGetVolumeStats,
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id),
    )


def test_existing_conf_is_never_overwritten_and_wrong_key_fails(env: Env) -> None:
    vol = create_volume(env)
    cipher_dir = vol.volume_context["cipherDir"]
    subprocess.run(
        ["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", "/dev/stdin", cipher_dir],
        input=b"someone else's password",
        check=True,
    )
    conf = _read(os.path.join(cipher_dir, "gocryptfs.conf"))
    target = env.target()
    err = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.node.node.NodePublishVolume,
        publish_request(vol, target),
    )
    assert "key" in err.details()
    assert _read(os.path.join(cipher_dir, "gocryptfs.conf")) == conf
    assert not os.path.exists(target)


def test_non_empty_uninitialised_dir_is_refused(env: Env) -> None:
    vol = create_volume(env)
    stray = os.path.join(vol.volume_context["cipherDir"], "data.bin")
    with open(stray, "wb") as f:
        f.write(b"precious")
    expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.node.node.NodePublishVolume,
        publish_request(vol, env.target()),
    )
    assert _read(stray) == b"precious"
    assert not os.path.exists(os.path.join(vol.volume_context["cipherDir"], "gocryptfs.conf"))


def test_each_volume_gets_its_own_key(env: Env) -> None:
    """Volume B's ciphertext presented under volume A's id does not open."""
    a, b = create_volume(env, "a"), create_volume(env, "b")
    ta = env.target("a")
    env.node.node.NodePublishVolume(publish_request(a, ta))
    _write_read(ta)
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=a.volume_id, target_path=ta)
    )
    swapped = publish_request(
        b, env.target("b"), context={"cipherDir": a.volume_context["cipherDir"]}
    )
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, env.node.node.NodePublishVolume, swapped)
    root = env.keys.root_key
    assert derive_volume_password(root, a.volume_id) != derive_volume_password(root, b.volume_id)


def test_sealed_passphrase_is_unsealed_in_guest(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    vol = create_volume(env)
    sealed = env.keys.seal_passphrase()
    target = env.target()
    ctx = {"keyResource": ""}
    req = publish_request(vol, target, secrets={"passphrase": sealed}, context=ctx)
    del req.volume_context["keyResource"]
    env.node.node.NodePublishVolume(req)
    _write_read(target)
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    # The volume's conf is wrapped with the unsealed passphrase: gocryptfs opens it with it.
    mnt = env.tmp / "check"
    mnt.mkdir()
    subprocess.run(
        ["gocryptfs", "-q", "-passfile", "/dev/stdin", vol.volume_context["cipherDir"], str(mnt)],
        input=PASSPHRASE,
        check=True,
    )
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    # A sealed passphrase in volume_context works too.
    req2 = publish_request(vol, env.target("ctx"), context={"passphrase": sealed})
    env.node.node.NodePublishVolume(req2)
    logs = caplog.text
    assert sealed not in logs and sealed[:40] not in logs
    assert PASSPHRASE.decode() not in logs


def test_plaintext_passphrase_is_refused_and_not_echoed(env: Env) -> None:
    vol = create_volume(env)
    err = expect_code(
        grpc.StatusCode.INVALID_ARGUMENT,
        env.node.node.NodePublishVolume,
        publish_request(vol, env.target(), secrets={"passphrase": "hunter2-plain"}),
    )
    assert "hunter2" not in err.details()


def test_key_resource_errors(env: Env) -> None:
    vol = create_volume(env)

    def with_key(uri: str) -> csi_pb2.NodePublishVolumeRequest:
        return publish_request(vol, env.target(), context={"keyResource": uri})

    fp = grpc.StatusCode.FAILED_PRECONDITION
    missing = with_key("kbs:///default/coco-csi/missing")
    expect_code(fp, env.node.node.NodePublishVolume, missing)
    # Under the allowed prefix but not a coco-csi volume key by type and size: refused.
    for name in ("short", "raw-bytes", "signing-jwk"):
        err = expect_code(fp, env.node.node.NodePublishVolume, with_key(KEY_PREFIX + name))
        assert "is not a coco-csi volume key" in err.details()
    bad = with_key("https://evil/key")
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.node.node.NodePublishVolume, bad)
    nokey = publish_request(vol, env.target())
    del nokey.volume_context["keyResource"]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, env.node.node.NodePublishVolume, nokey)
    assert env.core.publications() == []


def test_inline_ephemeral_volume(env: Env) -> None:
    target = env.target()
    req = publish_request(
        None,
        target,
        volume_id="csi-0123abcd",
        context={"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p"},
    )
    env.node.node.NodePublishVolume(req)
    backing = os.path.join(env.core.ephemeral_root, "csi-0123abcd")
    assert os.path.exists(os.path.join(backing, "gocryptfs.conf"))
    _write_read(target)
    assert b"confidential payload" not in backend_blob(backing)
    env.node.node.NodePublishVolume(req)
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-0123abcd", target_path=target)
    )
    assert not os.path.exists(backing) and not os.path.exists(target)


def test_many_volumes_concurrently(env: Env) -> None:
    vols = [create_volume(env, f"pvc-{i}") for i in range(8)]
    targets = [env.target(f"v{i}") for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda vt: env.node.node.NodePublishVolume(publish_request(*vt)),
                zip(vols, targets, strict=True),
            )
        )
    mounted = _mountinfo()
    assert all(t in mounted for t in targets)
    for t in targets:
        with open(os.path.join(t, "f"), "w") as f:
            f.write(t)
    for t in targets:
        assert _read(os.path.join(t, "f")).decode() == t
    assert env.core.metrics.mounted._value.get() == 8
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda vt: env.node.node.NodeUnpublishVolume(
                    csi_pb2.NodeUnpublishVolumeRequest(volume_id=vt[0].volume_id, target_path=vt[1])
                ),
                zip(vols, targets, strict=True),
            )
        )
    assert env.core.metrics.mounted._value.get() == 0


def test_identity_and_capabilities(env: Env) -> None:
    info = env.node.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "coco.csi.confidentialcontainers.org" and info.vendor_version
    assert env.node.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    caps = env.node.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert list(caps.capabilities) == []  # node mode: no controller service
    ccaps = env.ctrl.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    assert ccaps.capabilities[0].service.type == csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE
    ncaps = env.node.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    types = [c.rpc.type for c in ncaps.capabilities]
    rpc = csi_pb2.NodeServiceCapability.RPC
    assert types == [
        rpc.STAGE_UNSTAGE_VOLUME,
        rpc.GET_VOLUME_STATS,
        rpc.EXPAND_VOLUME,
        rpc.VOLUME_CONDITION,
    ]
    assert env.node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "test-node"


def test_volume_condition_is_in_every_stats_response() -> None:
    """With VOLUME_CONDITION advertised the spec requires volume_condition, message too, in
    every NodeGetVolumeStats response; an abnormal volume carries the core's reason."""
    from types import SimpleNamespace

    from csi_driver.core.node import VolumeStats
    from csi_driver.node import NodeServicer

    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id="v", volume_path="/p")
    for abnormal in (None, "the block daemon of volume v has exited"):
        stats = VolumeStats(10, 4, 6, 3, 1, 2, abnormal=abnormal)
        core = SimpleNamespace(stats=lambda vid, path, st=stats: st, metrics=None)
        resp = NodeServicer(core).NodeGetVolumeStats(req, None)  # type: ignore[arg-type]
        assert resp.HasField("volume_condition") and resp.volume_condition.message
        assert resp.volume_condition.abnormal is (abnormal is not None)
        if abnormal:
            assert resp.volume_condition.message == abnormal
        assert [(u.total, u.available, u.used) for u in resp.usage] == [(10, 4, 6), (3, 1, 2)]


def test_probe_not_ready_without_resolver(tmp_path) -> None:
    from csi_driver.core.node import NodeCore

    core = NodeCore("n", str(tmp_path / "s"), None, mounter="gocryptfs")
    try:
        ready, reason = core.probe()
        assert not ready and "resolver" in reason
    finally:
        core.shutdown()


def test_publish_creates_missing_parents_and_handles_existing_empty_target(env: Env) -> None:
    vol = create_volume(env)
    target = str(env.tmp / "deep" / "er" / "mount")
    env.node.node.NodePublishVolume(publish_request(vol, target))
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    os.makedirs(target)  # csi-sanity style: the CO pre-creates the target directory
    env.node.node.NodePublishVolume(publish_request(vol, target))
    assert os.path.ismount(target)


def test_target_path_with_spaces_and_mountinfo_escapes(env: Env) -> None:
    """mountinfo escapes spaces as \\040; lookups must still find the mount."""
    vol = create_volume(env)
    target = str(env.tmp / "pod with space" / "vol\ttab" / "mount")
    env.node.node.NodePublishVolume(publish_request(vol, target))
    assert os.path.ismount(target)
    env.node.node.NodePublishVolume(publish_request(vol, target))  # found again: idempotent
    env.node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    )
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id, target_path=target)
    )
    assert not os.path.exists(target)


def test_probe_not_ready_when_mounter_tool_missing(tmp_path) -> None:
    from csi_driver.core.node import NodeCore
    from csi_driver.mounter import GocryptfsMounter

    missing = GocryptfsMounter(binary=str(tmp_path / "no-such-gocryptfs"))
    core = NodeCore(
        "n",
        str(tmp_path / "s"),
        object(),
        mounter="gocryptfs",
        mounters={"gocryptfs": missing},
    )
    try:
        ready, reason = core.probe()
        assert not ready and "not installed" in reason
    finally:
        core.shutdown()


def test_capacity_is_enforced_and_shown_inside_the_mount(any_env: Env) -> None:
    """The demo's 64 MiB volume used to show the host's 23 GB: now statfs inside the mount
    is the volume's size, and a write past it is ENOSPC (fuse-crypt --capacity)."""
    env = any_env
    vol = env.ctrl.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name="small",
            volume_capabilities=[mount_capability()],
            parameters={"keyResource": KEY_RESOURCE},
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 << 20),
        )
    ).volume
    target = env.target()
    env.node.node.NodePublishVolume(publish_request(vol, target))
    st = env.node.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    )
    assert st.usage[0].total == 2 << 20
    if env.mounter == "gocryptfs":
        return  # Debian's gocryptfs has no quota: reported, not enforced
    sv = os.statvfs(target)
    assert sv.f_blocks * sv.f_frsize == 2 << 20
    with pytest.raises(OSError) as err, open(os.path.join(target, "big"), "wb") as f:
        f.write(os.urandom(3 << 20))
        f.flush()
    assert err.value.errno == errno.ENOSPC
