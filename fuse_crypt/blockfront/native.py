"""The block daemon's request loop in C (``blockloop.c``), loaded through cffi's ABI mode.

Why: the Python loop (libfuse's high-level API, mfusepy, :class:`.serve.BlockOperations`)
spends ~20 µs of CPU per request besides the kernel's FUSE round trip; on a 2-vCPU VM that
kept small-file reads at ~0.7x plain ext4 and sequential reads near 0.5x, where a C loop
reaches the issue's 0.8x and 0.6x (docs/block.md, "The request loop in C"). Only the loop
moved: the device is opened and checked, the header validated and the key unlocked in
Python as before, and the C side gets the segment's two keyed OpenSSL contexts, never key
bytes.

``blockloop.so.0`` is compiled by setup.py when libfuse3's headers are there (Debian's
libfuse3-dev; ``./run`` installs it); without it, or with ``FUSE_CRYPT_BLOCK_LOOP=python``
in the daemon's environment (escape hatch, benchmark baseline), the Python loop serves.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..fusefrontend import MAX_IO
from .device import _NEAR, _RA_MIN_REQUEST, READAHEAD, CryptDevice

log = logging.getLogger("fuse_crypt.blockfront")

#: ``python`` forces the Python loop (mfusepy); anything else, or unset, prefers C
LOOP_ENV = "FUSE_CRYPT_BLOCK_LOOP"
LIB_FILE = Path(__file__).with_name("blockloop.so.0")
#: the ops counted, in blockloop.c's order
OPS = ("read", "write", "fsync")

_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
struct coco_blk_params {
    int fd; int read_only; int allow_other; int threads; uint32_t max_io;
    int64_t ra_bytes; int64_t ra_near; int64_t ra_min_request;
    uint64_t offset; uint64_t fixed_size; uint32_t sector_size;
    EVP_CIPHER_CTX *dec; EVP_CIPHER_CTX *enc;
    uint64_t iv_base; uint64_t units; uint64_t mask;
    uint32_t uid, gid; int64_t time_sec;
};
struct coco_blk;
struct coco_blk *coco_blk_new(const struct coco_blk_params *p, const char *mountpoint,
                              const char *fsname);
int coco_blk_run(struct coco_blk *b);
void coco_blk_exit(struct coco_blk *b);
void coco_blk_unmount(struct coco_blk *b);
int coco_blk_initialized(struct coco_blk *b);
uint64_t coco_blk_size(struct coco_blk *b);
size_t coco_blk_counters(struct coco_blk *b, uint64_t *out, size_t n);
void coco_blk_free(struct coco_blk *b);
"""
_LOCK = threading.Lock()
_LIB: tuple[Any, Any] | None = None
_TRIED = False


def _load() -> tuple[Any, Any] | None:
    """(ffi, lib) of blockloop.so.0, once per process; None if it cannot be used."""
    global _LIB, _TRIED
    with _LOCK:
        if not _TRIED:
            _TRIED = True
            try:
                from cffi import FFI

                ffi = FFI()
                ffi.cdef(_CDEF)
                lib = ffi.dlopen(str(LIB_FILE))
                _ = lib.coco_blk_new  # resolve now: a file without it is refused
                _LIB = (ffi, lib)
            except Exception as exc:  # not built, no libfuse3.so.3, a symbol missing
                log.info("block: no C request loop (%s); the Python loop serves", exc)
        return _LIB


def chosen(device: CryptDevice) -> bool:
    """Whether ``device`` is served by the C loop: built, not overridden, and the segment
    runs on libcrypto's EVP contexts (the C loop needs them)."""
    if os.environ.get(LOOP_ENV) == "python":
        return False
    return device.segment.native_xts() is not None and _load() is not None


