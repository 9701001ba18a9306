"""The node core killed at every step of publish and unpublish, then kubelet's retries.

In-process, against the fakes in fakes.py (no root, no FUSE, no daemons): "kill -9 of the
plugin" raises at the chosen step and freezes the old NodeCore (no cleanup handler of a
killed process may run), then a new NodeCore starts on the same state dir and the same
mount table. Optionally the mount daemons die too. Kubelet then retries (publish or
unpublish), possibly crashing the plugin once more on the way; the end state must be
exactly right: mounted once and recorded once, or nothing left at all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.core.node import NodeCore, PublishRequest
from csi_driver.core.store import INTENT, MOUNTED, PublicationStore
from csi_driver.core.volcap import AccessMode, AccessType, Capability
from csi_driver.deadline import Deadline
from csi_driver.metrics import Metrics
from csi_driver.volume_key import new_volume_key_jwk

from .fakes import FakeMounter, FakeMountTable

KEY_PREFIX = "kbs:///default/coco-csi/"
KEY = KEY_PREFIX + "volume-root"
_ROOT_JWK = new_volume_key_jwk().encode()
VOLUME = "coco-vol"
CAP = Capability(AccessType.MOUNT, AccessMode.SINGLE_NODE_WRITER)


class _Resolver:
    def get_resource(self, uri: str) -> bytes:
        return _ROOT_JWK

    def unseal(self, sealed: str, *, allowed_kids: Any = ()) -> bytes:
        raise AssertionError("not used")


class _Killed(BaseException):
    """kill -9 of the plugin at this point."""


class _Gone:
    """What a killed plugin's store and mount table become: nothing it does lands."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *a, **k: None


class Node:
    """A node: one fake mount table and state dir, and the plugin instance of the moment."""

    def __init__(self, tmp: pathlib.Path) -> None:
        self.tmp = tmp
        self.table = FakeMountTable()
        self.kubelet = tmp / "kubelet"
        self.backend = tmp / "backend"
        (self.kubelet / "pods" / "p" / "volumes").mkdir(parents=True)
        (self.backend / VOLUME).mkdir(parents=True)
        self.target = str(self.kubelet / "pods" / "p" / "volumes" / "mount")
        self.core = self.start()

    def start(self) -> NodeCore:
        return NodeCore(
            "fake-node",
            str(self.tmp / "state"),
            _Resolver(),
            mounter="fake",
            mounters={"fake": FakeMounter(self.table)},
            kubelet_dir=str(self.kubelet),
            cipher_roots=[str(self.backend)],
            allowed_key_resources=[KEY_PREFIX],
            metrics=Metrics(),
            monitor_interval=3600,
            mount_table=self.table,
        )

    def request(self) -> PublishRequest:
        ctx = {"cipherDir": str(self.backend / VOLUME), "keyResource": KEY}
        return PublishRequest(VOLUME, self.target, CAP, volume_context=ctx)

    def publish(self) -> None:
        self.core.publish(self.request())

    def unpublish(self) -> None:
        self.core.unpublish(VOLUME, self.target)

    def freeze(self) -> None:
        """The current instance is killed: nothing it still runs (cleanup handlers on the
        way out of the call) reaches the state file, the mounts or the target."""
        old = self.core
        old.supervisor._stop.set()
        old.store = old.supervisor.store = _Gone()  # type: ignore[assignment]
        old.mounts = old.supervisor.mounts = _Gone()  # type: ignore[assignment]
        old._remove_target = old._remove_ephemeral = _Gone().x  # type: ignore[method-assign]

    def kill_plugin(self) -> None:
        """kill -9 of the plugin and its restart on the same node."""
        self.freeze()
        self.core = self.start()

    def kill_daemons(self) -> None:
        for pid in list(self.table.daemons()):
            self.table.kill(pid)

    def records(self) -> list[tuple[str, str]]:
        return [(p.target_path, p.phase) for p in PublicationStore(str(self.tmp / "state")).load()]


