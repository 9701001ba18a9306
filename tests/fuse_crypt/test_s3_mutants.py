"""S3Transport's parsing of hostile answers, rule by rule and in-process (mutation testing).

Why: what an S3 endpoint returns is hostile (a MinIO or Ceph run by the host); a bound off
by one or an error mapped to the wrong type lets it truncate a read, flood metadata or make
a retry take another object for ours.  ``test_s3_transport.py`` runs the transport against
moto; these pin each rule exactly (text, type, each bound on both sides) against a scripted
boto3 client, so mutants die in milliseconds.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

import botocore.exceptions
import pytest

from fuse_crypt.backend import s3
from fuse_crypt.backend.s3 import S3Transport
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    CredentialsRejected,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    TransientError,
)
from tests.fuse_crypt.test_oss_mutants import raises


class Client:
    """A boto3 S3 client stand-in: records calls, answers from ``answers[op]``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.answers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        def call(**kw: Any) -> Any:
            self.calls.append((name, kw))
            out = self.answers[name]
            if isinstance(out, BaseException):
                raise out
            return out

        return call


_TEMPLATE: list[S3Transport] = []


def transport(max_body: int = 100, deadline: float = 300.0) -> tuple[S3Transport, Client]:
    """A real S3Transport (its constructor is slow: boto3 builds a client) copied per test,
    with the client swapped for the scripted one."""
    if not _TEMPLATE:
        _TEMPLATE.append(
            S3Transport(
                "bkt",
                access_key="AK",
                secret_key="SK",
                endpoint_url="http://127.0.0.1:9",
                allow_insecure_http=True,
            )
        )
    t = copy.copy(_TEMPLATE[0])
    t.max_body, t.request_deadline = max_body, deadline
    c = Client()
    t._client = c
    return t, c


def client_error(status: Any, code: Any = "X") -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
    )


# -- small parsers -------------------------------------------------------------------------------


def test_code_is_shown_only_when_it_looks_like_one() -> None:
    assert s3._code({"Code": "NoSuchKey"}) == "NoSuchKey"
    assert s3._code({"Code": "a" * 64}) == "a" * 64
    for bad in ("a" * 65, "", "No Such", 5, None):
        assert s3._code({"Code": bad}) == "?"
    assert s3._code({}) == "?"


def test_etag_is_unquoted_and_bounded() -> None:
    assert (
        s3._etag('"d41d8cd98f00b204e9800998ecf8427e-12"') == "d41d8cd98f00b204e9800998ecf8427e-12"
    )
    assert s3._etag(' "abc" ') == "abc"
    assert s3._etag("a" * 80) == "a" * 80
    for bad in ("a" * 81, '""', "", "a b", "a/b", '"a"b"'):
        with raises(BadResponse, "malformed ETag"):
            s3._etag(bad)
    for missing in (None, 5, b"abc"):
        with raises(BadResponse, "missing ETag"):
            s3._etag(missing)


def test_a_part_answer_without_etag_is_transient_a_bad_one_is_not() -> None:
    """A part upload whose answer lost its ETag (a cut inside the headers) is retried: the
    same part number replaces whatever landed.  A malformed ETag stays a hostile answer."""
    t, c = transport()
    c.answers["upload_part"] = {}
    with raises(TransientError, "S3: upload_part answer without an ETag"):
        t.upload_part("k", "u", 1, b"x")
    c.answers["upload_part"] = {"ETag": "a b"}
    with raises(BadResponse, "malformed ETag"):
        t.upload_part("k", "u", 1, b"x")
    c.answers["upload_part"] = {"ETag": '"abc"'}
    assert t.upload_part("k", "u", 1, b"x") == "abc"


def test_times_become_nanoseconds_or_zero() -> None:
    utc = datetime.UTC
    when = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=utc)
    assert s3._ns(when) == 1714979289 * 10**9 + 123456 * 1000
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    assert s3._ns(datetime.datetime(2024, 5, 6, 9, 8, 9, 123456, tzinfo=plus2)) == s3._ns(when)
    for bad in (None, "2024-05-06", 5, object()):
        assert s3._ns(bad) == 0


