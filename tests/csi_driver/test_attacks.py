"""Issue 7 attacks on the node plugin, each reproduced over real gRPC with real FUSE mounts.

The host and the control plane are the adversary: they choose target paths, volume ids,
volume_context, the state directory's contents and the cipher directory's contents. None of
that may delete data, unmount another volume, pick the key or hang the plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from coco_proto import csi_pb2
from csi_driver.client import CsiClient

from .conftest import KEY_RESOURCE, Env, Keys, make_node
from .helpers import create_volume, expect_code, publish_request

SECRET = b"plaintext that must survive\n"
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _unpublish(env: Env, volume_id: str, target: str) -> None:
    env.node.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)
    )


def _unpublish_req(volume_id: str, target: str) -> csi_pb2.NodeUnpublishVolumeRequest:
    return csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)


def _published(env: Env, name: str = "a") -> tuple[csi_pb2.Volume, str]:
    vol = create_volume(env, f"pvc-{name}")
    target = env.target(name)
    env.node.node.NodePublishVolume(publish_request(vol, target))
    pathlib.Path(target, "data.txt").write_bytes(SECRET)
    return vol, target


def _tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            h.update(p.encode() + b"\0")
            with open(p, "rb") as f:
                h.update(f.read())
        h.update(dirpath.encode() + b"\1")
    return h.hexdigest()


# -- finding 2: unpublish must never delete data -------------------------------------------


def test_unpublish_of_pods_dir_keeps_data_of_volume_mounted_below(env: Env) -> None:
    """Unpublishing <kubelet>/pods used to rm -rf through another volume's live mount."""
    vol, target = _published(env)
    pods = str(env.tmp / "pods")
    expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.node.node.NodeUnpublishVolume,
        _unpublish_req("vol-x", pods),
    )
    assert pathlib.Path(target, "data.txt").read_bytes() == SECRET
    assert os.path.ismount(target)
    _unpublish(env, vol.volume_id, target)


def test_unpublish_keeps_a_non_empty_unmounted_target(env: Env) -> None:
    """rmdir only: files in an unmounted target directory are somebody's data."""
    target = env.target("plain")
    os.makedirs(target)
    pathlib.Path(target, "keep.txt").write_bytes(SECRET)
    err = expect_code(
        grpc.StatusCode.FAILED_PRECONDITION,
        env.node.node.NodeUnpublishVolume,
        _unpublish_req("vol-x", target),
    )
    assert "kept" in err.details()
    assert pathlib.Path(target, "keep.txt").read_bytes() == SECRET


def test_relative_target_is_invalid_and_nothing_is_deleted(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative target used to resolve against the plugin's cwd and be rm -rf'ed."""
    monkeypatch.chdir(env.tmp)
    rel = env.tmp / "precious"
    rel.mkdir()
    (rel / "keep.txt").write_bytes(SECRET)
    expect_code(INVALID, env.node.node.NodeUnpublishVolume, _unpublish_req("vol-x", "precious"))
    assert (rel / "keep.txt").read_bytes() == SECRET


def test_target_outside_kubelet_root_is_invalid(env: Env, tmp_path_factory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "keep.txt").write_bytes(SECRET)
    for path in (str(outside), str(env.tmp / "pods" / ".." / ".." / outside.name), "/"):
        expect_code(INVALID, env.node.node.NodeUnpublishVolume, _unpublish_req("vol-x", path))
    assert (outside / "keep.txt").read_bytes() == SECRET


def test_unpublish_through_symlink_does_not_unmount_another_volume(env: Env) -> None:
    vol, target = _published(env)
    # The target itself a symlink to the other volume's mount point...
    link = pathlib.Path(env.target("b"))
    link.symlink_to(target)
    for vid in ("vol-b", vol.volume_id):
        expect_code(INVALID, env.node.node.NodeUnpublishVolume, _unpublish_req(vid, str(link)))
    # ...or a parent directory that points into the other pod.
    (env.tmp / "pods" / "c").symlink_to(env.tmp / "pods" / "a")
    via_parent = str(env.tmp / "pods" / "c" / "volumes" / "mount")
    expect_code(
        grpc.StatusCode.NOT_FOUND,
        env.node.node.NodeUnpublishVolume,
        _unpublish_req("vol-b", via_parent),
    )
    assert os.path.ismount(target)
    assert pathlib.Path(target, "data.txt").read_bytes() == SECRET
    _unpublish(env, vol.volume_id, target)


def _forge_state(state_dir: pathlib.Path, records: list[dict[str, object]]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "node-state.json").write_text(json.dumps({"version": 1, "publications": records}))


def test_tampered_state_record_cannot_make_unpublish_delete_anything(
    tmp_path: pathlib.Path, keys: Keys
) -> None:
    """A state record marked ephemeral used to make the next unpublish rm -rf cipher_dir."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_bytes(SECRET)
    target = tmp_path / "pods" / "evil" / "mount"
    target.parent.mkdir(parents=True)
    rec = {
        "volume_id": "vol-evil",
        "target_path": str(target),
        "cipher_dir": str(precious),
        "mounter": "gocryptfs",
        "readonly": False,
        "access_mode": 1,
        "pid": 999999,
        "ephemeral": True,
    }
    _forge_state(tmp_path / "node-state", [rec])
    core = make_node(tmp_path, keys, "gocryptfs")
    try:
        assert core.publications() == []  # the forged record was dropped
        core.unpublish("vol-evil", str(target))
    finally:
        core.shutdown()
    assert (precious / "keep.txt").read_bytes() == SECRET


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_path", "/"),
        ("target_path", "relative/path"),
        ("volume_id", "../../x"),
        ("volume_id", "vol\n"),
        ("pid", True),
        ("readonly", "yes"),
        ("mounter", "sh"),
        ("phase", "done"),
        ("capacity_bytes", -1),
    ],
)
def test_malformed_state_records_are_dropped(
    tmp_path: pathlib.Path, keys: Keys, field: str, value: object
) -> None:
    target = tmp_path / "pods" / "p" / "mount"
    rec: dict[str, object] = {
        "volume_id": "vol-1",
        "target_path": str(target),
        "cipher_dir": str(tmp_path / "backend" / "vol-1"),
        "mounter": "gocryptfs",
        "readonly": False,
        "access_mode": 1,
        "pid": 999999,
    }
    rec[field] = value
    _forge_state(tmp_path / "node-state", [rec, "junk", {"volume_id": 1}])
    core = make_node(tmp_path, keys, "gocryptfs")
    try:
        assert core.publications() == []
    finally:
        core.shutdown()


