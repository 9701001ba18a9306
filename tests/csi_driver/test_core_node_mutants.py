"""The node core's validation and unpublish paths, in-process against the fakes.

NodeUnpublishVolume removes things (a mount, a target directory, an ephemeral volume's
ciphertext) on the word of a host-controlled request or state record; each rule that keeps
it from removing the wrong thing has a test here that fails in milliseconds when the rule
is wrong, so a mutation run (tools/mutation.py) can judge core/node.py by them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.core.node import PROBE_TIMEOUT, NodeCore, PublishRequest
from csi_driver.core.store import INTENT, Publication, PublicationStore
from csi_driver.core.volcap import AccessMode, AccessType, Capability
from csi_driver.deadline import Deadline
from csi_driver.metrics import Metrics
from csi_driver.mounts import MountEntry
from csi_driver.volume_key import new_volume_key_jwk

from .fakes import FakeMounter, FakeMountTable

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY = KEY_PREFIX + "volume-root"
_ROOT_JWK = new_volume_key_jwk().encode()
VOL = "vol-1"
CAP = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


class _Resolver:
    def get_resource(self, uri: str) -> bytes:
        return _ROOT_JWK

    def unseal(self, sealed: str, *, allowed_kids: Any = ()) -> bytes:
        raise AssertionError("not used")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.table = FakeMountTable()
        self.kubelet = tmp / "kubelet"
        self.backend = tmp / "backend"
        self.pods = self.kubelet / "pods"
        self.pods.mkdir(parents=True)
        (self.backend / VOL).mkdir(parents=True)
        self.target = str(self.pods / "t")
        self.metrics = Metrics()
        self.core = NodeCore(
            "node",
            str(tmp / "state"),
            _Resolver(),  # type: ignore[arg-type]
            mounter="fake",
            mounters={"fake": FakeMounter(self.table)},
            kubelet_dir=str(self.kubelet),
            cipher_roots=[str(self.backend)],
            allowed_key_resources=[KEY_PREFIX],
            metrics=self.metrics,
            monitor_interval=3600,
            mount_table=self.table,
        )
        self.stops: list[tuple[str, bool, bool]] = []
        real_stop = self.core.supervisor.stop

        def _stop(target: str, *, hung: bool = False, dead: bool = False) -> None:
            self.stops.append((target, hung, dead))
            real_stop(target, hung=hung, dead=dead)

        self.core.supervisor.stop = _stop  # type: ignore[method-assign]

    def publish(self, target: str | None = None, vol: str = VOL, **ctx: str) -> str:
        target = target or self.target
        context = {"cipherDir": str(self.backend / vol), "keyResource": KEY, **ctx}
        self.core.publish(PublishRequest(vol, target, CAP, volume_context=context))
        return target

    def publish_ephemeral(self, vol: str = "eph-1") -> str:
        target = str(self.pods / vol)
        ctx = {"csi.storage.k8s.io/ephemeral": "true"}
        self.core.publish(PublishRequest(vol, target, CAP, volume_context=ctx))
        return target

    def mounted(self) -> float:
        return self.metrics.mounted._value.get()  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    e = Env(tmp_path)
    yield e
    e.core.shutdown()


# -- request checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vid", "text"),
    [
        ("", "volume_id is required"),
        ("..", "volume_id has invalid characters or length"),
        ("a/b", "volume_id has invalid characters or length"),
    ],
)
def test_unpublish_checks_the_volume_id_first(env: Env, vid: str, text: str) -> None:
    env.publish()
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        env.core.unpublish(vid, env.target)
    assert env.table.find(env.target) is not None and env.stops == []


@pytest.mark.parametrize("bad", ["", "relative/t", "/etc", "/"])
def test_unpublish_refuses_targets_outside_the_kubelet_root(env: Env, bad: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="^target_path "):
        env.core.unpublish(VOL, bad)
    assert env.stops == []


def test_publish_request_checks_are_exact(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument, match=_exactly("target_path is required")):
        env.core.publish(PublishRequest(VOL, "", CAP))
    with pytest.raises(errors.InvalidArgument, match=_exactly("volume_capability is required")):
        env.core.publish(PublishRequest(VOL, env.target, None))
    with pytest.raises(errors.InvalidArgument, match=_exactly("volume_id is required")):
        env.core.publish(PublishRequest("", env.target, CAP))
    assert env.table.all() == {}


# -- unpublish ------------------------------------------------------------------------------


def test_unpublish_removes_the_mount_record_and_target_and_keeps_the_data(env: Env) -> None:
    env.publish()
    (env.backend / VOL / "data").write_bytes(b"ciphertext")
    assert env.mounted() == 1
    env.core.unpublish(VOL, env.target)
    assert env.table.find(env.target) is None and not os.path.exists(env.target)
    assert env.stops == [(env.target, False, False)]
    assert env.core.publications() == []
    assert PublicationStore(env.core.state_dir).load() == []
    assert env.mounted() == 0
    assert (env.backend / VOL / "data").read_bytes() == b"ciphertext"
    env.core.unpublish(VOL, env.target)  # idempotent: already gone is OK


def test_unpublish_of_another_volumes_target_is_not_found(env: Env) -> None:
    env.publish()
    text = f"volume other is not published at {env.target}"
    with pytest.raises(errors.NotFound, match=_exactly(text)):
        env.core.unpublish("other", env.target)
    assert env.table.find(env.target) is not None and os.path.isdir(env.target)
    assert env.stops == [] and len(env.core.publications()) == 1


def test_a_foreign_mount_without_a_record_is_left_alone(env: Env) -> None:
    os.mkdir(env.target)
    env.table.entries[env.target] = MountEntry(env.target, "ext4", "/dev/sda1", "rw")
    text = f"target_path {env.target} is a ext4 mount this driver did not make"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.core.unpublish(VOL, env.target)
    assert env.table.find(env.target) is not None and env.stops == []
    # ... unless it is dead: then it is cleaned up like ours
    env.table.states[env.target] = "dead"
    env.core.unpublish(VOL, env.target)
    assert env.table.find(env.target) is None and not os.path.exists(env.target)


@pytest.mark.parametrize("fstype", ["fuse.gocryptfs", "fuse.fuse-crypt", "fuse.fake-crypt"])
def test_our_own_fs_types_without_a_record_are_unmounted(env: Env, fstype: str) -> None:
    """A mount of ours whose record was lost (state dir wiped): kubelet's retry cleans it."""
    os.mkdir(env.target)
    env.table.entries[env.target] = MountEntry(env.target, fstype, "x", "rw")
    env.core.unpublish(VOL, env.target)
    assert env.table.find(env.target) is None and env.stops == [(env.target, False, False)]


