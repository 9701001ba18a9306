"""Whether this machine can make the real FUSE mounts the CSI and chart tests need.

One answer for every suite that mounts through the CSI node plugin, so a missing piece is
reported the same way everywhere (as a skip reason, never a failure).
"""

from __future__ import annotations

import os
import shutil


def fuse_skip_reason(root_needed_for: str = "FUSE mounts") -> str | None:
    """None if FUSE mounts can work here, else why not (for a pytest skip)."""
    if os.geteuid() != 0:
        return f"needs root for {root_needed_for}"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"/dev/fuse unusable: {exc.strerror}"
    if shutil.which("fusermount3") is None:
        return "fusermount3 missing (Debian package fuse3)"
    return None
