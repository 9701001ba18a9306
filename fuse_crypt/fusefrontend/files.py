"""Open files: the per-inode table, and content read / write / truncate.

State is keyed by the backing inode, not by the FUSE handle or path, because hard
links and several opens of one file share one ciphertext: they must share one
readers-writer lock (block read-modify-write is not atomic) and one cached file ID.
Per-handle state is just (backend handle, inode entry, cipher path for log lines).

Write and truncate follow gocryptfs (``file.go``, ``file_allocate_truncate.go``) so
the on-disk result is what gocryptfs itself would produce: partial blocks are
rewritten with a fresh nonce, a write beyond EOF first zero-pads the old last block
and leaves the blocks in between as holes, and a header-only file gets a new file ID.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from typing import Any

from ..backend import Stat, StorageBackend
from ..contentenc import CIPHER_BS, HEADER_LEN, PLAIN_BS, ContentEnc
from ..errors import CorruptDataError
from .blockio import BlockCrypt, BufferPool
from .quota import Quota
from .rwlock import RWLock

log = logging.getLogger("fuse_crypt.fusefrontend")

_ZERO_BLOCK = bytes(PLAIN_BS)
FALLOC_FL_KEEP_SIZE = 0x01
#: Largest read/write request we ask the kernel for (needs FUSE_MAX_PAGES, 4.20+).
MAX_IO = 1 << 20


class InodeEntry:
    """Shared state of one backing inode while at least one handle is open."""

    __slots__ = ("csize", "file_id", "key", "lock", "refs")

    def __init__(self, key: tuple[int, int], csize: int | None = None) -> None:
        self.key = key
        self.lock = RWLock()
        self.file_id: bytes | None = None
        self.refs = 0
        #: Cipher file size as last seen or produced by us (None: ask the backend
        #: under the write lock).  Every content change goes through this entry
        #: under its write lock, so once exact it stays exact without an fstat per
        #: write (the backing files of a mounted volume are not changed behind our
        #: back, as for gocryptfs).  It is only seeded from a size read while no
        #: other entry of the inode could be writing: see :meth:`FileTable.open`.
        self.csize = csize


class OpenFile:
    """One FUSE file handle."""

    __slots__ = ("append", "entry", "handle", "open_stat", "path", "writable")

    def __init__(
        self,
        handle: Any,
        entry: InodeEntry,
        path: str,
        writable: bool,
        open_stat: Stat | None,
        append: bool = False,
    ) -> None:
        self.handle = handle
        self.entry = entry
        self.path = path
        self.writable = writable
        #: Opened with O_APPEND: every write goes to *our* end of file, not to the
        #: kernel's offset.  libfuse's path-based API gives each hard-link name its
        #: own kernel inode, and the kernel computes an append offset from that
        #: name's cached size, which misses appends made through another name
        #: (two appenders via two links lost ~40% of their records).  Linux pwrite
        #: on an O_APPEND file ignores the offset too.
        self.append = append
        #: The backend's attributes from open(), handed out once by fstat(): right
        #: after a create libfuse asks for them, and they cannot have changed yet.
        self.open_stat = open_stat


def _eio(cpath: str, what: str, block: int | None = None) -> OSError:
    if block is None:
        log.warning("event=corrupt_data path=%s what=%s", cpath, what)
    else:
        log.warning("event=corrupt_block path=%s block=%d what=%s", cpath, block, what)
    return OSError(errno.EIO, "corrupt ciphertext")


class FileTable:
    """Open-file table plus the content algorithms that need it."""

    def __init__(
        self, backend: StorageBackend, enc: ContentEnc, quota: Quota | None = None
    ) -> None:
        self.backend = backend
        self.enc = enc
        self.quota = quota
        self.bc = BlockCrypt(enc)
        # Sized for the largest FUSE request (MAX_IO, possibly unaligned: +1 block).
        self._cpool = BufferPool(HEADER_LEN + (MAX_IO // PLAIN_BS + 1) * CIPHER_BS)
        self._ppool = BufferPool((MAX_IO // PLAIN_BS + 1) * PLAIN_BS)
        self._lock = threading.Lock()
        self._inodes: dict[tuple[int, int], InodeEntry] = {}
        self._handles: dict[int, OpenFile] = {}
        self._next_fh = 1
        #: Number of entries dropped so far (see :meth:`open`).
        self._dropped = 0
        #: Bumped by every read/write (racy increments are fine: only "did it
        #: change" matters, for the idle-time malloc trim).
        self.io_count = 0
        self._prealloc = True

    # -- table ------------------------------------------------------------------------

    def open(
        self,
        cpath: str,
        flags: int,
        mode: int,
        writable: bool,
        *,
        keep_stat: bool = False,
        append: bool = False,
    ) -> int:
        """Open ``cpath`` in the backend and register a handle; returns the FUSE fh.

        Log lines name the handle by ``cpath``: cipher paths only, since logs leave the TEE.

        ``keep_stat`` (for create) lets the first :meth:`fstat` of the handle reuse
        the attributes read here instead of asking the backend again.

        The size read here, outside the table lock, may seed a new inode entry's
        cached size only if no entry was dropped since just before the read: an
        entry that existed then could have grown or shrunk the file after our
        fstat and been released before we took the lock (issue 7, finding 8: the
        new entry kept the old size, and its next write zero-padded or tore a
        block).  Otherwise the first write asks the backend under the inode's
        write lock, where nothing else can change the file.  The counter is global
        (any inode), which is conservative and costs at most one fstat."""
        dropped = self._dropped  # before the fstat
        handle = self.backend.open(cpath, flags, mode)
        try:
            st = self.backend.fstat(handle)
        except BaseException:
            self.backend.close(handle)
            raise
        key = (st.dev, st.ino)
        with self._lock:
            fresh = self._dropped == dropped
            entry = self._inodes.get(key)
            if entry is None:
                entry = self._inodes[key] = InodeEntry(key, st.size if fresh else None)
            entry.refs += 1
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = OpenFile(
                handle, entry, cpath, writable, st if keep_stat and fresh else None, append
            )
        return fh

    def get(self, fh: int) -> OpenFile:
        of = self._handles.get(fh)
        if of is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return of

    def release(self, fh: int) -> None:
        with self._lock:
            of = self._handles.pop(fh, None)
            if of is None:
                return
            entry = of.entry
            entry.refs -= 1
            if entry.refs == 0:
                self._inodes.pop(entry.key, None)
                self._dropped += 1
        self.backend.close(of.handle)

    def close_all(self) -> None:
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
            self._inodes.clear()
        for of in handles:
            with contextlib.suppress(OSError):
                self.backend.close(of.handle)

    def open_count(self) -> int:
        return len(self._handles)

    # -- helpers (caller holds the inode lock) -------------------------------------------

    def _file_id(self, of: OpenFile) -> bytes | None:
        """Cached file ID, reading the header if needed; None for an empty file."""
        fid = of.entry.file_id
        if fid is not None:
            return fid
        hdr = self.backend.pread(of.handle, HEADER_LEN, 0)
        if not hdr:
            return None
        try:
            fid = self.enc.parse_header(hdr)
        except CorruptDataError:
            raise _eio(of.path, "header") from None
        of.entry.file_id = fid
        return fid

    def _read_blocks(self, of: OpenFile, fid: bytes, first: int, count: int) -> bytes:
        data = self.backend.pread(of.handle, count * CIPHER_BS, HEADER_LEN + first * CIPHER_BS)
        if not data:
            return b""
        try:
            return self.enc.decrypt_blocks(first, data, fid)
        except CorruptDataError:
            raise _eio(of.path, "block", first) from None

    def _csize(self, of: OpenFile) -> int:
        csize = of.entry.csize
        if csize is None:
            csize = of.entry.csize = self.backend.fstat(of.handle).size
        return csize

    def _pwrite(self, of: OpenFile, data: bytes | memoryview, offset: int) -> None:
        """Backend pwrite that keeps the cached cipher size exact (caller holds the
        write lock; on failure the cache is dropped by the public method)."""
        self.backend.pwrite(of.handle, data, offset)
        entry = of.entry
        end = offset + len(data)
        if entry.csize is not None and end > entry.csize:
            entry.csize = end

    def _ftruncate(self, of: OpenFile, size: int) -> None:
        self.backend.ftruncate(of.handle, size)
        of.entry.csize = size

    def _new_header(self, of: OpenFile) -> bytes:
        hdr, fid = self.enc.new_header()
        self._pwrite(of, hdr, 0)
        of.entry.file_id = fid
        return fid

    # -- read ---------------------------------------------------------------------------

    def read_into(self, fh: int, out: memoryview, offset: int) -> int:
        """Decrypt ``len(out)`` plaintext bytes at ``offset`` into ``out`` (e.g.
        libfuse's reply buffer); returns the count (short at EOF).  All blocks of
        the request come from one pread and one batch decrypt."""
        of = self.get(fh)
        size = len(out)
        if size <= 0:
            return 0
        self.io_count += 1
        first = offset // PLAIN_BS
        nblk = -(-(offset + size) // PLAIN_BS) - first
        clen = nblk * CIPHER_BS
        cbuf = self._cpool.get(HEADER_LEN + clen)
        pbuf: bytearray | None = None
        cmv = memoryview(cbuf)
        backend = self.backend
        lock = of.entry.lock
        lock.acquire_read()
        try:
            fid = of.entry.file_id
            if fid is None and first == 0:
                # Cold start at offset 0: header and blocks in one pread.
                got = backend.pread_into(of.handle, cmv[: HEADER_LEN + clen], 0)
                if got <= HEADER_LEN:
                    if got:
                        raise _eio(of.path, "truncated header")
                    return 0
                try:
                    fid = self.enc.parse_header(bytes(cmv[:HEADER_LEN]))
                except CorruptDataError:
                    raise _eio(of.path, "header") from None
                of.entry.file_id = fid
                ct = cmv[HEADER_LEN:got]
            else:
                if fid is None:
                    fid = self._file_id(of)
                    if fid is None:
                        return 0
                got = backend.pread_into(of.handle, cmv[:clen], HEADER_LEN + first * CIPHER_BS)
                if not got:
                    return 0
                ct = cmv[:got]
            skip = offset - first * PLAIN_BS
            try:
                if skip == 0 and nblk * PLAIN_BS == size:
                    return self.bc.decrypt_into(first, ct, fid, out)
                pbuf = self._ppool.get(nblk * PLAIN_BS)
                pmv = memoryview(pbuf)
                n = self.bc.decrypt_into(first, ct, fid, pmv)
            except CorruptDataError as e:
                raise _eio(of.path, str(e), first) from None
            m = min(size, n - skip)
            if m <= 0:
                return 0
            out[:m] = pmv[skip : skip + m]
            return m
        finally:
            lock.release_read()
            self._cpool.put(cbuf)
            if pbuf is not None:
                self._ppool.put(pbuf)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        """Convenience form of :meth:`read_into` returning bytes."""
        buf = bytearray(max(size, 0))
        n = self.read_into(fh, memoryview(buf), offset)
        return bytes(buf[:n])

    # -- write --------------------------------------------------------------------------

    def write(self, fh: int, data: bytes | memoryview, offset: int) -> int:
        of = self.get(fh)
        if not of.writable:
            raise OSError(errno.EBADF, "handle not open for writing")
        if not len(data):
            return 0
        self.io_count += 1
        lock = of.entry.lock
        lock.acquire_write()
        try:
            if of.append:
                offset = self.enc.plain_size(self._csize(of), strict=False)
            self._write_locked(of, data, offset)
        except BaseException:
            of.entry.csize = None  # a failed write may have changed the size partly
            raise
        finally:
            lock.release_write()
        return len(data)

    def _preallocate(self, of: OpenFile, offset: int, length: int) -> None:
        """Reserve the range first (like gocryptfs): running out of space then fails
        the write cleanly instead of leaving a torn, undecryptable block.  Turned
        off for good when the backend cannot do it."""
        if not self._prealloc:
            return
        try:
            self.backend.fallocate(of.handle, FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                self._prealloc = False
                log.info("event=prealloc_disabled errno=%s", e.errno)
                return
            raise

    def _pad_last_block(self, of: OpenFile, fid: bytes, psize: int) -> None:
        """writePadHole/zeroPad: fill the partial last block up to 4096 bytes so the
        blocks after it can be holes."""
        lb = psize // PLAIN_BS
        old = self._read_blocks(of, fid, lb, 1)
        padded = old + _ZERO_BLOCK[len(old) :]
        self._pwrite(of, self.enc.encrypt_blocks(lb, padded, fid), HEADER_LEN + lb * CIPHER_BS)

    def _charged(self, of: OpenFile, new_plain: int) -> int:
        """Charge the quota for ``of`` becoming ``new_plain`` bytes long; the delta."""
        if self.quota is None:
            return 0
        delta = self.enc.cipher_size(new_plain) - self._csize(of)
        self.quota.charge(delta)
        return delta

    def _write_locked(self, of: OpenFile, data: bytes | memoryview, offset: int) -> None:
        end = max(self.enc.plain_size(self._csize(of), strict=False), offset + len(data))
        delta = self._charged(of, end)
        try:
            self._write_unquoted(of, data, offset)
        except BaseException:
            if self.quota is not None:
                self.quota.charge(-delta)
            raise

    def _write_unquoted(self, of: OpenFile, data: bytes | memoryview, offset: int) -> None:
        csize = self._csize(of)
        header = b""
        if csize <= HEADER_LEN:
            # Empty or header-only: always a fresh file ID (audit: file ID poisoning).
            if offset < PLAIN_BS:
                # Goes out together with block 0 in one pwrite below.
                header, fid = self.enc.new_header()
                of.entry.file_id = fid
            else:
                fid = self._new_header(of)
            psize = 0
        else:
            known = self._file_id(of)
            assert known is not None
            fid = known
            psize = self.enc.plain_size(csize, strict=False)
        if offset > psize and psize % PLAIN_BS and offset // PLAIN_BS > psize // PLAIN_BS:
            self._pad_last_block(of, fid, psize)
            psize = (psize // PLAIN_BS + 1) * PLAIN_BS

        n = len(data)
        first = offset // PLAIN_BS
        end = offset + n
        last = -(-end // PLAIN_BS)
        nblk = last - first
        head = offset - first * PLAIN_BS
        tail_end = end - (last - 1) * PLAIN_BS  # bytes of the last block we cover
        need_first = head > 0 and first * PLAIN_BS < psize
        need_last = tail_end < PLAIN_BS and end < psize
        pbuf: bytearray | None = None
        cbuf = self._cpool.get(HEADER_LEN + nblk * CIPHER_BS)
        try:
            if head == 0 and not need_last:
                plain: bytes | memoryview = data
            else:
                # Read-modify-write of the partial first and/or last block.
                pbuf = self._ppool.get(nblk * PLAIN_BS)
                pm = memoryview(pbuf)
                old_first = self._read_blocks(of, fid, first, 1) if need_first else b""
                if head:
                    keep = old_first[:head]
                    pm[: len(keep)] = keep
                    if len(keep) < head:
                        pm[len(keep) : head] = _ZERO_BLOCK[: head - len(keep)]
                pm[head : head + n] = data
                tail = b""
                if need_last:
                    old_last = old_first if nblk == 1 and need_first else None
                    if old_last is None:
                        old_last = self._read_blocks(of, fid, last - 1, 1)
                    tail = old_last[tail_end:]
                    pm[head + n : head + n + len(tail)] = tail
                plain = pm[: head + n + len(tail)]
            cm = memoryview(cbuf)
            if header:  # first == 0: header and block 0 in one pwrite
                cm[:HEADER_LEN] = header
                clen = self.bc.encrypt_into(0, memoryview(plain), fid, cm[HEADER_LEN:])
                self._preallocate(of, 0, HEADER_LEN + clen)
                self._pwrite(of, cm[: HEADER_LEN + clen], 0)
            else:
                clen = self.bc.encrypt_into(first, memoryview(plain), fid, cm)
                coff = HEADER_LEN + first * CIPHER_BS
                self._preallocate(of, coff, clen)
                self._pwrite(of, cm[:clen], coff)
        finally:
            self._cpool.put(cbuf)
            if pbuf is not None:
                self._ppool.put(pbuf)

    # -- truncate / fallocate -------------------------------------------------------------

    def truncate(self, fh: int, size: int) -> None:
        of = self.get(fh)
        if size < 0:
            raise OSError(errno.EINVAL, "negative size")
        lock = of.entry.lock
        lock.acquire_write()
        try:
            self._truncate_locked(of, size)
        except BaseException:
            of.entry.csize = None
            raise
        finally:
            lock.release_write()

    def _truncate_locked(self, of: OpenFile, size: int) -> None:
        delta = self._charged(of, size)
        try:
            self._truncate_unquoted(of, size)
        except BaseException:
            if self.quota is not None:
                self.quota.charge(-delta)
            raise

    def _truncate_unquoted(self, of: OpenFile, size: int) -> None:
        csize = self._csize(of)
        if size == 0:
            if csize:
                self._ftruncate(of, 0)
            of.entry.file_id = None
            return
        psize = self.enc.plain_size(csize, strict=False)
        if size == psize and csize > HEADER_LEN:
            return
        if size < psize:
            fid = self._file_id(of)
            assert fid is not None
            lb, rem = divmod(size, PLAIN_BS)
            keep = self._read_blocks(of, fid, lb, 1)[:rem] if rem else b""
            self._ftruncate(of, HEADER_LEN + lb * CIPHER_BS)
            if rem:
                ct = self.enc.encrypt_blocks(lb, keep, fid)
                self._pwrite(of, ct, HEADER_LEN + lb * CIPHER_BS)
            return
        # Grow.
        if size % PLAIN_BS:
            # One zero byte at size-1: the write path pads the old last block and
            # leaves any blocks in between as holes (or does RMW within the block).
            self._write_unquoted(of, b"\0", size - 1)  # charged by the caller
            return
        if csize <= HEADER_LEN:
            fid = self._new_header(of)
        else:
            fid = self._file_id(of)
            assert fid is not None
            if psize % PLAIN_BS:
                self._pad_last_block(of, fid, psize)
        self._ftruncate(of, self.enc.cipher_size(size))

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        of = self.get(fh)
        if mode & ~FALLOC_FL_KEEP_SIZE:
            raise OSError(errno.EOPNOTSUPP, "only plain allocation is supported")
        if mode & FALLOC_FL_KEEP_SIZE:
            return  # reservation only: an optimisation we may skip
        lock = of.entry.lock
        lock.acquire_write()
        try:
            csize = self._csize(of)
            if offset + length > self.enc.plain_size(csize, strict=False):
                self._truncate_locked(of, offset + length)
        except BaseException:
            of.entry.csize = None
            raise
        finally:
            lock.release_write()

    # -- attributes -----------------------------------------------------------------------

    def fstat(self, fh: int) -> Stat:
        of = self.get(fh)
        st = of.open_stat
        if st is not None:
            of.open_stat = None
            return st
        return self.backend.fstat(of.handle)

    def fsync(self, fh: int, datasync: bool) -> None:
        self.backend.fsync(self.get(fh).handle, datasync)

    def flush(self, fh: int) -> None:
        """close(2) of a descriptor: buffering backends publish the file now."""
        of = self.get(fh)
        if of.writable:
            self.backend.flush(of.handle)
