"""OssTransport's parsing of hostile answers, rule by rule and in-process (mutation testing).

Why: everything the bucket returns is hostile (docs/fuse_crypt.md, "Object-store
transports"); a check that is off by one, compares the wrong side or maps a status to the
wrong error lets a lying store truncate a file, smuggle metadata or make a retry overwrite
data.  The peer tests (``test_oss_transport.py``) show the rules hold against a real OSS
protocol; these pin each rule exactly (its text, its errno, each bound on both sides)
against a scripted ``oss2.Bucket`` stand-in, so mutants die in milliseconds.
"""

from __future__ import annotations

import errno
import io
import ssl
from types import SimpleNamespace
from typing import Any

import oss2.exceptions
import pytest
import requests

from fuse_crypt.backend import oss
from fuse_crypt.backend.oss import OssCredentials, OssTransport
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    TransientError,
)


def raises(exc: type[BaseException], text: str, code: int | None = None) -> Any:
    """pytest.raises with the exact message (and errno), not a pattern."""

    class _Check:
        def __enter__(self) -> None:
            self._ctx = pytest.raises(exc)
            self._info = self._ctx.__enter__()

        def __exit__(self, *a: Any) -> bool:
            handled = self._ctx.__exit__(*a)
            e = self._info.value
            assert type(e) is exc, type(e)
            assert (e.strerror if isinstance(e, OSError) else str(e)) == text
            if code is not None:
                assert isinstance(e, OSError) and e.errno == code
            return bool(handled)

    return _Check()


# -- errors from requests / urllib3 ------------------------------------------------------------


def chain(length: int, last: BaseException) -> Exception:
    """``length`` wrappers, each the ``__cause__`` of the one before, then ``last``."""
    inner: BaseException = last
    for i in range(length):
        outer = Exception(f"wrapper {i}")
        outer.__cause__ = inner
        inner = outer
    assert isinstance(inner, Exception)
    return inner


def test_a_certificate_failure_anywhere_in_16_links_is_not_transient() -> None:
    cert = ssl.SSLCertVerificationError("bad cert")
    got = oss._transient_from(chain(15, cert))  # checked at depth 15, the 16th link
    assert type(got) is BadResponse
    assert got.strerror == "OSS: TLS certificate verification failed"
    got = oss._transient_from(chain(16, cert))  # depth 16: beyond the bound
    assert type(got) is TransientError and got.strerror == "OSS: connection failed"
    assert type(oss._transient_from(cert)) is BadResponse


def test_the_certificate_search_follows_context_and_first_argument() -> None:
    cert = ssl.SSLCertVerificationError("bad cert")
    ctx = Exception("during handling")
    ctx.__context__ = cert
    assert type(oss._transient_from(ctx)) is BadResponse
    assert type(oss._transient_from(Exception(Exception(cert)))) is BadResponse
    # an explicit cause is followed instead of the first argument
    both = Exception(cert)
    both.__cause__ = ValueError("the real cause")
    assert type(oss._transient_from(both)) is TransientError
    assert type(oss._transient_from(Exception("text", cert))) is TransientError


def test_timeouts_and_other_failures_are_transient_with_fixed_texts() -> None:
    t = oss._transient_from(requests.ReadTimeout("read timed out"))
    assert type(t) is TransientError and t.strerror == "OSS: request timed out"
    t = oss._transient_from(requests.ConnectionError("reset"))
    assert type(t) is TransientError and t.strerror == "OSS: connection failed"


# -- OSS error answers -----------------------------------------------------------------------


def server_error(status: Any, code: Any = "", rid: Any = "") -> oss2.exceptions.OssError:
    e = oss2.exceptions.ServerError(status, {"x-oss-request-id": "x"}, b"", {"Code": "x"})
    e.code, e.request_id = code, rid
    return e


