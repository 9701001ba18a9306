"""Whether this machine can make real FUSE mounts: the one check every suite uses.

One answer for every test that mounts (fuse_crypt's own mounts, the CSI node plugin's, the
chart's), so a missing piece is reported the same way everywhere (as a skip reason, never
a failure).
"""

from __future__ import annotations

import os
import shutil

import pytest


def fuse_skip_reason(root_needed_for: str | None = "FUSE mounts") -> str | None:
    """None if FUSE mounts can work here, else why not (for a pytest skip).

    ``root_needed_for`` names what needs root (the CSI plugin's mounts do: allow_other,
    mounts for other users); None for a plain mount by this user through fusermount3.
    """
    if root_needed_for is not None and os.geteuid() != 0:
        return f"needs root for {root_needed_for}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse unusable: {exc.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing (Debian package fuse3)"
    return None


#: Marks a test (or, as ``pytestmark``, a module) that makes plain FUSE mounts.
needs_fuse = pytest.mark.skipif(
    fuse_skip_reason(None) is not None, reason=str(fuse_skip_reason(None))
)