def test_a_recorded_target_is_unmounted_whatever_its_fs_type_now(env: Env) -> None:
    env.publish()
    env.table.entries[env.target] = MountEntry(env.target, "ext4", "/dev/sda1", "rw")
    env.core.unpublish(VOL, env.target)
    assert env.table.find(env.target) is None


@pytest.mark.parametrize("count", [1, 2])
def test_mounts_below_the_target_stop_everything(env: Env, count: int) -> None:
    env.publish()
    for i in range(count):
        below = f"{env.target}/sub{i}"
        env.table.entries[below] = MountEntry(below, "tmpfs", "tmpfs", "rw")
    sibling = env.target + "x"  # not below: a sibling with the same prefix
    env.table.entries[sibling] = MountEntry(sibling, "tmpfs", "tmpfs", "rw")
    text = (
        f"target_path {env.target} has {count} other mount(s) below it; "
        "not unmounting or removing anything"
    )
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.core.unpublish(VOL, env.target)
    assert env.stops == [] and env.table.find(env.target) is not None
    assert len(env.core.publications()) == 1


def test_only_a_sibling_with_the_same_prefix_does_not_block(env: Env) -> None:
    env.publish()
    sibling = env.target + "x"
    env.table.entries[sibling] = MountEntry(sibling, "tmpfs", "tmpfs", "rw")
    env.core.unpublish(VOL, env.target)
    assert env.table.find(env.target) is None and env.table.find(sibling) is not None