def test_code_and_request_id_are_shown_only_when_they_look_like_ones() -> None:
    assert oss._code(server_error(404, "NoSuchKey")) == "NoSuchKey"
    assert oss._code(server_error(404, "A.b9" * 16)) == "A.b9" * 16  # 64 characters
    assert oss._code(server_error(404, "A" * 65)) == "?"
    assert oss._code(server_error(404, "")) == "?"
    assert oss._code(server_error(404, "No Such")) == "?"
    assert oss._code(server_error(404, 7)) == "?"
    assert oss._rid(server_error(404, rid="5C-3a")) == " (request id 5C-3a)"
    assert oss._rid(server_error(404, rid="a" * 64)) == f" (request id {'a' * 64})"
    assert oss._rid(server_error(404, rid="a" * 65)) == ""
    assert oss._rid(server_error(404, rid="")) == ""
    assert oss._rid(server_error(404, rid="a\nb")) == ""
    assert oss._rid(server_error(404, rid=None)) == ""


@pytest.mark.parametrize(
    "status, code, cls",
    [
        (404, "NoSuchKey", ObjectNotFound),
        (404, "NoSuchUpload", ObjectNotFound),
        (404, "NoSuchBucket", ObjectStoreError),  # a missing bucket is not a missing file
        (409, "x", PreconditionFailed),
        (412, "x", PreconditionFailed),
        (400, "ObjectAlreadyExists", PreconditionFailed),
        (400, "InvalidArgument", ObjectStoreError),
        (401, "ObjectAlreadyExists", ObjectStoreError),
        (403, "AccessDenied", AccessDenied),
        (408, "x", TransientError),
        (429, "x", TransientError),
        (500, "x", TransientError),
        (503, "SlowDown", TransientError),
        (599, "x", TransientError),
        (499, "x", ObjectStoreError),
        (600, "x", BadResponse),
        (300, "x", BadResponse),
        (399, "x", BadResponse),
        (299, "x", ObjectStoreError),
        (100, "x", ObjectStoreError),
        (99, "x", BadResponse),
        (410, "x", ObjectStoreError),
    ],
)
def test_each_status_maps_to_its_error(status: int, code: str, cls: type[Exception]) -> None:
    got = oss._map_oss_error("GET", server_error(status, code, "R1"))
    assert type(got) is cls
    assert got.strerror == f"OSS GET: {status} {code} (request id R1)"


def test_a_status_that_is_not_a_number_is_a_bad_response() -> None:
    got = oss._map_oss_error("HEAD", server_error("404", "NoSuchKey"))
    assert type(got) is BadResponse and got.strerror == "OSS HEAD: 0 NoSuchKey"


def test_client_side_oss2_errors_map_to_fixed_texts() -> None:
    got = oss._map_oss_error("PUT", oss2.exceptions.RequestError(requests.ReadTimeout("t")))
    assert type(got) is TransientError and got.strerror == "OSS: request timed out"
    odd = oss2.exceptions.RequestError("no exception object")
    got = oss._map_oss_error("PUT", odd)
    assert type(got) is TransientError and got.strerror == "OSS PUT: connection failed"
    bare = oss2.exceptions.RequestError.__new__(oss2.exceptions.RequestError)
    oss2.exceptions.OssError.__init__(bare, -2, {}, b"", {})  # no ``exception`` attribute
    got = oss._map_oss_error("PUT", bare)
    assert type(got) is TransientError and got.strerror == "OSS PUT: connection failed"
    got = oss._map_oss_error("PUT", oss2.exceptions.InconsistentError("crc", "rid"))
    assert type(got) is TransientError
    assert got.strerror == "OSS PUT: CRC mismatch between client and server"
    got = oss._map_oss_error("PUT", oss2.exceptions.ClientError("bad"))
    assert type(got) is ObjectStoreError and got.errno == errno.EINVAL
    assert got.strerror == "OSS PUT: request refused by the client"


# -- ETags, metadata, keys, part numbers -----------------------------------------------------


def test_etag_is_unquoted_and_bounded() -> None:
    assert oss._clean_etag(' "5D41402ABC4B2A76" ') == "5D41402ABC4B2A76"
    assert oss._clean_etag("!" + "~" * 255) == "!" + "~" * 255  # 256 printable characters
    assert oss._clean_etag("XabcX") == "XabcX"  # only quotes and spaces are taken off
    for bad in ("a" * 257, "", '""', "a b", "a\x7f", "a\x00", None, 5, b"abc"):
        with raises(BadResponse, "OSS: malformed ETag"):
            oss._clean_etag(bad)


