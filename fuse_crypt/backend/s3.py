"""``S3Transport``: the :class:`ObjectTransport` over boto3 (AWS S3, MinIO, Ceph, OSS's S3 API).

Why these choices:

* **https only**, unless the caller opts in with ``allow_insecure_http`` (loopback
  tests); the endpoint is operator configuration, and plain http hands the host both
  credentials' use and the ciphertext stream to tamper with at leisure.
* ``ca_bundle`` pins the CA set for the endpoint (``verify=<file>``); without it the
  system store is used.  ``AWS_CA_BUNDLE`` and friends in the environment are ignored
  when a bundle is given.
* Credentials are only what the caller passes (never botocore's search of env vars,
  ``~/.aws`` or instance metadata, which inside a TEE would be host-controlled): fixed
  keys, or a ``credential_source`` re-read every ``refresh_seconds`` (expiring STS
  credentials rotated into their source by the CSI plugin, without a remount).
* Bounded in size and time: connect/read timeouts, at most ``max_body`` bytes per GET
  (read in pieces against a deadline, so a slow-drip server cannot hold a worker
  forever), listings and metadata checked against S3's own limits.
* botocore errors become the typed :mod:`.transport` errors; messages carry the
  operation, the HTTP status and a sanitised S3 error code, never a body, a key's
  content or a credential.
* botocore's own retries are limited to ``max_attempts`` (default 3, "standard" mode
  with backoff and jitter); a retrying wrapper above may take over (set 1 then).

Limitation: botocore reads *error* response bodies whole before parsing them; a
hostile endpoint can make one error response large (bounded only by the read timeout).
"""

from __future__ import annotations

import calendar
import contextlib
import copy
import datetime
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .transport import (
    SPOOL_PIECE,
    AccessDenied,
    BadResponse,
    Body,
    CredentialsRejected,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    SpoolRange,
    TransientError,
    UploadInfo,
    UploadLister,
    UploadPage,
    exact_buffer,
    next_upload_markers,
)

__all__ = ["S3Transport"]

_CODE_RE = re.compile(r"[A-Za-z0-9.]{1,64}")
_UPLOAD_ID_RE = re.compile(r"[\x21-\x7e]{1,1024}")
_ETAG_RE = re.compile(r'"?([A-Za-z0-9-]{1,80})"?')
_META_MAX = 8192
_LIST_MAX = 1000
#: Body pieces read per call: 4 per 1 MiB chunk (each read through urllib3 costs tens of
#: microseconds of Python; 64 KiB pieces cost ~15% more daemon CPU on a sequential read,
#: 1.46-1.70 against 1.15-1.41 CPU-s per 256 MiB in an A/B over moto), while the transient
#: copy next to the chunk buffer stays small.
_READ_PIECE = 256 << 10
_NOT_FOUND = frozenset({"NoSuchKey", "NoSuchUpload", "NotFound", "404"})
_TRANSIENT = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)
_DENIED = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"}
)
# Denials that mean "these credentials are no good" (an expired or replaced STS session, an
# unknown key), as opposed to a policy refusal: retried once newer credentials arrive.
_CREDS_REJECTED = frozenset(
    {"InvalidAccessKeyId", "ExpiredToken", "InvalidToken", "TokenRefreshRequired"}
)


def _bodiless_refusal(e: Any) -> bool:
    """A 400 or 403 whose answer had no error document (botocore then names the code
    after the status): what S3 answers a refused HEAD."""
    resp = e.response if isinstance(e.response, Mapping) else {}
    err = resp.get("Error") or {}
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return status in (400, 403) and isinstance(err, Mapping) and err.get("Code") == str(status)


class _RangeNotSatisfiable(ObjectStoreError):
    """416: a GET that starts at or past the end (answered as an empty read)."""


def _code(err: Mapping[str, Any]) -> str:
    code = err.get("Code")
    return code if isinstance(code, str) and _CODE_RE.fullmatch(code) else "?"


def _body(body: Body) -> Any:
    """What botocore is given to send: bytes, or a spool view from its start whose reads
    are short (<= SPOOL_PIECE): botocore hashes the payload in 1 MiB reads, with up
    to ``parallel`` parts in flight that was a few MiB of the daemon's 64 MiB budget."""
    if isinstance(body, SpoolRange):
        return body.capped(SPOOL_PIECE)
    return bytes(body)


