"""``OssTransport``: the :class:`~fuse_crypt.backend.transport.ObjectTransport` over oss2.

Why oss2 and not OSS's S3 endpoint: CDH's ``alibaba-cloud-oss`` volumes name an OSS
endpoint and AccessKey, and STS tokens and V4 signing are native there.  The SDK is used
for signing and request building only; everything that comes back is treated as hostile:

* **Transport policy**: https only, unless ``allow_insecure_http`` (tests, loopback); the
  CA is pinned with ``ca_file`` (else the system store).  The requests session ignores the
  environment (no ``*_PROXY``, ``REQUESTS_CA_BUNDLE`` or netrc from the pod) and follows no
  redirect, so a 3xx cannot carry the STS token to another host.  Compressed answers are
  refused (no decompression bombs).
* **Bounds**: connect and per-read timeouts, a per-request deadline while the body
  streams, GET bodies at most ``max_body`` (and never longer than asked for), XML answers
  at most ``max_xml``, user metadata at most 64 headers / 8 KiB, listings checked against
  what was asked (page size, prefix, delimiter, a token that moves).
* **Errors**: every failure is an :class:`ObjectStoreError` subclass (404 ->
  ``ObjectNotFound``, 409/412 -> ``PreconditionFailed``, 403 -> ``AccessDenied``, 5xx, 408,
  429, timeouts, resets and CRC mismatches -> ``TransientError``, anything malformed ->
  ``BadResponse``).  Messages carry the operation, the status, the OSS error code (when it
  looks like one) and the request id: never a body, a key, a credential or a signature.
  oss2's own logger is capped at WARNING, because at DEBUG it logs request headers, STS
  token included.
* **Credentials** may be a callable returning :class:`OssCredentials`; it is called for
  every request, so STS credentials refreshed by the caller (unsealed again in the guest)
  take effect without a remount.

Ranged GETs send ``x-oss-range-behavior: standard``, so a range past the end is a 416
(answered as ``b""``) instead of OSS's legacy "whole object, 200".
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import oss2
import oss2.credentials
import oss2.exceptions
import oss2.http
import oss2.models
import requests
import urllib3.exceptions

from .transport import (
    AccessDenied,
    BadResponse,
    Body,
    CredentialsRejected,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTransport,
    PreconditionFailed,
    TransientError,
    UploadInfo,
    UploadLister,
    UploadPage,
    exact_buffer,
    next_upload_markers,
    rewind,
)

__all__ = ["OssCredentials", "OssTransport"]

# oss2 logs full request headers (the STS token among them) at DEBUG and keys at INFO.
logging.getLogger("oss2").setLevel(logging.WARNING)

MiB = 1024 * 1024
DEFAULT_MAX_BODY = 64 * MiB
DEFAULT_MAX_XML = 8 * MiB
MAX_META_HEADERS = 64
MAX_META_BYTES = 8 * 1024  # OSS's own limit on user metadata
MAX_KEY_BYTES = 1023
MAX_TOKEN = 4096
MAX_OBJECT_SIZE = 1 << 50  # OSS and S3 stop at 48.8 TiB; anything bigger is a lie
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")  # DNS name or IPv4
_REGION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_META_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,127}")
_META_VALUE_RE = re.compile(r"[\x20-\x7e]*")
_CRED_RE = re.compile(r"[\x21-\x7e]{1,8192}")
_CODE_RE = re.compile(r"[A-Za-z0-9.]{1,64}")
_RID_RE = re.compile(r"[A-Za-z0-9-]{1,64}")
_ETAG_RE = re.compile(r"[\x21-\x7e]{1,256}")
_UPLOAD_ID_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,512}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclasses.dataclass(frozen=True, slots=True)
class OssCredentials:
    """An AccessKey pair, plus the STS token for temporary ones (never in ``repr``)."""

    access_key_id: str
    access_key_secret: str = dataclasses.field(repr=False)
    security_token: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for value in (self.access_key_id, self.access_key_secret):
            if not _CRED_RE.fullmatch(value):
                raise ObjectStoreError("OSS credentials are malformed", errno.EINVAL)
        if self.security_token is not None and not _CRED_RE.fullmatch(self.security_token):
            raise ObjectStoreError("OSS security token is malformed", errno.EINVAL)


CredentialSource = OssCredentials | Callable[[], OssCredentials]


class _Provider(oss2.credentials.CredentialsProvider):
    """Asks the caller's source on every request: refreshed STS credentials apply at once."""

    def __init__(self, source: CredentialSource) -> None:
        self._source = source

    def get_credentials(self) -> oss2.credentials.Credentials:
        if isinstance(self._source, OssCredentials):
            c = self._source
        else:
            try:
                c = self._source()
            except ObjectStoreError:
                raise
            except Exception:
                raise AccessDenied("OSS credentials are unavailable") from None
            if not isinstance(c, OssCredentials):
                raise AccessDenied("OSS credentials are unavailable")
        return oss2.credentials.Credentials(
            c.access_key_id, c.access_key_secret, c.security_token or ""
        )