def test_metadata_sent_is_lower_cased_prefixed_and_bounded() -> None:
    assert oss._meta_out({"Mode": "33188", "uid": "0"}) == {
        "x-oss-meta-mode": "33188",
        "x-oss-meta-uid": "0",
    }
    assert oss._meta_out({}) == {}
    for name, value in (("a b", "1"), ("", "1"), ("_a", "1"), ("a", "x\ny"), ("a", "é")):
        with raises(ObjectStoreError, "OSS: metadata must be printable ASCII", errno.EINVAL):
            oss._meta_out({name: value})
    many = {f"k{i}": "v" for i in range(64)}
    assert len(oss._meta_out(many)) == 64
    with raises(ObjectStoreError, "OSS: metadata too large", errno.E2BIG):
        oss._meta_out({**many, "k64": "v"})
    assert oss._meta_out({"a": "v" * 8191}) == {"x-oss-meta-a": "v" * 8191}  # 8,192 bytes
    with raises(ObjectStoreError, "OSS: metadata too large", errno.E2BIG):
        oss._meta_out({"a": "v" * 8192})
    assert len(oss._meta_out({"a": "v" * 4095, "b": "v" * 4095})) == 2  # 8,192 in all
    with raises(ObjectStoreError, "OSS: metadata too large", errno.E2BIG):
        oss._meta_out({"a": "v" * 4095, "bc": "v" * 4095})  # 8,193 in all


def test_metadata_received_is_checked_and_bounded() -> None:
    headers = {"X-OSS-Meta-Mode": "33188", "Content-Type": "x/y", "x-oss-meta-uid": "0"}
    assert oss._meta_in(headers) == {"mode": "33188", "uid": "0"}
    assert oss._meta_in({"x-oss-metadata": "v", "etag": "e"}) == {}
    for name, value in (("x-oss-meta-", "1"), ("x-oss-meta-a b", "1"), ("x-oss-meta-a", "\n")):
        with raises(BadResponse, "OSS: malformed user metadata"):
            oss._meta_in({name: value})
    many = {f"x-oss-meta-k{i}": "v" for i in range(64)}
    assert len(oss._meta_in(many)) == 64
    with raises(BadResponse, "OSS: user metadata over bound"):
        oss._meta_in({**many, "x-oss-meta-k64": "v"})
    assert oss._meta_in({"x-oss-meta-a": "v" * 16383}) == {"a": "v" * 16383}  # 16,384
    with raises(BadResponse, "OSS: user metadata over bound"):
        oss._meta_in({"x-oss-meta-a": "v" * 16384})
    two = {"x-oss-meta-a": "v" * 8191, "x-oss-meta-b": "v" * 8191}
    assert len(oss._meta_in(two)) == 2
    with raises(BadResponse, "OSS: user metadata over bound"):
        oss._meta_in({**two, "x-oss-meta-b": "v" * 8192})


def test_object_keys_are_checked_before_any_request() -> None:
    oss._check_key("a")
    oss._check_key("a/")
    oss._check_key("Xa")
    oss._check_key("x" * 1023)
    oss._check_key("é" * 511 + "x")  # 1,023 bytes
    for bad in ("", "/a", "\\a", "x" * 1024, "é" * 512):
        with raises(ObjectStoreError, "OSS: invalid object key", errno.EINVAL):
            oss._check_key(bad)
    with raises(ObjectStoreError, "OSS: object key is not valid UTF-8", errno.EINVAL):
        oss._check_key("a\udcff")


def test_part_numbers_are_1_to_10000() -> None:
    oss._check_part(1)
    oss._check_part(10000)
    for bad in (0, -1, 10001):
        with raises(ObjectStoreError, "OSS: part number out of range", errno.EINVAL):
            oss._check_part(bad)


# -- the transport over a scripted bucket ------------------------------------------------------


class Answer:
    """What ``get_object`` returns: status, headers, and a body read through ``read_buffer``."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.resp = self
        self.status = status
        self.headers = headers
        self.body = body
        self.caps: list[int] = []

    def read_buffer(self, cap: int) -> bytearray:
        self.caps.append(cap)
        return bytearray(self.body)


class Bucket:
    """Records each call; answers from ``answers[method]`` (an exception is raised)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.answers: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            self.calls.append((name, args, kw))
            out = self.answers[name]
            if isinstance(out, BaseException):
                raise out
            return out

        return call


