"""RetryingTransport, rule by rule, fast and in-process (for mutation testing).

Why a file of its own: a wrong retry loses or overwrites data (a create-only PUT or a
CompleteMultipartUpload judged "ours" when it is not, or a non-transient failure repeated),
so every rule of ``fuse_crypt/backend/retrying.py`` is pinned here exactly: the delays to the
float, each bound on both sides, the text of every refusal, which arguments reach the inner
transport and which object the ambiguous-outcome checks look at.  A scripted inner transport
and an injected clock keep each test well under a second, so mutants die in milliseconds
before ``test_retrying.py``'s proxy tests run.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from fuse_crypt.backend.retrying import RetryingTransport, multipart_etag
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    TransientError,
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()  # noqa: S324 - an ETag, not security


class Scripted:
    """An ObjectTransport whose answers are scripted per operation.

    ``script[op]`` is a list of outcomes consumed one per call: an exception is raised, any
    other value is returned; with the list empty the call answers ``default[op]``.  Every
    call is recorded with its arguments, so a test sees exactly what reached the bucket.
    """

    def __init__(self) -> None:
        self.script: dict[str, list[Any]] = {}
        self.default: dict[str, Any] = {}
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def _answer(self, op: str, *args: Any, **kw: Any) -> Any:
        self.calls.append((op, args, kw))
        queue = self.script.get(op, [])
        out = queue.pop(0) if queue else self.default.get(op)
        if isinstance(out, BaseException):
            raise out
        return out

    def ops(self) -> list[str]:
        return [op for op, _, _ in self.calls]

    def head(self, key: str) -> ObjectInfo:
        out: ObjectInfo = self._answer("head", key)
        return out

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        out: bytes = self._answer("get", key, start, length)
        return out

    def put(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        out: str = self._answer(
            "put",
            key,
            body,
            metadata=metadata,
            content_type=content_type,
            if_none_match=if_none_match,
        )
        return out

    def copy(
        self,
        src: str,
        dst: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        out: str = self._answer("copy", src, dst, metadata=metadata, content_type=content_type)
        return out

    def delete(self, key: str) -> None:
        self._answer("delete", key)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._answer("delete_many", keys)

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        out: ListPage = self._answer(
            "list", prefix, delimiter=delimiter, token=token, max_keys=max_keys
        )
        return out

    def create_multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
    ) -> str:
        out: str = self._answer(
            "create_multipart", key, metadata=metadata, content_type=content_type
        )
        return out

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes) -> str:
        out: str = self._answer("upload_part", key, upload_id, part_number, body)
        return out

    def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, src_key: str, start: int, length: int
    ) -> str:
        out: str = self._answer(
            "upload_part_copy", key, upload_id, part_number, src_key, start, length
        )
        return out

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        out: str = self._answer("complete_multipart", key, upload_id, parts)
        return out

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._answer("abort_multipart", key, upload_id)


class Clock:
    """Starts far from zero, so a time measured from 0 instead of from the first try shows."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def wrap(
    inner: Scripted,
    clock: Clock,
    rand: float = 1.0,
    retries: list[tuple[str, int, TransientError]] | None = None,
    **kw: Any,
) -> RetryingTransport:
    def on_retry(op: str, attempt: int, e: TransientError) -> None:
        if retries is not None:
            retries.append((op, attempt, e))

    return RetryingTransport(
        inner,  # type: ignore[arg-type]  # Scripted is structurally a transport
        clock=lambda: clock.now,
        sleep=clock.sleep,
        random=lambda: rand,
        on_retry=on_retry,
        **kw,
    )


# -- multipart_etag -----------------------------------------------------------------------------


def test_multipart_etag_is_md5_of_the_binary_part_md5s_dash_count() -> None:
    a, b, c = md5(b"a"), md5(b"b"), md5(b"c")
    raw = bytes.fromhex(a) + bytes.fromhex(b) + bytes.fromhex(c)
    want = md5(raw) + "-3"
    assert multipart_etag([(1, a), (2, b), (3, c)]) == want
    assert multipart_etag([(1, f'"{a}"'), (2, f'"{b.upper()}"'), (3, c)]) == want  # quotes, case
    assert multipart_etag([(1, a)]) == md5(bytes.fromhex(a)) + "-1"
    assert multipart_etag([]) == md5(b"") + "-0"


