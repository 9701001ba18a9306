"""Fuzz OssTransport with whatever a hostile OSS endpoint might answer.

The HTTP exchange is replaced at the requests layer by a synthetic answer (status, headers,
body drawn by Hypothesis, often shaped like a real OSS XML document), so oss2's parsers and
OssTransport's checks see hostile input; only an ObjectStoreError may escape, and what is
returned must respect what was asked (lengths, prefixes, page sizes).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any
from unittest import mock

import requests
import urllib3
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.backend.oss import OssCredentials, OssTransport
from fuse_crypt.backend.transport import ListPage, ObjectInfo, ObjectStoreError
from tests.fuzzing import fuzz, long_fuzz

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_safe = st.text(alphabet="ab/-_.%20", min_size=1, max_size=8)
_token = st.sampled_from(["0", "5", "100", "-1", "abc", "", "99999999999", "3.5", " 7"])


def _xml_list(draw: Any) -> bytes:
    parts = ["<ListBucketResult>"]
    if draw(st.booleans()):
        parts.append("<EncodingType>url</EncodingType>")
    parts.append(f"<IsTruncated>{draw(st.sampled_from(['true', 'false', 'x']))}</IsTruncated>")
    if draw(st.booleans()):
        token = draw(st.one_of(_safe, _text))
        parts.append(f"<NextContinuationToken>{token}</NextContinuationToken>")
    for _ in range(draw(st.integers(0, 6))):
        key = draw(st.one_of(st.just("p/").map(lambda p: p + "x"), _text))
        when = draw(st.sampled_from(["2026-01-01T00:00:00.000Z", "bad"]))
        parts.append(
            "<Contents>"
            f"<Key>{key}</Key>"
            f"<LastModified>{when}</LastModified>"
            f"<ETag>{draw(st.one_of(_safe, _text))}</ETag><Type>Normal</Type>"
            f"<Size>{draw(st.one_of(st.just('7'), _token))}</Size>"
            "<StorageClass>Standard</StorageClass>"
            "</Contents>"
        )
    for _ in range(draw(st.integers(0, 3))):
        cp = draw(st.one_of(_safe.map(lambda k: "p/" + k + "/"), _text))
        parts.append(f"<CommonPrefixes><Prefix>{cp}</Prefix></CommonPrefixes>")
    parts.append("</ListBucketResult>")
    return "".join(parts).encode("utf-8", "surrogatepass")


@st.composite
def answers(draw: Any) -> tuple[int, dict[str, str], bytes]:
    status = draw(
        st.one_of(
            st.just(200),
            st.just(200),
            st.sampled_from([204, 206, 301, 400, 403, 404, 409, 412, 416, 500, 503]),
        )
    )
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            st.builds(lambda: b"").map(lambda b: b),
            st.composite(lambda d: _xml_list(d))(),
            st.composite(lambda d: _xml_list(d))(),
            st.composite(lambda d: _xml_list(d))(),
            st.sampled_from(
                [
                    b"<Error><Code>NoSuchKey</Code><RequestId>ABC</RequestId></Error>",
                    b"<InitiateMultipartUploadResult><UploadId>u\x01</UploadId>"
                    b"</InitiateMultipartUploadResult>",
                    b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><x>&a;</x>",
                ]
            ),
        )
    )
    headers: dict[str, str] = {}
    names = [
        "Content-Range",
        "ETag",
        "Last-Modified",
        "Content-Type",
        "x-oss-meta-mode",
        "x-oss-meta-x",
        "x-oss-err",
        "x-oss-request-id",
        "x-oss-hash-crc64ecma",
    ]
    for name in draw(st.lists(st.sampled_from(names), max_size=6, unique=True)):
        headers[name] = draw(
            st.one_of(
                _text.map(lambda s: s.encode("latin-1", "replace").decode("latin-1")),
                st.sampled_from(
                    [
                        "bytes 0-9/100",
                        "bytes 5-4/10",
                        '"ABCDEF"',
                        "Thu, 01 Jan 2026 00:00:00 GMT",
                        "0",
                    ]
                ),
            )
        )
    length = draw(st.one_of(st.just(len(body)), st.just(len(body)), st.integers(0, 400), st.none()))
    if length is not None:
        headers["Content-Length"] = str(length)
    if draw(st.integers(0, 10)) == 0:
        headers["Content-Encoding"] = "gzip"
    return status, headers, body


def _response(status: int, headers: dict[str, str], body: bytes) -> requests.Response:
    raw = urllib3.HTTPResponse(
        body=io.BytesIO(body),
        headers=headers,
        status=status,
        preload_content=False,
        decode_content=False,
        enforce_content_length=True,
    )
    resp = requests.Response()
    resp.status_code = status
    resp.headers = requests.structures.CaseInsensitiveDict(headers)
    resp.raw = raw
    return resp


OPS = [
    lambda t: t.head("p/x"),
    lambda t: t.get("p/x"),
    lambda t: t.get("p/x", 5, 10),
    lambda t: t.list("p/", max_keys=3),
    lambda t: t.list("p/", delimiter=""),
    lambda t: t.put("p/x", b"body", metadata={"mode": "1"}, if_none_match=True),
    lambda t: t.copy("p/x", "p/y", metadata={"mode": "2"}),
    lambda t: t.delete("p/x"),
    lambda t: t.delete_many(["p/x", "p/y"]),
    lambda t: t.create_multipart("p/x", metadata={}),
    lambda t: t.upload_part("p/x", "U", 1, b"abc"),
    lambda t: t.upload_part_copy("p/x", "U", 2, "p/y", 0, 10),
    lambda t: t.complete_multipart("p/x", "U", [(1, "A" * 32)]),
    lambda t: t.abort_multipart("p/x", "U"),
]


@long_fuzz
@fuzz(quick=300)
@given(answer=answers(), op=st.sampled_from(range(len(OPS))))
def test_hostile_answers_only_raise_typed_errors(
    answer: tuple[int, dict[str, str], bytes], op: int
) -> None:
    t = OssTransport(
        "https://oss-cn-hangzhou.aliyuncs.com",
        "fuzz-bucket",
        region="cn-hangzhou",
        credentials=OssCredentials("ak", "sk"),
        max_body=200,
        max_xml=4096,
    )
    session = t._bucket.session.session
    with mock.patch.object(session, "request", return_value=_response(*answer)):
        try:
            result = OPS[op](t)
        except ObjectStoreError:
            return
    if isinstance(result, bytes):
        assert len(result) <= (10 if op == 2 else 200)
    elif isinstance(result, ListPage):
        assert len(result.objects) + len(result.common_prefixes) <= (3 if op == 3 else 1000)
        assert all(o.key.startswith("p/") and o.size >= 0 for o in result.objects)
    elif isinstance(result, ObjectInfo):
        assert result.size >= 0


@long_fuzz
@fuzz(quick=300)
@given(
    endpoint=st.builds(
        lambda scheme, rest: scheme + rest,
        st.sampled_from(["https://", "http://", "", "https://[", "ftp://"]),
        st.text(alphabet="ab.-:[]@/?#%1_ ", max_size=30),
    ),
    bucket=st.text(alphabet="ab-1.A_", max_size=70),
    region=st.text(alphabet="ab-1.A_", max_size=70),
    insecure=st.booleans(),
)
def test_constructor_only_raises_typed_errors(
    endpoint: str, bucket: str, region: str, insecure: bool
) -> None:
    with contextlib.suppress(ObjectStoreError):  # anything else fails the test
        OssTransport(
            endpoint,
            bucket,
            region=region,
            credentials=OssCredentials("ak", "sk"),
            allow_insecure_http=insecure,
        )