def _etag(value: object) -> str:
    if not isinstance(value, str):
        raise BadResponse("missing ETag")
    m = _ETAG_RE.fullmatch(value.strip())
    if m is None:
        raise BadResponse("malformed ETag")
    return m.group(1)


def _ns(value: object) -> int:
    if value is None:
        return 0
    try:
        ts = calendar.timegm(value.utctimetuple())  # type: ignore[attr-defined]
        micro = int(value.microsecond)  # type: ignore[attr-defined]
    except (AttributeError, TypeError, ValueError, OverflowError):
        return 0
    return ts * 1_000_000_000 + micro * 1000


def _meta(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, str] = {}
    total = 0
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise BadResponse("malformed metadata")
        total += len(k) + len(v)
        if total > _META_MAX:
            raise BadResponse("metadata over the size bound")
        out[k.lower()] = v
    return out


def _size(value: object) -> int:
    if not isinstance(value, int) or value < 0 or value > 5 << 40:
        raise BadResponse("malformed size")
    return value


class CredentialRefreshError(Exception):
    """The credential source failed (its message is not kept: it may name secrets)."""


def _refreshing_session(source: Callable[[], tuple[str, str, str | None]], every: float) -> Any:
    """A botocore session whose credentials are re-read from ``source`` about every
    ``every`` seconds (botocore refreshes them before a request once they are due), so
    expiring STS credentials rotated into their source are picked up without a remount.
    A failing source keeps the last credentials until they are due for good, then
    requests fail with AccessDenied."""
    import botocore.credentials
    import botocore.session

    def fetch() -> dict[str, Any]:
        try:
            ak, sk, token = source()
        except Exception:  # noqa: BLE001 - any failure of the source, typed, no text
            raise CredentialRefreshError("credential source failed") from None
        expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=every + 30)
        return {
            "access_key": ak,
            "secret_key": sk,
            "token": token,
            "expiry_time": expiry.isoformat(),
        }

    creds = botocore.credentials.RefreshableCredentials.create_from_metadata(
        fetch(), fetch, "coco-credential-source", advisory_timeout=30, mandatory_timeout=5
    )
    session = botocore.session.Session()
    session._credentials = creds  # the one hook botocore offers for given credentials
    return session


#: The S3 operations this transport calls: the client's service model is cut down to
#: these (and the shapes they reach), see :func:`_slim_model`.  ``HeadBucket`` is called by
#: botocore itself, not by us: its region redirector answers a HEAD refused with a bare
#: 301/400 (an expired or replaced session token, on HEAD) by a HEAD of the bucket to look
#: for ``x-amz-bucket-region``; without the operation that lookup died with an
#: AttributeError that escaped the error mapping.
_OPERATIONS = frozenset(
    {
        "HeadBucket",
        "HeadObject",
        "GetObject",
        "PutObject",
        "CopyObject",
        "DeleteObject",
        "DeleteObjects",
        "ListObjectsV2",
        "CreateMultipartUpload",
        "UploadPart",
        "UploadPartCopy",
        "CompleteMultipartUpload",
        "AbortMultipartUpload",
        "ListMultipartUploads",
    }
)


def _slim_model(model: dict[str, Any]) -> dict[str, Any]:
    """The S3 service model with only :data:`_OPERATIONS` and the shapes they reach.

    Why: the full model is ~100 operations and ~1,000 shapes, 3+ MiB of Python objects
    that the client keeps for its whole life; the daemon's RSS budget (64 MiB with
    caches full) cannot pay for operations it never calls. Shapes are walked from each
    kept operation's input, output and errors through members, list members and map
    keys/values."""
    ops = {k: v for k, v in model.get("operations", {}).items() if k in _OPERATIONS}
    shapes = model.get("shapes", {})
    keep: set[str] = set()
    todo: list[str] = []
    for op in ops.values():
        for ref in [op.get("input"), op.get("output"), *op.get("errors", [])]:
            if isinstance(ref, Mapping) and isinstance(ref.get("shape"), str):
                todo.append(ref["shape"])
    while todo:
        name = todo.pop()
        if name in keep or name not in shapes:
            continue
        keep.add(name)
        shape = shapes[name]
        refs = list((shape.get("members") or {}).values())
        refs += [shape.get(k) for k in ("member", "key", "value")]
        todo += [r["shape"] for r in refs if isinstance(r, Mapping) and "shape" in r]
    out = {k: v for k, v in model.items() if k not in ("operations", "shapes", "documentation")}
    out["operations"] = ops
    out["shapes"] = {k: shapes[k] for k in shapes if k in keep}
    # A fresh copy: the kept pieces are scattered through the pages the parser filled,
    # and would pin them all; copied, the whole parse can be freed.
    return copy.deepcopy(out)


