"""DeleteVolume's bucket requests run side by side, boundedly (issue 10), in process over the
strict fake transport: how many are ever in flight, that a page is checked whole before any
request of it, that the earliest failure in send order is the call's (with the code the
sequential code gave), that nothing sent outlives the call, that nothing is sent after a
failure beyond what was already in flight, and that a re-run finishes what a failed call
left.

The same through a real controller process and moto (a failure injected on the wire, then
the provisioner's retry): tests/csi_driver/test_object_delete_e2e.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.deadline import Deadline
from csi_driver.volumes import objectdelete as od
from csi_driver.volumes.objectdelete import abort_uploads, delete_prefix
from fuse_crypt.backend.retrying import RetryingTransport
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ListPage,
    ObjectStoreError,
    TransientError,
    UploadInfo,
    UploadPage,
)
from tests.csi_driver.helpers import plain_capability
from tests.csi_driver.test_object_delete import Env, env  # noqa: F401 (fixture)
from tests.fuse_crypt.fake_transport import FakeTransport

P = "pvcs/coco-1/"
OUTSIDE = ("pvcs/coco-10/x", "pvcs/coco-1", "top")


class Gauge(FakeTransport):
    """The strict fake, measuring how many aborts / batch deletes run at once; each one
    takes ``hold`` seconds, and ``fail[key]`` (an abort's key, or a batch's first key) is
    raised, after ``delay[key]`` seconds, the first time that request is sent."""

    def __init__(self, hold: float = 0.02, **kw: Any) -> None:
        super().__init__(**kw)
        self.hold = hold
        self.now = 0
        self.peak: dict[str, int] = {"abort_multipart": 0, "delete_many": 0}
        self.fail: dict[str, ObjectStoreError] = {}
        self.delay: dict[str, float] = {}
        self.ended: list[str] = []

    def _held(self, op: str, key: str) -> None:
        with self._lock:
            self.now += 1
            self.peak[op] = max(self.peak[op], self.now)
            exc = self.fail.pop(key, None)
        try:
            time.sleep(self.delay.get(key, self.hold))
            if exc is not None:
                raise exc
        finally:
            with self._lock:
                self.now -= 1
                self.ended.append(key)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._held("abort_multipart", key)
        super().abort_multipart(key, upload_id)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._held("delete_many", keys[0])
        super().delete_many(keys)


def start(t: FakeTransport, keys: Sequence[str]) -> None:
    for k in keys:
        t.create_multipart(k, metadata={})


def upload_keys(t: FakeTransport) -> list[str]:
    return sorted(k for k, *_ in t.uploads.values())


def fill(t: FakeTransport, n: int) -> list[str]:
    keys = [f"{P}f{i:04d}" for i in range(n)]
    for k in keys:
        t.put_raw(k, b"x")
    return keys


def test_the_bounds_are_the_documented_ones() -> None:
    assert od.ABORT_PARALLEL == 8 and od.BATCHES_IN_FLIGHT == 4


# -- AbortMultipartUpload ---------------------------------------------------------------------


def test_aborts_run_side_by_side_never_more_than_the_bound() -> None:
    t = Gauge(hold=0.05)  # 0.25 s side by side, 2 s one at a time: room for a loaded VM
    mine = [f"{P}big{i:03d}" for i in range(40)]
    start(t, mine + list(OUTSIDE))
    started = time.monotonic()
    assert abort_uploads(t, P, Deadline(30)) == 40
    took = time.monotonic() - started
    assert t.peak["abort_multipart"] == od.ABORT_PARALLEL
    assert upload_keys(t) == sorted(OUTSIDE)
    assert took < 40 * t.hold / 2  # one at a time would take 40 x 50 ms
    assert t.counts["abort_multipart"] == 40


def test_parallel_one_is_one_at_a_time() -> None:
    t = Gauge(hold=0.001)
    start(t, [f"{P}{i}" for i in range(10)])
    assert abort_uploads(t, P, Deadline(30), parallel=1) == 10
    assert t.peak["abort_multipart"] == 1


def test_each_page_is_checked_whole_and_its_aborts_end_before_the_next_listing() -> None:
    class Paged(Gauge):
        def list_uploads(self, prefix: str, **kw: Any) -> UploadPage:
            with self._lock:
                assert self.now == 0, "a page listed while the last one's aborts ran"
            page = super().list_uploads(prefix, **kw)
            if kw["key_marker"]:  # the second page ends with a key outside the prefix
                return UploadPage((*page.uploads, UploadInfo("pvcs/coco-10/x", "U")), None)
            return page

    # Pages of 20; the second holds 15 good uploads, then the hostile key: aborting while
    # checking would have had to start at least 15 - 8 of them before reaching it.
    t = Paged(max_keys_cap=20)
    start(t, [f"{P}{i:02d}" for i in range(35)])
    with pytest.raises(errors.FailedPrecondition, match="outside the volume's prefix"):
        abort_uploads(t, P, Deadline(30))
    assert t.counts["abort_multipart"] == 20  # the first page, and nothing of the second
    assert upload_keys(t) == [f"{P}{i:02d}" for i in range(20, 35)]


def test_a_failed_abort_stops_what_was_not_sent_and_a_rerun_finishes() -> None:
    t = Gauge(hold=0.3)  # the others are still in flight when the first one fails
    mine = [f"{P}big{i:03d}" for i in range(40)]
    start(t, mine + list(OUTSIDE))
    t.fail[mine[0]] = AccessDenied("abort: 403")
    t.delay[mine[0]] = 0.0
    with pytest.raises(errors.PermissionDenied):
        abort_uploads(t, P, Deadline(30))
    sent = len(t.ended)  # every request sent has ended (the failed one reached no store)
    assert t.now == 0 and t.counts["abort_multipart"] == sent - 1
    assert 1 <= sent <= od.ABORT_PARALLEL  # what was in flight, nothing sent after
    left = [k for k in upload_keys(t) if k.startswith(P)]
    assert len(left) == 40 - (sent - 1)  # the failed one and the unsent ones remain
    # The provisioner's retry lists again and aborts the rest; the neighbours stay.
    assert abort_uploads(t, P, Deadline(30)) == len(left)
    assert upload_keys(t) == sorted(OUTSIDE)


def test_the_earliest_failure_in_page_order_is_the_calls() -> None:
    """Upload 1 fails slowly with 403, upload 3 fails at once with a 503 that outlasts the
    retries: in time the 503 comes first, but sequentially upload 1 was aborted first, so
    the call is PERMISSION_DENIED, as it was when aborts ran one at a time."""
    t = Gauge()
    mine = [f"{P}big{i}" for i in range(6)]
    start(t, mine)
    t.fail[mine[1]] = AccessDenied("abort: 403")
    t.delay[mine[1]] = 1.0  # long enough that a loaded VM cannot reorder the two
    t.fail[mine[3]] = TransientError("abort: 503")
    t.delay[mine[3]] = 0.0
    with pytest.raises(errors.PermissionDenied) as info:
        abort_uploads(t, P, Deadline(30))
    assert t.ended.index(mine[3]) < t.ended.index(mine[1])  # the 503 did come first
    assert "403" not in str(info.value)
    assert t.now == 0


def test_transient_abort_failures_are_retried_in_parallel_too() -> None:
    t = Gauge(hold=0.001)
    start(t, [f"{P}{i:02d}" for i in range(30)])
    # Four 503s, to whichever aborts meet them (fewer than one abort's 5 attempts, even if
    # a single abort met them all).
    t.fail_next("abort_multipart", 4)
    retrying = RetryingTransport(t, base_delay=0.0, max_delay=0.0, budget=10)
    assert abort_uploads(retrying, P, Deadline(30)) == 30
    assert upload_keys(t) == []


def test_a_deadline_met_between_aborts_ends_the_call_after_those_in_flight() -> None:
    t = Gauge(hold=0.05)
    start(t, [f"{P}{i:03d}" for i in range(200)])
    with pytest.raises(errors.DeadlineExceeded):
        abort_uploads(t, P, Deadline(0.3))
    done = t.counts["abort_multipart"]
    assert t.now == 0 and len(t.ended) == done < 200
    assert abort_uploads(t, P, Deadline(30)) == 200 - done


# -- DeleteObjects ----------------------------------------------------------------------------


def test_batches_overlap_the_listing_never_more_than_the_bound() -> None:
    t = Gauge(hold=0.05, max_keys_cap=10)
    keys = fill(t, 100)
    for k in ("pvcs/coco-10/x", "pvcs/coco-1"):
        t.put_raw(k, b"keep")
    assert delete_prefix(t, P, Deadline(30)) == 100
    assert 1 < t.peak["delete_many"] <= od.BATCHES_IN_FLIGHT
    assert t.counts["delete_many"] == 10
    assert sorted(t.objects) == ["pvcs/coco-1", "pvcs/coco-10/x"]
    assert not set(keys) & set(t.objects)


def test_a_pass_ends_its_batches_before_the_prefix_is_listed_again() -> None:
    class Passes(Gauge):
        lists_at_zero: list[bool]

        def list(self, prefix: str, **kw: Any) -> ListPage:
            with self._lock:
                if kw.get("token") is None:
                    assert self.now == 0, "the prefix was listed again while batches ran"
            return super().list(prefix, **kw)

    t = Passes(hold=0.05, max_keys_cap=10)
    fill(t, 50)
    assert delete_prefix(t, P, Deadline(30)) == 50
    assert t.objects == {}


def test_a_failed_batch_stops_what_was_not_sent_and_a_rerun_finishes() -> None:
    t = Gauge(hold=0.5, max_keys_cap=10)  # the others are still in flight at the failure
    keys = fill(t, 100)
    t.put_raw("pvcs/coco-10/x", b"keep")
    t.fail[keys[0]] = AccessDenied("delete_objects: 403")
    t.delay[keys[0]] = 0.1  # after the next listings, before any other batch ends
    with pytest.raises(errors.PermissionDenied):
        delete_prefix(t, P, Deadline(30))
    sent = len(t.ended)
    assert t.now == 0 and t.counts["delete_many"] == sent - 1
    assert 1 <= sent <= od.BATCHES_IN_FLIGHT  # what was in flight, nothing sent after
    assert len([k for k in t.objects if k.startswith(P)]) == 100 - 10 * (sent - 1)
    assert delete_prefix(t, P, Deadline(30)) == 100 - 10 * (sent - 1)
    assert sorted(t.objects) == ["pvcs/coco-10/x"]


def test_a_batch_failure_outranks_a_later_listing_failure() -> None:
    """Batch 1 fails (slowly) with 403 while page 2's listing fails at once with a bad
    answer: sequentially, the 403 came first, so the call is PERMISSION_DENIED."""

    class BadSecondPage(Gauge):
        def list(self, prefix: str, **kw: Any) -> ListPage:
            if kw.get("token") is not None:
                self._req("list", prefix)
                raise BadResponse("list: malformed")
            return super().list(prefix, **kw)

    t = BadSecondPage(max_keys_cap=10)
    keys = fill(t, 20)
    t.fail[keys[0]] = AccessDenied("delete_objects: 403")
    t.delay[keys[0]] = 0.3
    with pytest.raises(errors.PermissionDenied):
        delete_prefix(t, P, Deadline(30))
    assert t.now == 0 and t.ended == [keys[0]]


def test_a_hostile_page_is_refused_before_its_batch_and_earlier_batches_end_first() -> None:
    class Hostile(Gauge):
        def list(self, prefix: str, **kw: Any) -> ListPage:
            page = super().list(prefix, **kw)
            if kw.get("token") is None:
                return page
            return ListPage((*page.objects, *super().list("top", token=None).objects), (), None)

    t = Hostile(hold=0.2, max_keys_cap=10)
    fill(t, 20)
    t.put_raw("top", b"keep")
    with pytest.raises(errors.FailedPrecondition, match="outside the volume's prefix"):
        delete_prefix(t, P, Deadline(30))
    assert t.counts["delete_many"] == 1 and t.now == 0 and len(t.ended) == 1
    assert "top" in t.objects and len([k for k in t.objects if k.startswith(P)]) == 10


# -- through the controller -------------------------------------------------------------------


def test_controller_delete_that_failed_half_way_is_finished_by_the_retry(
    env: Env,  # noqa: F811
) -> None:
    ctrl = env.backend()
    rec, _ = ctrl.create("pvc-par", [plain_capability()], env.params())
    prefix = f"pvcs/team-a/{rec.volume_id}/"
    env.bucket = bucket = Gauge(hold=0.005, max_keys_cap=25)
    mine = [f"{prefix}big{i:03d}" for i in range(60)]
    start(bucket, [*mine, "pvcs/team-a/other/z"])
    for i in range(30):
        bucket.put_raw(f"{prefix}obj{i:02d}", b"x")
    bucket.put_raw("pvcs/team-a/other/kept", b"x")
    bucket.fail[mine[30]] = AccessDenied("abort: 403")
    with pytest.raises(errors.PermissionDenied):
        ctrl.delete(rec.volume_id)
    assert ctrl.get(rec.volume_id) is not None  # the record stays for the retry
    assert mine[30] in upload_keys(bucket)
    assert len([k for k in bucket.objects if k.startswith(prefix)]) == 30  # uploads first
    ctrl.delete(rec.volume_id)
    assert upload_keys(bucket) == ["pvcs/team-a/other/z"]
    assert sorted(bucket.objects) == ["pvcs/team-a/other/kept"]
    assert ctrl.get(rec.volume_id) is None
