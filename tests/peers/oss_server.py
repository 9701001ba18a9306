"""Protocol-level Alibaba Cloud OSS server, for tests only (never a product component).

No OSS emulator can be installed here (moto drops ``x-oss-meta-*``, fails V4 and serves
namespaced S3 XML oss2 cannot parse), so this peer speaks the OSS REST API itself, as the
OSS API reference documents it and oss2 2.19 sends it (``docs: object-store.md §3``):

* **Authentication, verified**: V1 (``Authorization: OSS <ak>:<b64 HMAC-SHA1>``, string to
  sign = verb, Content-MD5, Content-Type, Date or ``x-oss-date``, the sorted ``x-oss-*``
  headers and ``/bucket/<decoded key>`` with the signed sub-resources) and V4
  (``OSS4-HMAC-SHA256 Credential=ak/yyyymmdd/region/oss/aliyun_v4_request,
  Signature=…[, AdditionalHeaders=…]`` over the six-line canonical request). The signature
  is recomputed here from the raw request, so a passing test means oss2 really signed a
  request OSS could authenticate.  Refused with 403 and the OSS codes: no/unknown scheme
  (``AccessDenied``), unknown AccessKeyId (``InvalidAccessKeyId``), a wrong signature
  (``SignatureDoesNotMatch``), a date more than 15 minutes off (``RequestTimeTooSkewed``),
  a V4 scope for another region or day (``SignatureDoesNotMatch``), a missing or wrong STS
  token for a temporary key (``InvalidSecurityToken``), a temporary key past its expiry
  (``SecurityTokenExpired``, EC 0002-00000007: :meth:`OssServer.issue_sts` hands out STS
  triples that expire, as AssumeRole does).
* **Objects**: PutObject (``x-oss-forbid-overwrite``, ``Content-MD5``), GetObject with one
  ``Range`` (206 + ``Content-Range``; an unsatisfiable or malformed range is ignored — 200,
  whole object — unless ``x-oss-range-behavior: standard``, then 416 ``InvalidRange`` or a
  clipped end), HeadObject (errors carry no body but an ``x-oss-err`` header), DeleteObject
  (204 even when absent), DeleteMultipleObjects (``Content-MD5`` required, ≤ 1,000 keys,
  ``encoding-type=url``), CopyObject (``x-oss-copy-source``, ``x-oss-metadata-directive``
  COPY/REPLACE), ListObjectsV2 (``list-type=2``: prefix, delimiter, opaque
  continuation-token, start-after, max-keys ≤ 1,000 counting common prefixes too,
  ``encoding-type=url``; root without xmlns as oss2 parses it).
* **Multipart**: InitiateMultipartUpload, UploadPart, UploadPartCopy
  (``x-oss-copy-source-range``), CompleteMultipartUpload (ascending parts, ETags checked,
  all but the last part ≥ 100 KB), AbortMultipartUpload; ``NoSuchUpload`` afterwards;
  ListMultipartUploads (``GET /?uploads``: prefix, key-marker/upload-id-marker paging,
  max-uploads ≤ 1,000, ``encoding-type=url``; no delimiter).
* ``x-oss-meta-*`` user metadata (≤ 8 KB), ETags as upper-case MD5 hex (multipart
  ``"<HEX>-<n>"``), ``x-oss-hash-crc64ecma`` (so oss2's CRC checks run), every response
  with ``x-oss-request-id`` and ``Server: AliyunOSS``, errors as the documented XML.

Path-style addressing only (what oss2 uses for an IP endpoint).  Buckets are made with
``OssServer.create_bucket``.  ``state.requests`` records each request (method, key, query,
range, status) so tests can count GETs; ``state.misbehave`` turns on hostile answers for
the client's own bound checks (see :class:`OssState`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import re
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import crcmod

from tests.peers.tls import ServedHttp, make_server_tls

MAX_CLOCK_SKEW = 15 * 60
MAX_KEYS = 1000
MIN_PART = 100 * 1024  # OSS: every part but the last must be at least 100 KB
MAX_META = 8 * 1024
MAX_XML_BODY = 2 * 1024 * 1024
_V1_SUBRESOURCE_TEXT = """
    acl uploads uploadId partNumber delete continuation-token symlink objectMeta tagging
    versionId versioning append position security-token x-oss-process location logging
    website referer lifecycle cors restore qos stat bucketInfo objectInfo live comp status
    vod startTime endTime callback callback-var encryption versions policy requestPayment
    x-oss-traffic-limit x-oss-request-payer sequential inventory inventoryId worm wormId
    wormExtend replication
