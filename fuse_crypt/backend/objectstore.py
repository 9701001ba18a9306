"""``ObjectStoreBackend``: ciphertext in a bucket prefix, laid out as s3fs/ossfs + gocryptfs.

Why this layout: a bucket written by CoCo's two-hop stack (ossfs or s3fs, then gocryptfs
on top) must mount here unchanged, and a bucket written here must mount there.  So the
objects are exactly what s3fs 1.90 leaves behind (see docs/fuse_crypt.md, "Object-store
volumes"):

* one object per cipher path under the prefix; ``gocryptfs.conf`` at the prefix root;
* directories are zero-byte ``<dir>/`` markers with ``Content-Type:
  application/x-directory``; directories that exist only as a common prefix (no marker)
  are directories too;
* user metadata ``mode uid gid atime mtime ctime`` as decimal ASCII (times as seconds,
  ``sec.nnnnnnnnn`` when the nanoseconds are not zero, which s3fs 1.90 reads as seconds);
* a symlink is an object whose body is the (encrypted) target and whose mode is 0120777.

Reads are ranged GETs aligned to cipher blocks (the frontend asks for whole blocks): a
random read costs one GET of the blocks it touches; a sequential reader gets whole
chunks (256 cipher blocks) read ahead from one streaming GET by one pump thread, back to
back.  Cached bytes are ciphertext, bounded by ``cache_bytes`` (GETs in flight
included), keyed by ETag, dropped at unmount.

Writes go to a per-file *spool* (a memfd, or an unlinked file in ``spool_dir``) that
only ever holds ciphertext as the crypto layer produced it, plus the set of byte
ranges written; flush/fsync/close publish the object whole: a single PUT for small
files, otherwise a multipart upload in which untouched ranges are UploadPartCopy'd
from the current object (a small overwrite in a large file uploads one part).  The
object is replaced only when the PUT or CompleteMultipartUpload succeeds, so readers
never see a half-written file and a daemon killed mid-upload leaves the old version.
A failed upload answers EIO to fsync/close and keeps the spool; it is retried in the
background and at unmount.

Renames are copy + delete (no server-side rename exists).  A directory rename first
writes an intent object (``gocryptfs.coco-rename.<hex>`` at the prefix root, naming
the two cipher paths), copies every key under the old prefix, then deletes the old
keys, then the intent; :meth:`ObjectStoreBackend.recover_renames` (run at mount)
finishes any rename an earlier daemon left half-done.

The bucket is hostile: listings, metadata and bodies are validated and bounded; names
that are not single path components are skipped; numbers out of range fall back to
defaults like s3fs does.  Tampered content is caught by the crypto layer above (EIO).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat as stat_mod
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from ..contentenc import CIPHER_BS, HEADER_LEN
from .base import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    DirEntry,
    Stat,
    StorageBackend,
    check_path,
)
from .transport import (
    BadResponse,
    Body,
    ListPage,
    ObjectInfo,
    ObjectNotFound,
    ObjectStream,
    ObjectTransport,
    PreconditionFailed,
    SpoolRange,
)

__all__ = ["DIR_CONTENT_TYPE", "INTENT_PREFIX", "ObjectStoreBackend"]

log = logging.getLogger("fuse_crypt.backend.objectstore")

DIR_CONTENT_TYPE = "application/x-directory"
_DIR_TYPES = frozenset({DIR_CONTENT_TYPE, "httpd/unix-directory"})
FILE_CONTENT_TYPE = "application/octet-stream"
#: Directory-rename intent objects live at the prefix root under this name prefix
#: (``gocryptfs.*`` names are never plaintext names, so they cannot collide).
INTENT_PREFIX = "gocryptfs.coco-rename."
_INTENT_MAX = 8192
#: Largest single CopyObject (S3 and OSS); bigger objects are copied part by part.
_COPY_MAX = 5 << 30
_COPY_PART = 512 << 20
_MIN_PART = 5 << 20
_MAX_PARTS = 10000
#: Upload bodies at least this long are sent as a view of the spool, not as bytes.
_VIEW_MIN = 1 << 20
#: Read-ahead / cache granule: 256 cipher blocks (~1 MiB, one 1 MiB FUSE read when the
#: reader is aligned), aligned to block boundaries.  Why this small: a sequential
#: reader is served by one streaming GET (:meth:`ObjectStoreBackend._stream_read`), so
#: the granule no longer sets the number of requests, only how finely the bounded
#: cache turns over.  With 4 MiB chunks x 1 ahead (the 64 MiB RSS budget allowed no
#: more) the stream stood idle between chunks and the chunk the reader had just left
#: had to go before the next could be fetched, so a kernel read-ahead request
#: arriving late for it cost a ranged GET (O(object size) on moto: ~0.4 s at 256 MiB)
#: and the eviction cascaded.  1 MiB chunks drop each chunk as soon as the reader has
#: finished it and keep up to ``DEFAULT_READAHEAD`` ahead, filled back to back by one
#: pump thread.
_CHUNK = 256 * CIPHER_BS
#: Default ciphertext cache: 5 chunks (~5 MiB).  Why 4 ahead and not the 7 it was: each
#: chunk ahead is ~1 MiB at the daemon's peak, and with 7 the peak RSS of a sequential
#: read sat at 62.8-65.0 MiB against the 64 MiB budget (one CI run failed at 64.3).
#: Measured 2026-12-03 (scratch harness, 3 interleaved rounds: 48 MiB read for VmHWM,
#: 256 MiB remounted read for MiB/s, over moto): 7 ahead 62.8-63.0 MiB / 279-292 MiB/s,
#: 5 ahead 60.7-60.9 / 259-290, 4 ahead 59.7-60.0 / 274-298, 3 ahead 58.8-59.0 /
#: 260-291: a sequential reader is served by one streaming GET, so the depth only
#: absorbs jitter; 4 MiB ahead covers ~40 ms at 100 MB/s.
DEFAULT_READAHEAD = 4
DEFAULT_CACHE_BYTES = (1 + DEFAULT_READAHEAD) * _CHUNK + HEADER_LEN  # chunk 0 has the header
#: Chunks a sequential reader has read to their end go first when its read-ahead needs
#: room (each is read once: the kernel's page cache keeps the plaintext).  Chunks up to
#: this many behind it that it has *not* finished are kept: the kernel's read-ahead
#: requests (1 MiB each, up to 4 outstanding measured) reach the daemon out of order
#: from several FUSE threads, so a request for an earlier chunk can come after one for
#: a later chunk, and a chunk evicted under it costs a ranged GET.
_KEEP_BEHIND = 4
#: Finished chunks remembered (keys only) for the eviction order and to let a stream
#: open after the chunk before it was already dropped.
_DONE_MAX = 64
#: A request at least this long is streaming even if it is not exactly contiguous (the
#: kernel's read-ahead requests arrive out of order from several FUSE threads).
_STREAMING = 32 * CIPHER_BS
#: Evicted chunk buffers kept for the next chunk fetch (see
#: :meth:`ObjectStoreBackend._recycle`), outside ``cache_bytes``: a sequential reader's
#: eviction frees one buffer just before its next fetch takes it, so one is enough, and
#: each more would be 1 MiB more at the daemon's peak.
_SPARE_CHUNKS = 1
#: Streaming GETs a daemon keeps open for sequential readers (one per (key, etag)),
#: and how long one may sit unused before the next stream read closes it.
_STREAMS_MAX = 2
_STREAM_IDLE = 30.0
#: Streaming uploads whose abort failed, kept to abort again (background retry, unmount):
#: their parts cost the tenant storage until a lifecycle rule removes them.  Bounded: past
#: this many the oldest is left to the lifecycle rule.
_ORPHANS_MAX = 64
_SYMLINK_MAX = 16384


def _refs_when_unshared() -> int:
    """What ``sys.getrefcount`` reports inside a method for a buffer that only its
    caller's local holds: the call shape of :meth:`ObjectStoreBackend._recycle`."""

    def probe(buf: bytearray) -> int:
        return sys.getrefcount(buf)

    buf = bytearray(1)
    return probe(buf)


#: See :meth:`ObjectStoreBackend._recycle`.
_UNSHARED_REFS = _refs_when_unshared()
_DETACH_MAX = 256 << 20
#: Small files (dir IVs: 16 bytes) whose content the node cache keeps.
_SMALL_CACHED = 64
_LIST_PAGES_MAX = 1_000_000
#: :meth:`ObjectStoreBackend.usage` bounds: objects listed, seconds, and the largest
#: object size believed (S3 allows 5 TiB, OSS 48.8 TiB).  The listing runs in the
#: daemon's background (fuse_crypt/cli/usagecache.py: a stats call waits at most 6 s), so
#: its budget can be long enough for 1M objects (1,000 pages) on a real store.
USAGE_MAX_OBJECTS = 1_000_000
USAGE_BUDGET = 60.0
_OBJECT_SIZE_MAX = 64 << 40
#: Entries one directory listing may hold in memory (a hostile store could page forever).
DIR_ENTRIES_MAX = 1_000_000
_CHILDREN_MAX_NAMES = 200_000
_DEV = 0x0B5E
_TIME_RE = re.compile(r"-?[0-9]{1,12}(?:\.[0-9]{1,9})?")
_INT_RE = re.compile(r"[0-9]{1,10}")
_NS = 1_000_000_000


def _valid_name(name: str) -> bool:
    return (
        0 < len(name) <= 255
        and name not in (".", "..")
        and "/" not in name
        and "\0" not in name
        and name.isprintable()
    )


def _parent(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition("/")
    return parent, name


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def fmt_time(ns: int) -> str:
    """s3fs's time format: seconds, plus ``.nnnnnnnnn`` when not whole (s3fs >= 1.92;
    1.90 reads the integer part)."""
    sec, nsec = divmod(ns, _NS)
    return str(sec) if nsec == 0 else f"{sec}.{nsec:09d}"


def parse_time(value: str | None) -> int | None:
    """Nanoseconds from an s3fs/rclone time value, or None if absent or malformed."""
    if value is None or not _TIME_RE.fullmatch(value):
        return None
    sec, _, frac = value.partition(".")
    neg = sec.startswith("-")
    ns = abs(int(sec)) * _NS + (int(frac.ljust(9, "0")) if frac else 0)
    return -ns if neg else ns


def _parse_id(value: str | None, default: int) -> int:
    if value is None or not _INT_RE.fullmatch(value):
        return default
    n = int(value)
    return n if n < 0xFFFFFFFF else default


def _mode_of(meta: Mapping[str, str], content_type: str, key_is_dir: bool) -> int:
    """s3fs's reading of ``mode`` (metaheader.cpp): missing → 0750 dirs / 0640 files;
    no type bits → a directory iff the content type says so."""
    raw = meta.get("mode")
    mode: int | None = None
    if raw is not None and _INT_RE.fullmatch(raw):
        n = int(raw)
        if n <= 0o177777:
            mode = n
    if key_is_dir:
        perms = stat_mod.S_IMODE(mode) if mode is not None else 0o750
        return stat_mod.S_IFDIR | perms
    if mode is None:
        return stat_mod.S_IFDIR | 0o750 if content_type in _DIR_TYPES else stat_mod.S_IFREG | 0o640
    fmt = stat_mod.S_IFMT(mode)
    if fmt == 0:
        fmt = stat_mod.S_IFDIR if content_type in _DIR_TYPES else stat_mod.S_IFREG
    elif fmt not in (
        stat_mod.S_IFREG,
        stat_mod.S_IFDIR,
        stat_mod.S_IFLNK,
        stat_mod.S_IFIFO,
        stat_mod.S_IFSOCK,
    ):
        fmt = stat_mod.S_IFREG  # never expose device nodes from a hostile bucket
    return fmt | stat_mod.S_IMODE(mode)


_TIME_KEYS = ("atime", "mtime", "ctime")


def _ino(key: str) -> int:
    h = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(h, "little") & ((1 << 63) - 1)) or 1