def test_a_hung_mount_is_detached_lazily(env: Env) -> None:
    env.publish()
    env.table.states[env.target] = "hung"
    env.core.unpublish(VOL, env.target)
    assert env.stops == [(env.target, True, False)]
    assert env.table.find(env.target) is None and not os.path.exists(env.target)


def test_a_dead_mount_is_detached_lazily_but_not_hung(env: Env) -> None:
    env.publish()
    env.table.states[env.target] = "dead"
    env.table.busy.add(env.target)  # a pod process still holds the ENOTCONN mount
    env.core.unpublish(VOL, env.target)
    assert env.stops == [(env.target, False, True)]
    assert env.table.find(env.target) is None and not os.path.exists(env.target)


def test_a_busy_live_mount_fails_and_is_left_serving(env: Env) -> None:
    env.publish()
    (pub,) = env.core.publications()
    env.table.busy.add(env.target)
    text = (
        f"target_path {env.target} is busy (a process still has a file or its working "
        "directory in it) after 0 s; nothing was unmounted, retry once it is closed"
    )
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.core.unpublish(VOL, env.target)
    assert env.stops == [(env.target, False, False)]
    assert env.core.publications() == [pub] and env.table.find(env.target) is not None
    assert env.table.daemons() == {pub.pid: env.target}
    handle = env.core.supervisor.get(env.target)
    assert handle is not None and not handle.stopping  # still watched: restarted if it dies
    env.table.busy.clear()
    env.core.unpublish(VOL, env.target)
    assert env.core.publications() == [] and not os.path.exists(env.target)


def test_no_mount_means_not_hung_whatever_the_probe_says(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkdir(env.target)
    monkeypatch.setattr(env.table, "probe", lambda target, timeout: "hung")
    env.core.unpublish(VOL, env.target)
    assert env.stops == [(env.target, False, False)] and not os.path.exists(env.target)


@pytest.mark.parametrize(
    ("exc", "detail"),
    [
        (OSError(errno.EBUSY, "Device or resource busy"), "Device or resource busy"),
        (OSError("umount2 refused"), "umount2 refused"),
    ],
)
def test_an_unmount_failure_is_internal_and_keeps_the_record(
    env: Env, monkeypatch: pytest.MonkeyPatch, exc: OSError, detail: str
) -> None:
    env.publish()

    def _fail(target: str, *, lazy: bool = False) -> None:
        raise exc

    monkeypatch.setattr(env.table, "unmount", _fail)
    text = f"cannot unmount {env.target}: {detail}"
    with pytest.raises(errors.Internal, match=_exactly(text)) as info:
        env.core.unpublish(VOL, env.target)
    assert info.value.__suppress_context__
    assert len(env.core.publications()) == 1 and os.path.isdir(env.target)


# -- removing the target --------------------------------------------------------------------


def test_a_target_left_with_files_is_kept(env: Env) -> None:
    env.publish()
    env.table.unmount(env.target)
    Path(env.target, "file").write_bytes(b"data")
    text = (
        f"target_path {env.target} is unmounted but not empty; its contents are kept "
        "(remove them by hand if they are not needed)"
    )
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.core.unpublish(VOL, env.target)
    assert Path(env.target, "file").read_bytes() == b"data"
    assert env.core.publications() == []  # the unmount itself is done and recorded


def test_a_target_that_is_a_file_is_kept(env: Env) -> None:
    Path(env.target).write_bytes(b"data")
    text = f"target_path {env.target} is not a directory; not removing it"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.core.unpublish(VOL, env.target)
    assert Path(env.target).read_bytes() == b"data"


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (errno.EEXIST, errors.FailedPrecondition),
        (errno.ENOTEMPTY, errors.FailedPrecondition),
        (errno.EBUSY, errors.Internal),
        (errno.EACCES, errors.Internal),
    ],
)
def test_rmdir_failures(
    env: Env, monkeypatch: pytest.MonkeyPatch, err: int, kind: type[errors.CsiError]
) -> None:
    os.mkdir(env.target)

    def _rmdir(path: str) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "rmdir", _rmdir)
    with pytest.raises(kind) as info:
        env.core.unpublish(VOL, env.target)
    if kind is errors.Internal:
        assert str(info.value) == f"cannot remove {env.target}: {os.strerror(err)}"
    else:
        assert "is unmounted but not empty" in str(info.value)
    assert info.value.__suppress_context__