def test_metadata_received_is_checked_and_bounded() -> None:
    assert s3._meta({"Mode": "33188", "uid": "0"}) == {"mode": "33188", "uid": "0"}
    assert s3._meta(None) == {}
    assert s3._meta([("a", "b")]) == {}
    for bad in ({"a": 1}, {1: "a"}, {"a": None}):
        with raises(BadResponse, "malformed metadata"):
            s3._meta(bad)
    assert s3._meta({"a": "v" * 8191}) == {"a": "v" * 8191}  # 8,192 characters
    with raises(BadResponse, "metadata over the size bound"):
        s3._meta({"a": "v" * 8192})
    assert len(s3._meta({"a": "v" * 4095, "b": "v" * 4095})) == 2
    with raises(BadResponse, "metadata over the size bound"):
        s3._meta({"a": "v" * 4095, "bc": "v" * 4095})


def test_sizes_are_bounded_on_both_sides() -> None:
    assert s3._size(0) == 0
    assert s3._size(5 << 40) == 5 << 40
    for bad in (-1, (5 << 40) + 1, "1", None, 1.0):
        with raises(BadResponse, "malformed size"):
            s3._size(bad)


# -- error answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, code, cls",
    [
        (404, "X", ObjectNotFound),
        (400, "NoSuchKey", ObjectNotFound),
        (400, "NoSuchUpload", ObjectNotFound),
        (400, "NotFound", ObjectNotFound),
        (400, "404", ObjectNotFound),
        (416, "X", s3._RangeNotSatisfiable),
        (400, "InvalidRange", s3._RangeNotSatisfiable),
        (412, "X", PreconditionFailed),
        (400, "PreconditionFailed", PreconditionFailed),
        (403, "X", AccessDenied),
        (400, "AccessDenied", AccessDenied),
        (400, "InvalidAccessKeyId", CredentialsRejected),
        (400, "SignatureDoesNotMatch", AccessDenied),
        (400, "ExpiredToken", CredentialsRejected),
        (400, "403", AccessDenied),
        (500, "X", TransientError),
        (503, "X", TransientError),
        (499, "X", ObjectStoreError),
        (408, "X", TransientError),
        (429, "X", TransientError),
        (400, "SlowDown", TransientError),
        (400, "RequestTimeout", TransientError),
        (400, "ConditionalRequestConflict", TransientError),
        (400, "X", ObjectStoreError),
        (409, "X", ObjectStoreError),
    ],
)
def test_each_status_and_code_maps_to_its_error(
    status: int, code: str, cls: type[Exception]
) -> None:
    t, c = transport()
    c.answers["head_object"] = client_error(status, code)
    with raises(cls, f"head_object: HTTP {status} {code}"):
        t.head("k")


def test_malformed_error_answers_still_map() -> None:
    got = S3Transport._client_error("op", client_error("404", "X"))
    assert type(got) is ObjectStoreError and got.strerror == "op: HTTP 0 X"
    e = client_error(404)
    e.response = "not a mapping"  # type: ignore[assignment]
    got = S3Transport._client_error("op", e)
    assert type(got) is ObjectStoreError and got.strerror == "op: HTTP 0 ?"
    e = client_error(404)
    e.response["Error"] = ["not", "a", "mapping"]  # type: ignore[typeddict-item]
    got = S3Transport._client_error("op", e)
    assert type(got) is ObjectNotFound and got.strerror == "op: HTTP 404 ?"


def test_transport_level_failures_are_typed() -> None:
    t, c = transport()
    c.answers["head_object"] = botocore.exceptions.ReadTimeoutError(endpoint_url="u")
    with raises(TransientError, "head_object: ReadTimeoutError"):
        t.head("k")
    c.answers["head_object"] = botocore.exceptions.NoCredentialsError()
    with raises(AccessDenied, "head_object: no usable credentials"):
        t.head("k")
    c.answers["head_object"] = botocore.exceptions.SSLError(endpoint_url="u", error="x")
    with raises(ObjectStoreError, "head_object: TLS verification failed"):
        t.head("k")