def test_state_file_fifo_or_huge_does_not_hang_or_exhaust(
    tmp_path: pathlib.Path, keys: Keys
) -> None:
    state = tmp_path / "node-state"
    state.mkdir()
    os.mkfifo(state / "node-state.json")
    t0 = time.monotonic()
    make_node(tmp_path, keys, "gocryptfs").shutdown()
    (state / "node-state.json").unlink()
    with open(state / "node-state.json", "wb") as f:
        f.truncate(3 << 30)  # sparse 3 GiB
    make_node(tmp_path, keys, "gocryptfs").shutdown()
    assert time.monotonic() - t0 < 10


def test_forged_pid_is_never_adopted(tmp_path: pathlib.Path) -> None:
    """A state record naming an unrelated process (right start time, own session) must not
    be adopted: unpublish would later SIGKILL it."""
    from csi_driver.proc import serves as pid_serves
    from csi_driver.proc import start_time as proc_start_time

    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        target = str(tmp_path / "t")
        assert not pid_serves(victim.pid, target, proc_start_time(victim.pid))
        assert not pid_serves(1, target, proc_start_time(1))
        assert not pid_serves(os.getpid(), target, proc_start_time(os.getpid()))
    finally:
        victim.kill()
        victim.wait()


# -- finding 7: ids and paths ----------------------------------------------------------------


@pytest.mark.parametrize(
    "volume_id", ["volnl\n", "..", ".", "a/b", "vol\0x", "x" * 129, " vol", "vol\r", "-vol"]
)
def test_hostile_volume_ids_are_invalid(env: Env, volume_id: str) -> None:
    vol = create_volume(env)
    req = publish_request(vol, env.target(), volume_id=volume_id)
    expect_code(INVALID, env.node.node.NodePublishVolume, req)
    expect_code(INVALID, env.node.node.NodeUnpublishVolume, _unpublish_req(volume_id, "/x"))
    assert env.core.publications() == []


@pytest.mark.parametrize("kind", ["nul", "huge", "relative", "dotdot", "empty-component"])
def test_hostile_target_paths_are_invalid(env: Env, kind: str) -> None:
    base = str(env.tmp / "pods" / "p")
    path = {
        "nul": base + "/mo\0unt",
        "huge": base + "/" + "/".join(["d" * 200] * 41),  # > 8 KiB
        "relative": "pods/p/mount",
        "dotdot": base + "/../p/mount",
        "empty-component": base + "//mount",
    }[kind]
    vol = create_volume(env)
    expect_code(INVALID, env.node.node.NodePublishVolume, publish_request(vol, path))
    expect_code(INVALID, env.node.node.NodeUnpublishVolume, _unpublish_req(vol.volume_id, path))
    assert env.core.publications() == []


