"""Volume capabilities as plain data, and which ones the driver supports (node and controller).

The servicers (csi_driver/convert.py) turn a protobuf VolumeCapability into a ``Capability``;
the core never sees protobuf. A check returns a typed ``Unsupported`` whose ``kind`` says
whether something required was missing (INVALID_ARGUMENT) or is merely not supported
(FAILED_PRECONDITION on the node) — no status code is guessed from a message.

gocryptfs is not safe with two writers on one ciphertext directory (each daemon caches
directory IVs and file headers), so multi-node writer modes are refused outright.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AccessMode(enum.IntEnum):
    """CSI's VolumeCapability.AccessMode.Mode, same numbers."""

    UNKNOWN = 0
    SINGLE_NODE_WRITER = 1
    SINGLE_NODE_READER_ONLY = 2
    MULTI_NODE_READER_ONLY = 3
    MULTI_NODE_SINGLE_WRITER = 4
    MULTI_NODE_MULTI_WRITER = 5
    SINGLE_NODE_SINGLE_WRITER = 6
    SINGLE_NODE_MULTI_WRITER = 7


class AccessType(enum.Enum):
    NONE = "none"  # the request set neither
    MOUNT = "mount"
    BLOCK = "block"


WRITABLE_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }
)
READONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})
SUPPORTED_MODES = WRITABLE_MODES | READONLY_MODES


@dataclass(frozen=True)
class Capability:
    """One requested volume capability. ``access_mode`` is the raw number: a request may
    carry a value no enum member has."""

    access_type: AccessType
    access_mode: int
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()

    @property
    def readonly_mode(self) -> bool:
        return self.access_mode in READONLY_MODES


@dataclass(frozen=True)
class Unsupported:
    """Why a capability cannot be served: ``missing`` (the request left out something
    required) or not supported by this driver."""

    missing: bool
    message: str

    def __str__(self) -> str:
        return self.message


def mode_name(mode: int) -> str:
    try:
        return AccessMode(mode).name
    except ValueError:
        return f"#{mode}"


def unsupported(cap: Capability, *, allow_block: bool = False) -> Unsupported | None:
    """None if supported, else the typed reason. Raw block access (``allow_block``) only
    for block volumes: a directory volume has no device to expose."""
    if cap.access_type is AccessType.BLOCK and not allow_block:
        return Unsupported(False, "block access is not supported (filesystem volumes only)")
    if cap.access_type is AccessType.BLOCK:
        if cap.access_mode == AccessMode.UNKNOWN:
            return Unsupported(True, "access_mode is required")
        if cap.access_mode not in SUPPORTED_MODES:
            return Unsupported(False, f"access mode {mode_name(cap.access_mode)} is not supported")
        return None
    if cap.access_type is not AccessType.MOUNT:
        return Unsupported(True, "access_type (mount) is required")
    if cap.access_mode == AccessMode.UNKNOWN:
        return Unsupported(True, "access_mode is required")
    if cap.access_mode not in SUPPORTED_MODES:
        return Unsupported(False, f"access mode {mode_name(cap.access_mode)} is not supported")
    return None