def transport(max_body: int = 100) -> tuple[OssTransport, Bucket]:
    t = OssTransport(
        "http://127.0.0.1:9",
        "test-bucket",
        region="cn-hangzhou",
        credentials=OssCredentials("ak", "sk"),
        allow_insecure_http=True,
        max_body=max_body,
    )
    b = Bucket()
    t._bucket = b  # type: ignore[assignment]
    return t, b


def test_head_parses_size_mtime_type_etag_and_metadata() -> None:
    t, b = transport()
    headers = {"Content-Type": "text/plain", "x-oss-meta-mode": "1"}
    b.answers["head_object"] = SimpleNamespace(
        headers=headers, content_length=12, etag='"E1"', last_modified=1700000000
    )
    assert t.head("k") == ObjectInfo("k", 12, "E1", 1700000000 * 10**9, {"mode": "1"}, "text/plain")
    assert b.calls == [("head_object", ("k",), {})]


def test_info_bounds() -> None:
    t, _ = transport()
    info = t._info("k", {}, 0, "e", 0)
    assert (info.size, info.content_type, info.metadata) == (0, "", {})
    assert t._info("k", {}, oss.MAX_OBJECT_SIZE, "e", 0).size == 1 << 50
    for size in (-1, oss.MAX_OBJECT_SIZE + 1, "12", None, 1.0):
        with raises(BadResponse, "OSS: malformed object size"):
            t._info("k", {}, size, "e", 0)
    for mtime in (None, "1", 1.5):
        with raises(BadResponse, "OSS: malformed Last-Modified"):
            t._info("k", {}, 1, "e", mtime)
    assert t._info("k", {"Content-Type": "a" * 256}, 1, "e", 0).content_type == "a" * 256
    for ctype in ("a" * 257, "a\nb", "é"):
        with raises(BadResponse, "OSS: malformed Content-Type"):
            t._info("k", {"Content-Type": ctype}, 1, "e", 0)


def ranged(start: int, last: int, total: str, body: bytes | None = None) -> Answer:
    data = b"x" * (last - start + 1) if body is None else body
    return Answer(
        206,
        {"Content-Range": f"bytes {start}-{last}/{total}", "Content-Length": str(len(data))},
        data,
    )


def test_get_asks_for_the_standard_range_and_reads_at_most_the_cap() -> None:
    t, b = transport(max_body=100)
    b.answers["get_object"] = a = ranged(10, 19, "1000")
    assert t.get("k", 10, 10) == b"x" * 10
    assert b.calls == [
        (
            "get_object",
            ("k",),
            {"byte_range": (10, 19), "headers": {"x-oss-range-behavior": "standard"}},
        )
    ]
    assert a.caps == [10]
    b.calls.clear()
    b.answers["get_object"] = a = Answer(200, {"Content-Length": "5"}, b"hello")
    assert t.get("k") == b"hello"
    assert b.calls[0][2]["byte_range"] == (0, None) and a.caps == [100]


def test_get_argument_checks() -> None:
    t, b = transport()
    for start, length in ((-1, None), (0, -1), (-1, 5)):
        with raises(ObjectStoreError, "OSS GET: negative range", errno.EINVAL):
            t.get("k", start, length)
    assert t.get("k", 5, 0) == b"" and b.calls == []
    with raises(ObjectStoreError, "OSS: invalid object key", errno.EINVAL):
        t.get("", 0, 1)


def test_get_past_the_end_is_empty_but_other_errors_are_mapped() -> None:
    t, b = transport()
    b.answers["get_object"] = server_error(416, "InvalidRange")
    assert t.get("k", 1000, 10) == b""
    b.answers["get_object"] = server_error(503, "SlowDown", "R")
    with raises(TransientError, "OSS GET: 503 SlowDown (request id R)"):
        t.get("k", 0, 10)