@pytest.mark.parametrize(
    "etag",
    [
        "not-hex",  # not hex at all
        "ab" * 15,  # 15 bytes
        "ab" * 17,  # 17 bytes
        "",  # nothing
        md5(b"a") + "-2",  # itself a multipart ETag
        "X" + md5(b"a") + "X",  # an MD5 inside other characters than quotes
    ],
)
def test_multipart_etag_of_a_part_that_is_not_an_md5_is_none(etag: str) -> None:
    assert multipart_etag([(1, md5(b"x")), (2, etag)]) is None
    assert multipart_etag([(1, etag)]) is None


def test_multipart_etag_counts_bytes_per_part_not_in_total() -> None:
    """Two 8-byte "MD5s" make 16 bytes: one MD5's worth, but not one per part."""
    assert multipart_etag([(1, "ab" * 8), (2, "cd" * 8)]) is None
    assert multipart_etag([(1, "ab" * 32)]) is None  # 32 bytes for one part


# -- the policy values ---------------------------------------------------------------------------


def test_defaults_are_the_documented_policy() -> None:
    inner = Scripted()
    t = RetryingTransport(inner)  # type: ignore[arg-type]
    assert (t.inner, t.attempts, t.base_delay, t.max_delay, t.budget) == (
        inner,
        5,
        0.1,
        5.0,
        60.0,
    )


@pytest.mark.parametrize(
    "kw",
    [
        {"attempts": 0},
        {"attempts": -1},
        {"base_delay": -0.001},
        {"max_delay": -0.001},
        {"budget": -0.001},
    ],
)
def test_negative_or_zero_attempts_policy_is_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as e:
        RetryingTransport(Scripted(), **kw)  # type: ignore[arg-type]
    assert str(e.value) == "retry policy values must be positive"


def test_smallest_valid_policy_is_accepted_and_means_one_try_no_wait() -> None:
    inner, c = Scripted(), Clock()
    t = wrap(inner, c, attempts=1, base_delay=0.0, max_delay=0.0, budget=0.0)
    assert (t.attempts, t.base_delay, t.max_delay, t.budget) == (1, 0.0, 0.0, 0.0)
    inner.script["get"] = [TransientError("503"), b"never"]
    with pytest.raises(TransientError):
        t.get("k")
    assert inner.ops() == ["get"] and c.sleeps == []


def test_zero_delays_with_a_budget_retry_without_sleeping_long() -> None:
    inner, c = Scripted(), Clock()
    t = wrap(inner, c, attempts=3, base_delay=0.0, max_delay=0.0, budget=0.0)
    inner.script["get"] = [TransientError("503"), TransientError("503"), b"ok"]
    assert t.get("k") == b"ok"  # spent 0 + delay 0 is not over a budget of 0
    assert c.sleeps == [0.0, 0.0]


# -- backoff, attempts, budget --------------------------------------------------------------------


def test_delays_are_exponential_capped_and_scaled_by_random() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503")] * 6 + [b"ok"]
    t = wrap(inner, c, attempts=7, base_delay=0.5, max_delay=6.0, budget=1000.0)
    assert t.get("k") == b"ok"
    assert c.sleeps == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]  # random() = 1: exactly the caps
    inner2, c2 = Scripted(), Clock()
    inner2.script["get"] = [TransientError("503")] * 3 + [b"ok"]
    assert wrap(inner2, c2, rand=0.25, base_delay=0.5, max_delay=6.0).get("k") == b"ok"
    assert c2.sleeps == [0.125, 0.25, 0.5]


def test_max_delay_caps_even_the_first_delay() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503"), b"ok"]
    assert wrap(inner, c, base_delay=8.0, max_delay=2.0).get("k") == b"ok"
    assert c.sleeps == [2.0]


def test_exactly_attempts_tries_then_a_typed_eio_naming_them() -> None:
    inner, c = Scripted(), Clock(now=50.0)
    first = TransientError("OSS GET: 503 SlowDown")
    last = TransientError("OSS GET: 500 InternalError")
    inner.script["get"] = [first, first, last, b"too late"]
    with pytest.raises(TransientError) as e:
        wrap(inner, c, attempts=3, base_delay=0.25, max_delay=10.0).get("k")
    assert inner.ops() == ["get"] * 3
    assert c.sleeps == [0.25, 0.5]
    assert e.value.errno == errno.EIO
    assert e.value.strerror == "OSS GET: 500 InternalError (gave up after 3 attempts, 0.8s)"
    assert e.value.__cause__ is last