# -- finding 3: the control plane must not pick the key or the place -------------------------


def test_key_resource_outside_allow_list_is_refused(env: Env) -> None:
    vol = create_volume(env)
    for uri in ("kbs:///default/signing-key/csi-test", "kbs:///default/coco-csi-other/k"):
        req = publish_request(vol, env.target(), context={"keyResource": uri})
        expect_code(grpc.StatusCode.PERMISSION_DENIED, env.node.node.NodePublishVolume, req)
    dots = publish_request(
        vol, env.target(), context={"keyResource": "kbs:///default/coco-csi/../signing-key/x"}
    )
    expect_code(INVALID, env.node.node.NodePublishVolume, dots)
    assert os.listdir(vol.volume_context["cipherDir"]) == []


def test_node_without_allow_list_refuses_every_key_resource(
    tmp_path: pathlib.Path, keys: Keys
) -> None:
    from csi_driver import errors
    from csi_driver.core.controller import LocalBackend
    from csi_driver.core.node import PublishRequest

    from .helpers import plain_capability

    backend = LocalBackend(str(tmp_path / "backend"))
    rec, ctx = backend.create("pvc", [plain_capability()], {"keyResource": KEY_RESOURCE})
    core = make_node(tmp_path, keys, "gocryptfs", allowed_key_resources=())
    try:
        req = PublishRequest(
            rec.volume_id,
            str(tmp_path / "pods" / "p" / "mount"),
            plain_capability(),
            volume_context=ctx,
        )
        with pytest.raises(errors.PermissionDenied, match="allowed-key-resource"):
            core.publish(req)
    finally:
        core.shutdown()


def test_public_signing_jwk_is_not_a_volume_key(env: Env) -> None:
    """The attack that won: keyResource pointing at the public verification JWK."""
    vol = create_volume(env)
    req = publish_request(
        vol, env.target(), context={"keyResource": "kbs:///default/coco-csi/signing-jwk"}
    )
    err = expect_code(grpc.StatusCode.FAILED_PRECONDITION, env.node.node.NodePublishVolume, req)
    assert "not a coco-csi volume key" in err.details()
    assert os.listdir(vol.volume_context["cipherDir"]) == []


def test_cipher_dir_outside_configured_roots_is_refused(env: Env, tmp_path_factory) -> None:
    """The controller (volume_context) must not choose an arbitrary guest directory."""
    vol = create_volume(env)
    elsewhere = tmp_path_factory.mktemp("guest-dir")
    link = env.tmp / "backend" / "link"
    link.symlink_to(elsewhere)
    for cipher_dir in (str(elsewhere), str(link), str(env.tmp / "backend"), "backend/x"):
        req = publish_request(vol, env.target(), context={"cipherDir": cipher_dir})
        expect_code(INVALID, env.node.node.NodePublishVolume, req)
    assert os.listdir(elsewhere) == []


def test_plaintext_passphrase_in_volume_context_is_refused(env: Env) -> None:
    vol = create_volume(env)
    req = publish_request(vol, env.target(), context={"passphrase": "hunter2-plain"})
    err = expect_code(INVALID, env.node.node.NodePublishVolume, req)
    assert "hunter2" not in err.details()
    assert os.listdir(vol.volume_context["cipherDir"]) == []


# -- finding 4: host-planted files, deadlines, exhaustion ------------------------------------


