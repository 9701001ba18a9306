"""DeleteVolume aborts the volume's unfinished multipart uploads, in process: the paging, the
prefix check on every listed key, the refusal of hostile pages before any abort of theirs,
the bounds, the error mapping, and the controller's ``onDelete: delete`` calling it.

Over real stores (moto, the OSS peer, real controller processes):
tests/csi_driver/test_object_delete_e2e.py; the transports' own page checks:
tests/fuse_crypt/test_list_uploads.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.deadline import Deadline
from csi_driver.volumes.objectdelete import abort_uploads
from fuse_crypt.backend.retrying import RetryingTransport
from fuse_crypt.backend.transport import (
    AccessDenied,
    ObjectNotFound,
    TransientError,
    UploadInfo,
    UploadPage,
)
from tests.csi_driver.helpers import plain_capability
from tests.csi_driver.test_object_delete import Env, env  # noqa: F401 (fixture)
from tests.fuse_crypt.fake_transport import FakeTransport

P = "pvcs/coco-1/"
OUTSIDE_UPLOADS = ("pvcs/coco-10/x", "pvcs/coco-1", "pvcs/gocryptfs.conf", "top")


def start(t: FakeTransport, keys: Sequence[str]) -> None:
    for k in keys:
        t.create_multipart(k, metadata={})


def upload_keys(t: FakeTransport) -> list[str]:
    return sorted(k for k, *_ in t.uploads.values())


def test_every_upload_under_the_prefix_is_aborted_across_pages_and_nothing_else() -> None:
    t = FakeTransport(max_keys_cap=7)  # pages of 7: the markers are exercised
    start(t, [f"{P}f{i:03d}" for i in range(30)])
    start(t, [f"{P}same"] * 9)  # several uploads of one key span a page boundary
    start(t, OUTSIDE_UPLOADS)
    assert abort_uploads(t, P, Deadline(30)) == 39
    assert upload_keys(t) == sorted(OUTSIDE_UPLOADS)
    assert t.counts["list_uploads"] == 6  # ceil(39 / 7)
    assert abort_uploads(t, P, Deadline(30)) == 0  # idempotent: nothing left is success


def test_an_upload_already_gone_is_success() -> None:
    class Gone(FakeTransport):
        def abort_multipart(self, key: str, upload_id: str) -> None:
            super().abort_multipart(key, upload_id)
            raise ObjectNotFound("NoSuchUpload")  # as if a racing abort won

    t = Gone()
    start(t, [P + "a"])
    # The transports turn NoSuchUpload into success themselves (S3Transport, OssTransport);
    # one that does not is still a clean CSI error, never an unmapped exception.
    with pytest.raises(errors.FailedPrecondition):
        abort_uploads(t, P, Deadline(5))


def test_empty_or_root_prefixes_are_refused() -> None:
    t = FakeTransport()
    start(t, ["a/b"])
    for bad in ("", "/", "//", "a"):
        with pytest.raises(errors.InvalidArgument):
            abort_uploads(t, bad, Deadline(5))
    assert t.counts["list_uploads"] == 0 and upload_keys(t) == ["a/b"]


class Scripted:
    """Answers scripted ListMultipartUploads pages; records aborts."""

    def __init__(self, pages: list[UploadPage | Exception]) -> None:
        self.pages = pages
        self.aborted: list[tuple[str, str]] = []
        self.asked: list[tuple[str, str]] = []

    def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
        self.asked.append((kw["key_marker"], kw["upload_id_marker"]))
        page = self.pages.pop(0) if self.pages else UploadPage((), None)
        if isinstance(page, Exception):
            raise page
        return page

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.aborted.append((key, upload_id))


def ups(*pairs: tuple[str, str]) -> tuple[UploadInfo, ...]:
    return tuple(UploadInfo(k, u) for k, u in pairs)


GOOD = ups((P + "a", "U1"), (P + "b", "U2"))


@pytest.mark.parametrize(
    "bad",
    [
        "pvcs/coco-10/x",  # a sibling volume whose id extends this one's
        "pvcs/coco-1",  # the volume's own name, without the slash
        "pvcs/",  # the class root
        "",
        "x" * 2000,
        None,
    ],
)
def test_a_page_naming_a_key_outside_the_prefix_is_refused_before_any_abort(bad: Any) -> None:
    t = Scripted(
        [UploadPage(GOOD, (P + "b", "U2")), UploadPage((*GOOD[:1], UploadInfo(bad, "U3")), None)]
    )
    with pytest.raises(errors.FailedPrecondition) as info:
        abort_uploads(t, P, Deadline(5))
    assert "outside the volume's prefix" in str(info.value)
    assert "coco-10" not in str(info.value)  # the hostile key is never echoed
    # The first page only (its two aborts run side by side: in either order).
    assert sorted(t.aborted) == [(u.key, u.upload_id) for u in GOOD]


@pytest.mark.parametrize("uid", ["", "a b", "x" * 1025, "\x00", None, "é"])
def test_a_malformed_upload_id_refuses_the_page(uid: Any) -> None:
    t = Scripted([UploadPage((*GOOD, UploadInfo(P + "c", uid)), None)])
    with pytest.raises(errors.FailedPrecondition, match="malformed upload id"):
        abort_uploads(t, P, Deadline(5))
    assert t.aborted == []


def test_an_oversize_page_is_refused() -> None:
    t = Scripted([UploadPage(ups(*[(f"{P}{i}", "U") for i in range(1001)]), None)])
    with pytest.raises(errors.FailedPrecondition, match="oversize"):
        abort_uploads(t, P, Deadline(5))
    assert t.aborted == []


@pytest.mark.parametrize(
    "second",
    [
        (P + "b", "U2"),  # the same markers again: a store paging forever
        (P + "a", "U9"),  # a key marker that went backwards
    ],
)
def test_markers_that_do_not_advance_are_refused(second: tuple[str, str]) -> None:
    t = Scripted([UploadPage(GOOD, (P + "b", "U2")), UploadPage((), second)])
    with pytest.raises(errors.FailedPrecondition, match="did not advance"):
        abort_uploads(t, P, Deadline(5))
    assert t.asked == [("", ""), (P + "b", "U2")]


def test_markers_are_passed_back_as_given() -> None:
    t = Scripted([UploadPage(GOOD[:1], (P + "a", "U1")), UploadPage(GOOD[1:], None)])
    assert abort_uploads(t, P, Deadline(5)) == 2
    assert t.asked == [("", ""), (P + "a", "U1")]


def test_time_is_bounded_by_the_deadline() -> None:
    class Endless(Scripted):
        n = 0

        def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
            self.n += 1
            return UploadPage((), (f"{P}{self.n:09d}", ""))

    with pytest.raises(errors.DeadlineExceeded):
        abort_uploads(Endless([]), P, Deadline(0.2))


def test_errors_map_to_csi_codes_and_transient_ones_are_retried() -> None:
    t = FakeTransport()
    start(t, [P + "a"])
    t.fail_next("list_uploads", 2)
    t.fail_next("abort_multipart", 1)
    retrying = RetryingTransport(t, base_delay=0.0, max_delay=0.0, budget=5)
    assert abort_uploads(retrying, P, Deadline(5)) == 1
    for exc, code in (
        (AccessDenied("403"), errors.PermissionDenied),
        (TransientError("503"), errors.Unavailable),
    ):
        s = Scripted([exc])
        with pytest.raises(code):
            abort_uploads(s, P, Deadline(5))


def test_controller_delete_aborts_uploads_and_deletes_objects(env: Env) -> None:  # noqa: F811
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-up", [plain_capability()], env.params())
    prefix = f"pvcs/team-a/{rec.volume_id}/"
    env.bucket.max_keys_cap = 5
    start(env.bucket, [f"{prefix}big{i}" for i in range(12)])
    outside = [f"pvcs/team-a/{rec.volume_id}-x/y", "pvcs/team-a/other/z", "pvcs/team-a/c"]
    start(env.bucket, outside)
    env.bucket.put_raw(prefix + "gocryptfs.conf", b"{}")
    ctrl.delete(rec.volume_id)
    assert upload_keys(env.bucket) == sorted(outside)
    assert not [k for k in env.bucket.objects if k.startswith(prefix)]
    assert ctrl.get(rec.volume_id) is None


def test_a_hostile_upload_page_keeps_the_record_and_the_objects(env: Env) -> None:  # noqa: F811
    class Hostile(FakeTransport):
        def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
            page = super().list_uploads(prefix, **kw)
            return UploadPage((*page.uploads, UploadInfo("pvcs/team-a/other/z", "U")), None)

    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-hostile", [plain_capability()], env.params())
    prefix = f"pvcs/team-a/{rec.volume_id}/"
    env.bucket = Hostile()
    start(env.bucket, [prefix + "a", "pvcs/team-a/other/z"])
    env.bucket.put_raw(prefix + "obj", b"x")
    with pytest.raises(errors.FailedPrecondition):
        ctrl.delete(rec.volume_id)
    assert env.bucket.counts["abort_multipart"] == 0
    assert prefix + "obj" in env.bucket.objects  # uploads go first: nothing deleted yet
    assert ctrl.get(rec.volume_id) is not None