def test_get_content_range_must_match_the_request() -> None:
    t, b = transport(max_body=100)
    b.answers["get_object"] = ranged(0, 9, "10")
    assert t.get("k", 0, 50) == b"x" * 10  # short where the object ends
    b.answers["get_object"] = ranged(5, 9, "*")
    assert t.get("k", 5, 50) == b"x" * 5  # total unknown: not checked
    bad = [
        Answer(206, {"Content-Length": "5"}, b"x" * 5),  # no Content-Range
        ranged(6, 10, "100"),  # another start
        ranged(6, 9, "100", b"x" * 5),  # another start, the right end and length
        ranged(5, 4, "100", b""),  # ends before it starts
        ranged(5, 8, "100"),  # cut short in the middle
        ranged(5, 10, "100"),  # longer than asked
        ranged(5, 9, "9"),  # says the object ends before the range
        Answer(206, {"Content-Range": "bytes 5-9/x", "Content-Length": "5"}, b"x" * 5),
        Answer(206, {"Content-Range": "bytes 5-9", "Content-Length": "5"}, b"x" * 5),
    ]
    for answer in bad:
        b.answers["get_object"] = answer
        with raises(BadResponse, "OSS GET: Content-Range does not match the request"):
            t.get("k", 5, 5)


def test_get_open_ended_range_must_reach_the_end() -> None:
    t, b = transport(max_body=100)
    b.answers["get_object"] = ranged(5, 9, "10")
    assert t.get("k", 5) == b"x" * 5
    b.answers["get_object"] = ranged(5, 8, "10")
    with raises(BadResponse, "OSS GET: Content-Range does not match the request"):
        t.get("k", 5)


def test_get_whole_answers_only_for_a_range_from_zero() -> None:
    t, b = transport(max_body=100)
    b.answers["get_object"] = Answer(200, {"Content-Length": "3"}, b"abc")
    assert t.get("k", 0, 3) == b"abc"
    with raises(BadResponse, "OSS GET: unexpected status 200"):
        t.get("k", 1, 3)
    for status in (204, 304, 201):
        b.answers["get_object"] = Answer(status, {"Content-Length": "0"}, b"")
        with raises(BadResponse, f"OSS GET: unexpected status {status}"):
            t.get("k", 0, 3)


def test_get_length_checks_on_both_sides() -> None:
    t, b = transport(max_body=10)
    b.answers["get_object"] = Answer(200, {"Content-Length": "10"}, b"x" * 10)
    assert t.get("k") == b"x" * 10  # exactly the cap
    b.answers["get_object"] = Answer(200, {"Content-Length": "11"}, b"x" * 11)
    with raises(BadResponse, "OSS GET: answer longer than asked for"):
        t.get("k")
    b.answers["get_object"] = ranged(0, 9, "100", b"x" * 10)
    b.answers["get_object"].headers["Content-Length"] = "11"  # declared over the cap
    with raises(BadResponse, "OSS GET: answer longer than asked for"):
        t.get("k", 0, 10)
    b.answers["get_object"] = ranged(0, 10, "11")
    b.answers["get_object"].headers["Content-Length"] = "10"
    with raises(BadResponse, "OSS GET: answer longer than asked for"):
        t.get("k")  # a range answer of 11 bytes (declaring 10), cap 10
    b.answers["get_object"] = Answer(200, {"Content-Length": "5"}, b"x" * 4)
    with raises(BadResponse, "OSS GET: body length does not match its headers"):
        t.get("k")
    b.answers["get_object"] = Answer(200, {"Content-Length": "5"}, b"x" * 6)
    with raises(BadResponse, "OSS GET: body length does not match its headers"):
        t.get("k")
    b.answers["get_object"] = Answer(200, {"Content-Length": "0"}, b"x")
    with raises(BadResponse, "OSS GET: body length does not match its headers"):
        t.get("k")
    b.answers["get_object"] = Answer(200, {}, b"x" * 7)  # chunked: no length to compare
    assert t.get("k") == b"x" * 7
    b.answers["get_object"] = Answer(200, {"Content-Length": "0"}, b"")
    assert t.get("k") == b""
    b.answers["get_object"] = Answer(200, {"Content-Length": "5x"}, b"x" * 5)
    with raises(BadResponse, "OSS GET: malformed Content-Length"):
        t.get("k")


# -- the body reader --------------------------------------------------------------------------


def bounded(body: bytes, limit: int, deadline: float = 1e18) -> oss._BoundedResponse:
    r = requests.Response()
    r.status_code = 200
    r.raw = io.BytesIO(body)
    return oss._BoundedResponse(r, limit, deadline)