def _transient_from(exc: BaseException) -> ObjectStoreError:
    """A requests/urllib3 failure: a certificate problem is not worth retrying."""
    seen: BaseException | None = exc
    depth = 0
    while seen is not None and depth < 16:
        if isinstance(seen, ssl.SSLCertVerificationError | ssl.CertificateError):
            return BadResponse("OSS: TLS certificate verification failed")
        nxt = seen.__cause__ or seen.__context__
        if nxt is None and seen.args and isinstance(seen.args[0], BaseException):
            nxt = seen.args[0]
        seen, depth = nxt, depth + 1
    if isinstance(exc, requests.Timeout):
        return TransientError("OSS: request timed out")
    return TransientError("OSS: connection failed")


class _BoundedResponse(oss2.http.Response):
    """oss2's response with every body read bounded in bytes and in time."""

    def __init__(self, response: requests.Response, limit: int, deadline: float) -> None:
        super().__init__(response)
        self._limit = limit
        self._deadline = deadline
        self._done = False

    def _chunks(self, size: int) -> Iterator[bytes]:
        """What the socket has, ``size`` at most per read (``read1``: no waiting to fill a
        buffer, so the deadline is checked while a slow peer trickles)."""
        raw = self.response.raw
        while True:
            if time.monotonic() > self._deadline:
                self.response.close()
                raise TransientError("OSS: response too slow")
            try:
                chunk = raw.read1(size)
            except (urllib3.exceptions.HTTPError, requests.RequestException) as e:
                self.response.close()
                raise _transient_from(e) from None
            except OSError as e:
                if isinstance(e, ObjectStoreError):
                    raise
                self.response.close()
                raise TransientError("OSS: connection failed") from None
            if not chunk:
                return
            yield chunk

    def read_at_most(self, cap: int) -> bytes:
        """The whole body; :class:`BadResponse` if it is longer than ``cap``."""
        return bytes(self.read_buffer(cap))

    def read_buffer(self, cap: int) -> bytearray:
        """:meth:`read_at_most` into a buffer returned as is (no ``bytes`` copy)."""
        if self._done:
            return bytearray()
        out = bytearray()
        for chunk in self._chunks(64 * 1024):
            out += chunk
            if len(out) > cap:
                self.response.close()
                raise BadResponse("OSS: response body longer than expected")
        self._done = True
        return out

    def fill(self, buf: bytearray, seconds: float) -> None:
        """The next ``len(buf)`` bytes of a stream (:class:`_OssStream`, which sized
        ``buf``) into ``buf`` within ``seconds``; the whole answer's length was checked
        against the request when it opened."""
        n = len(buf)
        self._deadline = time.monotonic() + seconds
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                piece = next(iter(self._chunks(min(64 * 1024, n - got))), b"")
                if not piece:
                    self.response.close()
                    raise TransientError("OSS stream: ended early")
                view[got : got + len(piece)] = piece
                got += len(piece)
        finally:
            view.release()

    def read(self, amt: int | None = None) -> bytes:
        if amt is None:
            return self.read_at_most(self._limit)
        if self._done:
            return b""
        for chunk in self._chunks(amt):
            self._limit -= len(chunk)
            if self._limit < 0:
                self.response.close()
                raise BadResponse("OSS: response body too large")
            return chunk
        self._done = True
        return b""

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(64 * 1024):
            yield chunk