def test_one_try_short_of_attempts_still_succeeds() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503")] * 2 + [b"ok"]
    assert wrap(inner, c, attempts=3).get("k") == b"ok"
    assert len(c.sleeps) == 2


def test_time_spent_is_measured_from_the_first_try() -> None:
    """A slow failing call counts against the budget, and the clock does not start at 0."""
    inner, c = Scripted(), Clock(now=5000.0)

    def slow_failure(*_: Any) -> None:
        c.now += 2.0
        raise TransientError("timed out")

    inner.script["get"] = [TransientError("x")] * 10
    inner._answer = lambda op, *a, **k: slow_failure()  # type: ignore[method-assign]
    with pytest.raises(TransientError) as e:
        wrap(inner, c, attempts=10, base_delay=1.0, max_delay=1.0, budget=6.5).get("k")
    # try 1 ends at 2.0 (+1 sleep), try 2 at 5.0 (+1 = 6.0 <= 6.5, sleep), try 3 at 8.0: over
    assert c.sleeps == [1.0, 1.0]
    assert e.value.strerror == "timed out (gave up after 3 attempts, 8.0s)"


def test_budget_is_inclusive_a_retry_that_ends_exactly_on_it_is_made() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503")] * 2 + [b"ok"]
    t = wrap(inner, c, attempts=10, base_delay=1.0, max_delay=100.0, budget=3.0)
    assert t.get("k") == b"ok"  # 0 + 1 <= 3, then 1 + 2 <= 3
    assert c.sleeps == [1.0, 2.0]


def test_budget_stops_the_retry_that_would_pass_it() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503")] * 3 + [b"ok"]
    t = wrap(inner, c, attempts=10, base_delay=1.0, max_delay=100.0, budget=3.0)
    with pytest.raises(TransientError) as e:
        t.get("k")  # spent 3 + next delay 4 = 7 > 3
    assert c.sleeps == [1.0, 2.0]
    assert e.value.strerror == "503 (gave up after 3 attempts, 3.0s)"
    inner.script["get"] = [TransientError("503"), b"ok"]
    c.sleeps.clear()
    t2 = wrap(inner, c, attempts=10, base_delay=1.0, max_delay=100.0, budget=0.999)
    with pytest.raises(TransientError, match=r"gave up after 1 attempts, 0\.0s"):
        t2.get("k")  # the very first delay (1.0) would pass the budget
    assert c.sleeps == []


def test_budget_counts_the_jittered_delay_not_the_cap() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503")] * 2 + [b"ok"]
    t = wrap(inner, c, rand=0.5, attempts=10, base_delay=2.0, max_delay=100.0, budget=3.0)
    assert t.get("k") == b"ok"  # delays 1 and 2: 0 + 1 <= 3, 1 + 2 <= 3 (caps 2 and 4 would not)
    assert c.sleeps == [1.0, 2.0]


@pytest.mark.parametrize(
    "exc",
    [
        ObjectNotFound("404"),
        AccessDenied("403"),
        BadResponse("x"),
        PreconditionFailed("409"),
        ObjectStoreError("400"),
        ValueError("a bug"),
    ],
)
def test_only_transient_errors_are_retried(exc: Exception) -> None:
    inner, c = Scripted(), Clock()
    retries: list[tuple[str, int, TransientError]] = []
    inner.script["get"] = [exc, b"never"]
    with pytest.raises(type(exc)) as e:
        wrap(inner, c, retries=retries).get("k")
    assert e.value is exc
    assert inner.ops() == ["get"] and c.sleeps == [] and retries == []


def test_on_retry_hears_each_retry_with_op_attempt_and_error_but_not_the_last() -> None:
    inner, c = Scripted(), Clock()
    errs = [TransientError(f"503 #{i}") for i in range(3)]
    inner.script["head"] = list(errs)
    retries: list[tuple[str, int, TransientError]] = []
    with pytest.raises(TransientError):
        wrap(inner, c, retries=retries, attempts=3).head("k")
    assert retries == [("head", 1, errs[0]), ("head", 2, errs[1])]


