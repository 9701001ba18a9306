"""The plaintext view of one LUKS2 data segment: byte-granular reads and writes.

The device belongs to the host: it is opened once, without following links and without
blocking (a planted FIFO must not hang us), and must be a block device or a regular file
(an image; tests and operators only, the CSI layer decides whether to allow one). Every
later access goes through that one descriptor, so renaming or replacing the path after
the open changes nothing.

Sizes: the plaintext is the segment, ``size`` bytes from ``offset``, or with a dynamic
size everything from ``offset`` to the end of the device rounded down to whole sectors
(what cryptsetup maps). ``refresh_size`` re-reads the device size after the disk grew.

Writes of any alignment: whole sectors are encrypted and written as they come; a partial
first or last sector is read, decrypted, patched and re-encrypted (read-modify-write).
One lock serialises writers, so two writes into one sector cannot lose each other's
bytes; reads take no lock (a reader racing a writer of the same bytes may see either
version, as with any disk).

Crypto is serialised (``_crypto``): both XTS backends (libcrypto's EVP through cffi, or
`cryptography`) let go of the GIL around each sector's C call, so FUSE worker threads
decrypting at once hand the GIL back and forth 256 times per MiB; measured here (with
`cryptography`), 4 such threads together decrypt at a third of one thread's rate. With
the lock one thread decrypts at full speed while the others wait outside the GIL or do
their preads, which still overlap. Per-thread libcrypto contexts without this lock were
tried (issue 11) and were 2-5x slower with 2-4 threads on two free cores: the GIL changes
hands at each of the 512 C calls per MiB (docs/block.md, "Figures").

Direct reads (opt-in, ``direct_reads=True``; ``FUSE_CRYPT_BLOCK_READS=direct`` for the
daemon): large ciphertext reads bypass the page cache (``O_DIRECT``). A second, read-only
descriptor on the same open file (``/proc/self/fd``, so nothing is looked up by name
again) reads each request of at least ``DIRECT_MIN`` bytes (pieces of the filesystem's
read-ahead, i.e. sequential reading), from our own read-ahead (``readahead.py``) or into
this thread's page-aligned buffer, and the sectors are decrypted from there straight into
libfuse's reply buffer. What it buys: no second, ciphertext copy of everything read in
guest memory (private, and in a TDX guest accepted page by page), and 10-25 % less daemon
CPU per GiB. Why it is not the default: with real data on this VM's disk it read no faster
than buffered reads, sometimes 10-20 % slower, and it adds read-ahead threads and up to
20 MiB of buffers (docs/block.md, "Direct reads").
Small reads (metadata, small files) stay buffered: the device's own read-ahead brings
their neighbours in with them. Writes stay buffered too: the kernel's write-back overlaps
them with our encryption, and a direct read of a range with dirty pages waits for their
write-back first (the kernel keeps the two paths coherent); each write drops our
read-ahead. A device (or a request) that cannot take direct I/O (alignment, a filesystem
without it) is read buffered; ``EINVAL`` from a direct read switches the device to
buffered reads for good (logged once).

Read-ahead of buffered reads: a read that continues where the last one ended asks the kernel
(``posix_fadvise(WILLNEED)``) to fetch the next ``READAHEAD`` bytes of *ciphertext* into
the device's page cache, so the following preads are memory copies that overlap our
decryption instead of waiting for the disk. Only ciphertext is cached; the host sees
nothing it does not already hold. No lock: the hint state is a pair of integers, and a
lost race only means one hint more or less.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import threading

from ..luks2 import XtsSegment
from .readahead import DirectReadAhead

Buffer = bytes | bytearray | memoryview

log = logging.getLogger("fuse_crypt.blockfront")

_BLKGETSIZE64 = 0x80081272
_BLKSSZGET = 0x1268  # logical block size: the unit O_DIRECT offsets and lengths need
#: O_DIRECT alignment assumed for an image file (no statx(STATX_DIOALIGN) in Python 3.11)
FILE_DIO_ALIGN = 4096
#: ``FUSE_CRYPT_BLOCK_READS=buffered`` in the daemon's environment reads ciphertext through
#: the page cache as before (escape hatch, benchmark baseline); ``direct`` is the default.
READS_ENV = "FUSE_CRYPT_BLOCK_READS"
#: a read of at least this many bytes goes direct: what the loop device sends for a
#: sequential reader (1 MiB, 768 KiB or 256 KiB pieces of the filesystem's read-ahead).
#: ext4's inode-table read-ahead (32 blocks, 128 KiB) and small files stay buffered,
#: where the device's read-ahead brings their neighbours in with them
DIRECT_MIN = 256 << 10
_RA_MIN_REQUEST = 128 << 10  # buffered: smaller reads are random access, never hinted
_MAX_BOUNCE = 16  # read buffers kept (one per worker thread; libfuse runs 4)
#: bytes of ciphertext hinted ahead of a sequential reader
READAHEAD = 8 << 20
_NEAR = 2 << 20  # "continues the last read" tolerance (two 1 MiB FUSE requests)


class DeviceError(OSError):
    """The device cannot be used (wrong type, too small, gone)."""


def open_device(path: str, *, read_only: bool = False, allow_regular: bool = True) -> int:
    """Open ``path`` without following a final symlink or blocking; check the file type.

    Returns the descriptor (blocking mode restored). A block device always passes (opened
    for writing, it is claimed exclusively: O_EXCL); a regular file only with
    ``allow_regular``. Anything else is refused.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(OSError):
        if not read_only and stat.S_ISBLK(os.lstat(path).st_mode):
            # Exclusive claim: EBUSY if the disk is mounted, in use by device-mapper or
            # served by another block daemon (two writers would corrupt it).
            flags |= os.O_EXCL
    try:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DeviceError(errno.ELOOP, "the device path is a symbolic link") from None
        if exc.errno == errno.EBUSY:
            raise DeviceError(errno.EBUSY, "the device is in use (mounted or open)") from None
        raise DeviceError(exc.errno, f"cannot open the device: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISBLK(st.st_mode) or (stat.S_ISREG(st.st_mode) and allow_regular)):
            kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a block device"
            raise DeviceError(errno.ENOTBLK, f"the device is {kind}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_direct_reader(fd: int) -> tuple[int, int, str]:
    """A read-only ``O_DIRECT`` descriptor on the file ``fd`` has open, and its alignment.

    Reopened through ``/proc/self/fd/N``, which leads to the open file itself: a host that
    renamed or replaced the device path since cannot slip another file in (the identity is
    checked again anyway). Returns ``(-1, 0, reason)`` when direct reads cannot work here
    (no /proc, a filesystem without O_DIRECT, an alignment the probe read refuses)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, _BLKSSZGET, b"\0" * 4)
        align: int = max(512, struct.unpack("=i", buf)[0])
    elif stat.S_ISREG(st.st_mode):
        align = FILE_DIO_ALIGN
    else:
        return -1, 0, "not a block device or file"
    try:
        dfd = os.open(
            f"/proc/self/fd/{fd}",
            os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
        )
    except OSError as exc:
        return -1, 0, f"cannot reopen the device for direct reads: {exc.strerror}"
    try:
        dst = os.fstat(dfd)
        if (dst.st_dev, dst.st_ino, dst.st_rdev) != (st.st_dev, st.st_ino, st.st_rdev):
            raise OSError(errno.ESTALE, "the reopened descriptor is another file")
        os.set_blocking(dfd, True)
        if device_size(fd) >= align:  # the probe: one aligned block from the start
            with mmap.mmap(-1, align) as probe:
                os.preadv(dfd, [probe], 0)
    except OSError as exc:
        os.close(dfd)
        return -1, 0, f"direct reads refused: {exc.strerror}"
    return dfd, align, ""


def device_size(fd: int) -> int:
    """Bytes of a block device (BLKGETSIZE64) or regular file (st_size)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8)
        size: int = struct.unpack("=Q", buf)[0]
        return size
    return st.st_size


class CryptDevice:
    """Decrypting, encrypting access to one segment through one descriptor."""

    def __init__(
        self,
        fd: int,
        segment: XtsSegment,
        *,
        offset: int,
        size: int | None,
        read_only: bool = False,
        direct_reads: bool = False,
    ) -> None:
        ss = segment.sector_size
        if offset < 0 or offset % 512:
            raise DeviceError(errno.EINVAL, "the segment offset must be a multiple of 512")
        if size is not None and (size <= 0 or size % ss):
            raise DeviceError(errno.EINVAL, "the segment size must be whole sectors")
        self.fd = fd
        self.segment = segment
        self.offset = offset
        self.fixed_size = size
        self.read_only = read_only
        self.sector_size = ss
        self._wlock = threading.Lock()
        self._crypto = threading.Lock()  # see the module doc
        self._next_read = -1  # where a sequential reader continues
        self._ra_end = 0  # hinted up to here (segment bytes)
        self.size = 0
        self.refresh_size()
        self._dfd, self._dio_align = -1, 0
        # One aligned read buffer per FUSE worker thread, by OS thread id: libfuse's threads
        # call in through ctypes, whose Python thread state (and so threading.local) does
        # not outlive one callback.
        self._bounce: dict[int, mmap.mmap] = {}
        self._ra: DirectReadAhead | None = None
        if direct_reads:
            self._dfd, self._dio_align, why = open_direct_reader(fd)
            if why:
                log.info("ciphertext reads go through the page cache: %s", why)
            elif offset % self._dio_align == 0:
                self._ra = DirectReadAhead(self._dfd, offset, lambda: self.size)

    @property
    def direct_reads(self) -> bool:
        """Whether ciphertext reads bypass the page cache now (module doc)."""
        return self._dfd >= 0

    def refresh_size(self) -> int:
        """(Re)compute the plaintext size from the device; returns it."""
        dev = device_size(self.fd)
        if self.fixed_size is not None:
            if self.offset + self.fixed_size > dev:
                raise DeviceError(errno.ENOSPC, "the device is smaller than its segment")
            self.size = self.fixed_size
        else:
            avail = dev - self.offset
            if avail < self.sector_size:
                raise DeviceError(errno.ENOSPC, "the device is smaller than its header")
            self.size = avail - avail % self.sector_size
        return self.size

    # -- raw sectors -------------------------------------------------------------------

    def _read_raw(self, start: int, length: int) -> bytearray:
        buf = bytearray(length)
        self._read_raw_into(memoryview(buf), start)
        return buf

    def _read_direct(self, start: int, length: int) -> memoryview | None:
        """Ciphertext ``[start, start+length)`` read past the page cache into this thread's
        aligned buffer (valid until the thread's next read), or None when this request
        cannot go direct (no direct descriptor, misaligned)."""
        dfd, pos = self._dfd, self.offset + start
        if dfd < 0 or pos % self._dio_align or length % self._dio_align:
            return None
        tid = threading.get_ident()
        buf = self._bounce.get(tid)
        if buf is None or len(buf) < length:
            if len(self._bounce) >= _MAX_BOUNCE:  # threads came and went: start over
                self._bounce.clear()
            # Page-aligned. Never closed here: a view of the old buffer may still be alive.
            buf = self._bounce[tid] = mmap.mmap(-1, length)
        view = memoryview(buf)[:length]
        try:
            n = os.preadv(dfd, [view], pos)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # The device changed its mind about direct I/O (or its alignment): read
            # through the page cache from now on; never fail the request for it.
            if self._dfd >= 0:
                log.warning("direct reads refused by the device (EINVAL); reading buffered")
                self._dfd = -1
            return None
        if n != length:  # the host shrank the device under us (a direct read is all-or-end)
            raise DeviceError(errno.EIO, "short read from the device")
        return view

    def _read_raw_into(self, view: memoryview, start: int) -> None:
        done, length = 0, len(view)
        while done < length:
            n = os.preadv(self.fd, [view[done:]], self.offset + start + done)
            if n <= 0:  # the host shrank the device under us
                raise DeviceError(errno.EIO, "short read from the device")
            done += n

    def _write_raw(self, start: int, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = os.pwrite(self.fd, view[done:], self.offset + start + done)
            if n <= 0:
                raise DeviceError(errno.EIO, "short write to the device")
            done += n

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        ss = self.sector_size
        first = offset - offset % ss
        end = offset + length
        last = end + (-end) % ss
        return first, last

    # -- plaintext I/O -------------------------------------------------------------------

    def _read_ahead(self, offset: int, end: int) -> None:
        """Hint the kernel to prefetch ciphertext after a sequential read (module doc).

        The loop device splits one read-ahead of the filesystem into several requests
        that our worker threads see slightly out of order, so "sequential" means: a large
        request (the filesystem's read-ahead, not a small random read) that starts near
        where the last read ended, or inside the window already hinted."""
        last, self._next_read = self._next_read, end
        if end - offset < _RA_MIN_REQUEST:
            return  # small reads: random access (small files, metadata); no prefetch
        sequential = last - _NEAR <= offset <= max(last, self._ra_end) + _NEAR
        if not sequential or end + READAHEAD // 2 <= self._ra_end:
            return
        start = max(end, self._ra_end)
        stop = min(end + READAHEAD, self.size)
        self._ra_end = stop
        if stop > start:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.offset + start, stop - start, os.POSIX_FADV_WILLNEED)

    def read_into(self, out: memoryview, offset: int) -> int:
        """Fill ``out`` with plaintext from ``offset``; short at the end of the segment."""
        if offset < 0:
            raise DeviceError(errno.EINVAL, "negative offset")
        length = min(len(out), max(0, self.size - offset))
        if length == 0:
            return 0
        first, last = self._span(offset, length)
        if first == offset and last == offset + length and length >= DIRECT_MIN:
            ra = self._ra if self._dfd >= 0 else None

            def sink(pos: int, ciphertext: memoryview) -> None:
                with self._crypto:
                    self.segment.decrypt_into(
                        first + pos, ciphertext, out[pos : pos + len(ciphertext)]
                    )

            if ra is not None and ra.serve(first, length, sink):
                ra.advance(first, last)
                return length
            raw = self._read_direct(first, length)
            if raw is not None:  # decrypt from our aligned buffer into the caller's
                sink(0, raw)
                if ra is not None:
                    ra.advance(first, last)
                return length
        self._read_ahead(first, last)
        if first == offset and last == offset + length:
            # Aligned (what the loop device sends): read into the caller's buffer and
            # decrypt there, no intermediate copy.
            self._read_raw_into(out[:length], first)
            with self._crypto:
                self.segment.decrypt_into(first, out[:length], out[:length])
            return length
        buf = self._read_raw(first, last - first)
        with self._crypto:
            self.segment.decrypt_into(first, buf, buf)
        out[:length] = memoryview(buf)[offset - first : offset - first + length]
        return length

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        n = self.read_into(memoryview(out), offset)
        return bytes(out[:n])

    def write(self, data: Buffer, offset: int) -> int:
        """Write plaintext at ``offset``; ENOSPC past the end (a disk does not grow)."""
        if self.read_only:
            raise DeviceError(errno.EROFS, "read-only")
        src = memoryview(data).cast("B")
        if offset < 0:
            raise DeviceError(errno.EINVAL, "negative offset")
        if not src:
            return 0
        if offset + len(src) > self.size:
            raise DeviceError(errno.ENOSPC, "write past the end of the volume")
        first, last = self._span(offset, len(src))
        ss = self.sector_size
        with self._wlock:
            if first == offset and last == offset + len(src):
                buf = bytearray(src)
            else:
                buf = bytearray(last - first)
                # Only the partial head and tail sectors need their old contents.
                head = self._read_raw(first, ss)
                with self._crypto:
                    self.segment.decrypt_into(first, head, head)
                buf[:ss] = head
                if last - ss > first:
                    tail = self._read_raw(last - ss, ss)
                    with self._crypto:
                        self.segment.decrypt_into(last - ss, tail, tail)
                    buf[-ss:] = tail
                buf[offset - first : offset - first + len(src)] = src
            with self._crypto:
                self.segment.encrypt_into(first, buf, buf)
            try:
                self._write_raw(first, buf)
            finally:
                if self._ra is not None:  # after the pwrite: readahead.py's module doc
                    self._ra.invalidate()
        return len(src)

    def sync(self) -> None:
        """Make written sectors durable (the loop device's flush/FUA ends here)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        self.segment.wipe()
        if self._ra is not None:  # its workers read dfd: stop them first
            self._ra.close()
        dfd, self._dfd = self._dfd, -1
        if dfd >= 0:
            os.close(dfd)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