def test_fifo_or_huge_conf_fails_fast(env: Env) -> None:
    vol = create_volume(env)
    conf = pathlib.Path(vol.volume_context["cipherDir"], "gocryptfs.conf")
    os.mkfifo(conf)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        env.node.node.NodePublishVolume(publish_request(vol, env.target()), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    conf.unlink()
    with open(conf, "wb") as f:
        f.truncate(3 << 30)
    with pytest.raises(grpc.RpcError) as info:
        env.node.node.NodePublishVolume(publish_request(vol, env.target()), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    assert time.monotonic() - t0 < 5
    assert not os.path.exists(env.target())


class _SlowResolver:
    """Wraps the real resolver; key fetches block until released (a hung KBS)."""

    def __init__(self, inner: object, delay: float | None = None) -> None:
        self.inner = inner
        self.delay = delay
        self.release = threading.Event()

    def get_resource(self, uri: str) -> bytes:
        if self.delay is not None:
            time.sleep(self.delay)
        else:
            self.release.wait(60)
        return self.inner.get_resource(uri)  # type: ignore[attr-defined]

    def unseal(self, sealed: str, **kw: object) -> bytes:
        return self.inner.unseal(sealed, **kw)  # type: ignore[attr-defined]


def test_probe_answers_while_many_publishes_hang(env: Env) -> None:
    slow = _SlowResolver(env.core.resolver)
    env.core.resolver = slow
    vols = [create_volume(env, f"hang-{i}") for i in range(20)]
    pool = ThreadPoolExecutor(len(vols))
    client = CsiClient(env.node_endpoint)
    try:
        futs = [
            pool.submit(
                client.node.NodePublishVolume,
                publish_request(v, env.target(f"hang-{i}")),
                timeout=30,
            )
            for i, v in enumerate(vols)
        ]
        time.sleep(0.5)
        t0 = time.monotonic()
        ready = env.node.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
        assert ready.ready.value
        assert time.monotonic() - t0 < 3.0  # not queued behind the hung publishes (loaded VM)
        slow.release.set()
        codes = []
        for f in futs:
            try:
                f.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    finally:
        slow.release.set()
        pool.shutdown(wait=True)
        client.close()


def test_publish_past_deadline_leaves_nothing_behind(env: Env) -> None:
    env.core.resolver = _SlowResolver(env.core.resolver, delay=1.5)
    vol = create_volume(env)
    target = env.target()
    with pytest.raises(grpc.RpcError) as info:
        env.node.node.NodePublishVolume(publish_request(vol, target), timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(2.5)  # let the server side run into its deadline
    assert env.core.publications() == []
    assert not os.path.exists(target)
    assert os.listdir(vol.volume_context["cipherDir"]) == []


def test_lock_tables_are_pruned(env: Env) -> None:
    vol = create_volume(env)
    for i in range(5):
        target = env.target(f"t{i}")
        env.node.node.NodePublishVolume(publish_request(vol, target, readonly=True))
        _unpublish(env, vol.volume_id, target)
        expect_code(INVALID, env.node.node.NodeUnpublishVolume, _unpublish_req("x", f"rel{i}"))
    assert env.core.lock_table_sizes() == (0, 0)


# -- beyond: a deleted gocryptfs.conf must not yield a fresh empty volume --------------------


@pytest.mark.parametrize("mounter", ["gocryptfs", "fuse-crypt"])
def test_deleted_conf_is_not_reinitialised(
    tmp_path: pathlib.Path, sockdir: str, keys: Keys, mounter: str
) -> None:
    from .conftest import _env

    for env in _env(tmp_path, sockdir, keys, mounter):
        vol, target = _published(env)
        _unpublish(env, vol.volume_id, target)
        cipher_dir = vol.volume_context["cipherDir"]
        os.unlink(os.path.join(cipher_dir, "gocryptfs.conf"))
        before = _tree_digest(cipher_dir)
        err = expect_code(
            grpc.StatusCode.FAILED_PRECONDITION,
            env.node.node.NodePublishVolume,
            publish_request(vol, target),
        )
        assert "missing" in err.details() and "not re-initialised" in err.details()
        assert _tree_digest(cipher_dir) == before
        assert not os.path.exists(target)


def test_interrupted_init_leftovers_are_initialised(env: Env) -> None:
    """An init that crashed after writing gocryptfs.diriv left a never-used volume."""
    vol = create_volume(env)
    cipher_dir = pathlib.Path(vol.volume_context["cipherDir"])
    (cipher_dir / "gocryptfs.diriv").write_bytes(os.urandom(16))
    target = env.target()
    env.node.node.NodePublishVolume(publish_request(vol, target))
    pathlib.Path(target, "x").write_bytes(SECRET)
    assert (cipher_dir / "gocryptfs.conf").exists()
    _unpublish(env, vol.volume_id, target)


def test_fifo_or_symlink_planted_as_mount_log_does_not_hang_or_redirect(env: Env) -> None:
    """The mount logs live in the state dir (a hostPath): a FIFO there blocked the open."""
    vol = create_volume(env)
    target = env.target()
    log_path = pathlib.Path(env.core.supervisor.log_path(target))
    os.mkfifo(log_path)
    env.node.node.NodePublishVolume(publish_request(vol, target), timeout=20)
    assert log_path.is_file() and not log_path.is_symlink()
    _unpublish(env, vol.volume_id, target)
    elsewhere = env.tmp / "elsewhere.txt"
    elsewhere.write_bytes(b"")
    log_path.unlink()
    log_path.symlink_to(elsewhere)
    env.node.node.NodePublishVolume(publish_request(vol, target), timeout=20)
    assert elsewhere.read_bytes() == b"" and not log_path.is_symlink()
    _unpublish(env, vol.volume_id, target)


def test_allowed_signing_kids_reach_the_resolver() -> None:
    """--allowed-signing-kid is handed to unseal (sealed_secrets enforces it)."""
    from csi_driver.keys import resolve_volume_key

    seen: list[object] = []

    class Recorder:
        def get_resource(self, uri: str) -> bytes:
            raise AssertionError("not used")

        def unseal(self, sealed: str, **kw: object) -> bytes:
            seen.append(kw.get("allowed_kids"))
            return b"pass phrase"

    key = resolve_volume_key(
        "vol-1",
        {},
        {"passphrase": "sealed.fake.fake.fake"},
        Recorder(),
        allowed_kids=["kbs:///default/signing-key/"],
    )
    assert key.source == "sealed-passphrase"
    assert [list(k) for k in seen] == [["kbs:///default/signing-key/"]]


def test_sealed_passphrase_from_a_kid_outside_the_allow_list_is_refused(
    tmp_path: pathlib.Path, keys: Keys
) -> None:
    from csi_driver import errors
    from csi_driver.core.controller import LocalBackend
    from csi_driver.core.node import PublishRequest

    from .helpers import plain_capability

    core = make_node(tmp_path, keys, "gocryptfs", allowed_signing_kids=["kbs:///other/"])
    try:
        backend = LocalBackend(str(tmp_path / "backend"))
        rec, ctx = backend.create("pvc", [plain_capability()], {"keyResource": KEY_RESOURCE})
        del ctx["keyResource"]
        req = PublishRequest(
            rec.volume_id,
            str(tmp_path / "pods" / "p" / "mount"),
            plain_capability(),
            secrets={"passphrase": keys.seal_passphrase()},
            volume_context=ctx,
        )
        with pytest.raises(errors.CsiError) as info:
            core.publish(req)
        assert info.value.code in (
            errors.Code.PERMISSION_DENIED,
            errors.Code.INVALID_ARGUMENT,
            errors.Code.FAILED_PRECONDITION,
        )
        assert os.listdir(tmp_path / "backend" / rec.volume_id) == []
    finally:
        core.shutdown()


def test_hung_mount_does_not_hang_stats(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon whose storage the host freezes wedges statfs; the caller gets UNAVAILABLE and
    repeated calls do not pile up threads."""
    import csi_driver.core.node as node_mod

    vol, target = _published(env)
    release = threading.Event()
    real_statvfs = os.statvfs

    def wedged(path):
        if path == target:
            release.wait(30)
        return real_statvfs(path)

    monkeypatch.setattr(node_mod, "PROBE_TIMEOUT", 0.5)
    monkeypatch.setattr(os, "statvfs", wedged)
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
    before = threading.active_count()
    try:
        t0 = time.monotonic()
        for _ in range(5):
            expect_code(grpc.StatusCode.UNAVAILABLE, env.node.node.NodeGetVolumeStats, req)
        assert time.monotonic() - t0 < 3
        assert threading.active_count() - before <= 2  # one stuck helper, not five
    finally:
        release.set()
    time.sleep(0.2)
    env.node.node.NodeGetVolumeStats(req)
    _unpublish(env, vol.volume_id, target)


def test_wedged_daemon_does_not_hang_the_plugin(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount whose daemon stops answering (SIGSTOP: what frozen storage looks like)."""
    import signal

    import csi_driver.core.node as node_mod

    monkeypatch.setattr(node_mod, "PROBE_TIMEOUT", 0.5)
    vol, target = _published(env)
    pid = env.core.publications()[0].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        while pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.01)
        t0 = time.monotonic()
        stats = csi_pb2.NodeGetVolumeStatsRequest(volume_id=vol.volume_id, volume_path=target)
        expect_code(grpc.StatusCode.UNAVAILABLE, env.node.node.NodeGetVolumeStats, stats)
        env.node.node.NodePublishVolume(publish_request(vol, target), timeout=10)  # idempotent
        assert env.node.identity.Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value
        assert time.monotonic() - t0 < 5
        env.node.node.NodeUnpublishVolume(_unpublish_req(vol.volume_id, target), timeout=30)
        assert not os.path.exists(target)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_unmount_never_follows_a_symlink_swapped_in(env: Env) -> None:
    """The last line of defence behind validation: the kernel refuses to follow the link."""
    from csi_driver.mounts import umount_nofollow

    vol, target = _published(env)
    link = pathlib.Path(env.target("swapped"))
    link.symlink_to(target)
    assert not umount_nofollow(str(link))
    assert not umount_nofollow(str(link), lazy=True)
    assert os.path.ismount(target)
    assert pathlib.Path(target, "data.txt").read_bytes() == SECRET
    _unpublish(env, vol.volume_id, target)
