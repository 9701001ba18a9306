"""Typed LUKS2 errors: every refusal names the check that failed, never key bytes.

Why a subtree under FuseCryptError: the block engine and the CSI node map the whole family
to one status, while tests and logs can still tell a hostile header (HeaderError) from an
I/O or usage problem (Luks2Error). A wrong passphrase is fuse_crypt's WrongKeyError.
"""

from __future__ import annotations

from ..errors import FuseCryptError

__all__ = ["HeaderError", "Luks2Error"]


class Luks2Error(FuseCryptError):
    """A LUKS2 operation failed (I/O, unusable device, refused request)."""


class HeaderError(Luks2Error):
    """The header is malformed, hostile or outside the accepted profiles; names the check."""
