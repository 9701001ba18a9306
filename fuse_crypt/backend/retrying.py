"""``RetryingTransport``: retries an ObjectTransport's transient failures, and only those.

Why a wrapper: 5xx, throttling (503 SlowDown), timeouts and dropped connections are the
normal weather of an object store, and every client (OSS, S3, fakes) needs the same policy;
as an ``ObjectTransport`` itself it stacks on any of them and is tested in-process with an
injected clock, sleep and random source.

Policy: only :class:`TransientError` is retried, at most ``attempts`` tries in all, with
exponential backoff and *full jitter* (delay = random() x min(max_delay, base_delay x 2^n),
AWS's recommendation: it spreads the retries of many clients after a shared throttle), and
never past ``budget`` seconds since the first try.  When the tries or the budget run out,
the last :class:`TransientError` is raised (``errno`` EIO): still typed as transient, so a
caller that keeps the data (the write spool) may try again later.

Expired credentials (:class:`CredentialsRejected`, with a ``credentials`` box given): the
store did nothing, so any operation is sent again once the box holds newer credentials,
waiting at most ``refresh_wait`` seconds for them and at most ``MAX_REFRESH_RETRIES``
times; then the refusal is raised with errno EIO.

Which operations are safe to repeat (S3/OSS semantics):

* ``head``, ``get``, ``list``, ``delete``, ``delete_many``, ``copy``, ``upload_part``,
  ``upload_part_copy``, ``abort_multipart``: idempotent, repeated as they are.
* ``put``: a whole-object replace is idempotent.  A *create-only* put is not: when an
  attempt failed in flight, the write may have landed, and the retry then meets its own
  object (``PreconditionFailed``).  After a transient failure that answer is checked: if
  the object's ETag is the MD5 of our body and its metadata is ours, the put succeeded.
* ``create_multipart``: repeated; an attempt that succeeded unseen leaves an orphaned
  upload (storage cost only, never visible data; a bucket lifecycle rule aborts those).
* ``complete_multipart``: repeated; when an attempt completed unseen, the retry gets
  ``NoSuchUpload``.  After a transient failure that answer is checked: if the object's
  ETag is the multipart ETag of exactly our parts (``MD5(part MD5s)-N``, as S3 and OSS
  compute it) the upload completed.  Otherwise the ``ObjectNotFound`` stands: the caller's
  previous version is intact and its spool still holds the data.
"""

from __future__ import annotations

import errno
import hashlib
import random as _random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from .transport import (
    Body,
    CredentialsRejected,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    ObjectStream,
    ObjectTransport,
    PreconditionFailed,
    TransientError,
    UploadLister,
    UploadPage,
    body_md5_hex,
    rewind,
)

if TYPE_CHECKING:
    from .credentials import CredentialBox

__all__ = ["RetryingTransport"]

#: How many credential refreshes one request may wait for before it fails with EIO.
MAX_REFRESH_RETRIES = 3

T = TypeVar("T")


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def multipart_etag(parts: Sequence[tuple[int, str]]) -> str | None:
    """``MD5(concatenated binary part MD5s)-N`` (lower-case), or None if a part ETag is
    not an MD5 (then the outcome cannot be recognised)."""
    try:
        digests = b"".join(bytes.fromhex(etag.strip('"')) for _, etag in parts)
    except ValueError:
        return None
    if len(digests) != 16 * len(parts):
        return None
    return f"{_md5_hex(digests)}-{len(parts)}"


