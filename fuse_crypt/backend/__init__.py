"""Storage backends: where ciphertext lives (see :mod:`fuse_crypt.backend.base`)."""

from .base import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    DirEntry,
    Stat,
    StorageBackend,
)
from .local import LocalDirBackend

__all__ = [
    "DirEntry",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "LocalDirBackend",
    "Stat",
    "StorageBackend",
]