# -- head, get, the body reader ------------------------------------------------------------------


def test_head_parses_the_answer() -> None:
    t, c = transport()
    c.answers["head_object"] = {
        "ContentLength": 3,
        "ETag": '"E"',
        "Metadata": {"Mode": "1"},
        "ContentType": "t" * 256,
        "LastModified": WHEN,
    }
    assert t.head("k") == ObjectInfo("k", 3, "E", 1714979289 * 10**9, {"mode": "1"}, "t" * 256)
    assert c.calls == [("head_object", {"Bucket": "bkt", "Key": "k"})]
    for ctype in ("t" * 257, None, 5):
        c.answers["head_object"] = {"ContentLength": 3, "ETag": "E", "ContentType": ctype}
        assert t.head("k").content_type == ""


class Body:
    """A streaming body: hands out ``data`` in pieces, records read sizes and close()."""

    def __init__(self, data: bytes, fail: BaseException | None = None) -> None:
        self.data = data
        self.reads: list[int] = []
        self.closed = False
        self.fail = fail

    def read(self, n: int) -> bytes:
        self.reads.append(n)
        if self.fail is not None:
            raise self.fail
        out, self.data = self.data[:n], self.data[n:]
        return out

    def close(self) -> None:
        self.closed = True


def test_get_asks_for_the_range_or_one_byte_over_the_cap() -> None:
    t, c = transport(max_body=100)
    c.answers["get_object"] = {"Body": Body(b"x" * 10)}
    assert t.get("k", 5, 10) == b"x" * 10
    c.answers["get_object"] = {"Body": Body(b"y" * 7)}
    assert t.get("k", 5) == b"y" * 7
    assert t.get("k", 5, 0) == b""
    assert c.calls == [
        ("get_object", {"Bucket": "bkt", "Key": "k", "Range": "bytes=5-14"}),
        ("get_object", {"Bucket": "bkt", "Key": "k", "Range": "bytes=5-105"}),
    ]


def test_get_argument_bounds() -> None:
    t, c = transport(max_body=100)
    for start, length in ((-1, None), (0, -1), (-1, 1)):
        with pytest.raises(ValueError, match="^negative range$"):
            t.get("k", start, length)
    c.answers["get_object"] = {"Body": Body(b"x" * 100)}
    assert t.get("k", 0, 100) == b"x" * 100
    with raises(BadResponse, "get: range larger than max_body"):
        t.get("k", 0, 101)
    assert len(c.calls) == 1


def test_get_past_the_end_is_empty_and_other_errors_pass() -> None:
    t, c = transport()
    c.answers["get_object"] = client_error(416, "InvalidRange")
    assert t.get("k", 50, 5) == b""
    c.answers["get_object"] = client_error(404, "NoSuchKey")
    with raises(ObjectNotFound, "get_object: HTTP 404 NoSuchKey"):
        t.get("k", 50, 5)


def read_body(t: S3Transport, body: Any, want: int, open_ended: bool) -> bytes:
    """``_read_body`` hands pieces to a sink (no joined copy); join them for the checks."""
    out = bytearray()
    t._read_body(body, want, open_ended, out.extend)
    return bytes(out)