def test_without_on_retry_retries_still_happen() -> None:
    inner, c = Scripted(), Clock()
    inner.script["get"] = [TransientError("503"), b"ok"]
    t = RetryingTransport(
        inner,  # type: ignore[arg-type]
        clock=lambda: c.now,
        sleep=c.sleep,
        random=lambda: 1.0,
    )
    assert t.get("k") == b"ok"
    assert c.sleeps == [0.1]


# -- every operation: its name, its arguments, its answer, its retry ----------------------------

INFO = ObjectInfo("k", 3, "e", 7, {"m": "1"}, "text/plain")
PAGE = ListPage((INFO,), ("p/",), "tok")
OPS: list[tuple[str, Any, tuple[Any, ...], dict[str, Any], Any]] = [
    # (op, call, inner args, inner kwargs, answer)
    ("head", lambda t: t.head("k"), ("k",), {}, INFO),
    ("get", lambda t: t.get("k", 3, 9), ("k", 3, 9), {}, b"bytes"),
    ("get", lambda t: t.get("k"), ("k", 0, None), {}, b"all"),
    (
        "copy",
        lambda t: t.copy("s", "d", metadata={"a": "1"}, content_type="x/y"),
        ("s", "d"),
        {"metadata": {"a": "1"}, "content_type": "x/y"},
        "etag-c",
    ),
    ("copy", lambda t: t.copy("s", "d"), ("s", "d"), {"metadata": None, "content_type": None}, "c"),
    ("delete", lambda t: t.delete("k"), ("k",), {}, None),
    ("delete_many", lambda t: t.delete_many(["a", "b"]), (["a", "b"],), {}, None),
    (
        "list",
        lambda t: t.list("p/", delimiter="", token="t0", max_keys=7),
        ("p/",),
        {"delimiter": "", "token": "t0", "max_keys": 7},
        PAGE,
    ),
    (
        "list",
        lambda t: t.list("p/"),
        ("p/",),
        {"delimiter": "/", "token": None, "max_keys": 1000},
        PAGE,
    ),
    (
        "create_multipart",
        lambda t: t.create_multipart("k", metadata={"a": "1"}, content_type="x/y"),
        ("k",),
        {"metadata": {"a": "1"}, "content_type": "x/y"},
        "upload-1",
    ),
    (
        "create_multipart",
        lambda t: t.create_multipart("k", metadata={}),
        ("k",),
        {"metadata": {}, "content_type": "application/octet-stream"},
        "upload-2",
    ),
    ("upload_part", lambda t: t.upload_part("k", "u", 4, b"body"), ("k", "u", 4, b"body"), {}, "p"),
    (
        "upload_part_copy",
        lambda t: t.upload_part_copy("k", "u", 5, "src", 10, 20),
        ("k", "u", 5, "src", 10, 20),
        {},
        "pc",
    ),
    ("abort_multipart", lambda t: t.abort_multipart("k", "u"), ("k", "u"), {}, None),
    (
        "put",
        lambda t: t.put("k", b"b", metadata={"a": "1"}, content_type="x/y", if_none_match=True),
        ("k", b"b"),
        {"metadata": {"a": "1"}, "content_type": "x/y", "if_none_match": True},
        "etag-p",
    ),
    (
        "put",
        lambda t: t.put("k", b"b", metadata={}),
        ("k", b"b"),
        {"metadata": {}, "content_type": "application/octet-stream", "if_none_match": False},
        "etag-q",
    ),
    (
        "complete_multipart",
        lambda t: t.complete_multipart("k", "u", [(1, "e1")]),
        ("k", "u", [(1, "e1")]),
        {},
        "etag-m",
    ),
]


@pytest.mark.parametrize("op, call, args, kwargs, answer", OPS, ids=[o[0] for o in OPS])
def test_each_operation_passes_its_arguments_and_answer_and_is_retried_by_name(
    op: str, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any], answer: Any
) -> None:
    inner, c = Scripted(), Clock()
    retries: list[tuple[str, int, TransientError]] = []
    err = TransientError("503")
    inner.script[op] = [err, answer]
    assert call(wrap(inner, c, retries=retries)) == answer
    assert inner.calls == [(op, args, kwargs)] * 2
    assert retries == [(op, 1, err)]
    assert c.sleeps == [0.1]