def test_read_at_most_is_bounded_on_both_sides_and_reads_once() -> None:
    r = bounded(b"x" * 100, limit=0)
    assert r.read_at_most(100) == b"x" * 100
    assert r.read_at_most(100) == b""  # done
    with raises(BadResponse, "OSS: response body longer than expected"):
        bounded(b"x" * 101, limit=0).read_at_most(100)
    big = b"y" * (200 * 1024)
    assert bounded(big, limit=0).read_at_most(len(big)) == big  # several 64 KiB chunks


def test_read_is_bounded_by_the_limit_and_ends_cleanly() -> None:
    r = bounded(b"abcdef", limit=6)
    assert r.read(4) == b"abcd"
    assert r.read(4) == b"ef"
    assert r.read(4) == b""
    assert r.read(4) == b""
    assert bounded(b"abc", limit=3).read() == b"abc"
    with raises(BadResponse, "OSS: response body longer than expected"):
        bounded(b"abcd", limit=3).read()
    r = bounded(b"abcd", limit=3)
    assert r.read(2) == b"ab"
    with raises(BadResponse, "OSS: response body too large"):
        r.read(2)
    assert b"".join(bounded(b"z" * 70000, limit=70000)) == b"z" * 70000


class Raw(io.BytesIO):
    """A socket body that records what each ``read1`` asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked: list[int | None] = []

    def read1(self, size: int | None = -1, /) -> bytes:
        self.asked.append(size)
        return super().read1(size)


def test_read_at_most_reads_in_64_kib_pieces_and_never_again_once_done() -> None:
    r = requests.Response()
    r.status_code = 200
    r.raw = raw = Raw(b"q" * (64 * 1024 + 1))
    br = oss._BoundedResponse(r, 0, 1e18)
    assert br.read_at_most(10**6) == b"q" * (64 * 1024 + 1)
    assert raw.asked == [65536, 65536, 65536]  # piece, last byte, end
    raw.write(b"more")  # the peer sends more after the end: never read
    raw.seek(-4, io.SEEK_END)
    assert br.read_at_most(10**6) == b"" and br.read(10) == b""
    assert len(raw.asked) == 3
    r = requests.Response()
    r.status_code = 200
    r.raw = raw = Raw(b"abc")
    br = oss._BoundedResponse(r, 10, 1e18)
    assert br.read(5) == b"abc" and br.read(5) == b""
    raw.write(b"more")
    raw.seek(-4, io.SEEK_END)
    assert br.read(5) == b"" and len(raw.asked) == 2  # done: the socket is not asked again


def test_reads_past_the_deadline_fail_transiently() -> None:
    with raises(TransientError, "OSS: response too slow"):
        bounded(b"abc", limit=3, deadline=0.0).read()


# -- listings ------------------------------------------------------------------------------------


def obj(key: str, size: Any = 1, etag: Any = "e", mtime: Any = 2) -> SimpleNamespace:
    return SimpleNamespace(key=key, size=size, etag=etag, last_modified=mtime)


def page(objs: list[Any], prefixes: list[Any], truncated: bool = False, nt: Any = None) -> Any:
    return SimpleNamespace(
        object_list=objs,
        prefix_list=prefixes,
        is_truncated=truncated,
        next_continuation_token=nt,
    )


def test_list_passes_what_was_asked_and_parses_the_page() -> None:
    t, b = transport()
    b.answers["list_objects_v2"] = page([obj("p/a", 3, '"E"', 7)], ["p/d/"], True, "t2")
    got = t.list("p/", token="t1", max_keys=2)
    assert got.objects == (ObjectInfo("p/a", 3, "E", 7 * 10**9),)
    assert got.common_prefixes == ("p/d/",) and got.next_token == "t2"
    assert b.calls == [
        (
            "list_objects_v2",
            (),
            {"prefix": "p/", "delimiter": "/", "continuation_token": "t1", "max_keys": 2},
        )
    ]
    b.calls.clear()
    b.answers["list_objects_v2"] = page([], [], False, "ignored")
    assert t.list("", delimiter="").next_token is None
    assert b.calls[0][2] == {
        "prefix": "",
        "delimiter": "",
        "continuation_token": "",
        "max_keys": 1000,
    }


def test_list_argument_bounds() -> None:
    t, b = transport()
    b.answers["list_objects_v2"] = page([], [])
    for n in (1, 1000):
        t.list("p/", max_keys=n)
    for n in (0, 1001):
        with raises(ObjectStoreError, "OSS LIST: max_keys must be 1..1000", errno.EINVAL):
            t.list("p/", max_keys=n)
    t.list("x" * 1023)
    t.list("é" * 511 + "x")
    for prefix, delim in (("x" * 1024, "/"), ("é" * 512, "/"), ("p/", "//")):
        with raises(ObjectStoreError, "OSS LIST: invalid prefix or delimiter", errno.EINVAL):
            t.list(prefix, delimiter=delim)


def test_list_entry_bounds() -> None:
    t, b = transport()
    b.answers["list_objects_v2"] = page([obj("p/a", 0), obj("p/b", oss.MAX_OBJECT_SIZE)], [])
    assert [o.size for o in t.list("p/").objects] == [0, 1 << 50]
    for size in (-1, oss.MAX_OBJECT_SIZE + 1, "1", None):
        b.answers["list_objects_v2"] = page([obj("p/a", size)], [])
        with raises(BadResponse, "OSS LIST: malformed size"):
            t.list("p/")
    b.answers["list_objects_v2"] = page([obj("p/a/b")], [])
    with raises(BadResponse, "OSS LIST: entry below the delimiter"):
        t.list("p/")
    b.answers["list_objects_v2"] = page([obj("p/a", etag="a b")], [])
    with raises(BadResponse, "OSS: malformed ETag"):
        t.list("p/")
    b.answers["list_objects_v2"] = page([obj("p/a"), obj("p/b")], ["p/c/"])
    assert len(t.list("p/", max_keys=3).objects) == 2
    with raises(BadResponse, "OSS LIST: more entries than asked for"):
        t.list("p/", max_keys=2)


@pytest.mark.parametrize("nt", [None, "", "t" * 4097, 5, "same"])
def test_list_continuation_token_must_be_new_and_bounded(nt: Any) -> None:
    t, b = transport()
    b.answers["list_objects_v2"] = page([], [], True, nt)
    with raises(BadResponse, "OSS LIST: bad continuation token"):
        t.list("p/", token="same")


def test_list_longest_token_is_accepted() -> None:
    t, b = transport()
    b.answers["list_objects_v2"] = page([], [], True, "t" * 4096)
    assert t.list("p/", token="t").next_token == "t" * 4096
    b.answers["list_objects_v2"] = page([], [], True, "t")
    assert t.list("p/").next_token == "t"


@pytest.mark.parametrize(
    "name, prefix, delimiter, is_prefix, text",
    [
        ("q/a", "p/", "/", False, "OSS LIST: entry outside the prefix"),
        ("", "", "/", False, "OSS LIST: entry outside the prefix"),
        (b"p/a", "p/", "/", False, "OSS LIST: entry outside the prefix"),
        ("p/" + "x" * 1022, "p/", "/", False, "OSS LIST: entry outside the prefix"),
        ("p/" + "é" * 511, "p/", "/", False, "OSS LIST: entry outside the prefix"),
        ("p/a/b", "p/", "/", False, "OSS LIST: entry below the delimiter"),
        ("p/a/", "p/", "/", False, "OSS LIST: entry below the delimiter"),
        ("p/a", "p/", "/", True, "OSS LIST: malformed common prefix"),
        ("p/a/b/", "p/", "/", True, "OSS LIST: malformed common prefix"),
        ("p/a//", "p/", "/", True, "OSS LIST: malformed common prefix"),
        ("p/a/", "p/", "", True, "OSS LIST: malformed common prefix"),
        ("/", "", "/", True, "OSS LIST: malformed common prefix"),
    ],
)
def test_listed_names_that_break_the_request_are_refused(
    name: Any, prefix: str, delimiter: str, is_prefix: bool, text: str
) -> None:
    with raises(BadResponse, text):
        OssTransport._check_listed(name, prefix, delimiter, is_prefix=is_prefix)


@pytest.mark.parametrize(
    "name, prefix, delimiter, is_prefix",
    [
        ("p/a", "p/", "/", False),
        ("p/a/b", "p/", "", False),  # no delimiter: anything below the prefix
        ("p/" + "x" * 1021, "p/", "/", False),  # 1,023 bytes
        ("p/a/", "p/", "/", True),
        ("p//", "p/", "/", True),  # an empty component under a prefix
        ("a/", "", "/", True),
    ],
)
def test_listed_names_that_fit_the_request_pass(
    name: str, prefix: str, delimiter: str, is_prefix: bool
) -> None:
    OssTransport._check_listed(name, prefix, delimiter, is_prefix=is_prefix)


# -- multipart -----------------------------------------------------------------------------------


def test_create_multipart_sends_type_and_metadata_and_checks_the_upload_id() -> None:
    t, b = transport()
    b.answers["init_multipart_upload"] = SimpleNamespace(upload_id="0004B9895DBBB6EC98E")
    assert t.create_multipart("k", metadata={"Mode": "1"}, content_type="x/y") == (
        "0004B9895DBBB6EC98E"
    )
    assert b.calls == [
        ("init_multipart_upload", ("k", {"Content-Type": "x/y", "x-oss-meta-mode": "1"}), {})
    ]
    b.calls.clear()
    assert t.create_multipart("k", metadata={}) == "0004B9895DBBB6EC98E"
    assert b.calls[0][1][1] == {"Content-Type": "application/octet-stream"}
    for uid in ("A" * 512, "a._~+/=-9"):
        b.answers["init_multipart_upload"] = SimpleNamespace(upload_id=uid)
        assert t.create_multipart("k", metadata={}) == uid
    for uid in ("", "A" * 513, "a b", "a\n", None, 5):
        b.answers["init_multipart_upload"] = SimpleNamespace(upload_id=uid)
        with raises(BadResponse, "OSS INIT-MULTIPART: malformed upload id"):
            t.create_multipart("k", metadata={})


def test_complete_multipart_checks_parts_before_sending() -> None:
    t, b = transport()
    b.answers["complete_multipart_upload"] = SimpleNamespace(etag='"M-2"')
    assert t.complete_multipart("k", "u", [(1, '"E1"'), (3, "E3"), (4, "XE4X")]) == "M-2"
    ((name, args, _),) = b.calls
    assert name == "complete_multipart_upload" and args[:2] == ("k", "u")
    assert [(p.part_number, p.etag) for p in args[2]] == [(1, "E1"), (3, "E3"), (4, "XE4X")]
    for parts in ([], [(2, "a"), (1, "b")], [(1, "a"), (1, "a")]):
        with raises(
            ObjectStoreError, "OSS COMPLETE: parts must be unique and ascending", errno.EINVAL
        ):
            t.complete_multipart("k", "u", parts)
    for parts in ([(0, "a")], [(1, "a"), (10001, "b")]):
        with raises(ObjectStoreError, "OSS: part number out of range", errno.EINVAL):
            t.complete_multipart("k", "u", parts)
    with raises(BadResponse, "OSS: malformed ETag"):
        t.complete_multipart("k", "u", [(1, "a b")])
    assert len(b.calls) == 1


@pytest.mark.parametrize(
    "method, op, call",
    [
        ("head_object", "HEAD", lambda t: t.head("k")),
        ("get_object", "GET", lambda t: t.get("k")),
        ("list_objects_v2", "LIST", lambda t: t.list("p/")),
        ("init_multipart_upload", "INIT-MULTIPART", lambda t: t.create_multipart("k", metadata={})),
        (
            "complete_multipart_upload",
            "COMPLETE-MULTIPART",
            lambda t: t.complete_multipart("k", "u", [(1, "e")]),
        ),
    ],
)
def test_errors_name_the_operation(method: str, op: str, call: Any) -> None:
    """NoSuchUpload from CompleteMultipartUpload must stay ObjectNotFound: the retrying
    wrapper's check that an unseen completion landed depends on it."""
    t, b = transport()
    b.answers[method] = server_error(404, "NoSuchUpload", "R9")
    with raises(ObjectNotFound, f"OSS {op}: 404 NoSuchUpload (request id R9)"):
        call(t)
    b.answers[method] = ValueError("the SDK choked on the answer")
    with raises(BadResponse, f"OSS {op}: malformed response"):
        call(t)