class _OssStream:
    """An open GET read in exact pieces (:class:`ObjectStream`), each bounded in size
    (``max_body``) and time (the request timeout)."""

    def __init__(self, resp: _BoundedResponse, left: int, max_body: int, seconds: float):
        self._resp = resp
        self._left = left
        self._max = max_body
        self._seconds = seconds
        self._broken = False

    def read_exact(self, n: int, into: bytearray | None = None) -> bytearray:
        if n <= 0 or n > self._max or n > self._left:
            raise BadResponse("OSS stream: read past the requested range")
        buf = exact_buffer(n, into)  # a wrong-sized buffer is refused, the stream kept
        try:
            self._resp.fill(buf, self._seconds)
        except BaseException:
            self._broken = True
            self.close()
            raise
        self._left -= n
        return buf

    def close(self) -> None:
        """Drop the connection, unless the body was read to its end (as after a
        ranged GET's :meth:`_BoundedResponse.read_buffer`, which leaves it as is)."""
        whole = self._left == 0 and not self._broken
        self._left, self._broken = 0, True
        if not whole:
            with contextlib.suppress(Exception):
                self._resp.response.close()


class _Session(oss2.Session):
    """requests without the environment, without redirects, with bounded responses."""

    def __init__(self, *, pool_size: int, verify: str | bool, limit: int, deadline: float):
        super().__init__(pool_size=pool_size)
        self.session.trust_env = False
        self.session.verify = verify
        self._limit = limit
        self._deadline = deadline

    def do_request(self, req: oss2.http.Request, timeout: Any) -> _BoundedResponse:
        started = time.monotonic()
        try:
            resp = self.session.request(
                req.method,
                req.url,
                data=req.data,
                params=req.params,
                headers=req.headers,
                stream=True,
                timeout=timeout,
                allow_redirects=False,
            )
        except requests.RequestException as e:
            raise _transient_from(e) from None
        original = getattr(resp.raw, "_original_response", None)
        defects = getattr(getattr(original, "msg", None), "defects", None) or []
        if defects:
            # http.client ends the head at EOF: a connection cut mid-head looks like an
            # answer with some headers missing.  That is a dropped connection, not data.
            resp.close()
            cut = any(type(d).__name__ == "MissingHeaderBodySeparatorDefect" for d in defects)
            if cut:
                raise TransientError("OSS: connection dropped in the response head")
            raise BadResponse("OSS: malformed response head")
        chunked = "chunked" in (resp.headers.get("Transfer-Encoding") or "").lower()
        if (
            resp.status_code not in (204, 304)
            and "Content-Length" not in resp.headers
            and not chunked
        ):
            # OSS frames every answer; one without a length was most likely cut mid-head
            # after a whole line (http.client then sees no defect).
            resp.close()
            raise TransientError("OSS: response head without a length (connection dropped?)")
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding != "identity":
            resp.close()
            raise BadResponse("OSS: compressed response refused")
        return _BoundedResponse(resp, self._limit, started + self._deadline)


# 403 codes that mean "these credentials are no good" (an expired or replaced STS token,
# an unknown key), as opposed to a policy refusal: retried once newer credentials arrive.
_CREDS_REJECTED = frozenset({"InvalidAccessKeyId", "InvalidSecurityToken", "SecurityTokenExpired"})


def _code(e: oss2.exceptions.OssError) -> str:
    code = e.code if isinstance(e.code, str) else ""
    return code if _CODE_RE.fullmatch(code) else "?"