def test_a_target_still_mounted_is_never_removed(env: Env) -> None:
    """The last guard before rmdir: whatever stop() did, a mounted target stays."""
    env.publish()
    text = f"{env.target} is still mounted; not removing it"
    with pytest.raises(errors.Internal, match=_exactly(text)):
        env.core._remove_target(env.target)
    assert os.path.isdir(env.target) and env.table.find(env.target) is not None


# -- ephemeral volumes ------------------------------------------------------------------------


def test_unpublish_deletes_an_ephemeral_volumes_ciphertext(env: Env) -> None:
    target = env.publish_ephemeral()
    cipher = Path(env.core.ephemeral_root, "eph-1")
    assert cipher.is_dir()
    (cipher / "sub").mkdir()
    (cipher / "sub" / "f").write_bytes(b"x")
    outside = env.tmp / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    (cipher / "link").symlink_to(outside)
    env.core.unpublish("eph-1", target)
    assert not cipher.exists() and not os.path.exists(target)
    assert (outside / "keep").read_bytes() == b"k"  # links are removed, not followed


def test_a_persistent_volumes_ciphertext_is_never_deleted(env: Env) -> None:
    env.publish()
    eph = Path(env.core.ephemeral_root, VOL)
    eph.mkdir(parents=True)  # even if a directory of its name sits in the ephemeral root
    env.core.unpublish(VOL, env.target)
    assert eph.is_dir() and (env.backend / VOL).is_dir()


def _ephemeral_kept(env: Env, caplog: pytest.LogCaptureFixture, message: str) -> None:
    with caplog.at_level(logging.ERROR, logger="csi_driver.core.node"):
        env.core._remove_ephemeral("eph-1")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [message]


def test_ephemeral_removal_keeps_what_is_not_a_plain_directory(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    root = Path(env.core.ephemeral_root)
    root.mkdir(parents=True, exist_ok=True)
    elsewhere = env.tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"k")
    (root / "eph-1").symlink_to(elsewhere)
    _ephemeral_kept(env, caplog, "ephemeral directory is not a plain directory; kept")
    assert (elsewhere / "keep").exists() and (root / "eph-1").is_symlink()
    (root / "eph-1").unlink()
    (root / "eph-1").write_bytes(b"file")
    caplog.clear()
    _ephemeral_kept(env, caplog, "ephemeral directory is not a plain directory; kept")
    assert (root / "eph-1").read_bytes() == b"file"