"""
V1_SUBRESOURCES = frozenset(_V1_SUBRESOURCE_TEXT.split())  # what oss2 signs as sub-resources
_crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)


def crc64(data: bytes) -> int:
    """CRC-64/ECMA-182 as OSS reports it in ``x-oss-hash-crc64ecma``."""
    return int(_crc64(data))


class OssError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(code)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclasses.dataclass
class StoredObject:
    data: bytes
    meta: dict[str, str]
    content_type: str
    etag: str  # without quotes
    mtime: float
    object_type: str = "Normal"
    crc: int = 0


@dataclasses.dataclass
class Upload:
    key: str
    meta: dict[str, str]
    content_type: str
    forbid_overwrite: bool
    parts: dict[int, tuple[bytes, str]] = dataclasses.field(default_factory=dict)
    initiated: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class OssState:
    """Buckets, credentials and a request log.

    ``credentials``: AccessKeyId -> (secret, required STS token or None).
    ``misbehave``: hostile-server switches for client tests: ``"ignore-range"`` (answer
    200 with the whole object whatever the Range), ``"long-body"`` (send 16 extra bytes on
    GET, with a matching Content-Length), ``"bad-content-range"`` (206 with a
    Content-Range for another start), ``"short-range"`` (206 with half the range asked
    for, Content-Range consistent with it), ``"huge-list"`` (a listing with more entries than
    max-keys), ``"same-token"`` (a truncated listing whose next token is the one given),
    ``"redirect"`` (GET/HEAD answered 307 to another host), ``"gzip"`` (a
    ``Content-Encoding: gzip`` label), ``"bad-meta"`` (a user-metadata value that is not
    ASCII), ``"many-meta"`` (80 user-metadata headers).
    """

    region: str = "cn-hangzhou"
    credentials: dict[str, tuple[str, str | None]] = dataclasses.field(default_factory=dict)
    buckets: dict[str, dict[str, StoredObject]] = dataclasses.field(default_factory=dict)
    uploads: dict[str, tuple[str, Upload]] = dataclasses.field(default_factory=dict)
    requests: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    misbehave: set[str] = dataclasses.field(default_factory=set)
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock)
    clock: Any = time.time  # what "now" is for the date-skew check
    #: AccessKeyId -> when (``clock()``) its STS credentials expire.
    expiry: dict[str, float] = dataclasses.field(default_factory=dict)

    def objects(self, bucket: str) -> dict[str, StoredObject]:
        if bucket not in self.buckets:
            raise OssError(404, "NoSuchBucket", "The specified bucket does not exist.")
        return self.buckets[bucket]


def _etag(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()  # noqa: S324 - the protocol's ETag


def _http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def v4_quote(s: str, keep_slash: bool) -> str:
    """OSS V4 URI encoding: unreserved characters kept, ``/`` only in the path."""
    return urllib.parse.quote(s, safe="/~" if keep_slash else "~")


def _parse_range(spec: str, size: int) -> tuple[int, int] | None | str:
    """(first, last) inclusive; None when malformed or multi-range; "unsat" if start >= size."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    a, b = m.group(1), m.group(2)
    if not a:  # suffix: the last n bytes
        n = int(b)
        if n == 0:
            return None
        return (max(0, size - n), size - 1) if size else "unsat"
    first = int(a)
    last = int(b) if b else size - 1
    if b and last < first:
        return None
    if first >= size:
        return "unsat"
    return first, min(last, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        pass

    # -- plumbing --------------------------------------------------------------------------

    def _request_id(self) -> str:
        return os.urandom(12).hex().upper()

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        *,
        content_length: int | None = None,
    ) -> None:
        self.entry["status"] = status  # before the client can see the answer
        self.send_response(status)
        self.send_header("Server", "AliyunOSS")
        self.send_header("Date", _http_date(time.time()))
        self.send_header("x-oss-request-id", self.rid)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        n = len(body) if content_length is None else content_length
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_xml(
        self, status: int, root: ET.Element, headers: dict[str, str] | None = None
    ) -> None:
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")
        self._send(status, body, {"Content-Type": "application/xml", **(headers or {})})

    def _send_error(self, e: OssError) -> None:
        root = ET.Element("Error")
        ec = f"0002-{e.status:08d}"
        for tag, text in (
            ("Code", e.code),
            ("Message", e.message),
            ("RequestId", self.rid),
            ("HostId", "oss.test"),
            *e.extra.items(),
            ("EC", ec),
        ):
            ET.SubElement(root, tag).text = text
        body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")
        headers = {"Content-Type": "application/xml", "x-oss-ec": ec}
        if self.command == "HEAD":
            headers["x-oss-err"] = base64.b64encode(body).decode()
            self._send(e.status, b"", headers, content_length=0)
        else:
            self._send(e.status, body, headers)

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            total = 0
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += n
                if total > self.server.max_object:
                    raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the limit.")
                chunks.append(self.rfile.read(n))
                self.rfile.readline()
            return b"".join(chunks)
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise OssError(400, "InvalidArgument", "Content-Length is invalid.") from None
        if n < 0 or n > self.server.max_object:
            raise OssError(400, "EntityTooLarge", "Your proposed upload exceeds the limit.")
        return self.rfile.read(n)

    def _header(self, name: str) -> str:
        values = self.headers.get_all(name) or []
        return ",".join(values)

    # -- dispatch --------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.rid = self._request_id()
        raw_path, _, raw_query = self.path.partition("?")
        self.query = dict(urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
        self.raw_query = raw_query
        bucket, _, raw_key = raw_path.lstrip("/").partition("/")
        self.bucket = urllib.parse.unquote(bucket)
        self.key = urllib.parse.unquote(raw_key)
        st = self.server.state
        # Logged before answering, so a client that got its answer sees its request logged.
        self.entry: dict[str, Any] = {
            "method": self.command,
            "bucket": self.bucket,
            "key": self.key,
            "query": dict(self.query),
            "range": self.headers.get("Range"),
            "copy_source": self.headers.get("x-oss-copy-source"),
            "status": 0,
        }
        with st.lock:
            st.requests.append(self.entry)
        try:
            body = self._read_body() if self.command in ("PUT", "POST") else b""
            self._authenticate(body)
            self._dispatch(body)
        except OssError as e:
            self._send_error(e)

    def _dispatch(self, body: bytes) -> None:
        q, m = self.query, self.command
        if not self.bucket:
            raise OssError(400, "InvalidRequest", "Service operations are not supported here.")
        if not self.key:
            if m == "GET" and q.get("list-type") == "2":
                return self._list_v2()
            if m == "GET" and "uploads" in q:
                return self._list_uploads()
            if m == "POST" and "delete" in q:
                return self._delete_multiple(body)
            raise OssError(400, "NotImplemented", "This bucket operation is not implemented.")
        self._check_key(self.key)
        if m == "POST" and "uploads" in q:
            return self._initiate()
        if "uploadId" in q:
            if m == "PUT" and "partNumber" in q:
                return self._upload_part(body)
            if m == "POST":
                return self._complete(body)
            if m == "DELETE":
                return self._abort()
        if m == "PUT" and not q:
            if self.headers.get("x-oss-copy-source"):
                return self._copy()
            return self._put(body)
        if m in ("GET", "HEAD") and not q:
            return self._get()
        if m == "DELETE" and not q:
            with self.server.state.lock:
                self.server.state.objects(self.bucket).pop(self.key, None)
            return self._send(204)
        raise OssError(400, "NotImplemented", "This object operation is not implemented.")

    @staticmethod
    def _check_key(key: str) -> None:
        if not 1 <= len(key.encode()) <= 1023 or key[0] in "/\\":
            raise OssError(400, "InvalidObjectName", "The specified object is not valid.")

    # -- authentication --------------------------------------------------------------------

    def _authenticate(self, body: bytes) -> None:
        auth = self._header("Authorization")
        scheme, _, rest = auth.partition(" ")
        if scheme == "OSS":
            ak, _, sig = rest.strip().partition(":")
            secret = self._secret(ak)
            self._check_date_v1()
            want = base64.b64encode(
                hmac.new(secret.encode(), self._v1_string_to_sign().encode(), hashlib.sha1).digest()
            ).decode()
        elif scheme == "OSS4-HMAC-SHA256":
            fields = {}
            for part in rest.split(","):
                k, _, v = part.strip().partition("=")
                fields[k.strip()] = v.strip()
            cred = fields.get("Credential", "").split("/")
            sig = fields.get("Signature", "")
            if len(cred) != 5 or not sig:
                raise OssError(400, "InvalidArgument", "Authorization header is malformed.")
            ak, day, region, product, term = cred
            secret = self._secret(ak)
            date = self._check_date_v4()
            if (
                day != date[:8]
                or region != self.server.state.region
                or product != "oss"
                or term != "aliyun_v4_request"
            ):
                raise OssError(403, "SignatureDoesNotMatch", "The credential scope is invalid.")
            sha = self._header("x-oss-content-sha256")
            if sha != "UNSIGNED-PAYLOAD" and sha != hashlib.sha256(body).hexdigest():
                raise OssError(400, "InvalidArgument", "x-oss-content-sha256 is invalid.")
            additional = [h for h in fields.get("AdditionalHeaders", "").split(";") if h]
            canonical = self._v4_canonical_request(additional, sha)
            scope = f"{day}/{region}/oss/aliyun_v4_request"
            to_sign = "\n".join(
                ["OSS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
            )
            k = ("aliyun_v4" + secret).encode()
            for part in (day, region, "oss", "aliyun_v4_request"):
                k = hmac.new(k, part.encode(), hashlib.sha256).digest()
            want = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        else:
            raise OssError(403, "AccessDenied", "You have no right to access this object.")
        if not hmac.compare_digest(want.encode(), sig.encode()):
            raise OssError(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )

    def _secret(self, ak: str) -> str:
        creds = self.server.state.credentials
        if ak not in creds:
            raise OssError(403, "InvalidAccessKeyId", "The OSS Access Key Id does not exist.")
        secret, token = creds[ak]
        if token is not None and not hmac.compare_digest(
            self._header("x-oss-security-token").encode(), token.encode()
        ):
            raise OssError(403, "InvalidSecurityToken", "The security token is invalid.")
        expires = self.server.state.expiry.get(ak)
        if expires is not None and self.server.state.clock() >= expires:
            raise OssError(
                403, "SecurityTokenExpired", "The security token you provided has expired."
            )
        return secret

    def _skew(self, when: datetime) -> None:
        if abs(self.server.state.clock() - when.timestamp()) > MAX_CLOCK_SKEW:
            raise OssError(
                403,
                "RequestTimeTooSkewed",
                "The difference between the request time and the server's time is too large.",
            )

    def _check_date_v1(self) -> None:
        raw = self._header("x-oss-date") or self._header("Date")
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            raise OssError(403, "AccessDenied", "Invalid date.") from None
        if when.tzinfo is None:
            raise OssError(403, "AccessDenied", "Invalid date.")
        self._skew(when)

    def _check_date_v4(self) -> str:
        raw = self._header("x-oss-date")
        try:
            when = datetime.strptime(raw, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            raise OssError(403, "AccessDenied", "Invalid x-oss-date.") from None
        self._skew(when)
        return raw

    def _oss_headers(self) -> list[tuple[str, str]]:
        out: dict[str, str] = {}
        for name in self.headers:
            low = name.lower()
            if low.startswith("x-oss-"):
                out[low] = self._header(name)
        return sorted(out.items())

    def _v1_string_to_sign(self) -> str:
        canon_headers = "".join(f"{k}:{v}\n" for k, v in self._oss_headers())
        resource = f"/{self.bucket}/{self.key}" if self.bucket else "/"
        subs = sorted((k, v) for k, v in self.query.items() if k in V1_SUBRESOURCES)
        if subs:
            resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in subs)
        date = self._header("x-oss-date") or self._header("Date")
        return "\n".join(
            [
                self.command,
                self._header("Content-MD5"),
                self._header("Content-Type"),
                date,
                canon_headers + resource,
            ]
        )

    def _v4_canonical_request(self, additional: list[str], payload: str) -> str:
        uri = v4_quote(f"/{self.bucket}/{self.key}" if self.bucket else "/", True)
        params = sorted(
            (v4_quote(k, False), v4_quote(v, False))
            for k, v in urllib.parse.parse_qsl(self.raw_query, keep_blank_values=True)
        )
        query = "&".join(f"{k}={v}" if v else k for k, v in params)
        signed = {}
        for name in self.headers:
            low = name.lower()
            if (
                low.startswith("x-oss-")
                or low in ("content-type", "content-md5")
                or (low in additional)
            ):
                signed[low] = self._header(name)
        headers = "".join(f"{k}:{v}\n" for k, v in sorted(signed.items()))
        return "\n".join([self.command, uri, query, headers, ";".join(sorted(additional)), payload])

    # -- objects ---------------------------------------------------------------------------

    def _user_meta(self) -> dict[str, str]:
        meta = {}
        for name in self.headers:
            low = name.lower()
            if low.startswith("x-oss-meta-"):
                meta[low[len("x-oss-meta-") :]] = self._header(name)
        if sum(len(k) + len(v) for k, v in meta.items()) > MAX_META:
            raise OssError(400, "InvalidArgument", "User metadata exceeds 8 KB.")
        return meta

    def _forbid_overwrite(self) -> bool:
        v = self.headers.get("x-oss-forbid-overwrite")
        if v is None:
            return False
        if v.lower() not in ("true", "false"):
            raise OssError(400, "InvalidArgument", "x-oss-forbid-overwrite is invalid.")
        return v.lower() == "true"

    def _object_headers(self, obj: StoredObject) -> dict[str, str]:
        h = {
            "Content-Type": obj.content_type,
            "ETag": f'"{obj.etag}"',
            "Last-Modified": _http_date(obj.mtime),
            "Accept-Ranges": "bytes",
            "x-oss-object-type": obj.object_type,
            "x-oss-storage-class": "Standard",
            "x-oss-hash-crc64ecma": str(obj.crc),
        }
        for k, v in obj.meta.items():
            h[f"x-oss-meta-{k}"] = v
        return h

    def _store(self, key: str, obj: StoredObject, forbid: bool) -> None:
        st = self.server.state
        with st.lock:
            objects = st.objects(self.bucket)
            if forbid and key in objects:
                raise OssError(409, "FileAlreadyExists", "The object you specified already exists.")
            objects[key] = obj

    def _put(self, body: bytes) -> None:
        md5 = self.headers.get("Content-MD5")
        if md5 is not None and md5 != base64.b64encode(hashlib.md5(body).digest()).decode():  # noqa: S324
            raise OssError(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")
        obj = StoredObject(
            body,
            self._user_meta(),
            self.headers.get("Content-Type") or "application/octet-stream",
            _etag(body),
            time.time(),
            crc=crc64(body),
        )
        self._store(self.key, obj, self._forbid_overwrite())
        self._send(200, b"", {"ETag": f'"{obj.etag}"', "x-oss-hash-crc64ecma": str(obj.crc)})

    def _get(self) -> None:
        st = self.server.state
        with st.lock:
            obj = st.objects(self.bucket).get(self.key)
        if obj is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.", Key=self.key)
        headers = self._object_headers(obj)
        size = len(obj.data)
        spec = self.headers.get("Range")
        standard = (self.headers.get("x-oss-range-behavior") or "").lower() == "standard"
        rng = _parse_range(spec, size) if spec else None
        if "ignore-range" in st.misbehave:
            rng = None
        if rng == "unsat" and standard:
            raise OssError(416, "InvalidRange", "The requested range cannot be satisfied.")
        if self.command == "HEAD" or not isinstance(rng, tuple):
            body = obj.data
            status = 200
        else:
            first, last = rng
            body = obj.data[first : last + 1]
            status = 206
            if "short-range" in st.misbehave and len(body) > 1:
                body = body[: len(body) // 2]
            shown = first + 1 if "bad-content-range" in st.misbehave else first
            headers["Content-Range"] = f"bytes {shown}-{shown + len(body) - 1}/{size}"
        if self.command == "GET" and "long-body" in st.misbehave:
            body += b"\xee" * 16
        if "redirect" in st.misbehave:
            return self._send(307, b"", {"Location": "http://127.0.0.1:9/elsewhere"})
        if "gzip" in st.misbehave:
            headers["Content-Encoding"] = "gzip"
        if "bad-meta" in st.misbehave:
            headers["x-oss-meta-bad"] = "caf\u00e9"  # latin-1 on the wire, not ASCII
        if "many-meta" in st.misbehave:
            headers.update({f"x-oss-meta-m{i}": "1" for i in range(80)})
        self._send(status, body, headers, content_length=len(body))

    def _source(self) -> StoredObject:
        src = self.headers.get("x-oss-copy-source") or ""
        path = urllib.parse.unquote(src.split("?", 1)[0])
        bucket, _, key = path.lstrip("/").partition("/")
        with self.server.state.lock:
            obj = self.server.state.objects(bucket).get(key)
        if obj is None:
            raise OssError(404, "NoSuchKey", "The specified key does not exist.")
        return obj

    def _copy(self) -> None:
        src = self._source()
        directive = (self.headers.get("x-oss-metadata-directive") or "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise OssError(400, "InvalidArgument", "x-oss-metadata-directive is invalid.")
        if_match = self.headers.get("x-oss-copy-source-if-match")
        if if_match is not None and if_match.strip('"').upper() != src.etag:
            raise OssError(412, "PreconditionFailed", "At least one of the preconditions failed.")
        if directive == "COPY":
            meta, ctype = dict(src.meta), src.content_type
        else:
            meta = self._user_meta()
            ctype = self.headers.get("Content-Type") or "application/octet-stream"
        obj = dataclasses.replace(src, meta=meta, content_type=ctype, mtime=time.time())
        self._store(self.key, obj, self._forbid_overwrite())
        root = ET.Element("CopyObjectResult")
        ET.SubElement(root, "ETag").text = f'"{obj.etag}"'
        ET.SubElement(root, "LastModified").text = _iso(obj.mtime)
        self._send_xml(200, root, {"ETag": f'"{obj.etag}"'})

    def _delete_multiple(self, body: bytes) -> None:
        md5 = self.headers.get("Content-MD5")
        if md5 is None:
            raise OssError(400, "MissingArgument", "Content-MD5 is required.")
        if md5 != base64.b64encode(hashlib.md5(body).digest()).decode():  # noqa: S324
            raise OssError(400, "InvalidDigest", "The Content-MD5 you specified is not valid.")
        root = _parse_xml(body, "Delete")
        quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
        keys = [o.findtext("Key") or "" for o in root.findall("Object")]
        if not keys or len(keys) > MAX_KEYS:
            raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.")
        url = self.query.get("encoding-type") == "url"
        if url:
            keys = [urllib.parse.unquote(k) for k in keys]
        out = ET.Element("DeleteResult")
        if url:
            ET.SubElement(out, "EncodingType").text = "url"
        with self.server.state.lock:
            objects = self.server.state.objects(self.bucket)
            for k in keys:
                objects.pop(k, None)
                if not quiet:
                    d = ET.SubElement(out, "Deleted")
                    ET.SubElement(d, "Key").text = urllib.parse.quote(k) if url else k
        self._send_xml(200, out)

    def _list_v2(self) -> None:
        q = self.query
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        encoding = q.get("encoding-type", "")
        if encoding not in ("", "url"):
            raise OssError(400, "InvalidArgument", "encoding-type is invalid.")
        try:
            max_keys = int(q.get("max-keys") or 100)
        except ValueError:
            raise OssError(400, "InvalidArgument", "max-keys is invalid.") from None
        if not 0 <= max_keys <= MAX_KEYS:
            raise OssError(400, "InvalidArgument", "max-keys is invalid.")
        token = q.get("continuation-token", "")
        after, after_is_prefix = q.get("start-after", ""), False
        if token:
            try:
                t = json.loads(base64.urlsafe_b64decode(token.encode()))
                after, after_is_prefix = str(t["k"]), bool(t["p"])
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise OssError(
                    400, "InvalidArgument", "The continuation token is invalid."
                ) from None
        with self.server.state.lock:
            objects = self.server.state.objects(self.bucket)
            keys = sorted(k for k in objects if k.startswith(prefix))
            snapshot = {k: objects[k] for k in keys}
        contents: list[str] = []
        prefixes: list[str] = []
        last: tuple[str, bool] | None = None
        truncated = False
        for k in keys:
            if k <= after or (after_is_prefix and k.startswith(after)):
                continue
            cp = None
            if delim:
                i = k.find(delim, len(prefix))
                if i >= 0:
                    cp = k[: i + len(delim)]
            if cp is not None and prefixes and prefixes[-1] == cp:
                continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            if cp is not None:
                prefixes.append(cp)
                last = (cp, True)
            else:
                contents.append(k)
                last = (k, False)
        misbehave = self.server.state.misbehave
        if "huge-list" in misbehave:
            contents = contents + [prefix + f"extra-{i}" for i in range(max_keys + 1)]
            snapshot.update({c: StoredObject(b"", {}, "", "0" * 32, 0) for c in contents})
        enc = urllib.parse.quote if encoding == "url" else (lambda s: s)
        root = ET.Element("ListBucketResult")
        for tag, text in (
            ("Name", self.bucket),
            ("Prefix", enc(prefix)),
            ("MaxKeys", str(max_keys)),
            ("Delimiter", enc(delim)),
            *([("EncodingType", "url")] if encoding else []),
            ("IsTruncated", "true" if truncated else "false"),
            ("KeyCount", str(len(contents) + len(prefixes))),
            ("ContinuationToken", token),
            ("StartAfter", enc(q.get("start-after", ""))),
        ):
            ET.SubElement(root, tag).text = text
        if truncated and last is not None:
            nxt = base64.urlsafe_b64encode(json.dumps({"k": last[0], "p": last[1]}).encode())
            next_token = token if "same-token" in misbehave and token else nxt.decode()
            ET.SubElement(root, "NextContinuationToken").text = enc(next_token)
        for k in contents:
            obj = snapshot[k]
            c = ET.SubElement(root, "Contents")
            for tag, text in (
                ("Key", enc(k)),
                ("LastModified", _iso(obj.mtime)),
                ("ETag", f'"{obj.etag}"'),
                ("Type", obj.object_type),
                ("Size", str(len(obj.data))),
                ("StorageClass", "Standard"),
            ):
                ET.SubElement(c, tag).text = text
        for p in prefixes:
            cp_node = ET.SubElement(root, "CommonPrefixes")
            ET.SubElement(cp_node, "Prefix").text = enc(p)
        self._send_xml(200, root)

    # -- multipart -------------------------------------------------------------------------

    def _initiate(self) -> None:
        st = self.server.state
        upload = Upload(
            self.key,
            self._user_meta(),
            self.headers.get("Content-Type") or "application/octet-stream",
            self._forbid_overwrite(),
        )
        upload_id = os.urandom(16).hex().upper()
        with st.lock:
            st.objects(self.bucket)
            st.uploads[upload_id] = (self.bucket, upload)
        root = ET.Element("InitiateMultipartUploadResult")
        for tag, text in (("Bucket", self.bucket), ("Key", self.key), ("UploadId", upload_id)):
            ET.SubElement(root, tag).text = text
        self._send_xml(200, root)

    def _list_uploads(self) -> None:
        """ListMultipartUploads (``GET /?uploads``): uploads sorted by key, then by upload
        id (OSS documents the markers that way: keys after ``key-marker``, and, with an
        ``upload-id-marker``, the same key's uploads with a greater id), at most
        ``max-uploads`` (default and maximum 1,000); ``NextKeyMarker`` and
        ``NextUploadIdMarker`` always present (oss2's parser requires both), ``Initiated``
        as ISO 8601. ``misbehave``: ``"same-token"`` answers a truncated page whose next
        markers are the ones given."""
        q = self.query
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        encoding = q.get("encoding-type", "")
        if encoding not in ("", "url"):
            raise OssError(400, "InvalidArgument", "encoding-type is invalid.")
        if delim:
            raise OssError(400, "NotImplemented", "delimiter is not implemented here.")
        try:
            max_uploads = int(q.get("max-uploads") or 1000)
        except ValueError:
            raise OssError(400, "InvalidArgument", "max-uploads is invalid.") from None
        if not 1 <= max_uploads <= MAX_KEYS:
            raise OssError(400, "InvalidArgument", "max-uploads is invalid.")
        key_marker = q.get("key-marker", "")
        id_marker = q.get("upload-id-marker", "") if key_marker else ""
        st = self.server.state
        with st.lock:
            found = sorted(
                (u.key, uid, u)
                for uid, (bucket, u) in st.uploads.items()
                if bucket == self.bucket and u.key.startswith(prefix)
            )
        todo = [
            (k, uid, u)
            for k, uid, u in found
            if not key_marker
            or k > key_marker
            or (k == key_marker and id_marker and uid > id_marker)
        ]
        page, truncated = todo[:max_uploads], len(todo) > max_uploads
        next_key, next_id = (page[-1][0], page[-1][1]) if truncated else ("", "")
        if truncated and "same-token" in st.misbehave and key_marker:
            next_key, next_id = key_marker, id_marker
        enc = urllib.parse.quote if encoding == "url" else (lambda s: s)
        root = ET.Element("ListMultipartUploadsResult")
        for tag, text in (
            ("Bucket", self.bucket),
            *([("EncodingType", "url")] if encoding else []),
            ("KeyMarker", enc(key_marker)),
            ("UploadIdMarker", id_marker),
            ("NextKeyMarker", enc(next_key)),
            ("NextUploadIdMarker", next_id),
            ("Delimiter", enc(delim)),
            ("Prefix", enc(prefix)),
            ("MaxUploads", str(max_uploads)),
            ("IsTruncated", "true" if truncated else "false"),
        ):
            ET.SubElement(root, tag).text = text
        for k, uid, u in page:
            node = ET.SubElement(root, "Upload")
            for tag, text in (
                ("Key", enc(k)),
                ("UploadId", uid),
                ("Initiated", _iso(u.initiated)),
            ):
                ET.SubElement(node, tag).text = text
        self._send_xml(200, root)

    def _upload(self) -> Upload:
        with self.server.state.lock:
            found = self.server.state.uploads.get(self.query.get("uploadId", ""))
        if found is None or found[0] != self.bucket or found[1].key != self.key:
            raise OssError(
                404, "NoSuchUpload", "The specified upload does not exist.", UploadId="x"
            )
        return found[1]

    def _upload_part(self, body: bytes) -> None:
        upload = self._upload()
        try:
            n = int(self.query["partNumber"])
        except ValueError:
            n = 0
        if not 1 <= n <= 10000:
            raise OssError(400, "InvalidArgument", "Part number must be between 1 and 10000.")
        if self.headers.get("x-oss-copy-source"):
            src = self._source()
            spec = self.headers.get("x-oss-copy-source-range")
            if spec is None:
                data = src.data
            else:
                rng = _parse_range(spec, len(src.data))
                if not isinstance(rng, tuple) or spec.strip().startswith("bytes=-"):
                    raise OssError(400, "InvalidArgument", "The copy source range is invalid.")
                data = src.data[rng[0] : rng[1] + 1]
            etag = _etag(data)
            with self.server.state.lock:
                upload.parts[n] = (data, etag)
            root = ET.Element("CopyPartResult")
            ET.SubElement(root, "LastModified").text = _iso(time.time())
            ET.SubElement(root, "ETag").text = f'"{etag}"'
            return self._send_xml(200, root, {"ETag": f'"{etag}"'})
        etag = _etag(body)
        with self.server.state.lock:
            upload.parts[n] = (body, etag)
        self._send(200, b"", {"ETag": f'"{etag}"', "x-oss-hash-crc64ecma": str(crc64(body))})

    def _complete(self, body: bytes) -> None:
        upload = self._upload()
        root = _parse_xml(body, "CompleteMultipartUpload")
        wanted: list[tuple[int, str]] = []
        for p in root.findall("Part"):
            try:
                wanted.append((int(p.findtext("PartNumber") or ""), (p.findtext("ETag") or "")))
            except ValueError:
                raise OssError(
                    400, "MalformedXML", "The XML you provided was not well-formed."
                ) from None
        if not wanted:
            raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.")
        numbers = [n for n, _ in wanted]
        if numbers != sorted(set(numbers)):
            raise OssError(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
        chunks = []
        for i, (n, etag) in enumerate(wanted):
            part = upload.parts.get(n)
            if part is None or etag.strip().strip('"').upper() != part[1]:
                raise OssError(
                    400, "InvalidPart", "One or more of the specified parts could not be found."
                )
            if i < len(wanted) - 1 and len(part[0]) < MIN_PART:
                raise OssError(
                    400,
                    "EntityTooSmall",
                    "Your proposed upload is smaller than the minimum allowed size.",
                )
            chunks.append(part[0])
        data = b"".join(chunks)
        md5s = b"".join(bytes.fromhex(upload.parts[n][1]) for n in numbers)
        etag = f"{hashlib.md5(md5s).hexdigest().upper()}-{len(numbers)}"  # noqa: S324
        obj = StoredObject(
            data, upload.meta, upload.content_type, etag, time.time(), "Multipart", crc64(data)
        )
        st = self.server.state
        with st.lock:
            self._store(self.key, obj, upload.forbid_overwrite or self._forbid_overwrite())
            st.uploads.pop(self.query["uploadId"], None)
        out = ET.Element("CompleteMultipartUploadResult")
        for tag, text in (
            ("Location", f"http://oss.test/{self.bucket}/{urllib.parse.quote(self.key)}"),
            ("Bucket", self.bucket),
            ("Key", self.key),
            ("ETag", f'"{etag}"'),
        ):
            ET.SubElement(out, tag).text = text
        self._send_xml(200, out, {"ETag": f'"{etag}"', "x-oss-hash-crc64ecma": str(obj.crc)})

    def _abort(self) -> None:
        self._upload()
        with self.server.state.lock:
            self.server.state.uploads.pop(self.query["uploadId"], None)
        self._send(204)


def _parse_xml(body: bytes, root_tag: str) -> ET.Element:
    if len(body) > MAX_XML_BODY or b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.")
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.") from None
    if root.tag != root_tag:
        raise OssError(400, "MalformedXML", "The XML you provided was not well-formed.")
    return root


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: OssState
    max_object: int

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up or refuses our CA is the test's business


class OssServer:
    """An OSS endpoint on 127.0.0.1:<random>, over TLS when ``tls_dir`` is given.

    ``endpoint`` is the URL to give oss2 (``https://127.0.0.1:<port>``, path style), and
    ``ca_path`` the CA file to pin for it.
    """

    def __init__(
        self,
        *,
        tls_dir: str | None = None,
        region: str = "cn-hangzhou",
        max_object: int = 256 * 1024 * 1024,
    ) -> None:
        self.state = OssState(region=region)
        self.ca_path: str | None = None
        tls = None
        if tls_dir is not None:
            self.ca_path, cert, key = make_server_tls(tls_dir, ca_cn="fake OSS CA")
            tls = (cert, key)
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.state = self.state
        self._httpd.max_object = max_object
        self._served = ServedHttp(self._httpd, tls, lazy_handshake=True, poll_interval=0.1)
        scheme = "https" if tls else "http"
        self.port = self._served.port
        self.endpoint = f"{scheme}://127.0.0.1:{self.port}"

    def add_credentials(self, ak: str, secret: str, token: str | None = None) -> None:
        self.state.credentials[ak] = (secret, token)

    def issue_sts(self, ttl: float) -> tuple[str, str, str]:
        """A fresh STS triple (AccessKeyId, AccessKeySecret, SecurityToken) valid for
        ``ttl`` seconds of the state's clock, as STS AssumeRole returns one."""
        ak = "STS." + os.urandom(9).hex()
        secret = base64.b64encode(os.urandom(24)).decode()
        token = base64.b64encode(os.urandom(96)).decode()
        with self.state.lock:
            self.state.credentials[ak] = (secret, token)
            self.state.expiry[ak] = self.state.clock() + ttl
        return ak, secret, token

    def expire(self, ak: str) -> None:
        """Make ``ak``'s STS credentials expire now."""
        with self.state.lock:
            self.state.expiry[ak] = self.state.clock()

    def create_bucket(self, name: str) -> None:
        with self.state.lock:
            self.state.buckets.setdefault(name, {})

    def objects(self, bucket: str) -> dict[str, StoredObject]:
        return self.state.buckets[bucket]

    def __enter__(self) -> OssServer:
        self._served.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._served.stop()


@contextlib.contextmanager
def oss_server(tls_dir: str | None = None, **kwargs: Any) -> Iterator[OssServer]:
    with OssServer(tls_dir=tls_dir, **kwargs) as server:
        yield server