def _slim_loader() -> Any:
    """botocore's data loader, reading botocore's own data only (never ``~/.aws/models``
    or ``AWS_DATA_PATH``: inside a TEE those are the host's), handing out a cut-down S3
    model (:func:`_slim_model`) and a single-partition endpoints table.

    Why: building one S3 client otherwise parses ~11 MiB of JSON into Python objects
    (the endpoints table of every AWS partition and service alone is 6.7 MiB) and
    keeps most of it; with these cuts the client costs ~2 MiB and the parse peak is
    smaller. The loader's cache is cleared after the client is built (see
    :meth:`S3Transport._drop_build_caches`)."""
    import botocore.exceptions
    import botocore.loaders

    class SlimLoader(botocore.loaders.Loader):  # type: ignore[misc]
        def load_data_with_path(self, name: str) -> Any:
            # The two big files are cut right after parsing and never cached whole,
            # so the full parse is freed before the client build goes on (its pages
            # are then reused instead of pinned by what the build keeps).
            slim = _SLIM_FILES.get(name.split("/")[0] if "/" in name else name)
            if slim is None or not (name == "endpoints" or name.endswith("/service-2")):
                return super().load_data_with_path(name)
            for path in self._potential_locations(name):
                found = self.file_loader.load_file(path)
                if found is not None:
                    return slim(found), path
            raise botocore.exceptions.DataNotFoundError(data_path=name)

    return SlimLoader(
        extra_search_paths=[botocore.loaders.Loader.BUILTIN_DATA_PATH],
        include_default_search_paths=False,
    )


def _slim_endpoints(data: Mapping[str, Any]) -> dict[str, Any]:
    """The endpoints table with every partition's ``services`` cut to ``s3`` (the
    partitions' regions and defaults stay, so region/partition resolution is
    unchanged)."""
    parts = []
    for p in data.get("partitions", []):
        if isinstance(p, Mapping):
            p = dict(p)
            services = p.get("services") or {}
            p["services"] = {k: v for k, v in services.items() if k == "s3"}
        parts.append(p)
    return copy.deepcopy({**data, "partitions": parts})


#: Data files cut down as they are loaded: ``endpoints`` and ``s3/<version>/service-2``.
_SLIM_FILES: dict[str, Callable[[Any], Any]] = {"endpoints": _slim_endpoints, "s3": _slim_model}


_CRANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/(?:[0-9]{1,19}|\*)")


class _S3Stream:
    """An open GET's body read in exact pieces (:class:`ObjectStream`)."""

    def __init__(self, body: Any, left: int, max_body: int, deadline: float) -> None:
        self._body = body
        self._left = left
        self._max = max_body
        self._deadline = deadline
        self._broken = False

    def read_exact(self, n: int, into: bytearray | None = None) -> bytearray:
        import botocore.exceptions as bx

        if n <= 0 or n > self._max or n > self._left:
            raise BadResponse("stream: read past the requested range")
        buf = exact_buffer(n, into)
        deadline = time.monotonic() + self._deadline
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                piece = self._body.read(min(_READ_PIECE, n - got))
                if not piece:
                    raise TransientError("stream: ended early")
                view[got : got + len(piece)] = piece
                got += len(piece)
                if time.monotonic() > deadline:
                    raise TransientError("stream: body too slow")
        except (bx.ReadTimeoutError, bx.ResponseStreamingError, bx.BotoCoreError, OSError) as e:
            self._left, self._broken = 0, True
            if isinstance(e, ObjectStoreError):
                raise
            raise TransientError(f"stream: {type(e).__name__}") from None
        finally:
            view.release()
        self._left -= n
        return buf

    def close(self) -> None:
        """Drop the connection, unless the body was read to its end: that one goes
        back to the pool (as after :meth:`S3Transport.get_buffer`)."""
        whole = self._left == 0 and not self._broken
        self._left, self._broken = 0, True
        if not whole:
            with contextlib.suppress(Exception):
                self._body.close()
            return
        with contextlib.suppress(Exception):
            if self._body.read(1):  # the end of the body, which releases the connection
                self._body.close()


