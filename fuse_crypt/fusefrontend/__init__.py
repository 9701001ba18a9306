"""The FUSE filesystem: plaintext paths and contents over a ciphertext backend.

Modules: :mod:`.paths` (plain → cipher paths, dir IVs, long names), :mod:`.files`
(open-file table, block read/write/truncate), :mod:`.xattrs`, :mod:`.operations`
(the mfusepy Operations class) and :mod:`.mount` (``serve``).
"""

from . import _libfuse  # noqa: F401  (must precede any mfusepy import)
from .mount import serve

__all__ = ["serve"]
