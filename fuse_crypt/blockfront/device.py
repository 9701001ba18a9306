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

Read-ahead: a read that continues where the last one ended asks the kernel
(``posix_fadvise(WILLNEED)``) to fetch the next ``READAHEAD`` bytes of *ciphertext* into
the device's page cache, so the following preads are memory copies that overlap our
decryption instead of waiting for the disk. Only ciphertext is cached; the host sees
nothing it does not already hold. No lock: the hint state is a pair of integers, and a
lost race only means one hint more or less.

Drop-behind: once a large read (the filesystem's read-ahead, whose plaintext the filesystem
above now caches) is decrypted, its ciphertext is dropped from the device's page cache
(``posix_fadvise(DONTNEED)``). A second copy of every byte read would only cost memory,
and on this VM the pages it frees are the next read-ahead's: reused pages are cheap to fill,
where fresh ones fault on the host (its balloon reports freed memory). Measured: cold 1 GiB
sequential reads through ext4 on the loop device at 996-1,273 MB/s (best of two per round,
four rounds) against 424-1,010 without (docs/block.md, "The request loop in C"). Small reads
(metadata, small files) keep their ciphertext cached.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from ..luks2 import XtsSegment

Buffer = bytes | bytearray | memoryview

log = logging.getLogger("fuse_crypt.blockfront")

_BLKGETSIZE64 = 0x80081272
#: bytes of ciphertext hinted ahead of a sequential reader
READAHEAD = 8 << 20
_NEAR = 2 << 20  # "continues the last read" tolerance (two 1 MiB FUSE requests)
_RA_MIN_REQUEST = 128 << 10  # the filesystem's own read-ahead sends at least this much


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
        self._read_ahead(first, last)
        if first == offset and last == offset + length:
            # Aligned (what the loop device sends): read into the caller's buffer and
            # decrypt there, no intermediate copy.
            self._read_raw_into(out[:length], first)
            with self._crypto:
                self.segment.decrypt_into(first, out[:length], out[:length])
        else:
            buf = self._read_raw(first, last - first)
            with self._crypto:
                self.segment.decrypt_into(first, buf, buf)
            out[:length] = memoryview(buf)[offset - first : offset - first + length]
        if last - first >= _RA_MIN_REQUEST:  # drop-behind (module doc)
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self.offset + first, last - first, os.POSIX_FADV_DONTNEED)
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
            self._write_raw(first, buf)
        return len(src)

    def sync(self) -> None:
        """Make written sectors durable (the loop device's flush/FUA ends here)."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        self.segment.wipe()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