class S3Transport:
    """One S3 bucket via boto3 (see the module docstring for the bounds and rules)."""

    def __init__(
        self,
        bucket: str,
        *,
        access_key: str = "",
        secret_key: str = "",
        session_token: str | None = None,
        credential_source: Callable[[], tuple[str, str, str | None]] | None = None,
        credential_box: Any = None,
        refresh_seconds: float = 60.0,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        ca_bundle: str | None = None,
        allow_insecure_http: bool = False,
        path_style: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        request_deadline: float = 300.0,
        max_body: int = 64 << 20,
        max_attempts: int = 3,
        max_pool: int = 16,
    ) -> None:
        import botocore.config
        import botocore.session

        if endpoint_url is not None:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("https", "http") or not parts.hostname:
                raise ValueError("endpoint must be an https:// URL")
            if parts.scheme == "http" and not allow_insecure_http:
                raise ValueError("plain-http endpoint refused (allow_insecure_http not set)")
            if parts.username or parts.password or parts.query or parts.fragment:
                raise ValueError("endpoint must not carry credentials, a query or a fragment")
        self.bucket = bucket
        self.max_body = max_body
        self.request_deadline = request_deadline
        config = botocore.config.Config(
            region_name=region,
            signature_version="s3v4",
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max(1, max_attempts), "mode": "standard"},
            max_pool_connections=max_pool,
            s3={"addressing_style": "path" if path_style else "virtual"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            proxies={},
        )
        if credential_box is not None:
            # Swapped credentials (fuse_crypt/backend/credentials.py) are read per request.
            bsession = botocore.session.Session()
            bsession._credentials = credential_box.botocore_credentials()
        elif credential_source is not None:
            bsession = _refreshing_session(credential_source, refresh_seconds)
        else:
            if not access_key or not secret_key:
                raise ValueError("no credentials")
            bsession = botocore.session.Session()
            bsession.set_credentials(access_key, secret_key, session_token)
        bsession.register_component("data_loader", _slim_loader())
        verify: bool | str = ca_bundle if ca_bundle is not None else True
        # boto3's client *is* this botocore client; building it without boto3's session
        # layer skips boto3's import and its s3transfer method injection (~3 MiB of the
        # daemon's 64 MiB budget, docs/fuse_crypt.md "Daemon memory"); we call only
        # the client's own operations.
        self._client = bsession.create_client(
            "s3", region_name=region, endpoint_url=endpoint_url, config=config, verify=verify
        )
        self._drop_build_caches(bsession)

    @staticmethod
    def _drop_build_caches(bsession: Any) -> None:
        """Free what botocore keeps only to build more clients: the loader's cache of
        parsed JSON and the endpoints table (the client has its endpoint and its rule
        set already). The mount daemon then collects and trims the heap once."""
        with contextlib.suppress(Exception):
            bsession.get_component("data_loader")._cache.clear()
        with contextlib.suppress(Exception):
            bsession._internal_components._components.pop("endpoint_resolver", None)

    def __repr__(self) -> str:
        return f"S3Transport(bucket={self.bucket!r})"

    # -- error mapping -----------------------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> Any:
        import botocore.exceptions as bx

        try:
            return getattr(self._client, op)(Bucket=self.bucket, **kwargs)
        except bx.ClientError as e:
            if op == "head_object" and _bodiless_refusal(e):
                raise self._explain_head_refusal(kwargs["Key"], e) from None
            raise self._client_error(op, e) from None
        except (
            bx.ConnectTimeoutError,
            bx.ReadTimeoutError,
            bx.EndpointConnectionError,
            bx.ConnectionClosedError,
            bx.ResponseStreamingError,
        ) as e:
            raise TransientError(f"{op}: {type(e).__name__}") from None
        except (bx.NoCredentialsError, CredentialRefreshError):
            raise AccessDenied(f"{op}: no usable credentials") from None
        except bx.SSLError:
            raise ObjectStoreError(f"{op}: TLS verification failed") from None
        except bx.BotoCoreError as e:
            raise ObjectStoreError(f"{op}: {type(e).__name__}") from None

    def _explain_head_refusal(self, key: str, e: Any) -> ObjectStoreError:
        """Why a HEAD was refused, when its answer could not say: a HEAD answer has no
        body, so a revoked key, a replaced or expired session token and a policy refusal
        all arrive as a bare 403 (or 400), and only the first two are worth waiting for
        newer credentials (CredentialsRejected; a bare 403 was AccessDenied, EACCES at
        once, so ``stat`` failed for good while the plugin was rotating keys).  The same
        request as a GET of the object's first byte is refused for the same reason, with
        an error document that names it.  Only a credential code from that answer changes
        the HEAD's classification; anything else (success, 404, another refusal, a
        transport failure) leaves it as it was.  Costs one request, on refusals only."""
        import botocore.exceptions as bx

        first = self._client_error("head_object", e)
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=key, Range="bytes=0-0")
        except bx.ClientError as pe:
            probe = self._client_error("head_object", pe)
            return probe if isinstance(probe, CredentialsRejected) else first
        except (bx.BotoCoreError, OSError, ValueError):
            return first
        body = r.get("Body") if isinstance(r, Mapping) else None
        with contextlib.suppress(Exception):
            if body is not None:
                body.close()  # not read: a hostile answer's size does not matter
        return first

    @staticmethod
    def _client_error(op: str, e: Any) -> ObjectStoreError:
        resp = e.response if isinstance(e.response, Mapping) else {}
        err = resp.get("Error") or {}
        meta = resp.get("ResponseMetadata") or {}
        status = meta.get("HTTPStatusCode")
        status = status if isinstance(status, int) else 0
        code = _code(err) if isinstance(err, Mapping) else "?"
        msg = f"{op}: HTTP {status} {code}"
        if status == 404 or code in _NOT_FOUND:
            return ObjectNotFound(msg)
        if status == 416 or code == "InvalidRange":
            return _RangeNotSatisfiable(msg)
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailed(msg)
        if code in _CREDS_REJECTED and status in (0, 400, 403):
            return CredentialsRejected(msg)
        if status == 403 or code in _DENIED:
            return AccessDenied(msg)
        if status >= 500 or status in (408, 429) or code in _TRANSIENT:
            return TransientError(msg)
        return ObjectStoreError(msg)

    # -- ObjectTransport ---------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo:
        r = self._call("head_object", Key=key)
        ctype = r.get("ContentType")
        return ObjectInfo(
            key,
            _size(r.get("ContentLength")),
            _etag(r.get("ETag")),
            _ns(r.get("LastModified")),
            _meta(r.get("Metadata")),
            ctype if isinstance(ctype, str) and len(ctype) <= 256 else "",
        )

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        if start < 0 or (length is not None and length < 0):
            raise ValueError("negative range")
        if length == 0:
            return b""
        want = self.max_body if length is None else min(length, self.max_body)
        if length is not None and length > self.max_body:
            raise BadResponse("get: range larger than max_body")
        body = self._get_body(key, start, want, length is None)
        if body is None:
            return b""
        parts: list[bytes] = []
        self._read_body(body, want, length is None, parts.append)
        return b"".join(parts)

    def get_buffer(self, key: str, start: int, length: int) -> bytearray:
        """:meth:`get` of a bounded range into one buffer allocated up front, returned
        as is: the body is held once (no list of pieces joined into a second copy).
        Why: the read-ahead's chunks are the largest allocations of the daemon, which
        has an RSS budget."""
        if start < 0 or length <= 0:
            raise ValueError("empty or negative range")
        if length > self.max_body:
            raise BadResponse("get: range larger than max_body")
        body = self._get_body(key, start, length, False)
        if body is None:
            return bytearray()
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0

        def sink(piece: bytes) -> None:
            nonlocal got
            view[got : got + len(piece)] = piece
            got += len(piece)

        try:
            self._read_body(body, length, False, sink)
        finally:
            view.release()
        del buf[got:]
        return buf

    def open_stream(self, key: str, start: int, end: int) -> _S3Stream:
        """One GET of ``[start, end)`` to be read chunk by chunk (see
        :class:`ObjectStream`); the answer must be exactly that range (206, the same
        Content-Range, the same length), or it is :class:`BadResponse`."""
        if start < 0 or end <= start:
            raise ValueError("empty or negative range")
        r = self._call("get_object", Key=key, Range=f"bytes={start}-{end - 1}")
        body = r.get("Body")
        if body is None:
            raise BadResponse("stream: no body")
        crange = r.get("ContentRange")
        m = _CRANGE.fullmatch(crange) if isinstance(crange, str) else None
        if (
            m is None
            or int(m.group(1)) != start
            or int(m.group(2)) != end - 1
            or r.get("ContentLength") != end - start
        ):
            body.close()
            raise BadResponse("stream: answer does not match the requested range")
        return _S3Stream(body, end - start, self.max_body, self.request_deadline)

    def _get_body(self, key: str, start: int, want: int, open_ended: bool) -> Any:
        """The streaming body of a ranged GET, or None when the range starts at or past
        the end. Open-ended: one byte more than ``want`` is asked, to tell "too large"
        apart."""
        end = start + want - (0 if open_ended else 1)
        try:
            r = self._call("get_object", Key=key, Range=f"bytes={start}-{end}")
        except _RangeNotSatisfiable:
            return None  # starts at or past the end: an empty short answer
        return r.get("Body")

    def _read_body(
        self, body: Any, want: int, open_ended: bool, sink: Callable[[bytes], None]
    ) -> None:
        """At most ``want`` bytes, handed to ``sink`` piece by piece (one more is an
        error unless the GET was open-ended and ``want`` is the max_body cap), against
        an overall deadline."""
        import botocore.exceptions as bx

        if body is None:
            raise BadResponse("get: no body")
        deadline = time.monotonic() + self.request_deadline
        got = 0
        complete = False
        try:
            while True:
                piece = body.read(min(_READ_PIECE, want + 1 - got))
                if not piece:
                    complete = True
                    break
                got += len(piece)
                if got > want:
                    raise BadResponse(
                        "get: object over max_body" if open_ended else "get: longer than asked"
                    )
                sink(piece)
                if time.monotonic() > deadline:
                    raise TransientError("get: body too slow")
        except (bx.ReadTimeoutError, bx.ResponseStreamingError, OSError) as e:
            if isinstance(e, ObjectStoreError):
                raise
            raise TransientError(f"get: {type(e).__name__}") from None
        finally:
            if not complete:
                body.close()  # drops the connection; a fully read one goes back to the pool

    def put(
        self,
        key: str,
        body: Body,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        kwargs: dict[str, Any] = {
            "Key": key,
            "Body": _body(body),
            "Metadata": dict(metadata),
            "ContentType": content_type,
        }
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        return _etag(self._call("put_object", **kwargs).get("ETag"))

    def copy(
        self,
        src: str,
        dst: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        kwargs: dict[str, Any] = {"Key": dst, "CopySource": {"Bucket": self.bucket, "Key": src}}
        if metadata is not None or content_type is not None:
            # REPLACE sets both: the half not given comes from the source, as OSS's copy does.
            if metadata is None or content_type is None:
                info = self.head(src)
                metadata = info.metadata if metadata is None else metadata
                content_type = content_type or info.content_type or "application/octet-stream"
            kwargs.update(
                MetadataDirective="REPLACE", Metadata=dict(metadata), ContentType=content_type
            )
        r = self._call("copy_object", **kwargs)
        return _etag((r.get("CopyObjectResult") or {}).get("ETag"))

    def delete(self, key: str) -> None:
        self._call("delete_object", Key=key)

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if len(keys) > 1000:
            raise ValueError("at most 1000 keys per request")
        r = self._call(
            "delete_objects",
            Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
        )
        errors = r.get("Errors") or []
        if errors:
            first = errors[0] if isinstance(errors[0], Mapping) else {}
            raise ObjectStoreError(f"delete_objects: {len(errors)} failed ({_code(first)})")

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        kwargs: dict[str, Any] = {"Prefix": prefix, "MaxKeys": max(1, min(max_keys, _LIST_MAX))}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token is not None:
            kwargs["ContinuationToken"] = token
        r = self._call("list_objects_v2", **kwargs)
        contents = r.get("Contents") or []
        prefixes = r.get("CommonPrefixes") or []
        if not isinstance(contents, list) or not isinstance(prefixes, list):
            raise BadResponse("list: malformed")
        if len(contents) + len(prefixes) > _LIST_MAX:
            raise BadResponse("list: page over 1000 entries")
        objs = []
        for c in contents:
            k = c.get("Key") if isinstance(c, Mapping) else None
            if not isinstance(k, str) or len(k) > 1024:
                raise BadResponse("list: malformed key")
            objs.append(
                ObjectInfo(
                    k, _size(c.get("Size")), _etag(c.get("ETag")), _ns(c.get("LastModified"))
                )
            )
        cps = []
        for p in prefixes:
            v = p.get("Prefix") if isinstance(p, Mapping) else None
            if not isinstance(v, str) or len(v) > 1024:
                raise BadResponse("list: malformed prefix")
            cps.append(v)
        nxt = None
        if r.get("IsTruncated"):
            # A truncated page without a usable next token would end the listing early and
            # hide entries (as OssTransport, refused, never taken as the last page).
            nxt = r.get("NextContinuationToken")
            if not isinstance(nxt, str) or not 0 < len(nxt) <= 4096 or nxt == token:
                raise BadResponse("list: malformed continuation token")
        return ListPage(tuple(objs), tuple(cps), nxt)

    def create_multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
    ) -> str:
        r = self._call(
            "create_multipart_upload", Key=key, Metadata=dict(metadata), ContentType=content_type
        )
        uid = r.get("UploadId")
        if not isinstance(uid, str) or not 0 < len(uid) <= 1024:
            raise BadResponse("create_multipart_upload: malformed upload id")
        return uid

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        r = self._call(
            "upload_part", Key=key, UploadId=upload_id, PartNumber=part_number, Body=_body(body)
        )
        if r.get("ETag") is None:
            # The answer lost its headers (a connection cut inside them): the part may or
            # may not have landed, and sending it again under its number replaces it.
            raise TransientError("S3: upload_part answer without an ETag")
        return _etag(r.get("ETag"))

    def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, src_key: str, start: int, length: int
    ) -> str:
        r = self._call(
            "upload_part_copy",
            Key=key,
            UploadId=upload_id,
            PartNumber=part_number,
            CopySource={"Bucket": self.bucket, "Key": src_key},
            CopySourceRange=f"bytes={start}-{start + length - 1}",
        )
        return _etag((r.get("CopyPartResult") or {}).get("ETag"))

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        r = self._call(
            "complete_multipart_upload",
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": f'"{e}"'} for n, e in parts]},
        )
        return _etag(r.get("ETag"))

    def abort_multipart(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(ObjectNotFound):
            self._call("abort_multipart_upload", Key=key, UploadId=upload_id)

    def list_uploads(
        self,
        prefix: str,
        *,
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> UploadPage:
        """One page of ListMultipartUploads (DeleteVolume's cleanup, never the daemon):
        every key must lie under ``prefix``, every id be one printable token, the page no
        longer than asked for, and a truncated page must name markers that move on."""
        limit = max(1, min(max_uploads, _LIST_MAX))
        kwargs: dict[str, Any] = {"Prefix": prefix, "MaxUploads": limit}
        if key_marker:
            kwargs["KeyMarker"] = key_marker
            if upload_id_marker:
                kwargs["UploadIdMarker"] = upload_id_marker
        r = self._call("list_multipart_uploads", **kwargs)
        uploads = r.get("Uploads") or []
        if not isinstance(uploads, list):
            raise BadResponse("list_uploads: malformed")
        if len(uploads) > limit:
            raise BadResponse("list_uploads: page longer than asked for")
        out = []
        for u in uploads:
            key = u.get("Key") if isinstance(u, Mapping) else None
            uid = u.get("UploadId") if isinstance(u, Mapping) else None
            if (
                not isinstance(key, str)
                or not key.startswith(prefix)
                or not 0 < len(key.encode("utf-8", "surrogatepass")) <= 1024
            ):
                raise BadResponse("list_uploads: key outside the prefix or malformed")
            if not isinstance(uid, str) or not _UPLOAD_ID_RE.fullmatch(uid):
                raise BadResponse("list_uploads: malformed upload id")
            out.append(UploadInfo(key, uid))
        nxt = None
        if r.get("IsTruncated"):
            nxt = next_upload_markers(
                r.get("NextKeyMarker"),
                r.get("NextUploadIdMarker") or "",
                (key_marker, upload_id_marker),
                max_key_bytes=1024,
                max_id=1024,
                what="list_uploads",
            )
        return UploadPage(tuple(out), nxt)


def _lists_uploads(t: S3Transport) -> UploadLister:
    """mypy proves S3Transport is an UploadLister (structural check, never called)."""
    return t
