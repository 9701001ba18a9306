"""The FUSE filesystem: plaintext paths and contents over a ciphertext backend.

Modules, one job each:

* :mod:`.paths` -- plaintext path -> cipher path (dir IVs, EME names, long names),
  with caches invalidated on rmdir / directory rename;
* :mod:`.files` -- open-file table keyed by backing inode (RW lock + cached file ID
  per inode), block read / write with read-modify-write, holes, truncate;
* :mod:`.blockio` -- batch block crypto into recycled buffers (hot path);
* :mod:`.rwlock` -- the per-inode readers-writer lock;
* :mod:`.xattrs` -- encrypted xattr names and values;
* :mod:`.operations` -- the mfusepy ``Operations`` class tying them together;
* :mod:`.allocator` -- the daemon's process-wide glibc malloc tuning and idle trim;
* :mod:`.mount` -- ``serve()``: libfuse3 options, readiness, tuning, error mapping.
"""

from . import _libfuse  # noqa: F401  (must precede any mfusepy import)
from .files import MAX_IO
from .mount import CryptFUSE, run_fuse_loop, serve
from .stopsignals import StopSignals

# CryptFUSE, StopSignals and MAX_IO: the libfuse plumbing the block frontend
# (fuse_crypt.blockfront) shares, so both daemons map errors and stop signals alike.
__all__ = ["MAX_IO", "CryptFUSE", "StopSignals", "run_fuse_loop", "serve"]
