"""Read-ahead of our own for direct (``O_DIRECT``) ciphertext reads.

Direct reads skip the kernel's read-ahead along with its page cache, so each of the loop
device's requests (about 2.5 MiB in flight for a sequential reader) waited for the disk:
on this VM's virtual disk, with real data, a daemon reading direct served 220-260 MB/s
where buffered reads (the device's read-ahead plus our ``WILLNEED`` hints) served 620-700
(docs/block.md, "Direct reads"). This keeps ``window`` chunks of ``CHUNK`` bytes of
ciphertext in flight ahead of a sequential reader, read direct by ``WORKERS`` threads into
page-aligned buffers of our own (bounded: the buffers are recycled, never more than
``window + SLACK`` of them, 20 MiB), and the reader decrypts straight out of them. Measured
with real data on the disk, 2 MiB chunks and 4 workers brought direct reads level with
buffered ones (1 MiB chunks and 2 workers: 605 against 715 MB/s).

Coherence with writes: the caller invalidates after every write (``invalidate``), once
the write's ``pwrite`` has returned. Everything read ahead is dropped then, so a read that
starts after a write has returned never sees ciphertext fetched before it (a read racing
the write may see either version, as with any disk). A chunk fetched after the write reads
the new bytes: a direct read of a range with dirty pages waits for their write-back.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

#: bytes per read-ahead chunk: one direct read (a request of the loop device, at most
#: 1 MiB, spans at most two)
CHUNK = 2 << 20
#: chunks kept in flight ahead of a sequential reader (16 MiB)
WINDOW = 8
SLACK = 2  # chunks allowed beyond the window (behind the reader, pinned, in flight)
WORKERS = 4  # direct reads in flight at once
_NEAR = 2 << 20  # "continues the last read": the loop device's requests arrive a bit out of order

Sink = Callable[[int, memoryview], None]


class _Chunk:
    __slots__ = ("buf", "done", "ok", "pins", "dropped")

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.done = threading.Event()
        self.ok = False
        self.pins = 0
        self.dropped = False


class DirectReadAhead:
    """Chunks of the segment read ahead, direct, from ``dfd``; segment offset 0 is device
    offset ``base``. Only whole chunks inside ``size()`` are read ahead."""

    def __init__(
        self, dfd: int, base: int, size: Callable[[], int], *, window: int = WINDOW
    ) -> None:
        self._dfd = dfd
        self._base = base
        self._size = size
        self._window = window
        self._lock = threading.Lock()
        self._chunks: dict[int, _Chunk] = {}
        self._free: list[mmap.mmap] = []
        self._allocated = 0
        self._next = -1  # where the sequential reader continues
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            WORKERS, thread_name_prefix="fuse-crypt-readahead"
        )
        self.hits = 0  # requests served from read-ahead (tests, benchmarks)

    # -- serving -------------------------------------------------------------------------

    def serve(self, start: int, length: int, sink: Sink) -> bool:
        """If ``[start, start+length)`` was read ahead, hand it to ``sink(pos, ciphertext)``
        piece by piece (``pos`` relative to ``start``) and return True; else False (the
        caller reads it itself). Waits for chunks still in flight."""
        first, last = start // CHUNK, (start + length - 1) // CHUNK
        with self._lock:
            chunks = [self._chunks.get(c) for c in range(first, last + 1)]
            if any(ch is None for ch in chunks):
                return False
            for ch in chunks:
                ch.pins += 1  # type: ignore[union-attr]
        held: list[_Chunk] = [ch for ch in chunks if ch is not None]
        try:
            for ch in held:
                ch.done.wait()
            if not all(ch.ok for ch in held):
                return False
            end = start + length
            for c, ch in zip(range(first, last + 1), held, strict=True):
                a, b = max(start, c * CHUNK), min(end, (c + 1) * CHUNK)
                sink(a - start, memoryview(ch.buf)[a - c * CHUNK : b - c * CHUNK])
            self.hits += 1
            return True
        finally:
            with self._lock:
                for ch in held:
                    ch.pins -= 1
                    self._recycle(ch)

    def advance(self, start: int, end: int) -> None:
        """A large read of ``[start, end)`` was served: if it continues the last one, keep
        the window ahead of it in flight; drop chunks the reader has passed."""
        size = self._size()
        with self._lock:
            last, self._next = self._next, end
            if self._pool is None or not (last - _NEAR <= start <= last + _NEAR):
                return
            # One sequential reader is followed: what lies outside its window is dropped
            # (so buffers held by an abandoned stream come back).
            lo = (start - _NEAR) // CHUNK
            stop = min(end + self._window * CHUNK, size) // CHUNK  # whole chunks only
            for c in [c for c in self._chunks if c < lo or c >= stop]:
                self._drop(c)
            c = end // CHUNK
            while c < stop:
                if c not in self._chunks:
                    buf = self._buffer()
                    if buf is None:
                        break
                    ch = self._chunks[c] = _Chunk(buf)
                    self._pool.submit(self._fetch, ch, c)
                c += 1

    def invalidate(self) -> None:
        """Drop everything read ahead (after a write; module doc)."""
        with self._lock:
            for c in list(self._chunks):
                self._drop(c)
            self._next = -1

    def close(self) -> None:
        """Stop the workers before the caller closes ``dfd``: none may read a descriptor
        number that is about to be reused."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for c in list(self._chunks):
                self._drop(c)
            for ch_buf in self._free:
                ch_buf.close()
            self._free.clear()

    # -- internals (under self._lock unless said otherwise) ------------------------------

    def _fetch(self, ch: _Chunk, c: int) -> None:  # worker thread, no lock
        try:
            n = os.preadv(self._dfd, [memoryview(ch.buf)[:CHUNK]], self._base + c * CHUNK)
            ch.ok = n == CHUNK
        except OSError:
            ch.ok = False  # the reader reads it itself and gets the error, or falls back
        finally:
            ch.done.set()
            with self._lock:
                self._recycle(ch)

    def _buffer(self) -> mmap.mmap | None:
        if self._free:
            return self._free.pop()
        if self._allocated >= self._window + SLACK:
            return None
        self._allocated += 1
        return mmap.mmap(-1, CHUNK)

    def _drop(self, c: int) -> None:
        ch = self._chunks.pop(c)
        ch.dropped = True
        self._recycle(ch)

    def _recycle(self, ch: _Chunk) -> None:
        if ch.dropped and ch.pins == 0 and ch.done.is_set() and ch.buf is not None:
            self._free.append(ch.buf)
            ch.buf = None  # type: ignore[assignment]