def _arm(node: Node, op: str, point: str) -> None:
    """Make the plugin die at ``point`` of its next ``op``."""
    core = node.core

    def after(obj: Any, name: str, when: Callable[..., bool] = lambda *a, **k: True) -> None:
        real = getattr(obj, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            out = real(*a, **k)
            if when(*a, **k):
                node.freeze()
                raise _Killed(point)
            return out

        setattr(obj, name, wrapper)

    def before(obj: Any, name: str, when: Callable[..., bool]) -> None:
        real = getattr(obj, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            if when(*a, **k):
                node.freeze()
                raise _Killed(point)
            return real(*a, **k)

        setattr(obj, name, wrapper)

    is_intent = lambda pub, *a, **k: pub.phase == INTENT  # noqa: E731
    arms = {
        ("publish", "before-intent"): lambda: before(core.store, "put", is_intent),
        ("publish", "after-intent"): lambda: after(core.store, "put", is_intent),
        ("publish", "after-mkdir"): lambda: after(core, "_make_target"),
        ("publish", "after-mount"): lambda: after(core.supervisor, "start"),
        ("publish", "after-save"): lambda: after(core.store, "update"),
        ("unpublish", "after-unmount"): lambda: after(core.supervisor, "stop"),
        ("unpublish", "after-save"): lambda: after(core.store, "remove"),
        ("unpublish", "after-rmdir"): lambda: after(core, "_remove_target"),
    }
    arms[(op, point)]()


PUBLISH_POINTS = ["before-intent", "after-intent", "after-mkdir", "after-mount", "after-save"]
UNPUBLISH_POINTS = ["after-unmount", "after-save", "after-rmdir"]
CRASHES = [("publish", p) for p in PUBLISH_POINTS] + [("unpublish", p) for p in UNPUBLISH_POINTS]
SCENARIOS = [
    (first, second, kill, final)
    for first, second, kill, final in itertools.product(
        CRASHES, [None, *CRASHES], [False, True], ["publish", "unpublish"]
    )
]


def _id(s: tuple[Any, ...]) -> str:
    first, second, kill, final = s
    parts = ["{}@{}".format(*first), "{}@{}".format(*second) if second else "-"]
    return "/".join([*parts, "daemons-killed" if kill else "daemons-live", "then-" + final])


def _crash(node: Node, op: str, point: str, kill_daemons: bool) -> None:
    _arm(node, op, point)
    # Usually killed at the point; an op with nothing to do may finish before reaching it.
    with contextlib.suppress(_Killed):
        getattr(node, op)()
    node.kill_plugin()
    if kill_daemons:
        node.kill_daemons()


def assert_published_once(node: Node) -> None:
    table = node.table
    assert list(table.entries) == [node.target]
    assert table.probe(node.target, 1) == "live"
    pid = table.owner[node.target]
    assert table.daemons() == {pid: node.target}  # no stray daemon
    assert node.records() == [(node.target, MOUNTED)]
    assert node.core.store.get(node.target).pid == pid  # type: ignore[union-attr]
    # And a further restart adopts exactly that daemon; republishing starts no other.
    node.kill_plugin()
    handle = node.core.supervisor.get(node.target)
    assert handle is not None and handle.pid == pid
    node.publish()
    assert table.daemons() == {pid: node.target}


def assert_nothing_left(node: Node) -> None:
    assert node.table.entries == {} and node.table.daemons() == {}
    assert node.records() == []
    assert not os.path.lexists(node.target)
    assert (node.backend / VOLUME).is_dir()  # data is never removed by an unpublish


@pytest.mark.parametrize("scenario", SCENARIOS, ids=_id)
def test_crash_then_retry(tmp_path: pathlib.Path, scenario: tuple[Any, ...]) -> None:
    first, second, kill, final = scenario
    node = Node(tmp_path)
    t0 = time.perf_counter()
    try:
        if first[0] == "unpublish":
            node.publish()
        _crash(node, *first, kill)
        if second is not None:
            _crash(node, *second, kill)
        getattr(node, final)()  # kubelet's retry succeeds
        getattr(node, final)()  # and stays idempotent
        if final == "publish":
            assert_published_once(node)
        else:
            assert_nothing_left(node)
    finally:
        node.core.shutdown()
    assert time.perf_counter() - t0 < 2.5  # no real waits (loose: a loaded CI VM)


# -- idempotency, conflicts, recovery and deadlines, in-process ------------------------


def test_publish_is_idempotent_and_conflicts_are_typed(tmp_path: pathlib.Path) -> None:
    node = Node(tmp_path)
    try:
        node.publish()
        node.publish()
        assert len(node.table.daemons()) == 1
        ro = PublishRequest(
            VOLUME, node.target, CAP, readonly=True, volume_context=node.request().volume_context
        )
        with pytest.raises(errors.AlreadyExists):
            node.core.publish(ro)
        other = str(node.kubelet / "pods" / "p" / "volumes" / "second")
        with pytest.raises(errors.FailedPrecondition, match="writable elsewhere"):
            node.core.publish(PublishRequest(VOLUME, other, CAP, volume_context=ro.volume_context))
        with pytest.raises(errors.InvalidArgument, match="access_mode is required"):
            node.core.publish(PublishRequest(VOLUME, other, Capability(AccessType.MOUNT, 0)))
        with pytest.raises(errors.FailedPrecondition, match="block"):
            node.core.publish(PublishRequest(VOLUME, other, Capability(AccessType.BLOCK, 1)))
        assert not os.path.exists(other)
    finally:
        node.core.shutdown()


def test_a_daemon_that_exits_at_once_leaves_nothing(tmp_path: pathlib.Path) -> None:
    node = Node(tmp_path)
    try:
        node.core.mounters["fake"].fail_next = "exit"  # type: ignore[attr-defined]
        with pytest.raises(errors.MountError):
            node.publish()
        assert node.records() == [] and node.table.entries == {}
        assert not os.path.exists(node.target)
        node.publish()  # the retry works
        assert_published_once(node)
    finally:
        node.core.shutdown()


def test_deadline_undoes_a_daemon_that_never_gets_ready(tmp_path: pathlib.Path) -> None:
    node = Node(tmp_path)
    try:
        node.core.mounters["fake"].fail_next = "hang"  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        with pytest.raises(errors.DeadlineExceeded):
            node.core.publish(node.request(), Deadline(0.2))
        assert time.perf_counter() - t0 < 2.5  # the 0.2 s deadline, not a daemon timeout
        assert node.records() == [] and node.table.entries == {}
        assert not os.path.exists(node.target)
    finally:
        node.core.shutdown()


def test_supervisor_restart_is_saved_and_adopted_after_a_plugin_restart(
    tmp_path: pathlib.Path,
) -> None:
    node = Node(tmp_path)
    try:
        node.publish()
        old = node.table.owner[node.target]
        node.table.kill(old)
        handle = node.core.supervisor.get(node.target)
        assert handle is not None
        node.core.supervisor._recover(handle)  # what the monitor thread does
        new = node.table.owner[node.target]
        assert new != old and node.table.probe(node.target, 1) == "live"
        assert PublicationStore(str(tmp_path / "state")).load()[0].pid == new
        node.kill_plugin()
        adopted = node.core.supervisor.get(node.target)
        assert adopted is not None and adopted.pid == new
    finally:
        node.core.shutdown()


def test_a_dead_mount_without_a_record_is_cleaned_for_the_retry(tmp_path: pathlib.Path) -> None:
    node = Node(tmp_path)
    try:
        os.mkdir(node.target)
        pid = node.table.mount(node.target, "/elsewhere")
        node.table.kill(pid)  # ENOTCONN, as a crashed daemon leaves it
        node.publish()
        assert_published_once(node)
    finally:
        node.core.shutdown()


# -- volume stats describe the volume ---------------------------------------------------


def _publish_with(node: Node, capacity: str) -> None:
    ctx = {**node.request().volume_context, "capacityBytes": capacity}  # type: ignore[dict-item]
    node.core.publish(PublishRequest(VOLUME, node.target, CAP, volume_context=ctx))


def test_stats_report_the_volumes_capacity_and_usage(tmp_path: pathlib.Path) -> None:
    node = Node(tmp_path)
    try:
        _publish_with(node, str(64 << 20))
        (node.backend / VOLUME / "blob").write_bytes(os.urandom(1 << 20))
        st = node.core.stats(VOLUME, node.target)
        assert st.bytes_total == 64 << 20
        assert (1 << 20) <= st.bytes_used < (2 << 20)
        assert st.bytes_available == st.bytes_total - st.bytes_used
        assert st.inodes_used == 2  # the stand-in conf and the blob
        node.kill_plugin()  # the capacity is part of the record
        assert node.core.stats(VOLUME, node.target).bytes_total == 64 << 20
    finally:
        node.core.shutdown()


def test_capacity_hint_is_bounded_by_the_nodes_storage(tmp_path: pathlib.Path) -> None:
    node = Node(tmp_path)
    try:
        _publish_with(node, "9" * 20)
        sv = os.statvfs(node.backend)
        assert node.core.stats(VOLUME, node.target).bytes_total == sv.f_blocks * sv.f_frsize
    finally:
        node.core.shutdown()


@pytest.mark.parametrize("bad", ["", "12abc", "-1", "1e9", " 5", "\u0661\u0662", "1" * 21])
def test_capacity_hints_that_are_not_byte_counts_are_refused(
    tmp_path: pathlib.Path, bad: str
) -> None:
    node = Node(tmp_path)
    try:
        with pytest.raises(errors.InvalidArgument, match="capacityBytes"):
            _publish_with(node, bad)
        assert node.records() == [] and node.table.entries == {}
    finally:
        node.core.shutdown()