def _rid(e: oss2.exceptions.OssError) -> str:
    rid = e.request_id if isinstance(e.request_id, str) else ""
    return f" (request id {rid})" if _RID_RE.fullmatch(rid) else ""


def _map_oss_error(op: str, e: oss2.exceptions.OssError) -> ObjectStoreError:
    status = e.status if isinstance(e.status, int) else 0
    if isinstance(e, oss2.exceptions.RequestError):
        inner = getattr(e, "exception", None)
        return (
            _transient_from(inner)
            if isinstance(inner, BaseException)
            else TransientError(f"OSS {op}: connection failed")
        )
    if isinstance(e, oss2.exceptions.InconsistentError):
        return TransientError(f"OSS {op}: CRC mismatch between client and server")
    if isinstance(e, oss2.exceptions.ClientError):
        return ObjectStoreError(f"OSS {op}: request refused by the client", errno.EINVAL)
    code = _code(e)
    msg = f"OSS {op}: {status} {code}{_rid(e)}"
    if status == 404 and code in ("NoSuchKey", "NoSuchUpload"):
        return ObjectNotFound(msg)
    if status in (409, 412) or (status == 400 and code == "ObjectAlreadyExists"):
        return PreconditionFailed(msg)
    if status == 403 and code in _CREDS_REJECTED:
        return CredentialsRejected(msg)
    if status == 403:
        return AccessDenied(msg)
    if status in (408, 429) or 500 <= status <= 599:
        return TransientError(msg)
    if 300 <= status <= 399 or status < 100 or status > 599:
        return BadResponse(msg)
    return ObjectStoreError(msg)


def _clean_etag(value: object) -> str:
    etag = value.strip().strip('"') if isinstance(value, str) else ""
    if not _ETAG_RE.fullmatch(etag):
        raise BadResponse("OSS: malformed ETag")
    return etag


