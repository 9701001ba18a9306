"""fuse_crypt: a gocryptfs-compatible encrypting FUSE filesystem.

Plaintext and keys exist only in this process's memory; the storage backend
underneath only ever sees gocryptfs-format ciphertext.
"""

# What other packages, the CLI entry point and the docs may import (tests/test_public_surfaces.py
# guards it): public submodules. Everything else is internal and may move freely.
__all__ = [
    "backend",
    "blockfront",
    "cli",
    "configfile",
    "errors",
    "fusefrontend",
    "hardening",
    "luks2",
    "metricsserver",
    "mounttable",
    "safeio",
    "strictjson",
]
