"""An in-memory :class:`ObjectTransport` for in-process tests of the object backend.

Strict on purpose, so the backend's use of the protocol is checked, not just tolerated:
bodies and listings are bounded like a real store, multipart parts other than the last
must be at least ``min_part`` bytes, copies of missing keys fail, and every request is
counted by operation (``counts``) so tests can assert "a 4 KiB read is one GET".
``fail_next`` injects failures into the next matching requests.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from fuse_crypt.backend.transport import (
    BadResponse,
    Body,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    TransientError,
    UploadInfo,
    UploadPage,
    exact_buffer,
)

MAX_OBJECT = 256 << 20


class _Obj:
    __slots__ = ("body", "content_type", "etag", "metadata", "mtime_ns")

    def __init__(self, body: bytes, metadata: Mapping[str, str], content_type: str) -> None:
        self.body = body
        self.metadata = {k.lower(): v for k, v in metadata.items()}  # as S3 and OSS do
        self.content_type = content_type
        self.etag = hashlib.md5(body).hexdigest()  # noqa: S324 - an ETag, not security
        self.mtime_ns = time.time_ns()


class FakeStream:
    """An open GET of one object version (the body as it was when it opened)."""

    def __init__(self, t: FakeTransport, body: bytes, start: int, end: int) -> None:
        self._t = t
        self._body = body
        self.pos = start
        self.end = end
        self.closed = False

    def read_exact(self, n: int, into: bytearray | None = None) -> bytearray:
        if self.closed or n <= 0 or self.pos + n > self.end:
            raise BadResponse("stream: read past the range")
        data = exact_buffer(n, into)
        self._t._stream_fault()
        data[:] = self._body[self.pos : self.pos + n]
        self.pos += n
        return data

    def close(self) -> None:
        self.closed = True


class FakeTransport:
    """One bucket in a dict; thread-safe; see the module docstring."""

    def __init__(self, *, min_part: int = 5 << 20, max_keys_cap: int = 1000) -> None:
        self.objects: dict[str, _Obj] = {}
        self.uploads: dict[str, tuple[str, dict[int, bytes], dict[str, str], str]] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, int]] = []  # (op, key, bytes moved)
        self.min_part = min_part
        self.max_keys_cap = max_keys_cap
        self._faults: list[tuple[str, Callable[[], ObjectStoreError]]] = []
        self._lock = threading.RLock()
        self._seq = 0

    # -- test helpers ----------------------------------------------------------------

    def fail_next(
        self, op: str, n: int = 1, exc: Callable[[], ObjectStoreError] | None = None
    ) -> None:
        """Make the next ``n`` requests of operation ``op`` ("*" = any) fail."""
        make = exc or (lambda: TransientError("injected 503"))
        with self._lock:
            self._faults.extend([(op, make)] * n)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _req(self, op: str, key: str, nbytes: int = 0) -> None:
        with self._lock:
            self.counts[op] += 1
            self.log.append((op, key, nbytes))
            for i, (fop, make) in enumerate(self._faults):
                if fop in (op, "*"):
                    del self._faults[i]
                    raise make()

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.log.clear()

    def body(self, key: str) -> bytes:
        return self.objects[key].body

    def put_raw(
        self,
        key: str,
        body: bytes,
        metadata: Mapping[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Plant an object behind the backend's back (the hostile host)."""
        with self._lock:
            self.objects[key] = _Obj(body, metadata or {}, content_type)

    # -- ObjectTransport ---------------------------------------------------------------

    def _info(self, key: str, o: _Obj, meta: bool = True) -> ObjectInfo:
        return ObjectInfo(
            key, len(o.body), o.etag, o.mtime_ns, dict(o.metadata) if meta else {}, o.content_type
        )

    def head(self, key: str) -> ObjectInfo:
        self._req("head", key)
        with self._lock:
            o = self.objects.get(key)
            if o is None:
                raise ObjectNotFound("head: 404")
            return self._info(key, o)

    def get(self, key: str, start: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            o = self.objects.get(key)
        if o is None:
            self._req("get", key)
            raise ObjectNotFound("get: 404")
        if start < 0 or (length is not None and length < 0):
            raise ValueError("bad range")
        if start >= len(o.body):  # S3/OSS answer 416; the transports make that b""
            self._req("get", key, 0)
            return b""
        end = len(o.body) if length is None else min(len(o.body), start + length)
        data = o.body[start:end]
        self._req("get", key, len(data))
        return data

    def open_stream(self, key: str, start: int, end: int) -> FakeStream:
        """One GET of ``[start, end)`` read in pieces (counted once, as "stream");
        ``fail_next("stream_read")`` breaks the next piece read from any stream."""
        with self._lock:
            o = self.objects.get(key)
        self._req("stream", key, max(0, end - start))
        if o is None:
            raise ObjectNotFound("stream: 404")
        if start < 0 or end <= start or end > len(o.body):
            raise BadResponse("stream: range not satisfiable")
        return FakeStream(self, o.body, start, end)

    def _stream_fault(self) -> None:
        with self._lock:
            for i, (fop, make) in enumerate(self._faults):
                if fop == "stream_read":
                    del self._faults[i]
                    raise make()

    def put(
        self,
        key: str,
        body: Body,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
        if_none_match: bool = False,
    ) -> str:
        body = bytes(body)  # a SpoolRange is read whole, as a client sends it
        self._req("put", key, len(body))
        if len(body) > MAX_OBJECT:
            raise BadResponse("put: too large")
        with self._lock:
            if if_none_match and key in self.objects:
                raise PreconditionFailed("put: 412")
            o = self.objects[key] = _Obj(bytes(body), metadata, content_type)
            return o.etag

    def copy(
        self,
        src: str,
        dst: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> str:
        self._req("copy", dst)
        with self._lock:
            o = self.objects.get(src)
            if o is None:
                raise ObjectNotFound("copy: 404")
            if src == dst and metadata is None:
                raise ObjectStoreError("copy onto itself without REPLACE: 400")
            n = _Obj(
                o.body,
                o.metadata if metadata is None else metadata,
                content_type if content_type is not None else o.content_type,
            )
            self.objects[dst] = n
            return n.etag

    def delete(self, key: str) -> None:
        self._req("delete", key)
        with self._lock:
            self.objects.pop(key, None)

    def delete_many(self, keys: Sequence[str]) -> None:
        self._req("delete_many", "", len(keys))
        if len(keys) > 1000:
            raise BadResponse("delete_many: more than 1000 keys")
        with self._lock:
            for k in keys:
                self.objects.pop(k, None)

    def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, max_keys: int = 1000
    ) -> ListPage:
        self._req("list", prefix)
        max_keys = min(max_keys, self.max_keys_cap)
        with self._lock:
            keys = sorted(k for k in self.objects if k.startswith(prefix))
            entries: list[tuple[str, ObjectInfo | None]] = []
            seen: set[str] = set()
            for k in keys:
                rest = k[len(prefix) :]
                if delimiter and delimiter in rest:
                    cp = prefix + rest.split(delimiter, 1)[0] + delimiter
                    if cp not in seen:
                        seen.add(cp)
                        entries.append((cp, None))
                else:
                    entries.append((k, self._info(k, self.objects[k], meta=False)))
        if token is not None:
            entries = [e for e in entries if e[0] > token]
        page = entries[:max_keys]
        nxt = page[-1][0] if len(entries) > max_keys else None
        return ListPage(
            tuple(i for _, i in page if i is not None),
            tuple(k for k, i in page if i is None),
            nxt,
        )

    def create_multipart(
        self,
        key: str,
        *,
        metadata: Mapping[str, str],
        content_type: str = "application/octet-stream",
    ) -> str:
        self._req("create_multipart", key)
        with self._lock:
            self._seq += 1
            uid = f"up{self._seq}"
            self.uploads[uid] = (key, {}, dict(metadata), content_type)
            return uid

    def _upload(self, key: str, upload_id: str) -> dict[int, bytes]:
        up = self.uploads.get(upload_id)
        if up is None or up[0] != key:
            raise ObjectNotFound("NoSuchUpload")
        return up[1]

    def upload_part(self, key: str, upload_id: str, part_number: int, body: Body) -> str:
        body = bytes(body)  # a SpoolRange is read whole, as a client sends it
        self._req("upload_part", key, len(body))
        with self._lock:
            parts = self._upload(key, upload_id)
            if not 1 <= part_number <= 10000:
                raise ObjectStoreError("InvalidArgument")
            parts[part_number] = bytes(body)
            return hashlib.md5(body).hexdigest()  # noqa: S324

    def upload_part_copy(
        self, key: str, upload_id: str, part_number: int, src_key: str, start: int, length: int
    ) -> str:
        self._req("upload_part_copy", key, length)
        with self._lock:
            parts = self._upload(key, upload_id)
            o = self.objects.get(src_key)
            if o is None:
                raise ObjectNotFound("copy source 404")
            if start < 0 or length <= 0 or start + length > len(o.body):
                raise ObjectStoreError("InvalidRange")
            body = o.body[start : start + length]
            parts[part_number] = body
            return hashlib.md5(body).hexdigest()  # noqa: S324

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[tuple[int, str]]) -> str:
        self._req("complete_multipart", key)
        with self._lock:
            have = self._upload(key, upload_id)
            numbers = [n for n, _ in parts]
            if numbers != sorted(set(numbers)) or not numbers:
                raise ObjectStoreError("InvalidPartOrder")
            chunks = []
            for i, (n, etag) in enumerate(parts):
                body = have.get(n)
                if body is None or hashlib.md5(body).hexdigest() != etag:  # noqa: S324
                    raise ObjectStoreError("InvalidPart")
                if i < len(parts) - 1 and len(body) < self.min_part:
                    raise ObjectStoreError("EntityTooSmall")
                chunks.append(body)
            _, _, meta, ctype = self.uploads.pop(upload_id)
            o = self.objects[key] = _Obj(b"".join(chunks), meta, ctype)
            return o.etag

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._req("abort_multipart", key)
        with self._lock:
            self.uploads.pop(upload_id, None)

    def list_uploads(
        self,
        prefix: str,
        *,
        key_marker: str = "",
        upload_id_marker: str = "",
        max_uploads: int = 1000,
    ) -> UploadPage:
        """ListMultipartUploads: sorted by (key, upload id), paged by the marker pair
        (an upload-id-marker counts only with a key-marker, as S3 and OSS document)."""
        self._req("list_uploads", prefix)
        cap = max(1, min(max_uploads, self.max_keys_cap))
        with self._lock:
            found = sorted((k, uid) for uid, (k, *_rest) in self.uploads.items())
        after = (key_marker, upload_id_marker if key_marker else "")
        todo = [
            (k, uid)
            for k, uid in found
            if k.startswith(prefix)
            and (not key_marker or k > after[0] or (k == after[0] and after[1] and uid > after[1]))
        ]
        page = todo[:cap]
        nxt = page[-1] if len(todo) > cap else None
        return UploadPage(tuple(UploadInfo(k, uid) for k, uid in page), nxt)
