"""Which volume capabilities the driver supports, shared by node and controller.

gocryptfs is not safe with two writers on one ciphertext directory (each daemon caches
directory IVs and file headers), so multi-node writer modes are refused outright.
"""

from __future__ import annotations

from coco_proto import csi_pb2

Mode = csi_pb2.VolumeCapability.AccessMode.Mode

WRITABLE_MODES = frozenset(
    {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER}
)
READONLY_MODES = frozenset({Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY})
SUPPORTED_MODES = WRITABLE_MODES | READONLY_MODES


def unsupported_reason(cap: csi_pb2.VolumeCapability) -> str | None:
    """None if supported, else a short reason suitable for an error message."""
    if cap.WhichOneof("access_type") == "block":
        return "block access is not supported (filesystem volumes only)"
    if cap.WhichOneof("access_type") != "mount":
        return "access_type (mount) is required"
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "access_mode is required"
    if cap.access_mode.mode not in SUPPORTED_MODES:
        return f"access mode {Mode.Name(cap.access_mode.mode)} is not supported"
    return None
