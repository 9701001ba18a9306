"""csi_driver/volumes/objectdelete.py, in process and fast, for mutation testing
(tools/mutation.py): every refusal by its exact text, every bound on both sides, and the
defence-in-depth prefix checks with the normaliser or the id check they back up broken on
purpose (monkeypatched), so a check that could never fire today is still proven to work.

The broader behaviour (the controller core, retries over RetryingTransport, tampered
records) is in tests/csi_driver/test_object_delete.py, over real stores in
tests/csi_driver/test_object_delete_e2e.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.deadline import Deadline
from csi_driver.volumes import objectdelete as od
from csi_driver.volumes.objectdelete import ObjectDeleter, delete_prefix, on_delete, volume_prefix
from csi_driver.volumes.objectmount import ObjectNodePolicy
from csi_driver.volumes.objectstore import ObjectVolumeSpec
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    CredentialsRejected,
    ListPage,
    ObjectInfo,
    TransientError,
    UploadInfo,
    UploadPage,
)
from tests.csi_driver.test_object_delete import AK, SK, Env, env  # noqa: F401 (fixture)

OUTSIDE = (
    "the object store listed a key outside the volume's prefix; nothing of that page was deleted"
)
BAD_PREFIX = "the volume's prefix would not be <class path>/<volume_id>/"
P = "p/coco-1/"


def _msg(exc: pytest.ExceptionInfo[BaseException]) -> str:
    return str(exc.value)


class Scripted:
    """A transport answering scripted listing pages, recording every request."""

    def __init__(
        self, pages: Sequence[ListPage | Exception], *, delete_error: Exception | None = None
    ) -> None:
        self.pages = list(pages)
        self.calls: list[tuple[str, Any]] = []
        self.delete_error = delete_error

    def list(self, prefix: str, **kw: Any) -> ListPage:
        self.calls.append(("list", (prefix, kw)))
        page = self.pages.pop(0) if self.pages else ListPage((), (), None)
        if isinstance(page, Exception):
            raise page
        return page

    def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
        self.calls.append(("list_uploads", (prefix, kw)))
        return UploadPage((), None)  # none here: tests/csi_driver/test_object_uploads.py

    def delete_many(self, keys: Sequence[str]) -> None:
        self.calls.append(("delete_many", list(keys)))
        if self.delete_error is not None:
            raise self.delete_error

    @property
    def deleted(self) -> list[list[str]]:
        return [c[1] for c in self.calls if c[0] == "delete_many"]

    @property
    def lists(self) -> list[tuple[str, dict[str, Any]]]:
        return [c[1] for c in self.calls if c[0] == "list"]


def page(keys: Sequence[str], token: str | None = None) -> ListPage:
    return ListPage(tuple(ObjectInfo(k, 1, "e", 0) for k in keys), (), token)


class StepDeadline(Deadline):
    """Records each step checked; expires at the ``fail_at``-th check (1-based)."""

    def __init__(self, fail_at: int = 0) -> None:
        super().__init__(60)
        self.steps: list[str] = []
        self.fail_at = fail_at

    def check(self, step: str) -> None:
        self.steps.append(step)
        if len(self.steps) == self.fail_at:
            raise errors.DeadlineExceeded(f"deadline exceeded before {step}")


# -- on_delete ---------------------------------------------------------------------------


def test_on_delete_default_normalisation_and_refusal_text() -> None:
    assert od.PARAM_ON_DELETE == "onDelete" and od.DEFAULT_ON_DELETE == "retain"
    assert on_delete({}) == "retain"
    assert on_delete({"onDelete": ""}) == "retain"
    assert on_delete({"onDelete": "   "}) == "retain"
    assert on_delete({"ondelete": "delete"}) == "retain"  # the name is case-sensitive
    assert on_delete({"onDelete": " DeLeTe "}) == "delete"
    assert on_delete({"onDelete": "RETAIN\n"}) == "retain"
    for bad in ("archive", "del", "deletex", "delete retain", "XXdeleteXX", "Delete!"):
        with pytest.raises(errors.InvalidArgument) as info:
            on_delete({"onDelete": bad})
        assert _msg(info) == "StorageClass parameter onDelete must be delete or retain"


# -- volume_prefix -----------------------------------------------------------------------


def test_volume_prefix_shapes() -> None:
    assert volume_prefix("a/b", "coco-1") == "a/b/coco-1/"
    assert volume_prefix("", "v") == "v/"
    assert volume_prefix("/a/", "v.1_x-Y") == "a/v.1_x-Y/"
    with pytest.raises(errors.InvalidArgument) as info:
        volume_prefix("a//b", "v")
    assert _msg(info) == (  # the normaliser's text, with this caller's label
        "StorageClass parameter path must be normalised (no '.', '..' or '//')"
    )
    # slashes are what is stripped, nothing else (an X, say)
    assert volume_prefix("", "X") == "X/"
    assert volume_prefix("X", "XX") == "X/XX/"


def test_volume_prefix_length_bound_in_bytes_both_sides() -> None:
    vid = "v" * 100
    # base + "/" + vid 100 + "/" = 511, 512 (the bound), 513 bytes
    for base_len, ok in ((409, True), (410, True), (411, False)):
        base = "b" * base_len
        if ok:
            assert len(volume_prefix(base, vid).encode()) == base_len + 102
        else:
            with pytest.raises(errors.InvalidArgument) as info:
                volume_prefix(base, vid)
            assert _msg(info) == BAD_PREFIX
    # bytes, not characters: 205 two-byte characters are 410 bytes
    assert len(volume_prefix("é" * 205, vid).encode()) == 512
    with pytest.raises(errors.InvalidArgument) as info:
        volume_prefix("é" * 205, vid + "v")
    assert _msg(info) == BAD_PREFIX


@pytest.mark.parametrize(
    ("base", "vid", "why"),
    [
        ("/abs/", "coco-1", "starts with /"),
        ("", "", "empty"),
    ],
)
def test_volume_prefix_backstops_hold_when_what_they_back_up_is_broken(
    monkeypatch: pytest.MonkeyPatch, base: str, vid: str, why: str
) -> None:
    monkeypatch.setattr(od.validate, "volume_id", lambda v, name="volume_id": v)
    monkeypatch.setattr(od, "normalise_prefix", lambda text, where: base)
    with pytest.raises(errors.InvalidArgument) as info:
        volume_prefix("ignored", vid)
    assert _msg(info) == BAD_PREFIX, why


def test_volume_prefix_backstop_refuses_only_what_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(od.validate, "volume_id", lambda v, name="volume_id": v)
    monkeypatch.setattr(od, "normalise_prefix", lambda text, where: "a/")
    assert volume_prefix("x", "v") == "a/v/"  # each backstop alone lets a good one through
    assert volume_prefix("x", "v/w") == "a/v/w/"  # (the id check is what refuses this)


# -- _check_keys / delete_prefix -------------------------------------------------------------


def test_keys_must_start_with_the_prefix_and_be_bounded() -> None:
    od._check_keys([P, P + "a", P + "d/", P + "\udcff", P + "k" * (1024 - len(P))], P)
    od._check_keys([P + "é" * 507 + "k"], P)  # 1024 bytes, 517 characters
    for bad in (
        "p/coco-1",
        "p/coco-10/x",
        "/p/coco-1/x",
        "P/coco-1/x",
        "",
        None,
        b"p/coco-1/x",
        P + "k" * (1025 - len(P)),
        P + "é" * 508,  # 1025 bytes
    ):
        with pytest.raises(errors.FailedPrecondition) as info:
            od._check_keys([P + "ok", bad], P)  # type: ignore[list-item]
        assert _msg(info) == OUTSIDE
    assert od.MAX_KEY_BYTES == 1024


def test_delete_prefix_refusal_text_and_shapes() -> None:
    for bad in ("", "/", "///", "p/coco-1"):
        t = Scripted([])
        with pytest.raises(errors.InvalidArgument) as info:
            delete_prefix(t, bad, Deadline(5))
        assert _msg(info) == "refusing to delete an empty or root prefix"
        assert t.calls == []
    for good in ("v/", "X/", "XX/X/"):  # a one-component prefix is fine; only / is stripped
        t = Scripted([])
        assert delete_prefix(t, good, Deadline(5)) == 0
        assert t.lists == [(good, {"delimiter": "", "token": None, "max_keys": 1000})]


def test_pages_batches_tokens_and_the_count() -> None:
    assert od.DELETE_BATCH == 1000
    first = [f"{P}a{i:04d}" for i in range(1000)]
    t = Scripted([page(first, "t1"), page([P + "b"], "t2"), page([], None), page([], None)])
    d = StepDeadline()
    assert delete_prefix(t, P, d) == 1001
    assert t.lists == [
        (P, {"delimiter": "", "token": None, "max_keys": 1000}),
        (P, {"delimiter": "", "token": "t1", "max_keys": 1000}),
        (P, {"delimiter": "", "token": "t2", "max_keys": 1000}),
        (P, {"delimiter": "", "token": None, "max_keys": 1000}),  # second pass: empty
    ]
    # No delete for an empty page; two batches may start in either order (they overlap).
    assert sorted(t.deleted) == sorted([first, [P + "b"]])
    assert d.steps == [
        "listing the volume's objects",
        "deleting the volume's objects",
        "listing the volume's objects",
        "deleting the volume's objects",
        "listing the volume's objects",
        "listing the volume's objects",
    ]


def test_the_count_sums_every_pass() -> None:
    t = Scripted([page([P + "a", P + "b"]), page([P + "c"]), page([])])
    assert delete_prefix(t, P, Deadline(5)) == 3
    assert len(t.lists) == 3


def test_oversize_page_refused_before_any_delete() -> None:
    t = Scripted([page([f"{P}{i}" for i in range(1001)], "t")])
    with pytest.raises(errors.FailedPrecondition) as info:
        delete_prefix(t, P, Deadline(5))
    assert _msg(info) == "the object store listed an oversize page"
    assert t.deleted == []


def test_hostile_key_on_a_later_page_stops_before_its_delete() -> None:
    t = Scripted([page([P + "a"], "t1"), page([P + "b", "p/coco-10/x"], "t2")])
    with pytest.raises(errors.FailedPrecondition) as info:
        delete_prefix(t, P, Deadline(5))
    assert _msg(info) == OUTSIDE
    assert t.deleted == [[P + "a"]]


def test_token_must_advance() -> None:
    t = Scripted([page([P + "a"], "t1"), page([P + "b"], "t1")])
    with pytest.raises(errors.FailedPrecondition) as info:
        delete_prefix(t, P, Deadline(5))
    assert _msg(info) == "the object store's continuation token did not advance"
    # the first token is compared with None: a first page naming a token is fine
    t = Scripted([page([], "t1"), page([], None)])
    assert delete_prefix(t, P, Deadline(5)) == 0


def test_page_count_bound_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    assert od.MAX_PAGES == 100_000
    monkeypatch.setattr(od, "MAX_PAGES", 3)
    t = Scripted([page([], "t1"), page([], "t2"), page([], None)])
    assert delete_prefix(t, P, Deadline(5)) == 0  # exactly MAX_PAGES pages: fine
    t = Scripted([page([], "t1"), page([], "t2"), page([], "t3"), page([], None)])
    with pytest.raises(errors.FailedPrecondition) as info:
        delete_prefix(t, P, Deadline(5))
    assert _msg(info) == "the object store listed too many pages"
    assert len(t.lists) == 3


def test_passes_bound_and_its_text() -> None:
    assert od.MAX_PASSES == 3
    t = Scripted([page([P + "a"]), page([P + "a"]), page([])])
    assert delete_prefix(t, P, Deadline(5)) == 2  # empty on the third pass: done
    t = Scripted([page([P + "a"]), page([P + "a"]), page([P + "a"]), page([])])
    with pytest.raises(errors.Unavailable) as info:
        delete_prefix(t, P, Deadline(5))
    assert _msg(info) == (
        "objects kept appearing under the volume's prefix while it was deleted; retry"
    )
    assert len(t.lists) == 3


@pytest.mark.parametrize("fail_at", [1, 2])
def test_deadline_checked_before_listing_and_before_deleting(fail_at: int) -> None:
    t = Scripted([page([P + "a"])])
    d = StepDeadline(fail_at)
    with pytest.raises(errors.DeadlineExceeded):
        delete_prefix(t, P, d)
    assert len(t.lists) == fail_at - 1 and t.deleted == []
    want = ["listing the volume's objects", "deleting the volume's objects"][:fail_at]
    assert d.steps == want


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        (
            AccessDenied("list: 403 nope"),
            errors.PermissionDenied,
            "the object store refused these credentials for deleting the volume",
        ),
        (
            CredentialsRejected("list: expired"),
            errors.PermissionDenied,
            "the object store refused these credentials for deleting the volume",
        ),
        (TransientError("list: 503 busy"), errors.Unavailable, "object store: list: 503 busy"),
        (BadResponse("list: bad xml"), errors.FailedPrecondition, "object store: list: bad xml"),
    ],
)
def test_store_errors_map_to_codes_and_texts(
    exc: Exception, kind: type[errors.CsiError], text: str
) -> None:
    for t in (Scripted([exc]), Scripted([page([P + "a"])], delete_error=exc)):
        with pytest.raises(kind) as info:
            delete_prefix(t, P, Deadline(5))
        assert _msg(info) == text and type(info.value) is kind
        assert info.value.__cause__ is None and info.value.__suppress_context__


# -- ObjectDeleter ---------------------------------------------------------------------------


def _policy(**kw: Any) -> ObjectNodePolicy:
    return ObjectNodePolicy(allowed_endpoints=("*.aliyuncs.com",), **kw)


def test_enabled_needs_both_a_resolver_and_endpoints(env: Env) -> None:  # noqa: F811
    assert ObjectDeleter(env.resolver, _policy()).enabled is True
    assert ObjectDeleter(None, _policy()).enabled is False
    assert ObjectDeleter(env.resolver, ObjectNodePolicy()).enabled is False
    assert od.DEFAULT_BUDGET == 120.0 and ObjectDeleter(None, _policy()).budget == 120.0
    assert "transport_factory" not in repr(ObjectDeleter(None, _policy()))


def test_disabled_refusal_texts(env: Env) -> None:  # noqa: F811
    for d in (ObjectDeleter(None, _policy()), ObjectDeleter(env.resolver, ObjectNodePolicy())):
        with pytest.raises(errors.FailedPrecondition) as info:
            d.check_class(env.params(), "coco-7", {})
        assert _msg(info) == (
            "onDelete: delete needs a controller that can unseal bucket credentials (a "
            "confidential controller pod started with --resolver and "
            "--allowed-object-endpoint); this one keeps objects, so the class is refused"
        )
        with pytest.raises(errors.FailedPrecondition) as info:
            d.delete(env.params(), "coco-7", {}, Deadline(5))
        assert _msg(info) == (
            "volume coco-7 has onDelete: delete but this controller has no resolver (or no "
            "--allowed-object-endpoint): its objects are kept and the call fails so the PV "
            "stays until a confidential controller deletes it"
        )


class Recorder:
    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, spec: ObjectVolumeSpec, *rest: Any) -> Any:
        self.calls.append((spec, *rest))
        return self.transport


def _deleter(e: Env, factory: Callable[..., Any], **kw: Any) -> ObjectDeleter:
    pol = kw.pop("policy", None) or _policy(ca_bundle="/etc/ca.pem")
    return ObjectDeleter(e.resolver, pol, ("kbs:///default/signing-key/",), factory, **kw)


def test_delete_passes_what_it_unsealed_and_derived(
    env: Env,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = Scripted([page(["pvcs/team-a/coco-7/x", "pvcs/team-a/coco-7/y"]), page([])])
    rec = Recorder(t)
    caplog.set_level(logging.INFO, logger="csi_driver.volumes.objectdelete")
    params = env.params(securityToken=env.seal("ak"))
    assert _deleter(env, rec, budget=10.0).delete(params, "coco-7", {}, Deadline(60)) == 2
    ((spec, ak, sk, tok, ca, budget),) = rec.calls
    assert (ak, sk, tok, ca, budget) == (AK, SK, AK, "/etc/ca.pem", 5.0)
    assert spec.prefix == "pvcs/team-a/coco-7/" and spec.bucket == "tenant-bucket"
    assert [lp[0] for lp in t.lists] == ["pvcs/team-a/coco-7/"] * 2
    (record,) = [r for r in caplog.records if r.name == "csi_driver.volumes.objectdelete"]
    assert record.getMessage() == "deleted object-store volume prefix"
    assert record.levelno == logging.INFO
    assert record.fields == {  # type: ignore[attr-defined]
        "volume_id": "coco-7",
        "location": "oss://tenant-bucket/pvcs/team-a/coco-7/",
        "objects": 2,
        "uploads_aborted": 0,
    }
    assert SK not in caplog.text and AK not in caplog.text


class UploadsInBothPasses(Scripted):
    """One object; one unfinished upload before the objects are deleted and two after (a
    client still uploading while the volume went away)."""

    def __init__(self) -> None:
        super().__init__([page(["pvcs/team-a/coco-7/x"]), page([])])
        self.upload_pages = [
            UploadPage((UploadInfo("pvcs/team-a/coco-7/a", "U1"),), None),
            UploadPage(
                (
                    UploadInfo("pvcs/team-a/coco-7/b", "U2"),
                    UploadInfo("pvcs/team-a/coco-7/c", "U3"),
                ),
                None,
            ),
        ]
        self.aborted: list[tuple[str, str]] = []

    def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
        self.calls.append(("list_uploads", (prefix, kw)))
        return self.upload_pages.pop(0) if self.upload_pages else UploadPage((), None)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.aborted.append((key, upload_id))


def test_the_log_counts_the_uploads_of_both_passes(
    env: Env,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = UploadsInBothPasses()
    caplog.set_level(logging.INFO, logger="csi_driver.volumes.objectdelete")
    assert _deleter(env, Recorder(t)).delete(env.params(), "coco-7", {}, Deadline(60)) == 1
    assert sorted(u for _, u in t.aborted) == ["U1", "U2", "U3"]
    (record,) = [r for r in caplog.records if r.name == "csi_driver.volumes.objectdelete"]
    assert record.fields["uploads_aborted"] == 3  # type: ignore[attr-defined]


def test_no_token_is_none_and_the_kid_allow_list_applies(env: Env) -> None:  # noqa: F811
    rec = Recorder(Scripted([]))
    _deleter(env, rec).delete(env.params(), "coco-7", {}, Deadline(60))
    assert rec.calls[0][3] is None
    other = ObjectDeleter(env.resolver, _policy(), ("kbs:///default/other-keys/",), rec)
    with pytest.raises(errors.CsiError):
        other.delete(env.params(), "coco-8", {}, Deadline(60))
    assert len(rec.calls) == 1


@pytest.mark.parametrize(
    ("own", "remaining", "factory_budget", "bounded"),
    [
        (10.0, 60.0, 5.0, 10.0),  # the deleter's own budget when the call has more time
        (120.0, 8.0, 4.0, 8.0),  # the call's deadline when it has less
        (1.5, 60.0, 1.0, 1.5),  # the transport's retry budget is at least 1 s
        (0.2, 60.0, 1.0, 1.0),  # and so is the whole operation's
        (120.0, 0.0, 1.0, 1.0),
    ],
)
def test_budgets(
    env: Env,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    own: float,
    remaining: float,
    factory_budget: float,
    bounded: float,
) -> None:
    seen: list[float] = []

    def fake_delete_prefix(transport: Any, prefix: str, deadline: Deadline) -> int:
        seen.append(deadline.remaining())
        assert prefix == "pvcs/team-a/coco-7/"
        return 0

    monkeypatch.setattr(od, "delete_prefix", fake_delete_prefix)
    monkeypatch.setattr(od, "abort_uploads", lambda t, p, d: 0)
    call = Deadline(60)
    monkeypatch.setattr(call, "remaining", lambda: remaining)
    rec = Recorder(object())
    _deleter(env, rec, budget=own).delete(env.params(), "coco-7", {}, call)
    assert rec.calls[0][5] == factory_budget
    assert bounded - 0.5 < seen[0] <= bounded


def test_spec_uses_path_then_prefix_and_drops_its_own_parameters(
    env: Env,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = _deleter(env, Recorder(Scripted([])))
    seen: list[dict[str, str]] = []
    real = od.parse_object_volume

    def spy(ctx: dict[str, str], secrets: Any, policy: Any) -> ObjectVolumeSpec:
        seen.append(dict(ctx))
        return real(ctx, secrets, policy)

    monkeypatch.setattr(od, "parse_object_volume", spy)
    spec, prefix = d._spec(env.params(), "coco-7", {})
    assert prefix == spec.prefix == "pvcs/team-a/coco-7/"
    assert seen[-1]["path"] == "pvcs/team-a/coco-7" and "onDelete" not in seen[-1]
    params = env.params(path="")
    params["prefix"] = "/old/style/"
    _, prefix = d._spec(params, "coco-7", {})
    assert prefix == "old/style/coco-7/" and "prefix" not in seen[-1]
    assert seen[-1]["path"] == "old/style/coco-7"
    params["path"] = "new"
    assert d._spec(params, "coco-7", {})[1] == "new/coco-7/"  # path wins over prefix
    assert d._spec(env.params(path=""), "coco-7", {})[1] == "coco-7/"
    # only slashes are stripped from the class path (as the node's parser does)
    assert d._spec(env.params(path="Xp/aX"), "coco-X", {})[1] == "Xp/aX/coco-X/"
    assert seen[-1]["path"] == "Xp/aX/coco-X"
    assert d._spec(env.params(path=" a b /"), "coco-7", {})[1] == " a b /coco-7/"


def test_spec_refuses_a_parsed_prefix_that_differs(
    env: Env,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    d = _deleter(env, Recorder(Scripted([])))
    real = od.parse_object_volume

    def widen(ctx: dict[str, str], secrets: Any, policy: Any) -> ObjectVolumeSpec:
        spec = real(ctx, secrets, policy)
        return ObjectVolumeSpec(**{**spec.__dict__, "prefix": "pvcs/team-a/"})

    monkeypatch.setattr(od, "parse_object_volume", widen)
    with pytest.raises(errors.InvalidArgument) as info:
        d.check_class(env.params(), "coco-7", {})
    assert _msg(info) == BAD_PREFIX


def test_spec_applies_the_policy_and_location_checks(env: Env) -> None:  # noqa: F811
    narrow = _deleter(env, Recorder(Scripted([])), policy=_policy(allowed_buckets=("x",)))
    with pytest.raises(errors.PermissionDenied):
        narrow.check_class(env.params(), "coco-7", {})
    ok = _deleter(env, Recorder(Scripted([])))
    ok.check_class(env.params(), "coco-7", {})  # None: accepted
    with pytest.raises(errors.PermissionDenied):
        ok.check_class(env.params(url="https://evil.example.com"), "coco-7", {})


def test_default_transport_builds_the_location(monkeypatch: pytest.MonkeyPatch) -> None:
    from fuse_crypt.cli.objectloc import ObjectLocation

    made: list[tuple[ObjectLocation, float]] = []

    def fake(self: ObjectLocation, retry_budget: float = 60.0) -> Any:
        made.append((self, retry_budget))
        if self.bucket == "bad-bucket":
            raise ValueError("no such endpoint scheme")
        return "transport"

    monkeypatch.setattr(ObjectLocation, "transport", fake)
    spec = ObjectVolumeSpec(
        kind="s3",
        endpoint="http://s3.example:9000",
        region="eu-1",
        bucket="the-bucket",
        prefix="pvcs/coco-X/",
        access_key_id=None,  # type: ignore[arg-type]
        access_key_secret=None,  # type: ignore[arg-type]
        security_token=None,
        passphrase=None,
        insecure_http=True,
    )
    assert od._default_transport(spec, "ak", "sk", "tok", "/ca.pem", 7.5) == "transport"
    loc, budget = made[0]
    assert budget == 7.5
    assert (loc.bucket, loc.prefix, loc.endpoint, loc.region, loc.kind) == (
        "the-bucket",
        "pvcs/coco-X",
        "http://s3.example:9000",
        "eu-1",
        "s3",
    )
    assert (loc.ca_bundle, loc.insecure_http) == ("/ca.pem", True)
    assert (loc.access_key, loc.secret_key, loc.session_token) == ("ak", "sk", "tok")
    bad = ObjectVolumeSpec(**{**spec.__dict__, "bucket": "bad-bucket", "kind": "oss"})
    with pytest.raises(errors.InvalidArgument) as info:
        od._default_transport(bad, "ak", "sk", None, None, 1.0)
    assert _msg(info) == "object store endpoint: no such endpoint scheme"
    assert made[1][0].kind == "oss" and made[1][0].session_token is None
    assert made[1][0].ca_bundle is None and made[1][0].insecure_http is True
    assert info.value.__suppress_context__
