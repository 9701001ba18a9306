"""``abort_uploads`` / ``_check_uploads`` and the request pool, in process and fast, for
mutation testing (tools/mutation.py): every refusal by its exact text, every bound on both
sides, the steps the deadline is checked at, the page size asked for, and the worker
threads' names (what an operator sees in a thread dump of a stuck DeleteVolume).

The behaviour is tested in tests/csi_driver/test_object_uploads.py and
tests/csi_driver/test_object_delete_parallel.py; this file pins the details their
assertions leave open.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.deadline import Deadline
from csi_driver.volumes import objectdelete as od
from csi_driver.volumes.objectdelete import abort_uploads, delete_prefix
from fuse_crypt.backend.transport import AccessDenied, ListPage, ObjectInfo, UploadInfo, UploadPage
from tests.csi_driver.test_objectdelete_mutants import StepDeadline

P = "p/coco-1/"


class Pages:
    """Scripted ListMultipartUploads pages; records what was asked and aborted."""

    def __init__(self, pages: list[Any], abort_error: Exception | None = None) -> None:
        self.pages = pages
        self.asked: list[dict[str, Any]] = []
        self.aborted: list[tuple[str, str]] = []
        self.threads: set[str] = set()
        self.abort_error = abort_error

    def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
        self.asked.append(kw)
        page = self.pages.pop(0) if self.pages else UploadPage((), None)
        return page  # type: ignore[no-any-return]

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self.threads.add(threading.current_thread().name)
        if self.abort_error is not None:
            raise self.abort_error
        self.aborted.append((key, upload_id))


def ups(*pairs: tuple[Any, Any]) -> tuple[Any, ...]:
    return tuple(UploadInfo(k, u) for k, u in pairs)


def test_refusal_texts_and_the_page_size_asked_for() -> None:
    for bad in ("", "/", "//", "p"):
        with pytest.raises(errors.InvalidArgument) as info:
            abort_uploads(Pages([]), bad, Deadline(5))
        assert str(info.value) == "refusing to abort uploads under an empty or root prefix"
    t = Pages([UploadPage(ups((P + "a", "U1")), None)])
    assert abort_uploads(t, P, Deadline(5)) == 1
    assert t.asked == [{"key_marker": "", "upload_id_marker": "", "max_uploads": 1000}]
    for good in ("v/", "X/", "XX/X/"):  # a one-component prefix is fine; only / is stripped
        assert abort_uploads(Pages([]), good, Deadline(5)) == 0


def test_a_full_page_is_fine_and_one_more_is_refused_by_its_text() -> None:
    full = ups(*[(f"{P}{i:04d}", "U") for i in range(1000)])
    assert abort_uploads(Pages([UploadPage(full, None)]), P, Deadline(30)) == 1000
    over = UploadPage((*full, UploadInfo(P + "x", "U")), None)
    with pytest.raises(errors.FailedPrecondition) as info:
        abort_uploads(Pages([over]), P, Deadline(30))
    assert str(info.value) == "the object store listed an oversize page of uploads"


@pytest.mark.parametrize("uid", ["!", "~", "x" * 1024, "A!~z"])
def test_upload_id_bounds_accept_their_edges(uid: str) -> None:
    t = Pages([UploadPage(ups((P + "a", uid)), None)])
    assert abort_uploads(t, P, Deadline(5)) == 1 and t.aborted == [(P + "a", uid)]


@pytest.mark.parametrize("uid", ["", " ", "\x7f", "x" * 1025, "a\x20b"])
def test_upload_id_bounds_refuse_past_their_edges(uid: str) -> None:
    t = Pages([UploadPage(ups((P + "a", "U1"), (P + "b", uid)), None)])
    with pytest.raises(errors.FailedPrecondition) as info:
        abort_uploads(t, P, Deadline(5))
    assert str(info.value) == (
        "the object store listed a malformed upload id; nothing of that page was aborted"
    )
    assert t.aborted == []


def test_an_entry_without_key_or_id_is_refused_not_a_crash() -> None:
    class Bare:
        pass

    class KeyOnly:
        key = P + "a"

    for entry in (Bare(), KeyOnly()):
        with pytest.raises(errors.FailedPrecondition):
            abort_uploads(Pages([UploadPage((entry,), None)]), P, Deadline(5))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "nxt",
    [
        [P + "a", "U1"],  # a list, not the pair the transports return
        (P + "a", "U1", "x"),  # three strings
        (P + "a",),
        (P + "a", 7),
        (7, "U1"),
    ],
)
def test_malformed_markers_are_refused_by_their_text(nxt: Any) -> None:
    t = Pages([UploadPage(ups((P + "a", "U1")), nxt)])
    with pytest.raises(errors.FailedPrecondition) as info:
        abort_uploads(t, P, Deadline(5))
    assert str(info.value) == "the object store's upload listing markers did not advance"


def test_markers_may_stay_on_one_key_while_the_upload_id_moves_on() -> None:
    t = Pages(
        [
            UploadPage(ups((P + "a", "U1")), (P + "a", "U1")),
            UploadPage(ups((P + "a", "U2")), (P + "a", "U2")),
            UploadPage(ups((P + "b", "U3")), None),
        ]
    )
    assert abort_uploads(t, P, Deadline(5)) == 3
    assert [(a["key_marker"], a["upload_id_marker"]) for a in t.asked] == [
        ("", ""),
        (P + "a", "U1"),
        (P + "a", "U2"),
    ]


def test_the_page_count_bound_and_its_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(od, "MAX_PAGES", 2)
    ok = Pages([UploadPage((), (P + "a", "")), UploadPage((), None)])
    assert abort_uploads(ok, P, Deadline(5)) == 0  # exactly MAX_PAGES pages: fine
    t = Pages([UploadPage((), (P + "a", "")), UploadPage((), (P + "b", "")), UploadPage((), None)])
    with pytest.raises(errors.FailedPrecondition) as info:
        abort_uploads(t, P, Deadline(5))
    assert str(info.value) == "the object store listed too many pages of uploads"
    assert len(t.asked) == 2


@pytest.mark.parametrize("fail_at", [1, 2])
def test_the_deadline_names_each_step(fail_at: int) -> None:
    t = Pages([UploadPage(ups((P + "a", "U1")), None)])
    d = StepDeadline(fail_at)
    with pytest.raises(errors.DeadlineExceeded) as info:
        abort_uploads(t, P, d)
    steps = ["listing the volume's unfinished uploads", "aborting the volume's unfinished uploads"]
    assert d.steps == steps[:fail_at]
    assert str(info.value) == f"deadline exceeded before {steps[fail_at - 1]}"
    assert t.aborted == []


def test_a_refused_abort_names_the_purpose() -> None:
    t = Pages([UploadPage(ups((P + "a", "U1")), None)], abort_error=AccessDenied("abort: 403"))
    with pytest.raises(errors.PermissionDenied) as info:
        abort_uploads(t, P, Deadline(5))
    assert str(info.value) == (
        "the object store refused these credentials for aborting the volume's uploads"
    )


def test_worker_threads_are_named_for_what_they_do() -> None:
    t = Pages([UploadPage(ups(*[(f"{P}{i}", "U") for i in range(20)]), None)])
    abort_uploads(t, P, Deadline(5))
    assert t.threads and all(n.startswith("abort-uploads_") for n in t.threads)

    class Objects:
        threads: set[str] = set()

        def list(self, prefix: str, **kw: Any) -> ListPage:
            if kw.get("token") is None and not self.threads:
                return ListPage((ObjectInfo(P + "a", 1, "e", 0),), (), None)
            return ListPage((), (), None)

        def delete_many(self, keys: Any) -> None:
            self.threads.add(threading.current_thread().name)

    o = Objects()
    delete_prefix(o, P, Deadline(5))
    assert o.threads and all(n.startswith("delete-objects_") for n in o.threads)
