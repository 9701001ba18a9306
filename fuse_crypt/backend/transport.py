"""The seam under the object-store backend: one bucket, spoken to object by object.

Why a seam of its own: the object-store backend (the s3fs/ossfs layout, ranged reads,
the ciphertext spool, multipart) is the same whether the bucket is S3, OSS, MinIO or an
in-memory fake; only the wire differs.  Each client (``s3.py`` over boto3, ``oss.py``
over oss2) implements :class:`ObjectTransport` and nothing else, so the layout logic is
tested in-process against a fake, and each client is tested against its real peer
(moto for S3, the protocol-level OSS server in ``tests/peers``).  A retrying wrapper is
just another ``ObjectTransport``.

Conventions every transport keeps:

* Keys are full object keys (the volume prefix already applied), ``/``-separated.
* ``metadata`` is the *user* metadata without the ``x-amz-meta-`` / ``x-oss-meta-``
  prefix, keys lower-cased, values ASCII strings (s3fs writes decimal numbers there).
* Every failure is an :class:`ObjectStoreError` subclass, which is an :class:`OSError`
  carrying the errno the FUSE frontend should answer; no SDK exception escapes.  The
  bucket is hostile: bodies, listings and error documents are bounded by the
  transport (``max_body`` for GETs) and never echoed into messages.
* Messages name the operation and the status, never a body, a credential or a
  signature.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = [
    "AccessDenied",
    "BadResponse",
    "Body",
    "CredentialsRejected",
    "ListPage",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStoreError",
    "ObjectStream",
    "ObjectTransport",
    "PreconditionFailed",
    "SpoolRange",
    "TransientError",
    "UploadInfo",
    "UploadLister",
    "UploadPage",
    "body_md5_hex",
    "exact_buffer",
    "rewind",
]


class ObjectStoreError(OSError):
    """A request failed; ``errno`` is what the filesystem answers for it."""

    default_errno = errno.EIO

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_ if errno_ is not None else self.default_errno, message)


class ObjectNotFound(ObjectStoreError):
    """404: no such key (or no such upload)."""

    default_errno = errno.ENOENT


class PreconditionFailed(ObjectStoreError):
    """412 / 409: a conditional write lost (``If-None-Match: *`` found an object)."""

    default_errno = errno.EEXIST


class AccessDenied(ObjectStoreError):
    """403: bad or expired credentials, or a policy refusal. Not retried."""

    default_errno = errno.EACCES


class CredentialsRejected(AccessDenied):
    """403 because the credentials themselves are no good (an expired STS token, an
    unknown or revoked access key): worth sending again once newer credentials arrive
    (fuse_crypt/backend/credentials.py), unlike a policy refusal."""


class TransientError(ObjectStoreError):
    """5xx, throttling, a timeout or a dropped connection: worth retrying."""

    default_errno = errno.EIO


class BadResponse(ObjectStoreError):
    """The store answered something malformed or over a bound. Not retried."""

    default_errno = errno.EIO


#: The piece a :class:`SpoolRange` yields when iterated.
SPOOL_PIECE = 256 << 10


class SpoolRange:
    """A read-only, seekable file view of bytes ``[offset, offset+length)`` of a spool
    descriptor: an upload body that is never whole in memory.

    Why: the daemon's budget is 64 MiB of RSS (issue 10) and a multipart upload has up
    to ``parallel`` parts of 8 MiB in flight; as ``bytes`` each part was in memory once
    here and often again in the HTTP client.  botocore and oss2/requests accept a file
    body: they take its length from ``len()``, read it in pieces to sign it (SHA-256,
    1 MiB reads) and to send it (16 KiB blocks), and ``seek(0)`` before a retry.  Each
    ``read(n)`` is one ``os.pread`` of ``n`` bytes into the returned object (positional:
    no shared file offset, so several views of one spool can be read at once from
    several threads); iteration yields pieces of :data:`SPOOL_PIECE`.

    The view does not own ``fd`` (closing it is a no-op).  The caller keeps the range
    unchanged while the view is in use; a spool found shorter than the range is an
    ``OSError(EIO)``, never zeros or a short body (which the store would store)."""

    __slots__ = ("_cap", "_fd", "_len", "_off", "_pos")

    def __init__(self, fd: int, offset: int, length: int, max_read: int | None = None) -> None:
        if offset < 0 or length < 0 or (max_read is not None and max_read < 1):
            raise ValueError("negative range")
        self._fd, self._off, self._len, self._pos = fd, offset, length, 0
        self._cap = max_read

    def capped(self, max_read: int) -> SpoolRange:
        """A new view of the same range, from its start, whose reads return at most
        ``max_read`` bytes (short reads, as a raw file's).  For clients that loop until
        EOF anyway (botocore hashes in 1 MiB reads); not for oss2, whose CRC adapter
        counts the bytes it asked for, not those it got."""
        return SpoolRange(self._fd, self._off, self._len, max_read)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"SpoolRange(offset={self._off}, length={self._len})"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._len}.get(whence)
        if base is None:
            raise ValueError("bad whence")
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (the rest when ``size`` is None or negative: only for
        small ranges), exactly that many unless the range ends first."""
        left = max(0, self._len - self._pos)
        want = left if size is None or size < 0 else min(size, left)
        if self._cap is not None:
            want = min(want, self._cap)
        if want == 0:
            return b""
        # One pread into the bytes returned (no second buffer to join or copy: a
        # client's read(n) costs n bytes, not 2n); a short read (the spool's end) loops.
        out = os.pread(self._fd, want, self._off + self._pos)
        if len(out) < want:
            pieces = [out]
            got = len(out)
            while got < want:
                piece = os.pread(self._fd, want - got, self._off + self._pos + got)
                if not piece:
                    raise OSError(errno.EIO, "spool shorter than the upload range")
                pieces.append(piece)
                got += len(piece)
            out = b"".join(pieces)
        self._pos += want
        return out

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        memoryview(buf)[: len(data)] = data
        return len(data)

    def __iter__(self) -> SpoolRange:
        return self

    def __next__(self) -> bytes:
        piece = self.read(SPOOL_PIECE)
        if not piece:
            raise StopIteration
        return piece

    def __bytes__(self) -> bytes:
        """The whole range (for small bodies and test fakes); the position is kept."""
        pos = self._pos
        try:
            self._pos = 0
            return b"".join(iter(lambda: self.read(SPOOL_PIECE), b""))
        finally:
            self._pos = pos

    def md5_hex(self) -> str:
        """MD5 of the whole range, read piece by piece; the position is kept."""
        h = hashlib.md5(usedforsecurity=False)
        pos = self._pos
        try:
            self._pos = 0
            while piece := self.read(SPOOL_PIECE):
                h.update(piece)
        finally:
            self._pos = pos
        return h.hexdigest()

    def close(self) -> None:
        """Nothing to release: the spool descriptor belongs to the caller."""


#: What ``put`` and ``upload_part`` send: bytes, or a view of the spool.
Body = bytes | SpoolRange


def body_md5_hex(body: Body) -> str:
    """MD5 (hex) of an upload body, without holding a :class:`SpoolRange` whole."""
    if isinstance(body, SpoolRange):
        return body.md5_hex()
    return hashlib.md5(body, usedforsecurity=False).hexdigest()


def exact_buffer(n: int, into: bytearray | None) -> bytearray:
    """The buffer an :meth:`ObjectStream.read_exact` fills: ``into`` (which must be
    exactly ``n`` bytes: a reused buffer of another size would leave stale bytes or
    be overrun), or a new one."""
    if into is None:
        return bytearray(n)
    if len(into) != n:
        raise ValueError("read_exact: buffer is not the size asked for")
    return into


def rewind(body: Body) -> Body:
    """``body`` ready to be sent from its first byte, as ``bytes`` or a view: a
    :class:`SpoolRange` is sought back to 0 (an attempt that failed may have read some
    of it), any other bytes-like value is made ``bytes`` (the SDKs want exactly that)."""
    if isinstance(body, SpoolRange):
        body.seek(0)
        return body
    return bytes(body)


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What HEAD (or a listing, with empty ``metadata``) says about one object."""

    key: str
    size: int
    etag: str
    last_modified_ns: int
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    content_type: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a delimited listing; ``next_token`` is ``None`` on the last page."""

    objects: tuple[ObjectInfo, ...]
    common_prefixes: tuple[str, ...]
    next_token: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class UploadInfo:
    """One unfinished multipart upload (ListMultipartUploads' ``Upload``)."""

    key: str
    upload_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class UploadPage:
    """One page of ListMultipartUploads; ``next_marker`` is the ``(key-marker,
    upload-id-marker)`` pair to pass back, ``None`` on the last page."""

    uploads: tuple[UploadInfo, ...]
    next_marker: tuple[str, str] | None


def next_upload_markers(
    key_marker: object,
    upload_id_marker: object,
    given: tuple[str, str],
    *,
    max_key_bytes: int,
    max_id: int,
    what: str,
) -> tuple[str, str]:
    """The markers a truncated ListMultipartUploads page names, checked for both clients:
    strings, a non-empty bounded key marker, a bounded upload-id marker, and a pair that
    moves on from ``given`` (a page naming the markers it was asked with would loop)."""
    if (
        not isinstance(key_marker, str)
        or not isinstance(upload_id_marker, str)
        or not 0 < len(key_marker.encode("utf-8", "surrogatepass")) <= max_key_bytes
        or len(upload_id_marker) > max_id
        or (key_marker, upload_id_marker) == given
    ):
        raise BadResponse(f"{what}: malformed or stuck markers")
    return key_marker, upload_id_marker


class ObjectStream(Protocol):
    """One open ranged GET ``[start, end)`` read in order, chunk by chunk (optional:
    a transport may offer ``open_stream(key, start, end) -> ObjectStream``).  Why: a
    sequential reader pays one round trip for the whole object instead of one per
    chunk.  The transport checked the answer's status, Content-Range and length when
    it opened; each read is bounded in size (at most ``max_body``) and time."""

    def read_exact(self, n: int, into: bytearray | None = None) -> bytearray:
        """The next ``n`` bytes, in one buffer; an early end or a slow body is an
        :class:`ObjectStoreError` (the stream is then unusable: close it).  With
        ``into`` (exactly ``n`` bytes long) that buffer is filled and returned, so a
        caller can reuse its buffers instead of faulting in fresh pages per chunk;
        after an error its contents are undefined."""
        ...

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        ...


class ObjectTransport(Protocol):
    """One bucket. Implementations: ``s3.S3Transport``, ``oss.OssTransport``, fakes."""

    def head(self, key: str) -> ObjectInfo:
        """Metadata of ``key``; :class:`ObjectNotFound` if absent."""
        ...

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[start, start+length)`` of ``key`` (to the end when ``length`` is
        None), by one ranged GET.  A short answer at the end of the object is fine;
        an answer longer than asked for is :class:`BadResponse`."""
        ...

    def put(
        self,
        key: str,
        body: Body,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        """Replace ``key`` whole; returns the ETag.  ``if_none_match`` makes it
        create-only (:class:`PreconditionFailed` if the key exists)."""
        ...

    def copy(
        self,
        src: str,
        dst: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        """Server-side copy; ``metadata=None`` keeps the source's metadata, otherwise
        it is replaced (how s3fs does chmod/utimens and the copy half of rename)."""
        ...

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting an absent key succeeds (S3/OSS semantics)."""
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete up to 1,000 keys in one request; absent keys are not an error."""
        ...

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        """One page of ListObjectsV2 under ``prefix``; pass ``next_token`` back."""
        ...

    def create_multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
    ) -> str:
        """Start a multipart upload; returns the upload id."""
        ...

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        """Upload part ``part_number`` (1-based); returns its ETag.  ``body`` may be a
        :class:`SpoolRange` (sent from its start, read in pieces)."""
        ...

    def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, src_key: str, start: int, length: int
    ) -> str:
        """Make part ``part_number`` from bytes ``[start, start+length)`` of ``src_key``
        server-side (UploadPartCopy), so unchanged ranges are never downloaded."""
        ...

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        """Publish the object from ``(part_number, etag)`` pairs; returns the ETag.
        Until this call succeeds the previous version of ``key`` stays readable."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished upload; an unknown upload id is not an error."""
        ...


class UploadLister(Protocol):
    """The transports that can list unfinished multipart uploads (S3, OSS, the retrying
    wrapper, the fake).  Why apart from :class:`ObjectTransport`: only DeleteVolume needs
    it (the mount daemon never lists uploads), and keeping it out of the daemon's
    protocol leaves every existing transport and test fake valid as it is."""

    def list_uploads(
        self,
        prefix: str,
        *,
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> UploadPage:
        """One page of ListMultipartUploads under ``prefix`` (no delimiter), from after
        ``(key_marker, upload_id_marker)``; pass ``next_marker`` back for the next page."""
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Drop an unfinished upload; an unknown upload id is not an error."""
        ...
