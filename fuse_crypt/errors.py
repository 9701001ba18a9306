"""Typed exceptions shared by all fuse_crypt layers.

Every message is written for humans and logs, so none of them may ever carry key
material, passwords or plaintext: callers format the *kind* of failure, never data.
The FUSE frontend maps :class:`CorruptDataError` to ``EIO`` so tampered ciphertext
can never surface as wrong plaintext.
"""

from __future__ import annotations


class FuseCryptError(Exception):
    """Base class; its message never contains key material."""


class ConfigError(FuseCryptError):
    """``gocryptfs.conf`` is corrupt, uses unknown flags or an unsupported feature."""


class WrongKeyError(FuseCryptError):
    """Wrong password or master key (the key-wrap authentication tag did not verify)."""


class CorruptDataError(FuseCryptError):
    """Authentication failed, bad file header, bad dir IV or an impossible size."""


class InvalidNameError(FuseCryptError):
    """A name cannot be decrypted, or a plaintext name is not a valid file name."""


class NameTooLongError(InvalidNameError):
    """A plaintext name is longer than 255 bytes (the frontend answers ENAMETOOLONG)."""


class BadInputError(FuseCryptError):
    """Unusable user input: empty password, malformed passfile or master-key text."""