def test_ephemeral_removal_keeps_a_directory_reached_through_a_symlink(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    e = Env(tmp_path)
    try:
        real = tmp_path / "real-eph"
        real.mkdir()
        (real / "eph-1").mkdir()
        Path(e.core.ephemeral_root).symlink_to(real)
        _ephemeral_kept(e, caplog, "ephemeral directory is not a plain directory; kept")
        assert (real / "eph-1").is_dir()
    finally:
        e.core.shutdown()


@pytest.mark.parametrize("where", ["at", "below"])
def test_ephemeral_removal_keeps_a_directory_with_a_mount(
    env: Env, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    path = Path(env.core.ephemeral_root, "eph-1")
    path.mkdir(parents=True)
    (path / "f").write_bytes(b"x")
    mp = str(path) if where == "at" else str(path / "m")
    env.table.entries[mp] = MountEntry(mp, "tmpfs", "tmpfs", "rw")
    _ephemeral_kept(env, caplog, "ephemeral directory has a mount inside; kept")
    assert (path / "f").exists()


def test_ephemeral_removal_ignores_mounts_beside_it(env: Env) -> None:
    path = Path(env.core.ephemeral_root, "eph-1")
    path.mkdir(parents=True)
    beside = str(path) + "x"
    env.table.entries[beside] = MountEntry(beside, "tmpfs", "tmpfs", "rw")
    env.core._remove_ephemeral("eph-1")
    assert not path.exists()
    env.core._remove_ephemeral("eph-1")  # already gone: nothing to do


def test_ephemeral_dir_is_one_valid_component_below_the_root(env: Env) -> None:
    assert env.core._ephemeral_dir("eph-1") == os.path.join(env.core.ephemeral_root, "eph-1")
    assert env.core.ephemeral_root == os.path.join(env.core.state_dir, "ephemeral")
    for bad in ("..", "a/b", ""):
        with pytest.raises(errors.InvalidArgument):
            env.core._ephemeral_dir(bad)


# -- state records ----------------------------------------------------------------------------


def _record(env: Env, **changes: Any) -> Publication:
    pub = Publication(
        volume_id=VOL,
        target_path=env.target,
        cipher_dir=str(env.backend / VOL),
        mounter="fake",
        readonly=False,
        access_mode=1,
    )
    return replace(pub, **changes)


def test_a_well_formed_record_passes(env: Env) -> None:
    env.core._check_record(_record(env))
    env.core._check_record(_record(env, pid=0, pid_start=0, capacity_bytes=0, access_mode=0))
    eph = env.core._ephemeral_dir("eph-1")
    env.core._check_record(_record(env, volume_id="eph-1", cipher_dir=eph, ephemeral=True))


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"volume_id": "../x"}, "volume_id has invalid characters or length"),
        ({"target_path": "/etc/x"}, None),
        ({"cipher_dir": "relative"}, "cipher_dir must be absolute"),
        ({"cipher_dir": "/a/../b"}, "cipher_dir must be normalised (no '.', '..' or '//')"),
        ({"mounter": "gocryptfs"}, "unknown mounter"),
        ({"ephemeral": True}, "ephemeral cipher_dir is not the plugin's own"),
        ({"pid": -1}, "negative number"),
        ({"pid_start": -1}, "negative number"),
        ({"access_mode": -1}, "negative number"),
        ({"capacity_bytes": -1}, "negative number"),
    ],
)
def test_forged_records_are_refused(env: Env, changes: dict[str, Any], text: str | None) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        env.core._check_record(_record(env, **changes))
    if text is not None:
        assert str(info.value) == text
    else:
        assert "is not below the directories this node serves" in str(info.value)


def test_a_record_whose_target_is_not_in_resolved_form_is_refused(env: Env) -> None:
    link = env.tmp / "kl"
    link.symlink_to(env.kubelet)
    text = "target_path is not in resolved form"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        env.core._check_record(_record(env, target_path=str(link / "pods" / "t")))
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        env.core._check_record(_record(env, target_path=env.target + "/"))


def test_forged_records_are_dropped_at_start_and_steer_nothing(tmp_path: Path) -> None:
    first = Env(tmp_path)
    first.publish()
    first.core.shutdown()
    store = PublicationStore(first.core.state_dir)
    good = store.load()
    assert len(good) == 1
    # a forged ephemeral intent that would make recovery delete the backend volume
    forged = replace(good[0], target_path=first.target + "2", ephemeral=True, phase=INTENT)
    store.put(forged)
    second = NodeCore(
        "node",
        first.core.state_dir,
        _Resolver(),  # type: ignore[arg-type]
        mounter="fake",
        mounters={"fake": FakeMounter(first.table)},
        kubelet_dir=str(first.kubelet),
        cipher_roots=[str(first.backend)],
        allowed_key_resources=[KEY_PREFIX],
        monitor_interval=3600,
        mount_table=first.table,
    )
    try:
        assert [p.target_path for p in second.publications()] == [first.target]
        assert (first.backend / VOL).is_dir()
    finally:
        second.shutdown()


# -- cipher dir and capacity from the control plane -------------------------------------------


def test_cipher_dir_from_volume_context_is_checked(env: Env) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        env.publish(cipherDir=str(env.tmp))
    assert str(info.value).startswith(f"volume_context cipherDir {env.tmp} is not below")
    with pytest.raises(errors.NotFound, match=_exactly("volume vol-2 does not exist")):
        env.publish(target=str(env.pods / "t2"), vol="vol-2")
    (env.backend / "vol-3").write_bytes(b"")
    text = f"volume vol-3: {env.backend / 'vol-3'} is not a directory (symlinks are refused)"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.publish(target=str(env.pods / "t3"), vol="vol-3")
    (env.backend / "vol-4").symlink_to(env.backend / VOL)
    text = f"volume_context cipherDir {env.backend / 'vol-4'} is a symlink; refusing to follow it"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        env.publish(target=str(env.pods / "t4"), vol="vol-4")
    assert env.table.all() == {}