class NativeLoop:
    """One mounted C request loop serving ``device`` at ``mountpoint``.

    ``__init__`` mounts (OSError if it cannot); ``run`` serves until unmounted or
    ``exit`` and then unmounts; ``close`` frees the session. The device, its descriptor
    and its key stay the caller's, and must outlive ``close``."""

    def __init__(
        self,
        device: CryptDevice,
        mountpoint: str,
        *,
        fsname: str,
        allow_other: bool = False,
        threads: int = 4,
    ) -> None:
        loaded = _load()
        xts = device.segment.native_xts()
        if loaded is None or xts is None:
            raise OSError(errno.ENOSYS, "the C request loop is not available")
        self._ffi, self._lib = ffi, lib = loaded
        dec, enc, iv_base, units, mask = xts
        p = ffi.new("struct coco_blk_params *")
        p.fd = device.fd
        p.read_only = int(device.read_only)
        p.allow_other = int(allow_other)
        p.threads = threads
        p.max_io = MAX_IO
        p.ra_bytes, p.ra_near, p.ra_min_request = READAHEAD, _NEAR, _RA_MIN_REQUEST
        p.offset = device.offset
        p.fixed_size = device.fixed_size or 0
        p.sector_size = device.sector_size
        p.dec = ffi.cast("EVP_CIPHER_CTX *", dec)
        p.enc = ffi.cast("EVP_CIPHER_CTX *", enc)
        p.iv_base = iv_base
        p.units = units
        p.mask = mask
        p.uid = os.getuid()
        p.gid = os.getgid()
        p.time_sec = int(time.time())  # the files' times, as the Python loop's
        self._device = device  # keeps the contexts alive as long as the loop
        handle = lib.coco_blk_new(p, os.fsencode(mountpoint), fsname.encode())
        if handle == ffi.NULL:
            code = ffi.errno or errno.EIO
            raise OSError(code, f"cannot mount the block loop: {os.strerror(code)}", mountpoint)
        self._handle: Any = handle
        # the counter layout (blockloop.c): requests by op, bytes read, bytes written, then
        # errors by op and errno; the C side says how many there are
        total = int(lib.coco_blk_counters(handle, ffi.NULL, 0))
        self._n_errno = (total - len(OPS) - 2) // len(OPS)
        self._counts = ffi.new("uint64_t[]", total)

    def run(self) -> None:
        """Serve (GIL released) until unmounted or :meth:`exit`; then unmount. Raises
        OSError(EIO) if libfuse's loop failed. Not mfusepy's RuntimeError: that one
        ``run_fuse_loop`` takes for a stop signal when the mount is gone, and this loop
        is always unmounted by then, while a stop through :meth:`exit` returns 0."""
        try:
            code = self._lib.coco_blk_run(self._handle)
        finally:
            self._lib.coco_blk_unmount(self._handle)
        if code != 0:
            raise OSError(errno.EIO, f"the block request loop failed (libfuse returned {code})")

    def exit(self) -> None:
        """End the loop (StopSignals then interrupts the loop thread's wait)."""
        self._lib.coco_blk_exit(self._handle)

    def initialized(self) -> bool:
        return bool(self._lib.coco_blk_initialized(self._handle))

    def size(self) -> int:
        return int(self._lib.coco_blk_size(self._handle))

    def counts(self) -> tuple[dict[str, int], int, int, dict[tuple[str, int], int]]:
        """(requests by op, plaintext bytes read, written, errors by (op, errno))."""
        c, n, n_errno = self._counts, len(OPS), self._n_errno
        self._lib.coco_blk_counters(self._handle, c, len(c))
        requests = {op: int(c[i]) for i, op in enumerate(OPS)}
        errors: dict[tuple[str, int], int] = {}
        base = n + 2
        for i, op in enumerate(OPS):
            for code in range(1, n_errno):
                v = int(c[base + i * n_errno + code])
                if v:
                    errors[op, code] = v
        return requests, int(c[n]), int(c[n + 1]), errors

    def close(self) -> None:
        if self._handle is not None:
            self._lib.coco_blk_free(self._handle)
            self._handle = None


__all__ = ["LOOP_ENV", "OPS", "NativeLoop", "chosen"]