def test_body_reads_are_bounded_on_both_sides() -> None:
    t, _ = transport(max_body=100)
    b = Body(b"x" * 5)
    assert read_body(t, b, 5, False) == b"x" * 5
    assert b.reads == [6, 1] and not b.closed  # read to its end: back to the pool
    b = Body(b"x" * 6)
    with raises(BadResponse, "get: longer than asked"):
        read_body(t, b, 5, False)
    assert b.closed
    with raises(BadResponse, "get: object over max_body"):
        read_body(t, Body(b"x" * 6), 5, True)
    with raises(BadResponse, "get: no body"):
        read_body(t, None, 5, False)
    big = b"z" * ((1 << 20) + 10)
    b = Body(big)
    assert read_body(t, b, len(big), False) == big
    assert b.reads == [s3._READ_PIECE] * ((1 << 20) // s3._READ_PIECE) + [11, 1]


def test_body_read_failures_are_transient_and_close_the_connection() -> None:
    t, _ = transport()
    b = Body(b"", ConnectionResetError("reset"))
    with raises(TransientError, "get: ConnectionResetError"):
        read_body(t, b, 5, False)
    assert b.closed
    b = Body(b"", BadResponse("inner"))
    with raises(BadResponse, "inner"):
        read_body(t, b, 5, False)
    slow, _ = transport(deadline=-1.0)
    b = Body(b"x" * 5)
    with raises(TransientError, "get: body too slow"):
        read_body(slow, b, 5, False)
    assert b.closed


# -- delete_many, list, create_multipart --------------------------------------------------------


def test_delete_many_bounds_and_errors() -> None:
    t, c = transport()
    t.delete_many([])
    assert c.calls == []
    with pytest.raises(ValueError, match="^at most 1000 keys per request$"):
        t.delete_many(["k"] * 1001)
    c.answers["delete_objects"] = {}
    t.delete_many(["k"] * 1000)
    assert c.calls[0][1]["Delete"] == {"Objects": [{"Key": "k"}] * 1000, "Quiet": True}
    c.answers["delete_objects"] = {"Errors": [{"Code": "AccessDenied"}, {"Code": "X"}]}
    with raises(ObjectStoreError, "delete_objects: 2 failed (AccessDenied)"):
        t.delete_many(["a", "b"])
    c.answers["delete_objects"] = {"Errors": ["junk"]}
    with raises(ObjectStoreError, "delete_objects: 1 failed (?)"):
        t.delete_many(["a"])


def test_list_sends_a_clamped_request() -> None:
    t, c = transport()
    c.answers["list_objects_v2"] = {}
    t.list("p/")
    t.list("p/", delimiter="", token="tok", max_keys=0)
    t.list("p/", max_keys=5000)
    t.list("p/", max_keys=7)
    assert [kw for _, kw in c.calls] == [
        {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 1000, "Delimiter": "/"},
        {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 1, "ContinuationToken": "tok"},
        {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 1000, "Delimiter": "/"},
        {"Bucket": "bkt", "Prefix": "p/", "MaxKeys": 7, "Delimiter": "/"},
    ]


WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)


def entry(key: Any, size: Any = 1) -> dict[str, Any]:
    return {"Key": key, "Size": size, "ETag": '"E"', "LastModified": WHEN}


def test_list_parses_and_bounds_the_page() -> None:
    t, c = transport()
    c.answers["list_objects_v2"] = {
        "Contents": [entry("p/a", 3)],
        "CommonPrefixes": [{"Prefix": "p/d/"}],
        "IsTruncated": True,
        "NextContinuationToken": "t" * 4096,
    }
    got = t.list("p/")
    assert got.objects == (ObjectInfo("p/a", 3, "E", 1714979289 * 10**9),)
    assert got.common_prefixes == ("p/d/",) and got.next_token == "t" * 4096
    c.answers["list_objects_v2"] = {
        "Contents": [entry("k" * 1024)],
        "CommonPrefixes": [{"Prefix": "p" * 1024}],
        "NextContinuationToken": "t",
    }
    got = t.list("")
    assert got.next_token is None  # not truncated: no token
    assert got.common_prefixes == ("p" * 1024,)
    c.answers["list_objects_v2"] = {"IsTruncated": True, "NextContinuationToken": "t"}
    assert t.list("").next_token == "t"  # the shortest token
    c.answers["list_objects_v2"] = {
        "Contents": [entry("a")] * 600,
        "CommonPrefixes": [{"Prefix": "b/"}] * 400,
    }
    assert len(t.list("").objects) == 600