class _Node:
    """What we know about one path: its type, the object behind it (if any) and its
    metadata.  ``marker`` is False for implicit directories and the bare root."""

    __slots__ = ("ctype", "data", "info", "marker", "meta", "mode")

    def __init__(
        self, mode: int, info: ObjectInfo | None, meta: dict[str, str], ctype: str, marker: bool
    ) -> None:
        self.mode = mode
        self.info = info
        self.meta = meta
        self.ctype = ctype
        self.marker = marker
        #: Content of a write-once small file (a dir IV), once read or written by us:
        #: base.read_small_file allows caching those; any change replaces the node.
        self.data: bytes | None = None


class _Ranges:
    """Sorted, merged half-open byte ranges (the spool's written regions)."""

    def __init__(self) -> None:
        self.r: list[list[int]] = []

    def add(self, s: int, e: int) -> None:
        if s >= e:
            return
        out: list[list[int]] = []
        placed = False
        for a, b in self.r:
            if b < s or a > e:
                if a > e and not placed:
                    out.append([s, e])
                    placed = True
                out.append([a, b])
            else:
                s, e = min(a, s), max(b, e)
        if not placed:
            out.append([s, e])
        out.sort()
        self.r = out

    def clip(self, limit: int) -> None:
        self.r = [[a, min(b, limit)] for a, b in self.r if a < limit]

    def overlaps(self, s: int, e: int) -> bool:
        return any(a < e and s < b for a, b in self.r)

    def pieces(self, s: int, e: int) -> Iterator[tuple[int, int, bool]]:
        """Split ``[s, e)`` into (start, end, written) pieces."""
        pos = s
        for a, b in self.r:
            if b <= pos:
                continue
            if a >= e:
                break
            if a > pos:
                yield pos, a, False
            yield max(a, pos), min(b, e), True
            pos = min(b, e)
        if pos < e:
            yield pos, e, False

    def clear(self) -> None:
        self.r = []

    def __bool__(self) -> bool:
        return bool(self.r)


class _State:
    """One key's open-file state, shared by every handle on it (see base.open)."""

    def __init__(self, path: str, key: str, node: _Node, ino: int) -> None:
        self.path = path
        self.key = key
        self.ino = ino
        self.lock = threading.RLock()
        self.refs = 0
        info = node.info
        self.size = info.size if info is not None else 0
        #: The published object we read untouched ranges from (None: nothing usable).
        self.base_etag: str | None = info.etag if info is not None and info.size else None
        #: Bytes of the base object still part of the file (a truncation lowers it).
        self.base_limit = self.size if self.base_etag is not None else 0
        self.meta = dict(node.meta)
        self.ctype = node.ctype or FILE_CONTENT_TYPE
        self.mode = node.mode
        self.written = _Ranges()
        self.spool: int | None = None
        self.dirty = False
        self.unlinked = False
        self.header: bytes | None = None
        self.seq_next = -1
        #: The streaming multipart upload of this dirty cycle, if one was started.
        self.early: _Early | None = None
        #: Bumped by chmod/chown/utimens on the open file (see :meth:`_finish_early`).
        self.meta_gen = 0

    def close_spool(self) -> None:
        if self.spool is not None:
            with contextlib.suppress(OSError):
                os.close(self.spool)
            self.spool = None


class _Early:
    """A multipart upload started while a file is still being written sequentially
    (issue 10: an upload at fsync/close cost spool time + upload time; streaming the
    complete parts while the writer goes on leaves only the tail for fsync).

    Part ``n`` (1-based) is ``[(n-1)*psize, n*psize)`` of the spool.  Workers read the
    part from ``fd`` (their own dup of the spool, so closing or replacing the state's
    spool never hands them another file's descriptor) and never take ``st.lock``, so the
    fsync that waits for them while holding it cannot deadlock.  A write into a part
    already taken bumps ``version[n]`` and drops its ETag; a worker records its ETag only
    if the version it read under is still current, so a stale part is never listed in
    CompleteMultipartUpload: finalisation uploads it again under the same number."""

    def __init__(
        self, key: str, fd: int, psize: int, meta: dict[str, str], ctype: str, meta_gen: int
    ) -> None:
        self.key = key
        self.meta_gen = meta_gen
        self.fd = fd
        self.psize = psize
        self.meta = meta
        self.ctype = ctype
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.upload_id: str | None = None
        #: Parts ``1..ready`` are complete in the spool; ``1..next-1`` were handed out.
        self.ready = 0
        self.next = 1
        self.version: dict[int, int] = {}
        self.etags: dict[int, str] = {}
        #: Jobs submitted and not finished (0: the CreateMultipartUpload job).
        self.inflight: set[int] = set()
        self.failed = False
        #: ``closing``: finalisation waits, no new parts; ``stop``: abandoned, abort it.
        self.closing = False
        self.stop = False
        self.ended = False


class _Stream:
    """One open GET ``[pos, limit)`` of an object version whose chunks are read from it
    in order.  ``busy`` while one thread opens or reads it (a stream is never shared);
    ``body`` is None until it is open."""

    __slots__ = ("body", "busy", "limit", "pos", "used")

    def __init__(self, pos: int, limit: int) -> None:
        self.body: ObjectStream | None = None
        self.pos = pos
        self.limit = limit
        self.busy = True
        self.used = time.monotonic()

    def close(self) -> None:
        if self.body is not None:
            with contextlib.suppress(OSError):
                self.body.close()


class _Handle:
    __slots__ = ("state", "writable")

    def __init__(self, state: _State, writable: bool) -> None:
        self.state = state
        self.writable = writable


