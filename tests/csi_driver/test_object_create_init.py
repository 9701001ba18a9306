"""CreateVolume's prefix init, in process: when a confidential controller initialises and when
it leaves the init to the node, and the controller core's idempotency around it (a failed
init keeps the record, the retry initialises the same volume id).  The init itself, over
real stores and processes: tests/csi_driver/test_object_create_init_e2e.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.deadline import Deadline
from csi_driver.volumes.objectdelete import ObjectDeleter
from tests.csi_driver.helpers import plain_capability
from tests.csi_driver.test_object_delete import Env, env  # noqa: F401 (fixture)

KEYS = ("kbs:///default/coco-csi/",)


def reason(d: ObjectDeleter, context: dict[str, str], secrets: dict[str, str]) -> str | None:
    return d._can_initialise(context, secrets)


def test_who_initialises(env: Env) -> None:  # noqa: F811
    on = dataclasses.replace(env.deleter(), allowed_key_resources=KEYS)
    p = env.params()
    creds = {k: p.pop(k) for k in ("akId", "akSecret")}
    assert reason(on, {**p, **creds}, {}) is None  # keyResource, credentials in the class
    assert reason(on, p, creds) is None  # credentials in the provisioner secret
    assert "node-publish" in str(reason(on, p, {}))  # credentials only where the node sees
    no_key = {k: v for k, v in {**p, **creds}.items() if k != "keyResource"}
    assert "node-publish" in str(reason(on, no_key, {}))
    assert reason(on, no_key, {"encPasswd": env.seal("sk")}) is None  # a passphrase suffices
    without_keys = env.deleter()
    assert "--allowed-key-resource" in str(reason(without_keys, {**p, **creds}, {}))
    assert reason(without_keys, no_key, {"encPasswd": env.seal("sk")}) is None
    assert "resolver" in str(reason(env.deleter(resolver=False), {**p, **creds}, {}))


def test_skipping_does_no_bucket_io(env: Env) -> None:  # noqa: F811
    d = env.deleter()  # no --allowed-key-resource: a keyResource class is left to the node
    assert d.initialise("coco-1", env.params(), {}, Deadline(5)) is False
    assert env.made == []  # no transport was even built


class Recorder:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def __call__(self, volume_id: str, *a: Any) -> bool:
        self.calls.append(volume_id)
        if self.fail:
            self.fail -= 1
            raise errors.Unavailable("object store: injected")
        return True


def test_create_initialises_and_a_failed_init_is_finished_by_the_retry(
    env: Env,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ctrl = env.backend()
    assert ctrl.object_deleter is not None
    rec = Recorder(fail=1)
    monkeypatch.setattr(ObjectDeleter, "initialise", lambda self, *a: rec(*a))
    params = env.params()
    with pytest.raises(errors.Unavailable):
        ctrl.create("pvc-1", [plain_capability()], params)
    (vid,) = rec.calls
    assert ctrl.get(vid) is not None  # the record stays for the retry
    again, _ = ctrl.create("pvc-1", [plain_capability()], params)
    assert again.volume_id == vid and rec.calls == [vid, vid]
    ctrl.create("pvc-1", [plain_capability()], params)  # idempotent: checked again
    assert rec.calls == [vid] * 3


def test_a_plain_controller_never_initialises(env: Env) -> None:  # noqa: F811
    from csi_driver.core.controller import LocalBackend

    ctrl = LocalBackend(str(env.tmp / "plain"))
    rec, ctx = ctrl.create("pvc-2", [plain_capability()], env.params(onDelete="retain"))
    assert ctx["path"] == f"pvcs/team-a/{rec.volume_id}" and env.made == []