class RetryingTransport:
    """An ObjectTransport that retries ``inner``'s :class:`TransientError` failures."""

    def __init__(
        self,
        inner: ObjectTransport,
        *,
        attempts: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
        budget: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        random: Callable[[], float] = _random.random,
        on_retry: Callable[[str, int, TransientError], None] | None = None,
        credentials: CredentialBox | None = None,
        refresh_wait: float = 30.0,
    ) -> None:
        if attempts < 1 or base_delay < 0 or max_delay < 0 or budget < 0:
            raise ValueError("retry policy values must be positive")
        self.inner = inner
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.budget = budget
        self._clock, self._sleep, self._random = clock, sleep, random
        self._on_retry = on_retry
        self.credentials = credentials
        self.refresh_wait = refresh_wait

    def _run(self, op: str, fn: Callable[[], T], retried: list[bool] | None = None) -> T:
        """``fn`` until it succeeds, fails for good, or the tries or budget run out.
        ``retried[0]`` is set once an attempt has failed transiently."""
        start = self._clock()
        attempt = 0
        refreshes = 0
        while True:
            attempt += 1
            version = self.credentials.version if self.credentials is not None else 0
            try:
                return fn()
            except CredentialsRejected:
                # Expired or replaced credentials: nothing was done by the store, so the
                # request is safe to send again once newer ones arrive (bounded wait).
                box = self.credentials
                if box is None:
                    raise
                refreshes += 1
                if refreshes > MAX_REFRESH_RETRIES or not box.wait_newer(
                    version, self.refresh_wait if box.version == version else 0.0
                ):
                    raise CredentialsRejected(
                        f"{op}: the object store rejected the credentials and no newer ones "
                        f"arrived within {self.refresh_wait:.0f}s",
                        errno.EIO,
                    ) from None
                attempt -= 1  # a credential refresh is not a transient failure
            except TransientError as e:
                if retried is not None:
                    retried[0] = True
                cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
                delay = self._random() * cap
                spent = self._clock() - start
                if attempt >= self.attempts or spent + delay > self.budget:
                    raise TransientError(
                        f"{e.strerror} (gave up after {attempt} attempts, {spent:.1f}s)"
                    ) from e
                if self._on_retry is not None:
                    self._on_retry(op, attempt, e)
                self._sleep(delay)

    # -- idempotent operations ----------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo:
        return self._run("head", lambda: self.inner.head(key))

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        return self._run("get", lambda: self.inner.get(key, start, length))

    def get_buffer(self, key: str, start: int, length: int) -> bytes | bytearray:
        """The inner transport's ``get_buffer`` (a GET into one buffer, returned without
        a copy) when it has one, else its ``get``; retried like :meth:`get`."""
        fn = getattr(self.inner, "get_buffer", None)
        if fn is None:
            return self.get(key, start, length)
        data: bytes | bytearray = self._run("get", lambda: fn(key, start, length))
        return data

    @property
    def open_stream(self) -> Callable[[str, int, int], ObjectStream] | None:
        """The inner transport's ``open_stream`` (None when it has none), not retried:
        a stream that fails to open or breaks makes the backend fall back to
        :meth:`get_buffer`, which is."""
        fn: Callable[[str, int, int], ObjectStream] | None = getattr(
            self.inner, "open_stream", None
        )
        return fn

    def copy(
        self,
        src: str,
        dst: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        return self._run(
            "copy",
            lambda: self.inner.copy(src, dst, metadata=metadata, content_type=content_type),
        )

    def delete(self, key: str) -> None:
        self._run("delete", lambda: self.inner.delete(key))

    def delete_many(self, keys: Sequence[str]) -> None:
        self._run("delete_many", lambda: self.inner.delete_many(keys))

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        return self._run(
            "list",
            lambda: self.inner.list(prefix, delimiter=delimiter, token=token, max_keys=max_keys),
        )

    def create_multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
    ) -> str:
        return self._run(
            "create_multipart",
            lambda: self.inner.create_multipart(key, metadata=metadata, content_type=content_type),
        )

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        # Every attempt sends the body from its first byte (a SpoolRange the failed
        # attempt read part of is sought back; bytes are unchanged).
        return self._run(
            "upload_part",
            lambda: self.inner.upload_part(key, upload_id, part_number, rewind(body)),
        )

    def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, src_key: str, start: int, length: int
    ) -> str:
        return self._run(
            "upload_part_copy",
            lambda: self.inner.upload_part_copy(
                key, upload_id, part_number, src_key, start, length
            ),
        )

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._run("abort_multipart", lambda: self.inner.abort_multipart(key, upload_id))

    def list_uploads(
        self,
        prefix: str,
        *,
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> UploadPage:
        """The inner transport's ListMultipartUploads (a read: repeated as it is)."""
        fn: Callable[..., UploadPage] | None = getattr(self.inner, "list_uploads", None)
        if fn is None:
            raise ObjectStoreError("list_uploads: this transport cannot list uploads")
        return self._run(
            "list_uploads",
            lambda: fn(
                prefix,
                key_marker=key_marker,
                upload_id_marker=upload_id_marker,
                max_uploads=max_uploads,
            ),
        )

    # -- the two whose retry can meet its own success ----------------------------------------

    def put(
        self,
        key: str,
        body: Body,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        retried = [False]
        try:
            return self._run(
                "put",
                lambda: self.inner.put(
                    key,
                    rewind(body),
                    metadata=metadata,
                    content_type=content_type,
                    if_none_match=if_none_match,
                ),
                retried,
            )
        except PreconditionFailed:
            if not (if_none_match and retried[0]):
                raise
            info = self._landed(key)
            want = {k.lower(): v for k, v in metadata.items()}
            if (
                info is None
                or info.etag.strip('"').lower() != body_md5_hex(body)
                or dict(info.metadata) != want
            ):
                raise
            return info.etag

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        retried = [False]
        try:
            return self._run(
                "complete_multipart",
                lambda: self.inner.complete_multipart(key, upload_id, parts),
                retried,
            )
        except ObjectNotFound:
            if not retried[0]:
                raise
            want = multipart_etag(parts)
            info = self._landed(key)
            if want is None or info is None or info.etag.strip('"').lower() != want:
                raise
            return info.etag

    def _landed(self, key: str) -> ObjectInfo | None:
        """HEAD after an ambiguous failure; None when that fails too."""
        try:
            return self.head(key)
        except ObjectStoreError:
            return None


def _conforms(t: RetryingTransport) -> ObjectTransport:
    """mypy proves RetryingTransport is an ObjectTransport (structural check, never called)."""
    return t


def _lists_uploads(t: RetryingTransport) -> UploadLister:
    """mypy proves RetryingTransport is an UploadLister (structural check, never called)."""
    return t