# -- a create-only PUT whose retry meets an object -------------------------------------------


def landed(body: bytes, meta: Mapping[str, str], etag: str | None = None) -> ObjectInfo:
    return ObjectInfo("k", len(body), md5(body) if etag is None else etag, 1, dict(meta))


def test_create_only_put_that_landed_unseen_is_ours_and_returns_its_etag() -> None:
    inner, c = Scripted(), Clock()
    quoted = f'"{md5(b"body").upper()}"'
    inner.script["put"] = [TransientError("reset"), PreconditionFailed("412")]
    inner.default["head"] = landed(b"body", {"mode": "33188", "uid": "0"}, quoted)
    t = wrap(inner, c)
    etag = t.put("k", b"body", metadata={"Mode": "33188", "UID": "0"}, if_none_match=True)
    assert etag == quoted
    assert inner.ops() == ["put", "put", "head"]
    assert inner.calls[-1] == ("head", ("k",), {})


def test_create_only_put_accepts_a_bytearray_body() -> None:
    inner, c = Scripted(), Clock()
    inner.script["put"] = [TransientError("reset"), PreconditionFailed("412")]
    inner.default["head"] = landed(b"body", {})
    assert wrap(inner, c).put("k", bytearray(b"body"), metadata={}, if_none_match=True) == md5(
        b"body"
    )


def test_create_only_put_without_a_transient_failure_never_looks() -> None:
    """No failed try: the object was there before us, even if it is byte-identical."""
    inner, c = Scripted(), Clock()
    err = PreconditionFailed("412")
    inner.script["put"] = [err]
    inner.default["head"] = landed(b"body", {})
    with pytest.raises(PreconditionFailed) as e:
        wrap(inner, c).put("k", b"body", metadata={}, if_none_match=True)
    assert e.value is err
    assert inner.ops() == ["put"]


def test_overwriting_put_is_never_judged_by_its_landing() -> None:
    """A 412/409 to a plain PUT is not "our create landed": it is raised as it came."""
    inner, c = Scripted(), Clock()
    err = PreconditionFailed("409")
    inner.script["put"] = [TransientError("reset"), err]
    inner.default["head"] = landed(b"body", {})
    with pytest.raises(PreconditionFailed) as e:
        wrap(inner, c).put("k", b"body", metadata={}, if_none_match=False)
    assert e.value is err
    assert inner.ops() == ["put", "put"]


@pytest.mark.parametrize(
    "info",
    [
        landed(b"other", {"mode": "1"}),  # someone else's body, our metadata
        landed(b"body", {"mode": "2"}),  # our body, other metadata
        landed(b"body", {"mode": "1", "extra": "x"}),  # our body, more metadata
        landed(b"body", {}),  # our body, no metadata
        landed(b"body", {"mode": "1"}, md5(b"body") + "-1"),  # a multipart object
        landed(b"body", {"mode": "1"}, f"X{md5(b'body')}X"),  # ours inside other characters
        AccessDenied("403"),  # cannot look
        ObjectNotFound("404"),  # gone again
    ],
    ids=["body", "meta", "more-meta", "no-meta", "multipart", "wrapped", "head-403", "head-404"],
)
def test_create_only_put_meeting_anything_but_itself_fails_with_the_original_error(
    info: ObjectInfo | Exception,
) -> None:
    inner, c = Scripted(), Clock()
    err = PreconditionFailed("412")
    inner.script["put"] = [TransientError("reset"), err]
    inner.default["head"] = info
    with pytest.raises(PreconditionFailed) as e:
        wrap(inner, c).put("k", b"body", metadata={"mode": "1"}, if_none_match=True)
    assert e.value is err
    assert inner.ops() == ["put", "put", "head"]


def test_the_landing_check_of_a_put_is_retried_like_any_head() -> None:
    inner, c = Scripted(), Clock()
    inner.script["put"] = [TransientError("reset"), PreconditionFailed("412")]
    inner.script["head"] = [TransientError("503")]
    inner.default["head"] = landed(b"body", {})
    assert wrap(inner, c).put("k", b"body", metadata={}, if_none_match=True) == md5(b"body")
    assert inner.ops() == ["put", "put", "head", "head"]


