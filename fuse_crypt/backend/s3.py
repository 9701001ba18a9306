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
import datetime
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .transport import (
    AccessDenied,
    BadResponse,
    CredentialsRejected,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    TransientError,
)

__all__ = ["S3Transport"]

_CODE_RE = re.compile(r"[A-Za-z0-9.]{1,64}")
_ETAG_RE = re.compile(r'"?([A-Za-z0-9-]{1,80})"?')
_META_MAX = 8192
_LIST_MAX = 1000
_READ_PIECE = 1 << 20
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


class _RangeNotSatisfiable(ObjectStoreError):
    """416: a GET that starts at or past the end (answered as an empty read)."""


def _code(err: Mapping[str, Any]) -> str:
    code = err.get("Code")
    return code if isinstance(code, str) and _CODE_RE.fullmatch(code) else "?"


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
        import boto3
        import botocore.config

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
            import botocore.session

            bsession = botocore.session.Session()
            bsession._credentials = credential_box.botocore_credentials()
            session = boto3.session.Session(botocore_session=bsession, region_name=region)
        elif credential_source is not None:
            session = boto3.session.Session(
                botocore_session=_refreshing_session(credential_source, refresh_seconds),
                region_name=region,
            )
        else:
            if not access_key or not secret_key:
                raise ValueError("no credentials")
            session = boto3.session.Session(
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                aws_session_token=session_token,
                region_name=region,
            )
        verify: bool | str = ca_bundle if ca_bundle is not None else True
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config, verify=verify)

    def __repr__(self) -> str:
        return f"S3Transport(bucket={self.bucket!r})"

    # -- error mapping -----------------------------------------------------------------

    def _call(self, op: str, **kwargs: Any) -> Any:
        import botocore.exceptions as bx

        try:
            return getattr(self._client, op)(Bucket=self.bucket, **kwargs)
        except bx.ClientError as e:
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
        # Open-ended: ask for one byte more than the cap, to tell "too large" apart.
        end = start + want - (0 if length is None else 1)
        kwargs: dict[str, Any] = {"Key": key, "Range": f"bytes={start}-{end}"}
        try:
            r = self._call("get_object", **kwargs)
        except _RangeNotSatisfiable:
            return b""  # starts at or past the end: an empty short answer
        return self._read_body(r.get("Body"), want, length is None)

    def _read_body(self, body: Any, want: int, open_ended: bool) -> bytes:
        """At most ``want`` bytes (one more is an error unless the GET was open-ended
        and ``want`` is the max_body cap), against an overall deadline."""
        import botocore.exceptions as bx

        if body is None:
            raise BadResponse("get: no body")
        deadline = time.monotonic() + self.request_deadline
        parts: list[bytes] = []
        got = 0
        complete = False
        try:
            while True:
                piece = body.read(min(_READ_PIECE, want + 1 - got))
                if not piece:
                    complete = True
                    break
                parts.append(piece)
                got += len(piece)
                if got > want:
                    raise BadResponse(
                        "get: object over max_body" if open_ended else "get: longer than asked"
                    )
                if time.monotonic() > deadline:
                    raise TransientError("get: body too slow")
        except (bx.ReadTimeoutError, bx.ResponseStreamingError, OSError) as e:
            if isinstance(e, ObjectStoreError):
                raise
            raise TransientError(f"get: {type(e).__name__}") from None
        finally:
            if not complete:
                body.close()  # drops the connection; a fully read one goes back to the pool
        return b"".join(parts)

    def put(
        self,
        key: str,
        body: bytes,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        kwargs: dict[str, Any] = {
            "Key": key,
            "Body": bytes(body),
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
        nxt = r.get("NextContinuationToken") if r.get("IsTruncated") else None
        if nxt is not None and (not isinstance(nxt, str) or not 0 < len(nxt) <= 4096):
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

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes) -> str:
        r = self._call(
            "upload_part", Key=key, UploadId=upload_id, PartNumber=part_number, Body=bytes(body)
        )
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