class ObjectStoreBackend(StorageBackend):
    """Cipher paths as objects under ``prefix`` of one bucket (see module docstring).

    ``transport`` is any :class:`ObjectTransport` (usually wrapped for retries);
    ``prefix`` is the volume's key prefix (``""`` for a whole bucket).  Sizes:
    ``part_size`` (multipart part, >= 5 MiB), ``multipart_threshold`` (files above it
    are uploaded in parts), ``parallel`` (concurrent part / copy requests),
    ``cache_bytes`` (ciphertext read cache; chunks being fetched count against it, so
    it bounds the read path's memory), ``readahead`` (chunks fetched ahead of a
    sequential reader; skipped when the cache has no room for them).  ``spool_dir``
    selects where write spools live (default: an anonymous memfd in guest memory).
    """

    supports_hardlinks = False
    supports_xattrs = False
    buffers_writes = True
    bounded_heap = True

    def __init__(
        self,
        transport: ObjectTransport,
        prefix: str = "",
        *,
        spool_dir: str | None = None,
        part_size: int = 8 << 20,
        multipart_threshold: int = 16 << 20,
        parallel: int = 4,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        readahead: int = DEFAULT_READAHEAD,
        meta_cache_entries: int = 16384,
        uid: int | None = None,
        gid: int | None = None,
    ) -> None:
        prefix = prefix.strip("/")
        if prefix:
            check_path(prefix)
            prefix += "/"
        if part_size < _MIN_PART:
            raise ValueError("part_size must be at least 5 MiB")
        self.t = transport
        self.prefix = prefix
        self.spool_dir = spool_dir
        self.part_size = part_size
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.parallel = max(1, parallel)
        self.cache_bytes = cache_bytes
        self.readahead = max(0, readahead)
        self.uid = os.geteuid() if uid is None else uid
        self.gid = os.getegid() if gid is None else gid
        self._lock = threading.RLock()
        self._nodes: collections.OrderedDict[str, _Node | None] = collections.OrderedDict()
        self._nodes_max = meta_cache_entries
        self._children: collections.OrderedDict[str, set[str]] = collections.OrderedDict()
        self._children_names = 0
        #: Bumped by every change to the caches (see :meth:`_remember`).
        self._mut = 0
        self._states: dict[str, _State] = {}
        self._pending: set[_State] = set()
        #: (key, upload id) of abandoned streaming uploads whose abort failed.
        self._orphans: collections.deque[tuple[str, str]] = collections.deque(maxlen=_ORPHANS_MAX)
        self._cache: collections.OrderedDict[tuple[str, str, int], bytes | bytearray] = (
            collections.OrderedDict()
        )
        self._cache_used = 0
        #: Free chunk buffers (:meth:`_recycle`), at most ``_SPARE_CHUNKS``.
        self._spare: list[bytearray] = []
        #: Chunks a sequential reader finished (see ``_KEEP_BEHIND``), bounded.
        self._done: collections.OrderedDict[tuple[str, str, int], None] = collections.OrderedDict()
        #: Bytes of chunk GETs in flight: reserved in the cache before the GET is sent.
        self._cache_reserved = 0
        self._inflight: dict[
            tuple[str, str, int], concurrent.futures.Future[bytes | bytearray]
        ] = {}
        self._io = concurrent.futures.ThreadPoolExecutor(self.parallel, "objstore-io")
        #: Streaming multipart parts (see :class:`_Early`): a pool of their own, so they
        #: never queue behind (or hold up) the parts of an fsync, which waits for both
        #: while holding ``st.lock``.
        self._early_io = concurrent.futures.ThreadPoolExecutor(self.parallel, "objstore-early")
        #: One pump thread runs every chunk fetch in the order asked (FIFO): a
        #: sequential reader's chunks are read from its stream back to back, each
        #: fetch starting the moment the one before it ends (and it owns the stream,
        #: so a chunk never waits on another thread holding it).
        self._ra = concurrent.futures.ThreadPoolExecutor(1, "objstore-readahead")
        #: Open streaming GETs of sequential readers (see :meth:`_stream_read`).
        self._streams: collections.OrderedDict[tuple[str, str], _Stream] = collections.OrderedDict()
        self._retry_thread: threading.Thread | None = None
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return f"ObjectStoreBackend(prefix={self.prefix!r})"

    # -- keys ---------------------------------------------------------------------------

    def _key(self, path: str) -> str:
        return self.prefix + path

    def _dirkey(self, path: str) -> str:
        return self.prefix + path + "/" if path else self.prefix

    # -- metadata cache -----------------------------------------------------------------

    def _remember(self, path: str, node: _Node | None, seen: int | None = None) -> None:
        """Cache ``node`` for ``path``.  ``seen``: the mutation count read before the
        store was asked; a probe that raced with one of our own changes is not cached
        (it could say "absent" for a file just created, and a later O_CREAT would then
        replace it)."""
        with self._lock:
            if seen is not None and seen != self._mut:
                return
            self._mut += 1
            self._nodes[path] = node
            self._nodes.move_to_end(path)
            while len(self._nodes) > self._nodes_max:
                self._nodes.popitem(last=False)

    def _forget(self, path: str) -> None:
        with self._lock:
            self._mut += 1
            self._nodes.pop(path, None)

    def _forget_tree(self, path: str) -> None:
        """Drop cached nodes and child sets of ``path`` and everything below it."""
        pre = path + "/"
        with self._lock:
            self._mut += 1
            for p in [p for p in self._nodes if p == path or p.startswith(pre)]:
                del self._nodes[p]
            for p in [p for p in self._children if p == path or p.startswith(pre)]:
                self._children_names -= len(self._children.pop(p))

    def _set_children(self, path: str, names: set[str], seen: int | None = None) -> None:
        with self._lock:
            if seen is not None and seen != self._mut:
                return  # changed while we listed: the listing may be stale
            self._mut += 1
            old = self._children.pop(path, None)
            if old is not None:
                self._children_names -= len(old)
            if len(names) > _CHILDREN_MAX_NAMES // 4:
                return
            self._children[path] = names
            self._children_names += len(names)
            while self._children_names > _CHILDREN_MAX_NAMES and self._children:
                _, dropped = self._children.popitem(last=False)
                self._children_names -= len(dropped)

    def _child_added(self, path: str) -> None:
        parent, name = _parent(path)
        with self._lock:
            self._mut += 1
            s = self._children.get(parent)
            if s is not None and name not in s:
                s.add(name)
                self._children_names += 1

    def _child_removed(self, path: str) -> None:
        parent, name = _parent(path)
        with self._lock:
            self._mut += 1
            s = self._children.get(parent)
            if s is not None and name in s:
                s.discard(name)
                self._children_names -= 1

    def _new_meta(self, mode: int, now_ns: int | None = None) -> dict[str, str]:
        t = fmt_time(time.time_ns() if now_ns is None else now_ns)
        return {
            "mode": str(mode),
            "uid": str(self.uid),
            "gid": str(self.gid),
            "atime": t,
            "mtime": t,
            "ctime": t,
        }

    def _node_from_info(self, info: ObjectInfo, key_is_dir: bool) -> _Node:
        meta = {k: v for k, v in info.metadata.items() if isinstance(v, str)}
        mode = _mode_of(meta, info.content_type, key_is_dir)
        return _Node(mode, info, meta, info.content_type, True)

    def _root_node(self) -> _Node:
        info: ObjectInfo | None = None
        meta: dict[str, str] = {}
        if self.prefix:
            try:
                info = self.t.head(self.prefix)
                meta = dict(info.metadata)
            except ObjectNotFound:
                info = None
        return _Node(
            _mode_of(meta, DIR_CONTENT_TYPE, True) if meta else stat_mod.S_IFDIR | 0o755,
            info,
            meta,
            DIR_CONTENT_TYPE,
            info is not None,
        )

    def _lookup(self, path: str) -> _Node | None:
        """The node at ``path`` or None (absent), from the cache or the store (s3fs's
        order: ``HEAD x``, ``HEAD x/``, then a one-key listing of ``x/``)."""
        with self._lock:
            if path in self._nodes:
                self._nodes.move_to_end(path)
                return self._nodes[path]
            if path:
                parent, name = _parent(path)
                kids = self._children.get(parent)
                if kids is not None and name not in kids:
                    return None
            seen = self._mut
        if path == "":
            node: _Node | None = self._root_node()
        else:
            node = self._probe(path)
        self._remember(path, node, seen)
        return node

    def _probe(self, path: str) -> _Node | None:
        key = self._key(path)
        try:
            info = self.t.head(key)
            return self._node_from_info(info, False)
        except ObjectNotFound:
            pass
        try:
            info = self.t.head(key + "/")
            return self._node_from_info(info, True)
        except ObjectNotFound:
            pass
        page = self.t.list(key + "/", delimiter="/", max_keys=1)
        if page.objects or page.common_prefixes:
            return _Node(stat_mod.S_IFDIR | 0o750, None, {}, "", False)
        return None

    def _need(self, path: str) -> _Node:
        node = self._lookup(check_path(path))
        if node is None:
            raise OSError(errno.ENOENT, "no such object")
        return node

    def _stat(self, path: str, node: _Node) -> Stat:
        info = node.info
        meta = node.meta
        lm = info.last_modified_ns if info is not None else 0
        mtime = parse_time(meta.get("mtime"))
        mtime = lm if mtime is None else mtime
        atime = parse_time(meta.get("atime"))
        ctime = parse_time(meta.get("ctime"))
        is_dir = stat_mod.S_ISDIR(node.mode)
        size = 4096 if is_dir else (info.size if info is not None else 0)
        with self._lock:
            st = self._states.get(self._key(path)) if not is_dir else None
        ino = _ino(self._key(path) + ("/" if is_dir else ""))
        if st is not None:
            size, ino = st.size, st.ino
            mtime = parse_time(st.meta.get("mtime")) or mtime
        return Stat(
            node.mode,
            ino,
            _DEV,
            2 if is_dir else 1,
            _parse_id(meta.get("uid"), self.uid),
            _parse_id(meta.get("gid"), self.gid),
            size,
            mtime if atime is None else atime,
            mtime,
            mtime if ctime is None else ctime,
            -(-size // 512),
            4096,
        )

    # -- metadata -----------------------------------------------------------------------

    def lstat(self, path: str) -> Stat:
        return self._stat(path, self._need(path))

    def _list_names(self, path: str) -> list[tuple[str, int]]:
        """(name, type bits or 0) of every entry of directory ``path``, paging past
        1,000 entries; hostile entries (not one valid component) are skipped."""
        dk = self._dirkey(path)
        out: dict[str, int] = {}
        for page in self._pages(dk, "/"):
            for o in page.objects:
                name = o.key[len(dk) :]
                if name == "" or not _valid_name(name):
                    continue
                out.setdefault(name, 0)
            for p in page.common_prefixes:
                if not p.startswith(dk) or not p.endswith("/"):
                    raise BadResponse("list: prefix outside the prefix")
                name = p[len(dk) : -1]
                if _valid_name(name):
                    out[name] = stat_mod.S_IFDIR
            if len(out) > DIR_ENTRIES_MAX:
                raise BadResponse("list: directory over the entry bound")
        return list(out.items())

    def _pages(self, dk: str, delimiter: str) -> Iterator[ListPage]:
        """Every page of the listing of ``dk``, each object key checked to lie under it;
        a token that does not advance, or more than _LIST_PAGES_MAX pages (a hostile store
        could page forever), is refused."""
        token: str | None = None
        for _ in range(_LIST_PAGES_MAX):
            page = self.t.list(dk, delimiter=delimiter, token=token, max_keys=1000)
            if any(not o.key.startswith(dk) for o in page.objects):
                raise BadResponse("list: key outside the prefix")
            yield page
            if page.next_token is None:
                return
            if page.next_token == token:
                raise BadResponse("list: continuation token did not advance")
            token = page.next_token
        raise BadResponse("list: too many pages")

    def _need_dir(self, path: str) -> _Node:
        node = self._need(path)
        if not stat_mod.S_ISDIR(node.mode):
            raise OSError(errno.ENOTDIR, "not a directory")
        return node

    def listdir(self, path: str) -> list[str]:
        return [e.name for e in self.scandir(path)]

    def scandir(self, path: str) -> list[DirEntry]:
        self._need_dir(path)
        with self._lock:
            seen = self._mut
        entries = self._list_names(path)
        self._set_children(path, {n for n, _ in entries}, seen)
        out = []
        for name, typ in entries:
            child = _join(path, name)
            with self._lock:
                cached = self._nodes.get(child)
            if cached is not None:
                typ = stat_mod.S_IFMT(cached.mode)
            key = self._key(child) + ("/" if typ == stat_mod.S_IFDIR else "")
            out.append(DirEntry(name, _ino(key), typ))
        return out

    def _check_creatable(self, path: str) -> None:
        check_path(path)
        if path == "":
            raise OSError(errno.EEXIST, "exists")
        self._need_dir(_parent(path)[0])
        if self._lookup(path) is not None:
            raise OSError(errno.EEXIST, "exists")

    def mkdir(self, path: str, mode: int) -> None:
        self._check_creatable(path)
        # s3fs's mkdir stores the permission bits only (493 for 0755).
        meta = self._new_meta(stat_mod.S_IMODE(mode))
        try:
            etag = self.t.put(
                self._dirkey(path),
                b"",
                metadata=meta,
                content_type=DIR_CONTENT_TYPE,
                if_none_match=True,
            )
        except PreconditionFailed:
            self._forget(path)
            raise OSError(errno.EEXIST, "exists") from None
        info = ObjectInfo(self._dirkey(path), 0, etag, time.time_ns(), meta, DIR_CONTENT_TYPE)
        self._remember(
            path,
            _Node(stat_mod.S_IFDIR | stat_mod.S_IMODE(mode), info, meta, DIR_CONTENT_TYPE, True),
        )
        self._set_children(path, set())
        self._child_added(path)

    def _is_empty(self, path: str) -> bool:
        dk = self._dirkey(path)
        page = self.t.list(dk, delimiter="/", max_keys=2)
        return not page.common_prefixes and all(o.key == dk for o in page.objects)

    def rmdir(self, path: str) -> None:
        if check_path(path) == "":
            raise OSError(errno.EBUSY, "cannot remove the root")
        self._need_dir(path)
        if not self._is_empty(path):
            raise OSError(errno.ENOTEMPTY, "directory not empty")
        self.t.delete(self._dirkey(path))
        self._forget_tree(path)
        self._remember(path, None)
        self._child_removed(path)

    def unlink(self, path: str) -> None:
        node = self._need(path)
        if stat_mod.S_ISDIR(node.mode):
            raise OSError(errno.EISDIR, "is a directory")
        key = self._key(path)
        with self._lock:
            st = self._states.get(key)
        if st is not None:
            with st.lock:
                self._detach(st)
        self.t.delete(key)
        self._remember(path, None)
        self._child_removed(path)

    def _detach(self, st: _State) -> None:
        """An unlinked but open file keeps its content (POSIX): pull the rest of the
        object into the spool (up to 256 MiB; beyond, reads of its unwritten ranges
        fail) and stop publishing it."""
        if st.base_etag is not None and 0 < st.base_limit <= _DETACH_MAX:
            for s, e, written in list(st.written.pieces(0, st.base_limit)):
                for a in range(s, e, self.part_size) if not written else ():
                    b = min(e, a + self.part_size)
                    data = self._get_exact(st.key, a, b)
                    if len(data) != b - a:
                        raise OSError(errno.EIO, "object shorter than expected")
                    self._spool_write(st, data, a)
            st.base_etag = None
            st.base_limit = 0
        st.unlinked = True
        st.dirty = False
        self._early_drop(st)
        with self._lock:
            self._pending.discard(st)
            if self._states.get(st.key) is st:
                del self._states[st.key]

    # -- renames --------------------------------------------------------------------------

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        if flags & RENAME_EXCHANGE or flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "rename exchange is not supported on object stores")
        if check_path(old) == "" or check_path(new) == "":
            raise OSError(errno.EBUSY, "cannot rename the root")
        src = self._need(old)
        self._need_dir(_parent(new)[0])
        dst = self._lookup(new)
        if old == new:
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "target exists")
        if stat_mod.S_ISDIR(src.mode):
            if new.startswith(old + "/"):
                raise OSError(errno.EINVAL, "cannot move a directory into itself")
            if dst is not None:
                if not stat_mod.S_ISDIR(dst.mode):
                    raise OSError(errno.ENOTDIR, "target is not a directory")
                if not self._is_empty(new):
                    raise OSError(errno.ENOTEMPTY, "target directory not empty")
                self.t.delete(self._dirkey(new))
            self._rename_dir(old, new)
            return
        if dst is not None and stat_mod.S_ISDIR(dst.mode):
            raise OSError(errno.EISDIR, "target is a directory")
        okey, nkey = self._key(old), self._key(new)
        with self._lock:
            st = self._states.get(okey)
            replaced = self._states.get(nkey)
        if st is not None:
            self._upload_or_eio(st)
            src = self._need(old)
        if replaced is not None:
            # The file being replaced is open: its handles keep its old content and
            # must never publish it over the new one.
            with replaced.lock:
                self._detach(replaced)
        meta = dict(src.meta)
        meta["ctime"] = fmt_time(time.time_ns())
        size = src.info.size if src.info is not None else 0
        etag = self._copy_object(okey, nkey, size, meta, src.ctype or FILE_CONTENT_TYPE)
        self.t.delete(okey)
        info = ObjectInfo(nkey, size, etag, time.time_ns(), meta, src.ctype)
        with self._lock:
            if st is not None and self._states.get(okey) is st:
                del self._states[okey]
                st.key, st.path = nkey, new
                st.base_etag = etag if size else None
                self._states[nkey] = st
        self._remember(old, None)
        self._child_removed(old)
        self._remember(new, _Node(src.mode, info, meta, src.ctype, True))
        self._child_added(new)

    def _copy_object(
        self, src: str, dst: str, size: int, meta: Mapping[str, str], ctype: str
    ) -> str:
        """Server-side copy with new metadata; multipart UploadPartCopy above 5 GiB."""
        if size < _COPY_MAX:
            return self.t.copy(src, dst, metadata=meta, content_type=ctype)
        upload = self.t.create_multipart(dst, metadata=meta, content_type=ctype)
        try:
            futs = []
            for n, start in enumerate(range(0, size, _COPY_PART), 1):
                length = min(_COPY_PART, size - start)
                futs.append(
                    (
                        n,
                        self._io.submit(
                            self.t.upload_part_copy, dst, upload, n, src, start, length
                        ),
                    )
                )
            parts = [(n, f.result()) for n, f in futs]
            return self.t.complete_multipart(dst, upload, parts)
        except BaseException:
            with contextlib.suppress(OSError):
                self.t.abort_multipart(dst, upload)
            raise

    def _iter_tree(self, dk: str) -> Iterator[ObjectInfo]:
        for page in self._pages(dk, ""):
            yield from page.objects

    def _rename_dir(self, old: str, new: str) -> None:
        # Publish what open files under the old directory hold first: their keys move.
        pre = self._key(old) + "/"
        with self._lock:
            moving = [s for k, s in self._states.items() if k.startswith(pre)]
        for st in moving:
            self._upload_or_eio(st)
        intent = self.prefix + INTENT_PREFIX + os.urandom(8).hex()
        body = json.dumps({"v": 1, "from": old, "to": new}, sort_keys=True).encode()
        self.t.put(
            intent,
            body,
            metadata=self._new_meta(stat_mod.S_IFREG | 0o400),
            content_type=FILE_CONTENT_TYPE,
            if_none_match=True,
        )
        try:
            self._finish_dir_rename(old, new)
        finally:
            self._forget_tree(old)
            self._forget_tree(new)
        self.t.delete(intent)
        with self._lock:
            for st in moving:
                if self._states.get(st.key) is st:
                    del self._states[st.key]
                    st.key = self._key(new) + st.key[len(pre) - 1 :]
                    st.path = new + st.path[len(old) :]
                    self._states[st.key] = st
        self._remember(old, None)
        self._child_removed(old)
        self._child_added(new)

    def _finish_dir_rename(self, old: str, new: str) -> None:
        """Copy every key under ``old/`` to ``new/`` (children keep their cipher names:
        they depend only on their own directory's IV), then delete the old keys.
        Idempotent: a re-run copies what is still under ``old/`` and deletes it."""
        src, dst = self._dirkey(old), self._dirkey(new)
        batch: list[concurrent.futures.Future[str]] = []
        for o in self._iter_tree(src):
            batch.append(self._io.submit(self.t.copy, o.key, dst + o.key[len(src) :]))
            if len(batch) >= 4 * self.parallel:
                for f in batch:
                    f.result()
                batch = []
        for f in batch:
            f.result()
        for _ in range(_LIST_PAGES_MAX):
            page = self.t.list(src, delimiter="", max_keys=1000)
            keys = [o.key for o in page.objects if o.key.startswith(src)]
            if not keys:
                break
            self.t.delete_many(keys)

    def recover_renames(self) -> int:
        """Finish directory renames an earlier daemon left half-done (run at mount,
        before serving).  Returns how many it finished.  An intent that is not ours
        (bad JSON, paths that are not valid, one nested in the other) is left alone
        and logged."""
        done = 0
        page = self.t.list(self.prefix + INTENT_PREFIX, delimiter="/", max_keys=1000)
        for o in page.objects:
            if o.size > _INTENT_MAX:
                log.warning("event=bad_rename_intent key=%s", o.key)
                continue
            body = self.t.get(o.key, 0, _INTENT_MAX + 1)
            try:
                doc = json.loads(body)
                old, new = doc["from"], doc["to"]
                if doc.get("v") != 1 or not isinstance(old, str) or not isinstance(new, str):
                    raise ValueError
                if not old or not new or check_path(old) != old or check_path(new) != new:
                    raise ValueError
                if new.startswith(old + "/") or old.startswith(new + "/") or old == new:
                    raise ValueError
            except (ValueError, KeyError, TypeError, OSError, UnicodeDecodeError):
                log.warning("event=bad_rename_intent key=%s", o.key)
                continue
            self._finish_dir_rename(old, new)
            self.t.delete(o.key)
            self._forget_tree(old)
            self._forget_tree(new)
            with self._lock:
                self._children.clear()
                self._children_names = 0
            done += 1
            log.info("event=rename_recovered key=%s", o.key)
        return done

    def link(self, src: str, dst: str) -> None:
        del src, dst
        raise OSError(errno.EPERM, "hard links are not supported on object stores")

    def symlink(self, target: str, path: str) -> None:
        self._check_creatable(path)
        body = target.encode("utf-8", "surrogateescape")
        if len(body) > _SYMLINK_MAX or b"\0" in body or body != body.strip():
            raise OSError(errno.EINVAL, "symlink target not storable")
        meta = self._new_meta(stat_mod.S_IFLNK | 0o777)
        try:
            etag = self.t.put(self._key(path), body, metadata=meta, if_none_match=True)
        except PreconditionFailed:
            self._forget(path)
            raise OSError(errno.EEXIST, "exists") from None
        info = ObjectInfo(self._key(path), len(body), etag, time.time_ns(), meta, FILE_CONTENT_TYPE)
        self._remember(path, _Node(stat_mod.S_IFLNK | 0o777, info, meta, FILE_CONTENT_TYPE, True))
        self._child_added(path)

    def readlink(self, path: str) -> str:
        node = self._need(path)
        if not stat_mod.S_ISLNK(node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        data = self.t.get(self._key(path), 0, _SYMLINK_MAX + 1)
        if len(data) > _SYMLINK_MAX:
            raise OSError(errno.EIO, "symlink target too long")
        return data.strip().decode("utf-8", "surrogateescape")

    # -- metadata updates (copy onto itself with REPLACE, as s3fs does) ------------------

    def _update_meta(self, path: str, changes: Mapping[str, str], mode: int | None = None) -> None:
        node = self._need(path)
        with self._lock:
            open_st = self._states.get(self._key(path))
        # An open file's own metadata is the newest (writes move its mtime).
        meta = dict(open_st.meta if open_st is not None else node.meta)
        meta.update(changes)
        meta["ctime"] = fmt_time(time.time_ns())
        new_mode = node.mode if mode is None else mode
        meta["mode"] = str(new_mode)
        is_dir = stat_mod.S_ISDIR(node.mode)
        if is_dir:
            if path == "" and not self.prefix:
                raise OSError(errno.EPERM, "the bucket root has no metadata object")
            dk = self._dirkey(path)
            for k in ("uid", "gid", "atime", "mtime"):
                meta.setdefault(k, self._new_meta(0)[k])
            if node.marker:
                etag = self.t.copy(dk, dk, metadata=meta, content_type=DIR_CONTENT_TYPE)
            else:  # implicit directory (or the root): materialise its marker
                etag = self.t.put(dk, b"", metadata=meta, content_type=DIR_CONTENT_TYPE)
            info = ObjectInfo(dk, 0, etag, time.time_ns(), meta, DIR_CONTENT_TYPE)
            self._remember(path, _Node(new_mode, info, meta, DIR_CONTENT_TYPE, True))
            return
        key = self._key(path)
        with self._lock:
            st = self._states.get(key)
        if st is not None:
            with st.lock:
                st.meta.update(meta)
                st.mode = new_mode
                st.meta_gen += 1
                if st.dirty:
                    self._remember(
                        path, _Node(new_mode, node.info, dict(st.meta), node.ctype, True)
                    )
                    return  # published with the content
        size = node.info.size if node.info is not None else 0
        etag = self._copy_object(key, key, size, meta, node.ctype or FILE_CONTENT_TYPE)
        info = ObjectInfo(key, size, etag, time.time_ns(), meta, node.ctype)
        if st is not None:
            with st.lock:
                if st.base_etag is not None and not st.dirty:
                    st.base_etag = etag
        self._remember(path, _Node(new_mode, info, meta, node.ctype, True))

    def chmod(self, path: str, mode: int) -> None:
        node = self._need(path)
        if stat_mod.S_ISLNK(node.mode):
            raise OSError(errno.EOPNOTSUPP, "chmod on a symlink")
        self._update_meta(path, {}, stat_mod.S_IFMT(node.mode) | stat_mod.S_IMODE(mode))

    def chown(self, path: str, uid: int, gid: int) -> None:
        changes = {}
        if uid != -1:
            changes["uid"] = str(uid)
        if gid != -1:
            changes["gid"] = str(gid)
        if changes:
            self._update_meta(path, changes)

    def utimens(self, path: str, atime_ns: int | None, mtime_ns: int | None) -> None:
        changes = {}
        if atime_ns is not None:
            changes["atime"] = fmt_time(atime_ns)
        if mtime_ns is not None:
            changes["mtime"] = fmt_time(mtime_ns)
        if changes:
            self._update_meta(path, changes)

    def statfs(self) -> dict[str, int]:
        """Buckets have no size: a large synthetic capacity, like s3fs (256 TiB)."""
        blocks = (256 << 40) // 4096
        return {
            "f_bsize": 4096,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": blocks,
            "f_bavail": blocks,
            "f_files": 1 << 32,
            "f_ffree": 1 << 32,
            "f_favail": 1 << 32,
            "f_namemax": 255,
        }

    def usage(
        self,
        *,
        max_objects: int = USAGE_MAX_OBJECTS,
        budget: float = USAGE_BUDGET,
        clock: Callable[[], float] = time.monotonic,
    ) -> tuple[int, int, int]:
        """``(bytes stored, objects, bytes written but not yet uploaded)`` under the
        prefix: what NodeGetVolumeStats reports for the volume (statfs above is synthetic).

        Why a full listing: object stores keep no per-prefix totals, so the sizes are
        summed from a paged listing without delimiter (markers, ``gocryptfs.conf`` and
        ``gocryptfs.diriv`` objects included: they are stored bytes too).  The store is
        hostile: keys outside the prefix, a token that does not advance and sizes out of
        range are :class:`BadResponse`; more than ``max_objects`` objects or pages, or
        pages still coming after ``budget`` seconds, are refused too (E2BIG, ETIMEDOUT)
        rather than trusted or waited for.  The third number is how much open files
        have grown past what the listing saw (their spools hold the ciphertext)."""
        with self._lock:
            dirty = {
                st.key: st.size
                for st in (*self._states.values(), *self._pending)
                if st.dirty and not st.unlinked
            }
        listed = dict.fromkeys(dirty, 0)
        stored = objects = 0
        deadline = clock() + budget
        for pages, page in enumerate(self._pages(self.prefix, ""), 1):
            for o in page.objects:
                if not 0 <= o.size <= _OBJECT_SIZE_MAX:
                    raise BadResponse("list: object size out of range")
                stored += o.size
                if o.key in listed:
                    listed[o.key] = o.size
            objects += len(page.objects)
            if objects > max_objects or pages > max_objects // 100 + 10:
                raise OSError(errno.E2BIG, f"more than {max_objects} objects to measure")
            if page.next_token is not None and clock() > deadline:
                raise OSError(errno.ETIMEDOUT, f"listing took longer than {budget:g} s")
        pending = sum(max(0, size - listed[k]) for k, size in dirty.items())
        return stored, objects, pending

    # -- xattrs: s3fs without -o use_xattr (CDH's default) answers EOPNOTSUPP ---------------

    def getxattr(self, path: str, name: str) -> bytes:
        raise OSError(errno.EOPNOTSUPP, "xattrs are not stored on object stores")

    def setxattr(self, path: str, name: str, value: bytes, flags: int = 0) -> None:
        raise OSError(errno.EOPNOTSUPP, "xattrs are not stored on object stores")

    def listxattr(self, path: str) -> list[str]:
        self._need(path)
        return []

    def removexattr(self, path: str, name: str) -> None:
        raise OSError(errno.EOPNOTSUPP, "xattrs are not stored on object stores")

    # -- small whole files ------------------------------------------------------------------

    def read_small_file(self, path: str, max_size: int = 1 << 20) -> bytes:
        key = self._key(check_path(path))
        with self._lock:
            st = self._states.get(key)
        if st is not None:
            if st.size > max_size:
                raise OSError(errno.EFBIG, "file too large")
            return self._read(st, 0, st.size)
        cached = self._lookup(path)
        if cached is None:
            raise OSError(errno.ENOENT, "no such object")
        if not stat_mod.S_ISREG(cached.mode):
            raise OSError(errno.EIO, "not a regular file")
        if cached.data is not None and len(cached.data) <= max_size:
            return cached.data
        try:
            data = self.t.get(key, 0, max_size + 1)
        except ObjectNotFound:
            raise OSError(errno.ENOENT, "no such object") from None
        if len(data) > max_size:
            raise OSError(errno.EFBIG, "file too large")
        if len(data) <= _SMALL_CACHED:
            with self._lock:
                if self._nodes.get(path) is cached:
                    cached.data = data
        return data

    def write_small_file_excl(
        self, path: str, data: bytes, mode: int, *, sync: bool = True
    ) -> None:
        del sync  # a PUT is durable when it returns
        self._check_creatable(path)
        meta = self._new_meta(stat_mod.S_IFREG | stat_mod.S_IMODE(mode))
        key = self._key(path)
        try:
            etag = self.t.put(key, bytes(data), metadata=meta, if_none_match=True)
        except PreconditionFailed:
            self._forget(path)
            raise OSError(errno.EEXIST, "exists") from None
        info = ObjectInfo(key, len(data), etag, time.time_ns(), meta, FILE_CONTENT_TYPE)
        node = _Node(stat_mod.S_IFREG | stat_mod.S_IMODE(mode), info, meta, FILE_CONTENT_TYPE, True)
        if len(data) <= _SMALL_CACHED:
            node.data = bytes(data)
        self._remember(path, node)
        self._child_added(path)

    # -- file handles ---------------------------------------------------------------------

    def open(self, path: str, flags: int, mode: int = 0o600) -> _Handle:
        if flags & os.O_APPEND:
            raise OSError(errno.EINVAL, "O_APPEND is not allowed on backend handles")
        check_path(path)
        key = self._key(path)
        writable = bool(flags & (os.O_WRONLY | os.O_RDWR))
        for _ in range(100):
            st = self._open_state(path, key, flags, mode)
            with st.lock:
                with self._lock:
                    if self._states.get(key) is not st:
                        # Closed and dropped meanwhile by another opener: take the
                        # current one (O_EXCL was satisfied: the file is ours).
                        flags &= ~os.O_EXCL
                        continue
                    self._pending.discard(st)
                st.refs += 1
                break
        else:
            raise OSError(errno.EAGAIN, "open raced with close too often")
        h = _Handle(st, writable)
        if writable and flags & os.O_TRUNC:
            self.ftruncate(h, 0)
        return h

    def _open_state(self, path: str, key: str, flags: int, mode: int) -> _State:
        """The shared state of ``key``, creating the object (O_CREAT) and/or the state."""
        with self._lock:
            st = self._states.get(key)
        if st is None:
            node = self._lookup(path) if path else self._need(path)
            if node is None:
                if not flags & os.O_CREAT:
                    raise OSError(errno.ENOENT, "no such object")
                node = self._create_empty(path, mode, bool(flags & os.O_EXCL))
            elif flags & os.O_CREAT and flags & os.O_EXCL:
                raise OSError(errno.EEXIST, "exists")
            if stat_mod.S_ISDIR(node.mode):
                raise OSError(errno.EISDIR, "is a directory")
            if stat_mod.S_ISLNK(node.mode):
                raise OSError(errno.ELOOP, "is a symlink")
            if not stat_mod.S_ISREG(node.mode):
                raise OSError(errno.EIO, "not a regular file")
            with self._lock:
                st = self._states.get(key)
                if st is None:
                    st = self._states[key] = _State(path, key, node, _ino(key))
        elif flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, "exists")
        return st

    def _create_empty(self, path: str, mode: int, excl: bool) -> _Node:
        """s3fs's create: a zero-byte object with full metadata, right away."""
        self._need_dir(_parent(path)[0])
        meta = self._new_meta(stat_mod.S_IFREG | stat_mod.S_IMODE(mode))
        key = self._key(path)
        try:
            # Always create-only: a file our cache missed is opened, never emptied.
            etag = self.t.put(key, b"", metadata=meta, if_none_match=True)
        except PreconditionFailed:
            self._forget(path)
            if excl:
                raise OSError(errno.EEXIST, "exists") from None
            return self._need(path)
        info = ObjectInfo(key, 0, etag, time.time_ns(), meta, FILE_CONTENT_TYPE)
        node = _Node(stat_mod.S_IFREG | stat_mod.S_IMODE(mode), info, meta, FILE_CONTENT_TYPE, True)
        self._remember(path, node)
        self._child_added(path)
        return node

    # -- reading ----------------------------------------------------------------------------

    def _get_exact(self, key: str, s: int, e: int) -> bytes:
        data = self.t.get(key, s, e - s)
        if len(data) > e - s:
            raise BadResponse("get: longer than asked")
        return data

    def _evict_for(self, need: int, reader: tuple[str, str, int] | None) -> bool:
        """Make room for ``need`` more bytes (caller holds ``self._lock``); False if
        there is none.  With ``reader`` (key, etag, chunk index of a sequential reader
        asking for read-ahead) the chunks it is in or has yet to read are kept:
        chunks of that object it has finished go first, then its chunks more than
        ``_KEEP_BEHIND`` behind it, then other objects' chunks, least recently used
        first.  Without it, anything may go (a chunk needed now)."""
        budget = self.cache_bytes - need

        def full() -> bool:
            return self._cache_used + self._cache_reserved > budget

        if reader is None:
            while full() and self._cache:
                buf = self._cache.popitem(last=False)[1]
                self._cache_used -= len(buf)
                self._recycle(buf)
            return not full()
        key, etag, first = reader
        mine = [c for c in self._cache if c[0] == key and c[1] == etag]
        done = self._done
        order = [c for c in mine if c in done]
        order += [c for c in mine if c[2] < first - _KEEP_BEHIND and c not in done]
        order += [c for c in self._cache if c[0] != key or c[1] != etag]
        for ck in order:
            if not full():
                break
            buf = self._cache.pop(ck)
            self._cache_used -= len(buf)
            self._recycle(buf)
        return not full()

    def _recycle(self, buf: bytes | bytearray) -> None:
        """Keep a chunk buffer just taken out of the cache for the next fetch (caller
        holds ``self._lock`` and ``buf`` in one local).  Why: a fresh 1 MiB buffer per
        chunk is page-faulted in and zeroed, and unmapped again when evicted (the
        bounded-heap allocator profile mmap()s buffers this large, see
        ``fusefrontend/allocator.py``); reusing them cut the daemon's CPU for a
        sequential read by about a third (docs/fuse_crypt.md).  Only a buffer nobody
        else can reach is kept: no reader's memoryview of it (a view holds a
        reference), no future's result, no other thread's local; CPython's reference
        count says so exactly (:data:`_UNSHARED_REFS`, measured at import on the same
        call shape).  Were that ever wrong, a reader would decrypt another chunk's
        ciphertext, which every block's MAC (bound to its block number and file ID)
        refuses: EIO, never wrong plaintext."""
        if (
            type(buf) is bytearray
            and len(buf) == _CHUNK
            and len(self._spare) < _SPARE_CHUNKS
            and sys.getrefcount(buf) <= _UNSHARED_REFS
        ):
            self._spare.append(buf)

    def _spare_buffer(self, n: int) -> bytearray | None:
        """A recycled chunk buffer for a fetch of ``n`` bytes, or None (allocate)."""
        if n != _CHUNK:
            return None
        with self._lock:
            return self._spare.pop() if self._spare else None

    def _cache_put(self, ck: tuple[str, str, int], data: bytes | bytearray) -> None:
        if len(data) > self.cache_bytes:
            return
        with self._lock:
            old = self._cache.pop(ck, None)
            if old is not None:
                self._cache_used -= len(old)
                self._recycle(old)
            self._evict_for(len(data), None)
            self._cache[ck] = data
            self._cache_used += len(data)

    @staticmethod
    def _chunk_bounds(i: int) -> tuple[int, int]:
        return (0 if i == 0 else HEADER_LEN + i * _CHUNK), HEADER_LEN + (i + 1) * _CHUNK

    @staticmethod
    def _chunk_of(off: int) -> int:
        return max(0, (off - HEADER_LEN) // _CHUNK)

    def _chunk(self, key: str, etag: str, i: int, limit: int) -> bytes | bytearray:
        """Chunk ``i`` of object version ``etag`` (clipped to ``limit``), needed now:
        from the cache, an in-flight read-ahead, or a new fetch (room is made by
        evicting anything, least recently used first)."""
        got = self._start((key, etag, i), limit, None)
        assert got is not None
        return got.result() if isinstance(got, concurrent.futures.Future) else got

    def _start(
        self, ck: tuple[str, str, int], limit: int, reader: tuple[str, str, int] | None
    ) -> bytes | bytearray | concurrent.futures.Future[bytes | bytearray] | None:
        """Chunk ``ck`` if cached, else the fetch that will bring it (joined if in
        flight, else queued on the pump).  With ``reader`` (a read-ahead for the
        sequential reader at that (key, etag, chunk)) the fetch is only queued when
        the cache has room for it without evicting what the reader still needs;
        None when it has not, so the cache plus the fetches in flight stay within
        ``cache_bytes``."""
        with self._lock:
            data = self._cache.get(ck)
            if data is not None:
                self._cache.move_to_end(ck)
                return data
            fut = self._inflight.get(ck)
            if fut is not None:
                return fut
            if reader is not None and ck in self._done:
                # A late request's read-ahead: the reader is past this chunk already.
                return b""
            s, e = self._chunk_bounds(ck[2])
            e = min(e, limit)
            if s >= e:
                return b""
            if not self._evict_for(e - s, reader) and reader is not None:
                return None
            self._cache_reserved += e - s
            try:
                fut = self._ra.submit(self._fetch_chunk, ck, s, e, limit)
            except BaseException:
                self._cache_reserved -= e - s
                raise
            self._inflight[ck] = fut
            return fut

    def _fetch_chunk(
        self, ck: tuple[str, str, int], s: int, e: int, limit: int
    ) -> bytes | bytearray:
        try:
            try:
                # One buffer per chunk, kept as read: a transport with get_buffer
                # (S3, OSS, the retrying wrapper) skips the joined copy of the body.
                get_buffer = getattr(self.t, "get_buffer", None)
                data: bytes | bytearray | None = self._stream_read(ck, s, e, limit)
                if data is not None:
                    pass
                elif get_buffer is None:
                    data = self._get_exact(ck[0], s, e)
                else:
                    data = get_buffer(ck[0], s, e - s)
                    if not isinstance(data, bytes | bytearray) or len(data) > e - s:
                        raise BadResponse("get: longer than asked")
            finally:
                with self._lock:
                    self._cache_reserved -= e - s
            self._cache_put(ck, data)
            return data
        finally:
            with self._lock:
                self._inflight.pop(ck, None)

    def _stream_read(
        self, ck: tuple[str, str, int], s: int, e: int, limit: int
    ) -> bytearray | None:
        """Chunk bytes ``[s, e)`` read from the streaming GET ``[.., limit)`` of
        ``(key, etag)`` when it stands at ``s``; None tells the caller to send a ranged
        GET.  Why: a ranged GET costs a round trip (and O(object size) on moto), so a
        sequential reader is served by one long GET, as rclone does.  Only chunks of
        sequential readers come here (:meth:`_chunk`).  A stream is opened at chunk 0,
        or at a chunk whose predecessor is cached (the reader just had it); a chunk
        ahead of the stream re-opens it there; one behind it, or a stream another
        thread holds, is a ranged GET.  A stream that fails or ends early is closed and
        the chunk fetched by a ranged GET (through the retrying transport): never short
        or wrong bytes.
        Memory: the chunk's buffer only (the socket applies backpressure)."""
        open_stream = getattr(self.t, "open_stream", None)
        if open_stream is None or s >= limit or self._closed.is_set():
            return None
        key, etag, i = ck
        sk = (key, etag)
        drop: list[_Stream] = []
        with self._lock:
            now = time.monotonic()
            for k, v in list(self._streams.items()):
                if not v.busy and (now - v.used > _STREAM_IDLE or (k[0] == key and k != sk)):
                    drop.append(self._streams.pop(k))
            cur = self._streams.get(sk)
            opening = False
            if cur is not None and (cur.busy or s < cur.pos):
                cur = None  # held by another thread, or behind: a ranged GET
            elif cur is not None and s == cur.pos:
                cur.busy = True
            elif e >= limit or (
                i > 0 and (prev := (key, etag, i - 1)) not in self._cache and prev not in self._done
            ):
                # The object's last chunk (a small file: one GET either way), or no
                # sign of a reader going on from here (large reads at random offsets
                # count as sequential too): a ranged GET, not a stream dropped after
                # one chunk.
                cur = None
            else:
                if cur is not None:  # a forward jump: re-open at s
                    drop.append(self._streams.pop(sk))
                while len(self._streams) >= _STREAMS_MAX:
                    victim = next((k for k, v in self._streams.items() if not v.busy), None)
                    if victim is None:
                        break
                    drop.append(self._streams.pop(victim))
                if len(self._streams) < _STREAMS_MAX:
                    cur = self._streams[sk] = _Stream(s, limit)
                    opening = True
                else:
                    cur = None
        for old in drop:
            old.close()
        if cur is None:
            return None
        try:
            if opening:
                cur.body = open_stream(key, s, limit)
            assert cur.body is not None
            data: bytearray = cur.body.read_exact(e - s, self._spare_buffer(e - s))
            if len(data) != e - s:
                raise BadResponse("stream: short chunk")
        except OSError as exc:
            log.info("event=stream_fallback errno=%s", exc.errno)
            with self._lock:
                if self._streams.get(sk) is cur:
                    del self._streams[sk]
            cur.close()
            return None
        with self._lock:
            cur.pos = e
            cur.used = time.monotonic()
            cur.busy = False
            done = e >= cur.limit or self._streams.get(sk) is not cur or self._closed.is_set()
            if done and self._streams.get(sk) is cur:
                del self._streams[sk]
        if done:
            cur.close()
        return data

    def _close_streams(self, key: str | None) -> None:
        """Close the idle streams of ``key`` (all of them with None): at release and
        unmount.  A stream in use is closed by its reader when it is done."""
        with self._lock:
            drop = [
                self._streams.pop(k)
                for k, v in list(self._streams.items())
                if (key is None or k[0] == key) and not v.busy
            ]
        for old in drop:
            old.close()

    def _remote(
        self, st: _State, etag: str, limit: int, s: int, e: int
    ) -> list[bytes | memoryview]:
        """Bytes ``[s, e)`` of published version ``etag`` (``e <= limit``), as pieces
        (views of cached chunks are handed out, never copied here: the caller copies
        once into its own buffer).  A random read costs one GET of exactly the blocks
        asked for (the frontend aligns to cipher blocks); a sequential reader gets
        whole chunks plus read-ahead."""
        key = st.key
        if e <= HEADER_LEN:  # the file header alone (the frontend's file-ID read)
            hdr = st.header
            if hdr is None:
                hdr = self._get_exact(key, 0, min(HEADER_LEN, limit))
                st.header = hdr
            return [hdr[s:e]]
        seq = s == 0 or abs(s - st.seq_next) <= CIPHER_BS or e - s >= _STREAMING
        st.seq_next = e
        first, last = self._chunk_of(s), self._chunk_of(e - 1)
        if not seq:
            # A small read off the sequence (a random reader, or a page the kernel
            # asks for alone): served from chunks cached or on their way, else one
            # GET of exactly its blocks.
            with self._lock:
                near = all(
                    (key, etag, i) in self._cache or (key, etag, i) in self._inflight
                    for i in range(first, last + 1)
                )
            if not near:
                return [self._get_exact(key, s, e)]
        parts: list[bytes | memoryview] = []
        for i in range(first, last + 1):
            chunk = self._chunk(key, etag, i, limit)
            cs = self._chunk_bounds(i)[0]
            parts.append(memoryview(chunk)[max(0, s - cs) : max(0, e - cs)])
        if seq:
            finished = last if e >= min(self._chunk_bounds(last)[1], limit) else last - 1
            with self._lock:
                done = self._done
                mine = [c for c in done if c[0] == key and c[1] == etag]
                if mine and first + _KEEP_BEHIND < max(c[2] for c in mine):
                    # Far behind what a reader of this object finished: a new pass
                    # over it (not a late request), which needs its read-ahead.
                    for c in mine:
                        if c[2] >= first:
                            del done[c]
                for i in range(first, finished + 1):
                    done[(key, etag, i)] = None
                    done.move_to_end((key, etag, i))
                while len(done) > _DONE_MAX:
                    done.popitem(last=False)
            # In order, and none after one that found no room: the pump then reads
            # the stream without gaps (a gap would re-open it further on).
            reader = (key, etag, first)
            for j in range(last + 1, last + 1 + self.readahead):
                if self._chunk_bounds(j)[0] >= limit:
                    break
                if self._start((key, etag, j), limit, reader) is None:
                    break
        if s == 0 and parts and len(parts[0]) >= HEADER_LEN:
            st.header = bytes(parts[0][:HEADER_LEN])
        return parts

    def _read(self, st: _State, offset: int, size: int, *, locked: bool = False) -> bytes:
        """File bytes ``[offset, offset+size)``: written ranges from the spool, the rest
        from the published object, zeros past its end (holes).  ``locked``: the
        caller (an upload's part worker) has the state frozen."""
        out = self._pieces(st, offset, size, locked=locked)
        if len(out) == 1 and isinstance(out[0], bytes):
            return out[0]
        return b"".join(out)

    def _pieces(
        self, st: _State, offset: int, size: int, *, locked: bool = False
    ) -> list[bytes | memoryview]:
        """:meth:`_read` as pieces in order (short at the end of the file, or where the
        object turned out shorter than it said).  The spool is read under
        ``st.lock`` (an upload may be emptying it); GETs happen outside it."""
        ctx = contextlib.nullcontext() if locked else st.lock
        plan: list[bytes | tuple[int, int, int]] = []
        with ctx:
            end = min(st.size, offset + size)
            if offset >= end:
                return []
            etag, limit = st.base_etag, st.base_limit
            for s, e, written in st.written.pieces(offset, end):
                if written:
                    assert st.spool is not None
                    data = os.pread(st.spool, e - s, s)
                    plan.append(data + bytes(e - s - len(data)))
                else:
                    plan.append((s, min(e, limit) if etag is not None else s, e))
        out: list[bytes | memoryview] = []
        for item in plan:
            if isinstance(item, bytes):
                out.append(item)
                continue
            s, r, e = item
            if r > s:
                assert etag is not None
                got = self._remote(st, etag, limit, s, r)
                out += got
                if sum(len(p) for p in got) < r - s:
                    break  # the object is shorter than it said: a short read, EIO above
            if e > max(r, s):
                out.append(bytes(e - max(r, s)))  # a hole (or truncated-then-grown range)
        return out

    def pread(self, handle: _Handle, size: int, offset: int) -> bytes:
        return self._read(handle.state, offset, size)

    def pread_into(self, handle: _Handle, buf: memoryview, offset: int) -> int:
        """Copy the pieces straight into the frontend's buffer.  Why: joining them
        first cost a fresh 1 MiB allocation per FUSE read (page-faulted in: the
        bounded-heap profile mmaps buffers >= 1 MiB) and a second copy."""
        n = 0
        for p in self._pieces(handle.state, offset, len(buf)):
            m = len(p)
            buf[n : n + m] = p
            n += m
        return n

    # -- writing ----------------------------------------------------------------------------

    def _spool_fd(self, st: _State) -> int:
        if st.spool is None:
            if self.spool_dir is not None:
                fd, name = tempfile.mkstemp(prefix=".spool-", dir=self.spool_dir)
                os.unlink(name)
                st.spool = fd
            else:
                st.spool = os.memfd_create("fuse-crypt-spool", os.MFD_CLOEXEC)
        return st.spool

    def _spool_write(self, st: _State, data: bytes | memoryview, offset: int) -> None:
        fd = self._spool_fd(st)
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            n = os.pwrite(fd, mv[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, "spool write failed")
            done += n
        st.written.add(offset, offset + len(mv))

    def _touch(self, st: _State) -> None:
        now = fmt_time(time.time_ns())
        st.meta["mtime"] = now
        st.meta["ctime"] = now
        st.dirty = True

    def pwrite(self, handle: _Handle, data: bytes | memoryview, offset: int) -> int:
        if not handle.writable:
            raise OSError(errno.EBADF, "handle not open for writing")
        st = handle.state
        n = len(data)
        with st.lock:
            self._spool_write(st, data, offset)
            st.size = max(st.size, offset + n)
            self._touch(st)
            if n:
                self._early_written(st, offset, offset + n)
        return n

    def ftruncate(self, handle: _Handle, size: int) -> None:
        st = handle.state
        with st.lock:
            if size < st.size:
                self._early_drop(st)  # its parts may hold cut-off bytes: start over
                st.written.clip(size)
                st.base_limit = min(st.base_limit, size)
                if st.spool is not None:
                    os.ftruncate(st.spool, size)
            st.size = size
            self._touch(st)

    def fstat(self, handle: _Handle) -> Stat:
        st = handle.state
        with st.lock:
            meta = st.meta
            mtime = parse_time(meta.get("mtime")) or 0
            atime = parse_time(meta.get("atime"))
            ctime = parse_time(meta.get("ctime"))
            return Stat(
                st.mode,
                st.ino,
                _DEV,
                0 if st.unlinked else 1,
                _parse_id(meta.get("uid"), self.uid),
                _parse_id(meta.get("gid"), self.gid),
                st.size,
                mtime if atime is None else atime,
                mtime,
                mtime if ctime is None else ctime,
                -(-st.size // 512),
                4096,
            )

    def _compose(self, st: _State, s: int, e: int) -> bytes:
        data = self._read(st, s, e - s, locked=True)
        if len(data) != e - s:
            raise OSError(errno.EIO, "object shorter than expected")
        return data

    def _body(self, st: _State, s: int, e: int) -> Body:
        """The upload body of file bytes ``[s, e)`` (caller holds ``st.lock``, so the
        spool stays as it is until the upload returns): a :class:`SpoolRange` view when
        the range was written whole into the spool (a sequential write: the part is
        then never whole in memory, issue 10's 64 MiB budget), else the composed bytes
        (spool, published object and holes), as are ranges under a piece."""
        if (
            e - s >= _VIEW_MIN
            and st.spool is not None
            and next(st.written.pieces(s, e)) == (s, e, True)
            and os.fstat(st.spool).st_size >= e
        ):
            return SpoolRange(st.spool, s, e - s)
        return self._compose(st, s, e)

    def _upload(self, st: _State) -> None:
        """Publish the file whole (caller holds ``st.lock``)."""
        if not st.dirty or st.unlinked:
            return
        meta = dict(st.meta)
        meta["mode"] = str(st.mode)
        size = st.size
        if size <= self.multipart_threshold or st.base_etag is None and size <= self.part_size:
            self._early_drop(st)
            body = self._body(st, 0, size)
            etag = self.t.put(st.key, body, metadata=meta, content_type=st.ctype)
        else:
            done = self._finish_early(st, size, meta) if st.early is not None else None
            if done is None:
                etag = self._upload_multipart(st, size, meta)
            else:
                etag, meta = done
                st.meta.update({k: meta[k] for k in _TIME_KEYS if k in meta})
        st.base_etag = etag if size else None
        st.base_limit = size if size else 0
        st.written.clear()
        st.header = None
        if st.spool is not None:
            os.ftruncate(st.spool, 0)
        st.dirty = False
        info = ObjectInfo(st.key, size, etag, time.time_ns(), meta, st.ctype)
        self._remember(st.path, _Node(st.mode, info, meta, st.ctype, True))

    def _plan_parts(self, st: _State, size: int) -> list[tuple[int, int, bool]]:
        """(start, end, copy) parts: ``part_size`` pieces that were written are
        uploaded; runs of untouched pieces become one UploadPartCopy (<= 5 GiB)."""
        psize = max(self.part_size, -(-size // _MAX_PARTS))
        parts: list[tuple[int, int, bool]] = []
        for a in range(0, size, psize):
            b = min(size, a + psize)
            clean = (
                st.base_etag is not None and b <= st.base_limit and not st.written.overlaps(a, b)
            )
            if clean and parts and parts[-1][2] and b - parts[-1][0] <= _COPY_MAX:
                parts[-1] = (parts[-1][0], b, True)
            else:
                parts.append((a, b, clean))
        return parts

    def _send_parts(
        self, st: _State, upload: str, jobs: list[tuple[int, int, int, bool]]
    ) -> list[tuple[int, str]]:
        """Upload (or UploadPartCopy, ``copy``) parts ``(n, start, end, copy)`` of the
        file, ``parallel`` at a time (caller holds ``st.lock``); their (n, ETag)."""
        sem = threading.Semaphore(self.parallel)

        def one(n: int, a: int, b: int, copy: bool) -> str:
            try:
                if copy:
                    return self.t.upload_part_copy(st.key, upload, n, st.key, a, b - a)
                return self.t.upload_part(st.key, upload, n, self._body(st, a, b))
            finally:
                sem.release()

        futs = []
        for n, a, b, copy in jobs:
            sem.acquire()  # bounds the part bodies held in memory
            futs.append((n, self._io.submit(one, n, a, b, copy)))
        return [(n, f.result()) for n, f in futs]

    def _upload_multipart(self, st: _State, size: int, meta: dict[str, str]) -> str:
        upload = self.t.create_multipart(st.key, metadata=meta, content_type=st.ctype)
        try:
            jobs = [(n, a, b, c) for n, (a, b, c) in enumerate(self._plan_parts(st, size), 1)]
            parts = self._send_parts(st, upload, jobs)
            return self.t.complete_multipart(st.key, upload, parts)
        except BaseException:
            with contextlib.suppress(OSError):
                self.t.abort_multipart(st.key, upload)
            raise

    # -- streaming multipart upload of sequential writes (issue 10) ---------------------------

    def _early_written(self, st: _State, s: int, e: int) -> None:
        """After a write of ``[s, e)`` (``st.lock`` held): dirty the streamed parts it
        touched, then start or feed the streaming upload once the spool holds one written
        range from offset 0 past the multipart threshold.  Files that never get there
        (small ones, random writers) are uploaded at flush/fsync/close exactly as before."""
        early = st.early
        if early is not None:
            with early.lock:
                last = min((e - 1) // early.psize + 1, early.next - 1)
                for n in range(s // early.psize + 1, last + 1):
                    early.version[n] = early.version.get(n, 0) + 1
                    early.etags.pop(n, None)
        if st.unlinked or st.spool is None or not st.written.r:
            return
        head = st.written.r[0][0]
        if head != 0:
            # An existing file overwritten from its start keeps its header (the file ID):
            # bring those bytes into the spool (usually cached: no request), or wait.
            if early is not None or head > HEADER_LEN or st.base_etag is None:
                return
            if st.written.r[0][1] - CIPHER_BS <= self.multipart_threshold:
                return
            hdr = self._read(st, 0, head, locked=True)
            if len(hdr) != head:
                return
            self._spool_write(st, hdr, 0)
        # A cipher block of margin: the frontend rewrites a partial last block in place.
        end = st.written.r[0][1] - CIPHER_BS
        if early is None:
            if end <= self.multipart_threshold:
                return
            meta = dict(st.meta)
            meta["mode"] = str(st.mode)
            early = _Early(st.key, os.dup(st.spool), self.part_size, meta, st.ctype, st.meta_gen)
            st.early = early
            with early.lock:
                early.inflight.add(0)
                try:
                    self._early_io.submit(self._early_job, early, 0)
                except RuntimeError:  # shut down: unmounting
                    early.inflight.discard(0)
                    early.failed = True
                    return
        with early.lock:
            early.ready = max(early.ready, end // early.psize)
            self._early_pump(early)

    def _early_pump(self, early: _Early) -> None:
        """Hand out complete parts, at most ``parallel`` in flight per file, each read
        from the spool by its worker only when it runs (``early.lock`` held)."""
        if early.upload_id is None or early.failed or early.closing or early.stop:
            return
        while early.next <= min(early.ready, _MAX_PARTS) and len(early.inflight) < self.parallel:
            n = early.next
            early.next += 1
            early.inflight.add(n)
            try:
                self._early_io.submit(self._early_job, early, n)
            except RuntimeError:
                early.inflight.discard(n)
                early.failed = True
                return

    def _early_job(self, early: _Early, n: int) -> None:
        """Worker: CreateMultipartUpload (``n == 0``) or part ``n``.  Any failure marks
        the upload failed (finalisation then falls back to a whole upload); the last
        worker of an abandoned upload aborts it."""
        version = 0
        try:
            if n == 0:
                uid = self.t.create_multipart(
                    early.key, metadata=early.meta, content_type=early.ctype
                )
                with early.lock:
                    early.upload_id = uid
            else:
                with early.lock:
                    if early.stop or early.failed:
                        return
                    version = early.version.get(n, 0)
                    upload_id = early.upload_id
                assert upload_id is not None
                start = (n - 1) * early.psize
                if os.fstat(early.fd).st_size < start + early.psize:
                    return  # cut by a truncate meanwhile, which dropped this upload
                # A view of the spool, read in small pieces as the client signs and
                # sends it: the part is never whole in memory (the 64 MiB budget).
                body = SpoolRange(early.fd, start, early.psize)
                etag = self.t.upload_part(early.key, upload_id, n, body)
                with early.lock:
                    if early.version.get(n, 0) == version:
                        early.etags[n] = etag
        except Exception as exc:  # noqa: BLE001 - a background worker records, never vanishes
            with early.lock:
                # A part rewritten while it was being sent (the store may then refuse
                # it: its bytes changed between signing and sending) is only stale:
                # finalisation sends it again.  Anything else spoils the upload.
                stale = n > 0 and (early.stop or early.version.get(n, 0) != version)
                if not stale:
                    early.failed = True
            log.warning(
                "event=stream_part_failed key=%s part=%d error=%s errno=%s",
                early.key,
                n,
                type(exc).__name__,
                getattr(exc, "errno", None),
            )
        finally:
            with early.lock:
                early.inflight.discard(n)
                self._early_pump(early)
                last = early.stop and not early.inflight and not early.ended
                if last:
                    early.ended = True
                early.idle.notify_all()
            if last:
                self._early_abort(early)

    def _early_abort(self, early: _Early) -> None:
        """Abort an abandoned streaming upload (its parts are deleted; the object was
        never touched) and release its spool descriptor."""
        if early.upload_id is not None:
            try:
                self.t.abort_multipart(early.key, early.upload_id)
            except Exception as exc:  # noqa: BLE001 - retried in the background and at unmount
                log.warning(
                    "event=stream_abort_failed key=%s error=%s", early.key, type(exc).__name__
                )
                with self._lock:
                    self._orphans.append((early.key, early.upload_id))
                if not self._closed.is_set():
                    self._start_retry()
        with contextlib.suppress(OSError):
            os.close(early.fd)

    def _early_drop(self, st: _State) -> None:
        """Abandon the streaming upload (truncate, unlink, rename over, small final size,
        unmount); ``st.lock`` held.  Aborted now, or by its last worker when it ends."""
        early = st.early
        if early is None:
            return
        st.early = None
        with early.lock:
            early.stop = True
            last = not early.inflight and not early.ended
            if last:
                early.ended = True
        if last:
            self._early_abort(early)

    def _finish_early(
        self, st: _State, size: int, meta: dict[str, str]
    ) -> tuple[str, dict[str, str]] | None:
        """Complete the streaming upload (``st.lock`` held): wait for the parts in flight,
        upload the tail and every part written again since it was sent (same number: it
        replaces), then CompleteMultipartUpload.  Returns the ETag and the metadata the
        object got, or None when the upload is unusable (a part failed, the file outgrew
        10,000 parts): the caller then uploads the file whole, as without streaming.

        The object gets the metadata of the moment the upload was created: its times
        (mtime, ctime) are those of the write that started the stream, not of the last
        write.  Correcting them would cost a server-side copy of the whole object (on moto
        as long as the upload).  A chmod/chown/utimens on the open file meanwhile is
        honoured with that copy."""
        early = st.early
        assert early is not None
        st.early = None
        with early.lock:
            early.closing = True
            while early.inflight:
                early.idle.wait()
            early.ended = True
            upload = early.upload_id
            usable = (
                not early.failed
                and upload is not None
                and early.key == st.key
                and size <= early.psize * _MAX_PARTS
            )
            etags = dict(early.etags)
        if not usable or upload is None:
            self._early_abort(early)
            return None
        psize = early.psize
        try:
            jobs = []
            have: list[tuple[int, str]] = []
            for n in range(1, -(-size // psize) + 1):
                a, b = (n - 1) * psize, min(size, n * psize)
                if n in etags and b - a == psize:
                    have.append((n, etags[n]))
                    continue
                clean = (
                    st.base_etag is not None
                    and b <= st.base_limit
                    and not st.written.overlaps(a, b)
                )
                jobs.append((n, a, b, clean))
            parts = sorted(have + self._send_parts(st, upload, jobs))
            etag = self.t.complete_multipart(st.key, upload, parts)
        except BaseException:
            self._early_abort(early)
            raise
        with contextlib.suppress(OSError):
            os.close(early.fd)
        stored = dict(early.meta)
        if st.meta_gen != early.meta_gen:
            etag = self._copy_object(st.key, st.key, size, meta, st.ctype)
            stored = dict(meta)
        return etag, stored

    def _upload_or_eio(self, st: _State) -> None:
        with st.lock:
            try:
                self._upload(st)
            except OSError as e:
                log.warning(
                    "event=upload_failed key=%s error=%s errno=%s",
                    st.key,
                    type(e).__name__,
                    e.errno,
                )
                raise OSError(errno.EIO, "upload to the object store failed; data kept") from None

    def flush(self, handle: _Handle) -> None:
        if handle.writable:
            self._upload_or_eio(handle.state)

    def fsync(self, handle: _Handle, datasync: bool = False) -> None:
        self._upload_or_eio(handle.state)

    def close(self, handle: _Handle) -> None:
        st = handle.state
        with st.lock:
            failed = False
            if handle.writable or st.dirty:
                try:
                    self._upload_or_eio(st)
                except OSError:
                    failed = True
            st.refs -= 1
            if st.refs > 0:
                return
            with self._lock:
                if failed and not st.unlinked:
                    self._pending.add(st)
                    self._start_retry()
                    return
                if self._states.get(st.key) is st:
                    del self._states[st.key]
            st.close_spool()
            self._close_streams(st.key)

    # -- background retry of failed uploads ----------------------------------------------------

    def _start_retry(self) -> None:
        if self._retry_thread is None or not self._retry_thread.is_alive():
            self._retry_thread = threading.Thread(
                target=self._retry_loop, name="objstore-retry", daemon=True
            )
            self._retry_thread.start()

    def _abort_orphans(self) -> int:
        """Abort again the streaming uploads whose abort failed; returns how many are left."""
        with self._lock:
            todo = list(self._orphans)
            self._orphans.clear()
        for key, upload in todo:
            try:
                self.t.abort_multipart(key, upload)  # an upload already gone is not an error
            except Exception as exc:  # noqa: BLE001 - kept for the next try
                log.warning("event=stream_abort_failed key=%s error=%s", key, type(exc).__name__)
                with self._lock:
                    self._orphans.append((key, upload))
        with self._lock:
            return len(self._orphans)

    def retry_pending(self) -> int:
        """Try once more to publish files whose last upload failed (and to abort
        abandoned streaming uploads); returns how many files are still pending."""
        self._abort_orphans()
        with self._lock:
            todo = list(self._pending)
        for st in todo:
            with st.lock:
                try:
                    self._upload(st)
                except OSError:
                    continue
                with self._lock:
                    self._pending.discard(st)
                    if st.refs == 0 and self._states.get(st.key) is st:
                        del self._states[st.key]
                if st.refs == 0:
                    st.close_spool()
        with self._lock:
            return len(self._pending)

    def _retry_loop(self) -> None:
        delay = 0.5
        while not self._closed.wait(delay):
            if self.retry_pending() == 0 and not self._orphans:
                return
            delay = min(delay * 2, 30.0)

    def destroy(self) -> None:
        """At unmount: a last try for pending uploads, then drop spools and caches."""
        left = self.retry_pending()
        if left:
            log.error("event=uploads_lost count=%d", left)
        self._closed.set()
        with self._lock:
            states = list(self._states.values()) + list(self._pending)
            self._states.clear()
            self._pending.clear()
            self._cache.clear()
            self._spare.clear()
            self._done.clear()
            self._cache_used = 0
            self._nodes.clear()
            self._children.clear()
        for st in states:
            with st.lock:
                self._early_drop(st)  # an upload never completed: aborted, not left behind
            st.close_spool()
        self._close_streams(None)
        self._io.shutdown(wait=False, cancel_futures=True)
        # Not cancelled: a queued job of a dropped upload returns at once, and the last
        # one of each aborts it (bounded by the transport's retry budget).
        self._early_io.shutdown(wait=True)
        self._ra.shutdown(wait=False, cancel_futures=True)
        left = self._abort_orphans()  # the aborts that failed above or earlier: one last try
        if left:
            log.warning("event=uploads_orphaned count=%d", left)

    # -- test / tooling helpers ------------------------------------------------------------------

    def pending_uploads(self) -> int:
        with self._lock:
            return len(self._pending)

    def cache_bytes_used(self) -> int:
        with self._lock:
            return self._cache_used
