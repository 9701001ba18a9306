"""Storage backends: where ciphertext lives (see :mod:`fuse_crypt.backend.base`).

A local directory (:class:`LocalDirBackend`) or a bucket prefix
(:class:`ObjectStoreBackend` over an ``ObjectTransport``, e.g. ``s3.S3Transport``)."""

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
from .objectstore import ObjectStoreBackend

__all__ = [
    "DirEntry",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "LocalDirBackend",
    "ObjectStoreBackend",
    "Stat",
    "StorageBackend",
    "credentials",  # CredentialBox: credentials swapped in a mounted daemon (STS refresh)
    "oss",  # OssTransport (oss2), imported on demand like s3
    "retrying",  # RetryingTransport: backoff + jitter around any ObjectTransport
    "s3",  # S3Transport (boto3), imported on demand: boto3 is slow to import
    "transport",  # ObjectTransport, the seam under ObjectStoreBackend
]