def _meta_out(metadata: Mapping[str, str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        low = name.lower()
        if not _META_NAME_RE.fullmatch(low) or not _META_VALUE_RE.fullmatch(value):
            raise ObjectStoreError("OSS: metadata must be printable ASCII", errno.EINVAL)
        total += len(low) + len(value)
        headers["x-oss-meta-" + low] = value
    if len(headers) > MAX_META_HEADERS or total > MAX_META_BYTES:
        raise ObjectStoreError("OSS: metadata too large", errno.E2BIG)
    return headers


def _meta_in(headers: Mapping[str, str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    total = 0
    for name, value in headers.items():
        low = name.lower()
        if not low.startswith("x-oss-meta-"):
            continue
        key = low[len("x-oss-meta-") :]
        if not _META_NAME_RE.fullmatch(key) or not _META_VALUE_RE.fullmatch(value):
            raise BadResponse("OSS: malformed user metadata")
        total += len(key) + len(value)
        meta[key] = value
        if len(meta) > MAX_META_HEADERS or total > 2 * MAX_META_BYTES:
            raise BadResponse("OSS: user metadata over bound")
    return meta


def _check_key(key: str) -> None:
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise ObjectStoreError("OSS: object key is not valid UTF-8", errno.EINVAL) from None
    if not key or size > MAX_KEY_BYTES or key[0] in "/\\":
        raise ObjectStoreError("OSS: invalid object key", errno.EINVAL)


def _check_part(part_number: int) -> None:
    if not 1 <= part_number <= 10000:
        raise ObjectStoreError("OSS: part number out of range", errno.EINVAL)


class OssTransport:
    """One OSS bucket through oss2 (V4 signing by default)."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        *,
        region: str,
        credentials: CredentialSource,
        ca_file: str | None = None,
        allow_insecure_http: bool = False,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        request_timeout: float = 300.0,
        max_body: int = DEFAULT_MAX_BODY,
        max_xml: int = DEFAULT_MAX_XML,
        pool_size: int = 16,
        auth_version: str = "v4",
    ) -> None:
        try:  # urlsplit, .port and .hostname raise ValueError on bad IPv6 literals and ports
            url = urllib.parse.urlsplit(endpoint if "://" in endpoint else "https://" + endpoint)
            port, host = url.port, url.hostname
        except ValueError:
            raise ObjectStoreError("OSS endpoint must be an https URL", errno.EINVAL) from None
        if (
            url.scheme not in ("https", "http")
            or not host
            or port == 0
            or not _HOST_RE.fullmatch(host)
        ):
            raise ObjectStoreError("OSS endpoint must be an https URL", errno.EINVAL)
        if url.scheme == "http" and not allow_insecure_http:
            raise ObjectStoreError(
                "OSS endpoint must use https (plain http needs an explicit opt-in)",
                errno.EINVAL,
            )
        if url.username or url.password or url.path not in ("", "/") or url.query:
            raise ObjectStoreError("OSS endpoint must be scheme://host[:port]", errno.EINVAL)
        if not _BUCKET_RE.fullmatch(bucket) or "--" in bucket:
            raise ObjectStoreError("OSS bucket name is invalid", errno.EINVAL)
        if not _REGION_RE.fullmatch(region):
            raise ObjectStoreError("OSS region is invalid", errno.EINVAL)
        if auth_version not in ("v4", "v1"):
            raise ObjectStoreError("OSS auth version must be v4 or v1", errno.EINVAL)
        if max_body < 1 or max_xml < 1:
            raise ObjectStoreError("OSS bounds must be positive", errno.EINVAL)
        self.bucket_name = bucket
        self.max_body = max_body
        self._request_timeout = request_timeout
        provider = _Provider(credentials)
        auth: Any
        if auth_version == "v4":
            auth = oss2.ProviderAuthV4(provider)
        else:
            auth = oss2.ProviderAuth(provider)
        session = _Session(
            pool_size=pool_size,
            verify=ca_file if ca_file is not None else True,
            limit=max_xml,
            deadline=request_timeout,
        )
        try:
            self._bucket = oss2.Bucket(
                auth,
                f"{url.scheme}://{url.netloc}",
                bucket,
                session=session,
                connect_timeout=(connect_timeout, read_timeout),
                region=region,
                enable_crc=True,
            )
        except Exception:  # oss2 re-parses the endpoint: ClientError, or ValueError
            raise ObjectStoreError("OSS endpoint is not usable by oss2", errno.EINVAL) from None

    # -- error funnel ----------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ObjectStoreError:
            raise
        except oss2.exceptions.OssError as e:
            raise _map_oss_error(op, e) from None
        except requests.RequestException as e:
            raise _transient_from(e) from None
        except Exception:  # the SDK parsing a hostile answer: KeyError, ValueError, XML...
            raise BadResponse(f"OSS {op}: malformed response") from None

    # -- ObjectTransport -------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo:
        _check_key(key)
        r = self._call("HEAD", lambda: self._bucket.head_object(key))
        return self._info(key, r.headers, r.content_length, r.etag, r.last_modified)

    def _info(
        self, key: str, headers: Mapping[str, str], size: object, etag: object, mtime: object
    ) -> ObjectInfo:
        if not isinstance(size, int) or not 0 <= size <= MAX_OBJECT_SIZE:
            raise BadResponse("OSS: malformed object size")
        if not isinstance(mtime, int):
            raise BadResponse("OSS: malformed Last-Modified")
        ctype = headers.get("Content-Type") or ""
        if len(ctype) > 256 or not _META_VALUE_RE.fullmatch(ctype):
            raise BadResponse("OSS: malformed Content-Type")
        return ObjectInfo(
            key=key,
            size=size,
            etag=_clean_etag(etag),
            last_modified_ns=mtime * 1_000_000_000,
            metadata=_meta_in(headers),
            content_type=ctype,
        )

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return bytes(self._get(key, start, length))

    def get_buffer(self, key: str, start: int, length: int) -> bytearray:
        """:meth:`get` of a bounded range, the body returned in the buffer it was read
        into (one copy fewer; the read-ahead's chunks are the daemon's largest
        allocations and it has an RSS budget)."""
        if length <= 0:
            raise ObjectStoreError("OSS GET: empty range", errno.EINVAL)
        return self._get(key, start, length)

    def _get(self, key: str, start: int, length: int | None) -> bytearray:
        _check_key(key)
        if start < 0 or (length is not None and length < 0):
            raise ObjectStoreError("OSS GET: negative range", errno.EINVAL)
        if length == 0:
            return bytearray()
        cap = self.max_body if length is None else min(length, self.max_body)
        end = None if length is None else start + length - 1
        headers = {"x-oss-range-behavior": "standard"}

        def fetch() -> bytearray:
            try:
                result = self._bucket.get_object(key, byte_range=(start, end), headers=headers)
            except oss2.exceptions.ServerError as e:
                if e.status == 416:
                    return bytearray()
                raise
            resp: _BoundedResponse = result.resp
            try:
                declared = int(resp.headers.get("Content-Length", "-1"))
            except ValueError:
                raise BadResponse("OSS GET: malformed Content-Length") from None
            if resp.status == 206:
                m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range") or "")
                if not m or int(m.group(1)) != start or int(m.group(2)) < start:
                    raise BadResponse("OSS GET: Content-Range does not match the request")
                last = int(m.group(2))
                if m.group(3) != "*":
                    # Short only where the object ends: a range cut short in the middle
                    # would pass for the whole answer.
                    total = int(m.group(3))
                    want = total - 1 if end is None else min(end, total - 1)
                    if last != want:
                        raise BadResponse("OSS GET: Content-Range does not match the request")
                expected = last - start + 1
            elif resp.status == 200 and start == 0:
                expected = declared
            else:
                raise BadResponse(f"OSS GET: unexpected status {resp.status}")
            if expected > cap or declared > cap:
                raise BadResponse("OSS GET: answer longer than asked for")
            body = resp.read_buffer(cap)
            if expected >= 0 and len(body) != expected:
                raise BadResponse("OSS GET: body length does not match its headers")
            return body

        data: bytearray = self._call("GET", fetch)
        return data

    def open_stream(self, key: str, start: int, end: int) -> _OssStream:
        """One GET of ``[start, end)`` read chunk by chunk (:class:`ObjectStream`); the
        answer must be exactly that range (206, Content-Range, Content-Length)."""
        _check_key(key)
        if start < 0 or end <= start:
            raise ObjectStoreError("OSS GET: empty or negative range", errno.EINVAL)
        headers = {"x-oss-range-behavior": "standard"}

        def fetch() -> _OssStream:
            result = self._bucket.get_object(key, byte_range=(start, end - 1), headers=headers)
            resp: _BoundedResponse = result.resp
            m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range") or "")
            if (
                resp.status != 206
                or m is None
                or int(m.group(1)) != start
                or int(m.group(2)) != end - 1
                or resp.headers.get("Content-Length") != str(end - start)
            ):
                resp.response.close()
                raise BadResponse("OSS stream: answer does not match the requested range")
            return _OssStream(resp, end - start, self.max_body, self._request_timeout)

        stream: _OssStream = self._call("GET", fetch)
        return stream

    def put(
        self,
        key: str,
        body: Body,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        _check_key(key)
        headers = {"Content-Type": content_type, **_meta_out(metadata)}
        if if_none_match:
            headers["x-oss-forbid-overwrite"] = "true"
        r = self._call("PUT", lambda: self._bucket.put_object(key, rewind(body), headers=headers))
        return _clean_etag(r.etag)

    def copy(
        self,
        src: str,
        dst: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        _check_key(src)
        _check_key(dst)
        if metadata is None and content_type is None:
            headers = {"x-oss-metadata-directive": "COPY"}
        else:
            # REPLACE sets both; the one not given is kept from the source (a chmod of a
            # directory marker must keep application/x-directory).
            if metadata is None or content_type is None:
                source = self.head(src)
                metadata = source.metadata if metadata is None else metadata
                content_type = content_type or source.content_type or "application/octet-stream"
            headers = {
                "x-oss-metadata-directive": "REPLACE",
                "Content-Type": content_type,
                **_meta_out(metadata),
            }
        r = self._call(
            "COPY", lambda: self._bucket.copy_object(self.bucket_name, src, dst, headers=headers)
        )
        return _clean_etag(r.etag)

    def delete(self, key: str) -> None:
        _check_key(key)
        with contextlib.suppress(ObjectNotFound):  # absent is fine (S3/OSS semantics)
            self._call("DELETE", lambda: self._bucket.delete_object(key))

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if len(keys) > 1000:
            raise ObjectStoreError("OSS DeleteMultipleObjects: at most 1,000 keys", errno.EINVAL)
        for key in keys:
            _check_key(key)
        self._call("DELETE-MULTIPLE", lambda: self._bucket.batch_delete_objects(list(keys)))

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        if not 1 <= max_keys <= 1000:
            raise ObjectStoreError("OSS LIST: max_keys must be 1..1000", errno.EINVAL)
        if len(prefix.encode()) > MAX_KEY_BYTES or len(delimiter) > 1:
            raise ObjectStoreError("OSS LIST: invalid prefix or delimiter", errno.EINVAL)
        r = self._call(
            "LIST",
            lambda: self._bucket.list_objects_v2(
                prefix=prefix,
                delimiter=delimiter,
                continuation_token=token or "",
                max_keys=max_keys,
            ),
        )
        objects = []
        for o in r.object_list:
            self._check_listed(o.key, prefix, delimiter, is_prefix=False)
            objects.append(
                ObjectInfo(
                    key=o.key,
                    size=o.size
                    if isinstance(o.size, int) and 0 <= o.size <= MAX_OBJECT_SIZE
                    else -1,
                    etag=_clean_etag(o.etag),
                    last_modified_ns=int(o.last_modified) * 1_000_000_000,
                )
            )
            if objects[-1].size < 0:
                raise BadResponse("OSS LIST: malformed size")
        prefixes = []
        for p in r.prefix_list:
            self._check_listed(p, prefix, delimiter, is_prefix=True)
            prefixes.append(p)
        if len(objects) + len(prefixes) > max_keys:
            raise BadResponse("OSS LIST: more entries than asked for")
        next_token: str | None = None
        if r.is_truncated:
            nt = r.next_continuation_token
            if not isinstance(nt, str) or not 0 < len(nt) <= MAX_TOKEN or nt == token:
                raise BadResponse("OSS LIST: bad continuation token")
            next_token = nt
        return ListPage(tuple(objects), tuple(prefixes), next_token)

    @staticmethod
    def _check_listed(name: object, prefix: str, delimiter: str, *, is_prefix: bool) -> None:
        if (
            not isinstance(name, str)
            or not name.startswith(prefix)
            or not name
            or len(name.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES
        ):
            raise BadResponse("OSS LIST: entry outside the prefix")
        rest = name[len(prefix) :]
        if is_prefix:
            if not delimiter or not rest.endswith(delimiter) or delimiter in rest[:-1]:
                raise BadResponse("OSS LIST: malformed common prefix")
            if rest == delimiter and not prefix:
                raise BadResponse("OSS LIST: malformed common prefix")
        elif delimiter and delimiter in rest:
            raise BadResponse("OSS LIST: entry below the delimiter")

    def create_multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
    ) -> str:
        _check_key(key)
        headers = {"Content-Type": content_type, **_meta_out(metadata)}
        r = self._call("INIT-MULTIPART", lambda: self._bucket.init_multipart_upload(key, headers))
        upload_id = r.upload_id
        if not isinstance(upload_id, str) or not _UPLOAD_ID_RE.fullmatch(upload_id):
            raise BadResponse("OSS INIT-MULTIPART: malformed upload id")
        return upload_id

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        _check_key(key)
        _check_part(part_number)
        r = self._call(
            "UPLOAD-PART",
            lambda: self._bucket.upload_part(key, upload_id, part_number, rewind(body)),
        )
        return _clean_etag(r.etag)

    def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, src_key: str, start: int, length: int
    ) -> str:
        _check_key(key)
        _check_key(src_key)
        _check_part(part_number)
        if start < 0 or length < 1:
            raise ObjectStoreError("OSS UPLOAD-PART-COPY: empty or negative range", errno.EINVAL)
        r = self._call(
            "UPLOAD-PART-COPY",
            lambda: self._bucket.upload_part_copy(
                self.bucket_name,
                src_key,
                (start, start + length - 1),
                key,
                upload_id,
                part_number,
            ),
        )
        return _clean_etag(r.etag)

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        _check_key(key)
        numbers = [n for n, _ in parts]
        if not parts or numbers != sorted(set(numbers)):
            raise ObjectStoreError("OSS COMPLETE: parts must be unique and ascending", errno.EINVAL)
        for n, etag in parts:
            _check_part(n)
            _clean_etag(etag)
        infos = [oss2.models.PartInfo(n, etag.strip('"')) for n, etag in parts]
        r = self._call(
            "COMPLETE-MULTIPART",
            lambda: self._bucket.complete_multipart_upload(key, upload_id, infos),
        )
        return _clean_etag(r.etag)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        _check_key(key)
        with contextlib.suppress(ObjectNotFound):  # NoSuchUpload: already gone
            self._call(
                "ABORT-MULTIPART", lambda: self._bucket.abort_multipart_upload(key, upload_id)
            )

    def list_uploads(
        self,
        prefix: str,
        *,
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> UploadPage:
        """One page of ListMultipartUploads (``GET /?uploads``, no delimiter), checked as
        :meth:`list` checks its pages: every key under ``prefix``, ids well formed, no
        longer than asked for, and a truncated page's markers must move on."""
        if not 1 <= max_uploads <= 1000:
            raise ObjectStoreError("OSS LIST-UPLOADS: max_uploads must be 1..1000", errno.EINVAL)
        if len(prefix.encode()) > MAX_KEY_BYTES:
            raise ObjectStoreError("OSS LIST-UPLOADS: invalid prefix", errno.EINVAL)
        r = self._call(
            "LIST-UPLOADS",
            lambda: self._bucket.list_multipart_uploads(
                prefix=prefix,
                key_marker=key_marker,
                upload_id_marker=upload_id_marker if key_marker else "",
                max_uploads=max_uploads,
            ),
        )
        if r.prefix_list or len(r.upload_list) > max_uploads:
            raise BadResponse("OSS LIST-UPLOADS: more entries than asked for")
        uploads = []
        for u in r.upload_list:
            self._check_listed(u.key, prefix, "", is_prefix=False)
            if not isinstance(u.upload_id, str) or not _UPLOAD_ID_RE.fullmatch(u.upload_id):
                raise BadResponse("OSS LIST-UPLOADS: malformed upload id")
            uploads.append(UploadInfo(u.key, u.upload_id))
        next_marker: tuple[str, str] | None = None
        if r.is_truncated:
            next_marker = next_upload_markers(
                r.next_key_marker,
                r.next_upload_id_marker,
                (key_marker, upload_id_marker),
                max_key_bytes=MAX_KEY_BYTES,
                max_id=MAX_TOKEN,
                what="OSS LIST-UPLOADS",
            )
        return UploadPage(tuple(uploads), next_marker)


def _lists_uploads(t: OssTransport) -> UploadLister:
    """mypy proves OssTransport is an UploadLister (structural check, never called)."""
    return t


def _conforms(t: OssTransport) -> ObjectTransport:
    """mypy proves OssTransport is an ObjectTransport (structural check, never called)."""
    return t
