"""glibc allocator tuning for the mount daemon: process-wide, so it lives with the mount.

Why here and not in the crypto: the tuning changes the whole process (every thread's
malloc), which only the process that serves a mount may decide. Building a
:class:`~fuse_crypt.contentenc.ContentEnc` (a key check, a test, a library caller) must
leave the caller's allocator alone; ``serve()`` calls :func:`tune_process` once before
the loop starts, and the idle-time trim uses :func:`malloc_trim`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

__all__ = ["malloc_trim", "tune_allocator", "tune_process"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 4 << 20  # serve buffers up to 4 MiB from the heap
_TRIM_THRESHOLD = 32 << 20  # keep up to 32 MiB of freed heap instead of returning it
_ARENA_MAX = 2
#: The bounded-heap profile (object-store daemons, RSS budget 64 MiB): buffers of 1 MiB
#: and more are mmap()ed and unmapped on free, and at most 4 MiB of freed heap is kept.
#: Measured on the object daemon's cache-filling read (tests/fuse_crypt/
#: test_objectstore_rss.py): VmHWM 85 MiB with the thresholds above, 71 MiB with these;
#: its throughput is bound by the network, not by page faults.
_BOUNDED_MMAP_THRESHOLD = 1 << 20
_BOUNDED_TRIM_THRESHOLD = 4 << 20
_allocator_tuned: bool | None = None


def _libc(name: str) -> Any | None:
    """``name`` from the C library this process runs on, or None (not glibc, no libc)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune_allocator(*, bounded_heap: bool = False) -> bool:
    """Stop glibc from mmap()ing and unmapping every I/O-sized buffer.

    By default glibc serves allocations >= 128 KiB with a fresh mmap and returns them
    to the kernel on free, so each 128 KiB..1 MiB request buffer costs one page fault
    per 4 KiB page (measured ~4-5 us per block: more than the AES-GCM itself).
    Raising the mmap and trim thresholds lets those buffers be reused from the heap,
    which more than doubles batch throughput.  Process-wide, idempotent, skipped when
    the user already tunes malloc via the environment or libc has no ``mallopt``.
    Returns whether the tuning is in effect.  ``bounded_heap``: the smaller
    thresholds of the bounded-heap profile instead (see ``_BOUNDED_MMAP_THRESHOLD``).
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    mallopt = _libc("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_t, trim_t = (
        (_BOUNDED_MMAP_THRESHOLD, _BOUNDED_TRIM_THRESHOLD)
        if bounded_heap
        else (_MMAP_THRESHOLD, _TRIM_THRESHOLD)
    )
    _allocator_tuned = bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_t) and mallopt(_M_TRIM_THRESHOLD, trim_t)
    )
    return _allocator_tuned


def _bound_arenas() -> None:
    """Bound glibc's per-thread arenas.

    With the raised thresholds libfuse's per-read 1 MiB reply buffers are recycled
    instead of page-faulted in; with one arena per libfuse worker thread, each arena
    would then hoard its own freed buffers. Two arenas are plenty because Python
    serialises the workers on the GIL anyway, and keep the daemon's RSS small."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_ARENA_MAX, _ARENA_MAX)


def tune_process(*, bounded_heap: bool = False) -> bool:
    """All of the mount daemon's allocator tuning (:func:`tune_allocator`, then the
    arena bound); returns whether the thresholds are in effect."""
    tuned = tune_allocator(bounded_heap=bounded_heap)
    _bound_arenas()
    return tuned


def malloc_trim() -> Callable[[], None] | None:
    """A call that gives freed heap back to the kernel (glibc ``malloc_trim(0)``), or
    None where libc has none. The raised trim threshold keeps freed buffers, so the
    daemon calls this once a burst of I/O is over."""
    trim = _libc("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = [ctypes.c_size_t]

    def run() -> None:
        trim(0)

    return run
