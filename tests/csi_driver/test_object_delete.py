"""DeleteVolume of object-store volumes, in process: the controller core (LocalBackend) with
a real offline-fs resolver (sealed credentials unsealed for real) and an in-memory
transport (tests/fuse_crypt/fake_transport.py), so the logic is tested without a network:
onDelete delete|retain, the prefix rule, paging, batching, retries, idempotence, hostile
listings, bounded time, and what a controller without a resolver does.

The same logic over real stores (moto, the OSS peer) and real gRPC is in
tests/csi_driver/test_object_delete_e2e.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.core.controller import LocalBackend
from csi_driver.deadline import Deadline
from csi_driver.resolver import build
from csi_driver.volumes.objectdelete import (
    ObjectDeleter,
    delete_prefix,
    on_delete,
    volume_prefix,
)
from csi_driver.volumes.objectmount import ObjectNodePolicy
from csi_driver.volumes.objectstore import ObjectVolumeSpec
from fuse_crypt.backend.retrying import RetryingTransport
from fuse_crypt.backend.transport import AccessDenied, ListPage, ObjectInfo, TransientError
from sealed_secrets.keys import generate_signing_key, public_jwk
from sealed_secrets.seal import seal_vault
from tests.csi_driver.helpers import plain_capability
from tests.fuse_crypt.fake_transport import FakeTransport

KID = "kbs:///default/signing-key/del-test"
AK, SK = "AKIADELETETEST0001", "delete-secret-Zx81-never-logged"
ENDPOINT = "https://oss-cn-hangzhou.aliyuncs.com"


@dataclass
class Env:
    tmp: Path
    resolver: Any
    signing_key: Any
    bucket: FakeTransport = field(default_factory=FakeTransport)
    made: list[tuple[str, str, str | None]] = field(default_factory=list)

    def seal(self, name: str) -> str:
        return seal_vault(
            f"kbs:///default/objcreds/{name}", "kbs", signing_key=self.signing_key, signing_kid=KID
        )

    def factory(
        self,
        spec: ObjectVolumeSpec,
        ak: str,
        sk: str,
        token: str | None,
        ca: str | None,
        budget: float,
    ) -> Any:
        self.made.append((ak, sk, token))
        return RetryingTransport(self.bucket, base_delay=0.0, max_delay=0.0, budget=budget)

    def deleter(self, *, resolver: bool = True, **policy: Any) -> ObjectDeleter:
        pol = ObjectNodePolicy(allowed_endpoints=("*.aliyuncs.com",), **policy)
        return ObjectDeleter(
            self.resolver if resolver else None, pol, ("kbs:///default/signing-key/",), self.factory
        )

    def backend(self, name: str = "ctrl", **kw: Any) -> LocalBackend:
        return LocalBackend(str(self.tmp / name), object_deleter=self.deleter(**kw))

    def params(self, **extra: str) -> dict[str, str]:
        base = {
            "bucket": "tenant-bucket",
            "path": "pvcs/team-a",
            "url": ENDPOINT,
            "encrypted": "gocryptfs",
            "keyResource": "kbs:///default/coco-csi/volume-root",
            "akId": self.seal("ak"),
            "akSecret": self.seal("sk"),
            "onDelete": "delete",
        }
        base.update(extra)
        return {k: v for k, v in base.items() if v != ""}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    sk = generate_signing_key(KID)
    res = {
        "default/objcreds/ak": AK.encode(),
        "default/objcreds/sk": SK.encode(),
        "default/signing-key/del-test": public_jwk(sk).export().encode(),
    }
    path = tmp_path / "resources.json"
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in res.items()}))
    yield Env(tmp_path, build(f"offline-fs:{path}"), sk)


def fill(t: FakeTransport, prefix: str, n: int) -> None:
    for i in range(n):
        t.put_raw(f"{prefix}f{i:05d}", b"x")


NEIGHBOURS = (
    "pvcs/team-a/gocryptfs.conf",  # the class root's own objects
    "pvcs/team-a/other-volume/x",
    "pvcs/team-a",
    "pvcs/x",
    "top-level",
)


def plant_neighbours(t: FakeTransport, vid: str) -> set[str]:
    keys = {*NEIGHBOURS, f"pvcs/team-a/{vid}", f"pvcs/team-a/{vid}-sibling/x"}
    for k in keys:
        t.put_raw(k, b"keep me")
    return keys


def test_on_delete_values_and_default() -> None:
    assert on_delete({}) == "retain"
    assert on_delete({"onDelete": "Delete"}) == "delete"
    assert on_delete({"onDelete": "retain"}) == "retain"
    for bad in ("archive", "yes", "delete x"):
        with pytest.raises(errors.InvalidArgument):
            on_delete({"onDelete": bad})


def test_volume_prefix_is_class_path_slash_volume_id_slash() -> None:
    assert volume_prefix("pvcs/team-a", "coco-1") == "pvcs/team-a/coco-1/"
    assert volume_prefix("/pvcs/", "coco-1") == "pvcs/coco-1/"
    assert volume_prefix("", "coco-1") == "coco-1/"
    for vid in ("", "..", ".", "a/b", "coco-1/", "/", "x\n", "a" * 200):
        with pytest.raises(errors.InvalidArgument):
            volume_prefix("pvcs", vid)
    for path in ("a/../b", "a//b", "./a", "a\x00b", "a\\b"):
        with pytest.raises(errors.InvalidArgument):
            volume_prefix(path, "coco-1")


def test_delete_removes_every_object_of_the_volume_and_nothing_else(env: Env) -> None:
    ctrl = env.backend()
    rec, ctx = ctrl.create("pvc-1", [plain_capability()], env.params())
    assert "onDelete" not in ctx and ctx["path"] == f"pvcs/team-a/{rec.volume_id}"
    assert env.bucket.objects == {}  # CreateVolume does no bucket I/O
    prefix = f"pvcs/team-a/{rec.volume_id}/"
    fill(env.bucket, prefix, 2503)  # three pages, three batches
    env.bucket.put_raw(prefix, b"", content_type="application/x-directory")
    env.bucket.put_raw(prefix + "d/", b"", content_type="application/x-directory")
    keep = plant_neighbours(env.bucket, rec.volume_id)
    ctrl.delete(rec.volume_id, deadline=Deadline(60))
    assert set(env.bucket.objects) == keep
    assert env.made == [(AK, SK, None)]  # the sealed credentials, unsealed here
    assert env.bucket.counts["delete_many"] == 3  # batches of <= 1000
    assert env.bucket.counts["delete"] == 0
    assert ctrl.get(rec.volume_id) is None
    # Idempotent: the record is gone, the prefix is empty.
    ctrl.delete(rec.volume_id)
    assert set(env.bucket.objects) == keep


def test_objects_already_gone_is_success(env: Env) -> None:
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-1", [plain_capability()], env.params())
    ctrl.delete(rec.volume_id)  # never published: nothing to delete
    assert ctrl.get(rec.volume_id) is None


def test_retain_is_the_default_and_keeps_the_objects(env: Env) -> None:
    ctrl = env.backend()
    for name, extra in (("pvc-default", {"onDelete": ""}), ("pvc-retain", {"onDelete": "retain"})):
        rec, _ = ctrl.create(name, [plain_capability()], env.params(**extra))
        fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 3)
        ctrl.delete(rec.volume_id)
        assert ctrl.get(rec.volume_id) is None
        assert len([k for k in env.bucket.objects if rec.volume_id in k]) == 3
    assert env.made == [] and env.bucket.counts["list"] == 0


def test_credentials_from_the_provisioner_secret(env: Env) -> None:
    ctrl = env.backend()
    params = env.params(akId="", akSecret="")
    secrets = {"akId": env.seal("ak"), "akSecret": env.seal("sk")}
    with pytest.raises(errors.InvalidArgument):  # no credentials anywhere: refused now
        ctrl.create("pvc-1", [plain_capability()], params)
    rec, _ = ctrl.create("pvc-1", [plain_capability()], params, secrets=secrets)
    fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 5)
    with pytest.raises(errors.InvalidArgument):  # DeleteVolume without the secret
        ctrl.delete(rec.volume_id)
    assert ctrl.get(rec.volume_id) is not None and len(env.bucket.objects) == 5
    ctrl.delete(rec.volume_id, secrets=secrets)
    assert env.bucket.objects == {} and ctrl.get(rec.volume_id) is None


def test_without_a_resolver_delete_classes_are_refused_and_objects_kept(env: Env) -> None:
    for ctrl in (LocalBackend(str(env.tmp / "none")), env.backend("nores", resolver=False)):
        with pytest.raises(errors.FailedPrecondition) as info:
            ctrl.create("pvc-1", [plain_capability()], env.params())
        assert "resolver" in str(info.value)
        rec, _ = ctrl.create("pvc-2", [plain_capability()], env.params(onDelete="retain"))
        ctrl.delete(rec.volume_id)  # retain: as before
    # A record that says delete (made by a confidential controller) met by one without a
    # resolver: the call fails, the objects and the record stay.
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-3", [plain_capability()], env.params())
    fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 2)
    for plain in (LocalBackend(str(env.tmp / "ctrl")), env.backend(resolver=False)):
        with pytest.raises(errors.FailedPrecondition):
            plain.delete(rec.volume_id)
        assert plain.get(rec.volume_id) is not None and len(env.bucket.objects) == 2


def test_the_controllers_policy_applies(env: Env) -> None:
    ctrl = env.backend()
    for bad, exc in (
        ({"url": "https://evil.example.com"}, errors.PermissionDenied),
        ({"url": "http://oss-cn-hangzhou.aliyuncs.com"}, errors.PermissionDenied),
        ({"akSecret": "plaintext-secret"}, errors.InvalidArgument),
        ({"path": "a/../b"}, errors.InvalidArgument),
        ({"onDelete": "archive"}, errors.InvalidArgument),
    ):
        with pytest.raises(exc) as info:
            ctrl.create("pvc-x", [plain_capability()], env.params(**bad))
        assert "plaintext-secret" not in str(info.value)
    narrow = env.backend("narrow", allowed_buckets=("tenant-bucket/other",))
    with pytest.raises(errors.PermissionDenied):
        narrow.create("pvc-y", [plain_capability()], env.params())
    ok = env.backend("ok", allowed_buckets=("tenant-bucket/pvcs",))
    ok.create("pvc-z", [plain_capability()], env.params())


def test_a_tampered_record_cannot_widen_the_prefix(env: Env) -> None:
    """The index lives on host storage: a record rewritten to name the class root, an empty
    path or a traversal still deletes at most <path>/<volume_id>/ or nothing."""
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-1", [plain_capability()], env.params())
    keep = plant_neighbours(env.bucket, rec.volume_id)
    index = Path(ctrl.root, ".coco-csi", "volumes.json")
    for path in ("..", "pvcs/team-a/..", "pvcs//team-a", "/"):
        doc = json.loads(index.read_text())
        doc["volumes"][0]["parameters"]["path"] = path
        index.write_text(json.dumps(doc))
        if path == "/":  # normalised to the bucket root: the prefix is still <volume_id>/
            ctrl.delete(rec.volume_id)
            break
        with pytest.raises(errors.InvalidArgument):
            ctrl.delete(rec.volume_id)
    assert set(env.bucket.objects) == keep


class Hostile(FakeTransport):
    """A bucket whose listing under the prefix also names keys outside it."""

    def __init__(self, extra: list[str], after_pages: int = 0) -> None:
        super().__init__()
        self.extra, self.after_pages, self.pages = extra, after_pages, 0

    def list(self, prefix: str, **kw: Any) -> ListPage:  # type: ignore[override]
        page = super().list(prefix, **kw)
        self.pages += 1
        if self.pages <= self.after_pages:
            return page
        planted = tuple(ObjectInfo(k, 1, "e", 0) for k in self.extra)
        return ListPage(page.objects + planted, page.common_prefixes, page.next_token)


@pytest.mark.parametrize("after_pages", [0, 1])
def test_hostile_listing_never_causes_a_delete_outside_the_prefix(
    env: Env, after_pages: int
) -> None:
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-1", [plain_capability()], env.params())
    prefix = f"pvcs/team-a/{rec.volume_id}/"
    outside = [*NEIGHBOURS, f"pvcs/team-a/{rec.volume_id}", f"pvcs/team-a/{rec.volume_id}-x/y"]
    env.bucket = Hostile(outside, after_pages)
    env.bucket.max_keys_cap = 10
    keep = plant_neighbours(env.bucket, rec.volume_id)
    fill(env.bucket, prefix, 25)
    with pytest.raises(errors.FailedPrecondition) as info:
        ctrl.delete(rec.volume_id)
    assert "outside" in str(info.value) and "team-a" not in str(info.value)
    assert keep <= set(env.bucket.objects)  # nothing outside deleted, ever
    assert env.bucket.counts["delete_many"] == after_pages  # the hostile page got no delete
    assert ctrl.get(rec.volume_id) is not None  # the record stays: retried later


def test_delete_prefix_refuses_empty_and_root_prefixes() -> None:
    t = FakeTransport()
    t.put_raw("a", b"x")
    for bad in ("", "/", "//", "a"):
        with pytest.raises(errors.InvalidArgument):
            delete_prefix(t, bad, Deadline(5))
    assert t.counts["list"] == 0 and "a" in t.objects


def test_transient_failures_are_retried_and_access_denied_is_not(env: Env) -> None:
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-1", [plain_capability()], env.params())
    fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 10)
    env.bucket.fail_next("list", 2)
    env.bucket.fail_next("delete_many", 2)
    ctrl.delete(rec.volume_id)
    assert env.bucket.objects == {}
    rec, _ = ctrl.create("pvc-2", [plain_capability()], env.params())
    fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 10)
    env.bucket.fail_next("delete_many", 1, lambda: AccessDenied("delete_objects: 403"))
    with pytest.raises(errors.PermissionDenied) as info:
        ctrl.delete(rec.volume_id)
    assert SK not in str(info.value) and AK not in str(info.value)
    assert len(env.bucket.objects) == 10 and ctrl.get(rec.volume_id) is not None
    env.bucket.fail_next("list", 50)  # more than the retries: UNAVAILABLE, record kept
    with pytest.raises(errors.Unavailable):
        ctrl.delete(rec.volume_id)
    env.bucket.clear_faults()
    ctrl.delete(rec.volume_id)  # the provisioner's retry finishes it
    assert env.bucket.objects == {} and ctrl.get(rec.volume_id) is None


def test_time_is_bounded_by_the_calls_deadline() -> None:
    class Endless(FakeTransport):
        n = 0

        def list(self, prefix: str, **kw: Any) -> ListPage:  # type: ignore[override]
            self.n += 1
            objs = tuple(ObjectInfo(f"{prefix}n{self.n}-{i}", 0, "e", 0) for i in range(1000))
            return ListPage(objs, (), f"tok{self.n}")

    t = Endless()
    with pytest.raises(errors.DeadlineExceeded):
        delete_prefix(t, "p/coco-1/", Deadline(0.3))
    assert t.n > 1


def test_a_token_that_does_not_advance_is_refused() -> None:
    class Stuck(FakeTransport):
        def list(self, prefix: str, **kw: Any) -> ListPage:  # type: ignore[override]
            return ListPage((ObjectInfo(prefix + "a", 0, "e", 0),), (), "same")

    with pytest.raises(errors.FailedPrecondition):
        delete_prefix(Stuck(), "p/coco-1/", Deadline(5))


def test_objects_that_keep_coming_back_end_in_unavailable() -> None:
    class Zombie(FakeTransport):
        def delete_many(self, keys: Any) -> None:
            self._req("delete_many", "", len(keys))

    t = Zombie()
    fill(t, "p/coco-1/", 3)
    with pytest.raises(errors.Unavailable):
        delete_prefix(t, "p/coco-1/", Deadline(5))
    assert t.counts["list"] == 3


def test_secrets_never_reach_logs_or_errors(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-1", [plain_capability()], env.params())
    fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 3)
    env.bucket.fail_next("list", 1, lambda: TransientError("injected 503"))
    ctrl.delete(rec.volume_id)
    text = caplog.text + repr(caplog.records) + repr(ctrl.object_deleter)
    assert SK not in text and AK not in text
    assert "deleted object-store volume prefix" in caplog.text


def test_plaintext_credentials_only_with_the_operators_opt_in(env: Env) -> None:
    params = env.params(akId="plain-ak-id", akSecret="plain-secret-value")
    with pytest.raises(errors.InvalidArgument) as info:
        env.backend().create("pvc-1", [plain_capability()], params)
    assert "plain-secret-value" not in str(info.value)
    ctrl = env.backend("optin", allow_plaintext_secrets=True)
    rec, _ = ctrl.create("pvc-1", [plain_capability()], params)
    fill(env.bucket, f"pvcs/team-a/{rec.volume_id}/", 2)
    ctrl.delete(rec.volume_id)
    assert env.bucket.objects == {} and env.made == [("plain-ak-id", "plain-secret-value", None)]