# -- a CompleteMultipartUpload whose retry finds no upload -----------------------------------


def parts_of(*bodies: bytes) -> list[tuple[int, str]]:
    return [(i + 1, f'"{md5(b)}"') for i, b in enumerate(bodies)]


def test_complete_that_landed_unseen_is_ours_and_returns_its_etag() -> None:
    inner, c = Scripted(), Clock()
    parts = parts_of(b"a" * 10, b"b")
    want = multipart_etag(parts)
    assert want is not None
    quoted = f'"{want.upper()}"'
    inner.script["complete_multipart"] = [TransientError("cut"), ObjectNotFound("NoSuchUpload")]
    inner.default["head"] = ObjectInfo("k", 11, quoted, 1, {"other": "meta is not checked"})
    assert wrap(inner, c).complete_multipart("k", "u", parts) == quoted
    assert inner.ops() == ["complete_multipart", "complete_multipart", "head"]
    assert inner.calls[-1] == ("head", ("k",), {})


def test_complete_without_a_transient_failure_never_looks() -> None:
    inner, c = Scripted(), Clock()
    parts = parts_of(b"a")
    err = ObjectNotFound("NoSuchUpload")
    inner.script["complete_multipart"] = [err]
    inner.default["head"] = ObjectInfo("k", 1, str(multipart_etag(parts)), 1)
    with pytest.raises(ObjectNotFound) as e:
        wrap(inner, c).complete_multipart("k", "u", parts)
    assert e.value is err
    assert inner.ops() == ["complete_multipart"]


@pytest.mark.parametrize(
    "etag",
    [
        "OLD",  # the previous version
        md5(b"a"),  # a single-part object with our part's body
        str(multipart_etag(parts_of(b"a", b"b"))),  # other parts
        str(multipart_etag(parts_of(b"a"))).replace("-1", "-2"),  # other count
        f"X{multipart_etag(parts_of(b'a'))}X",  # ours inside other characters than quotes
    ],
)
def test_complete_meeting_another_object_keeps_not_found(etag: str) -> None:
    inner, c = Scripted(), Clock()
    err = ObjectNotFound("NoSuchUpload")
    inner.script["complete_multipart"] = [TransientError("503"), err]
    inner.default["head"] = ObjectInfo("k", 1, etag, 1)
    with pytest.raises(ObjectNotFound) as e:
        wrap(inner, c).complete_multipart("k", "u", parts_of(b"a"))
    assert e.value is err
    assert inner.ops() == ["complete_multipart", "complete_multipart", "head"]


@pytest.mark.parametrize("head", [ObjectNotFound("404"), AccessDenied("403"), BadResponse("x")])
def test_complete_whose_landing_cannot_be_seen_keeps_not_found(head: Exception) -> None:
    inner, c = Scripted(), Clock()
    err = ObjectNotFound("NoSuchUpload")
    inner.script["complete_multipart"] = [TransientError("503"), err]
    inner.default["head"] = head
    with pytest.raises(ObjectNotFound) as e:
        wrap(inner, c).complete_multipart("k", "u", parts_of(b"a"))
    assert e.value is err


def test_complete_with_unrecognisable_part_etags_keeps_not_found() -> None:
    """Part ETags that are not MD5s give no expected ETag: even an object whose ETag is
    the string "None" (what a careless comparison would accept) is not ours."""
    for etag in ("None", "none", ""):
        inner, c = Scripted(), Clock()
        err = ObjectNotFound("NoSuchUpload")
        inner.script["complete_multipart"] = [TransientError("503"), err]
        inner.default["head"] = ObjectInfo("k", 1, etag, 1)
        with pytest.raises(ObjectNotFound) as e:
            wrap(inner, c).complete_multipart("k", "u", [(1, "not-an-md5")])
        assert e.value is err


def test_complete_other_errors_after_a_retry_are_raised_as_they_came() -> None:
    inner, c = Scripted(), Clock()
    err = PreconditionFailed("409")
    inner.script["complete_multipart"] = [TransientError("503"), err]
    with pytest.raises(PreconditionFailed) as e:
        wrap(inner, c).complete_multipart("k", "u", parts_of(b"a"))
    assert e.value is err
    assert inner.ops() == ["complete_multipart"] * 2