def test_cipher_dir_is_required_without_a_backend_root(env: Env) -> None:
    req = PublishRequest(VOL, env.target, CAP, volume_context={"keyResource": KEY})
    text = f"volume {VOL}: no cipherDir in volume_context and no --backend-root on this node"
    with pytest.raises(errors.NotFound, match=_exactly(text)):
        env.core.publish(req)


def test_cipher_dir_needs_a_cipher_root(tmp_path: Path) -> None:
    e = Env(tmp_path)
    e.core.cipher_roots = ()
    try:
        text = "volume_context cipherDir is not accepted: this node has no --cipher-dir-root"
        with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
            e.publish()
    finally:
        e.core.shutdown()


@pytest.mark.parametrize("raw", ["-1", "1.5", "1e9", " 1", "\u0661", "1" * 21, ""])
def test_capacity_hint_must_be_a_decimal_byte_count(raw: str) -> None:
    text = "volume_context capacityBytes must be a decimal number of bytes"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        NodeCore._capacity_hint({"capacityBytes": raw}, "/")


def test_capacity_hint_is_bounded_by_the_storage(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    size = st.f_blocks * st.f_frsize
    assert NodeCore._capacity_hint({}, str(tmp_path)) == 0
    assert NodeCore._capacity_hint({"capacityBytes": "1024"}, str(tmp_path)) == 1024
    assert NodeCore._capacity_hint({"capacityBytes": "0"}, str(tmp_path)) == 0
    assert NodeCore._capacity_hint({"capacityBytes": "9" * 20}, str(tmp_path)) == size
    assert NodeCore._capacity_hint({"capacityBytes": str(size)}, str(tmp_path)) == size


def test_capacity_hint_on_storage_that_does_not_answer(tmp_path: Path) -> None:
    text = "the volume's storage is not answering"
    with pytest.raises(errors.Unavailable, match=_exactly(text)):
        NodeCore._capacity_hint({"capacityBytes": "1"}, str(tmp_path / "missing"))


# -- locks, probes and the log lines operators rely on -------------------------------------------


def test_unpublish_waits_for_an_operation_on_the_same_target(env: Env) -> None:
    env.publish()
    (env.backend / "vol-2").mkdir()
    other = env.publish(target=str(env.pods / "t2"), vol="vol-2")
    core = env.core
    with core._holding(core._target_locks, env.target, Deadline(), "test"):
        text = f"an operation on target {env.target} is still in progress"
        with pytest.raises(errors.Aborted, match=_exactly(text)):
            core.unpublish(VOL, env.target, Deadline(0.05))
        core.unpublish("vol-2", other, Deadline(0.05))  # another target is not held up
    assert env.table.find(env.target) is not None and env.table.find(other) is None
    assert core.lock_table_sizes() == (0, 0)


def test_probes_use_the_probe_timeout(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.publish()
    timeouts: list[float] = []
    real = env.table.probe

    def probe(target: str, timeout: float) -> str:
        timeouts.append(timeout)
        return real(target, timeout)

    monkeypatch.setattr(env.table, "probe", probe)
    env.core.unpublish(VOL, env.target)
    assert timeouts and set(timeouts) == {PROBE_TIMEOUT}


def test_unpublish_logs_volume_and_target(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    env.publish()
    with caplog.at_level(logging.INFO, logger="csi_driver.core.node"):
        env.core.unpublish(VOL, env.target)
    done = [r for r in caplog.records if r.getMessage() == "unpublished"]
    assert len(done) == 1
    assert done[0].fields == {"volume_id": VOL, "target": env.target}  # type: ignore[attr-defined]


def test_kept_ephemeral_directories_are_logged_with_their_volume(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    root = Path(env.core.ephemeral_root)
    (root / "eph-1").mkdir(parents=True)
    (root / "eph-2").parent.mkdir(parents=True, exist_ok=True)
    (root / "eph-2").write_bytes(b"")
    mp = str(root / "eph-1" / "m")
    env.table.entries[mp] = MountEntry(mp, "tmpfs", "tmpfs", "rw")
    with caplog.at_level(logging.ERROR, logger="csi_driver.core.node"):
        env.core._remove_ephemeral("eph-1")
        env.core._remove_ephemeral("eph-2")
    got = [(r.getMessage(), r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    assert got == [
        ("ephemeral directory has a mount inside; kept", {"volume_id": "eph-1"}),
        ("ephemeral directory is not a plain directory; kept", {"volume_id": "eph-2"}),
    ]


def test_ephemeral_removal_is_best_effort(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """What cannot be removed stays (it is ciphertext under a key that died with the pod);
    the unpublish itself succeeds."""
    target = env.publish_ephemeral()
    cipher = Path(env.core.ephemeral_root, "eph-1")
    (cipher / "stuck").write_bytes(b"x")
    (cipher / "gone").write_bytes(b"x")
    real_unlink = os.unlink

    def unlink(path: Any, *, dir_fd: int | None = None) -> None:
        if os.fsdecode(path) == "stuck":
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", unlink)
    env.core.unpublish("eph-1", target)
    assert sorted(os.listdir(cipher)) == ["stuck"] and not os.path.exists(target)


# -- where the ciphertext lives ---------------------------------------------------------------


def test_ephemeral_directories_are_private_and_reused(env: Env) -> None:
    first = env.publish_ephemeral("eph-1")
    root = Path(env.core.ephemeral_root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "eph-1").stat().st_mode) == 0o700
    env.publish_ephemeral("eph-2")  # the root exists now: fine
    assert stat.S_IMODE((root / "eph-2").stat().st_mode) == 0o700
    env.core.unpublish("eph-1", first)
    (root / "eph-3").mkdir(mode=0o700)  # left by an earlier plugin instance: reused
    env.publish_ephemeral("eph-3")
    assert env.table.find(str(env.pods / "eph-3")) is not None


def test_a_backend_root_names_the_volume_directory(tmp_path: Path) -> None:
    table = FakeMountTable()
    kubelet, backend = tmp_path / "kubelet", tmp_path / "backend"
    (kubelet / "pods").mkdir(parents=True)
    (backend / VOL).mkdir(parents=True)
    core = NodeCore(
        "node",
        str(tmp_path / "state"),
        _Resolver(),  # type: ignore[arg-type]
        mounter="fake",
        mounters={"fake": FakeMounter(table)},
        backend_root=str(backend),
        kubelet_dir=str(kubelet),
        allowed_key_resources=[KEY_PREFIX],
        monitor_interval=3600,
        mount_table=table,
    )
    try:
        target = str(kubelet / "pods" / "t")
        core.publish(PublishRequest(VOL, target, CAP, volume_context={"keyResource": KEY}))
        assert table.entries[target].source == str(backend / VOL)
        with pytest.raises(errors.NotFound, match=_exactly("volume vol-2 does not exist")):
            core.publish(
                PublishRequest("vol-2", target + "2", CAP, volume_context={"keyResource": KEY})
            )
    finally:
        core.shutdown()


def test_capacity_probe_uses_the_probe_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from csi_driver.core import node as node_mod

    seen: list[float] = []
    real = node_mod.fsprobe.call

    def call(path: str, fn: Any, timeout: float) -> Any:
        seen.append(timeout)
        return real(path, fn, timeout)

    monkeypatch.setattr(node_mod.fsprobe, "call", call)
    assert NodeCore._capacity_hint({"capacityBytes": "1"}, str(tmp_path)) == 1
    assert seen == [PROBE_TIMEOUT]


def test_a_cipher_dir_that_cannot_be_inspected(env: Env) -> None:
    (env.backend / "file").write_bytes(b"")
    bad = str(env.backend / "file" / "x")
    text = "volume vol-1: cannot inspect its directory: Not a directory"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        env.publish(cipherDir=bad)