@pytest.mark.parametrize(
    "answer, text",
    [
        ({"Contents": {"Key": "a"}}, "list: malformed"),
        ({"CommonPrefixes": "p/"}, "list: malformed"),
        (
            {"Contents": [entry("a")] * 601, "CommonPrefixes": [{"Prefix": "b/"}] * 400},
            "list: page over 1000 entries",
        ),
        ({"Contents": [entry("k" * 1025)]}, "list: malformed key"),
        ({"Contents": [entry(5)]}, "list: malformed key"),
        ({"Contents": ["p/a"]}, "list: malformed key"),
        ({"Contents": [entry("a", -1)]}, "malformed size"),
        ({"CommonPrefixes": [{"Prefix": "p" * 1025}]}, "list: malformed prefix"),
        ({"CommonPrefixes": [{"Prefix": None}]}, "list: malformed prefix"),
        ({"CommonPrefixes": ["p/"]}, "list: malformed prefix"),
        ({"IsTruncated": True, "NextContinuationToken": ""}, "list: malformed continuation token"),
        (
            {"IsTruncated": True, "NextContinuationToken": "t" * 4097},
            "list: malformed continuation token",
        ),
        ({"IsTruncated": True, "NextContinuationToken": 5}, "list: malformed continuation token"),
        # truncated without a next token: taken as the last page, entries would go missing
        ({"IsTruncated": True}, "list: malformed continuation token"),
    ],
)
def test_list_refuses_malformed_pages(answer: dict[str, Any], text: str) -> None:
    t, c = transport()
    c.answers["list_objects_v2"] = answer
    with raises(BadResponse, text):
        t.list("")


def test_list_refuses_a_token_that_does_not_advance() -> None:
    t, c = transport()
    c.answers["list_objects_v2"] = {"IsTruncated": True, "NextContinuationToken": "same"}
    with raises(BadResponse, "list: malformed continuation token"):
        t.list("", token="same")
    c.answers["list_objects_v2"] = {"IsTruncated": True, "NextContinuationToken": "next"}
    assert t.list("", token="same").next_token == "next"
    c.answers["list_objects_v2"] = {"IsTruncated": False, "NextContinuationToken": "ignored"}
    assert t.list("").next_token is None


def test_create_multipart_checks_the_upload_id() -> None:
    t, c = transport()
    c.answers["create_multipart_upload"] = {"UploadId": "u" * 1024}
    assert t.create_multipart("k", metadata={"m": "1"}, content_type="x/y") == "u" * 1024
    assert c.calls == [
        (
            "create_multipart_upload",
            {"Bucket": "bkt", "Key": "k", "Metadata": {"m": "1"}, "ContentType": "x/y"},
        )
    ]
    c.calls.clear()
    c.answers["create_multipart_upload"] = {"UploadId": "u"}
    assert t.create_multipart("k", metadata={}) == "u"
    assert c.calls[0][1]["ContentType"] == "application/octet-stream"
    for uid in ("", "u" * 1025, None, 5):
        c.answers["create_multipart_upload"] = {"UploadId": uid}
        with raises(BadResponse, "create_multipart_upload: malformed upload id"):
            t.create_multipart("k", metadata={})


def test_get_says_which_bound_a_long_body_broke() -> None:
    t, c = transport(max_body=4)
    c.answers["get_object"] = {"Body": Body(b"x" * 5)}
    with raises(BadResponse, "get: object over max_body"):
        t.get("k")  # open-ended: the object is larger than the cap
    c.answers["get_object"] = {"Body": Body(b"x" * 4)}
    with raises(BadResponse, "get: longer than asked"):
        t.get("k", 0, 3)


def test_a_body_read_exactly_at_its_deadline_is_still_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, _ = transport(deadline=0.0)
    monkeypatch.setattr(s3.time, "monotonic", lambda: 1000.0)  # the clock stands still
    assert read_body(t, Body(b"abc"), 3, False) == b"abc"
