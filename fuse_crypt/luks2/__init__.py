"""LUKS2 on-disk format: read, validate, unlock, create and re-key (pure, fd-based).

Compatible with cryptsetup 2.6 and CoCo's Confidential Data Hub (aes-xts-plain64, 64-byte
volume key, attached 16 KiB header, data at 16 MiB; CDH's dataIntegrity headers, 96-byte
key, only where the caller says it serves dm-integrity: the kernel engine). The host owns
the disk, so the header is hostile input: it is read once, checked against the accepted
profiles (profile.py), unlocked from that in-memory copy, and authenticated by a MAC in a
token (binding.py). No FUSE, no CSI here: the sector crypto is segment.py, the block
frontend is fuse_crypt.blockfront."""

from .errors import HeaderError, Luks2Error
from .keyslot import KdfCost
from .segment import SegmentError, XtsSegment
from .volume import (
    DataSegment,
    Opened,
    add_passphrase,
    bind_volume,
    format_volume,
    inspect_header,
    is_luks,
    open_volume,
    remove_passphrase,
)

__all__ = [
    "DataSegment",
    "HeaderError",
    "KdfCost",
    "Luks2Error",
    "Opened",
    "SegmentError",
    "XtsSegment",
    "add_passphrase",
    "bind_volume",
    "format_volume",
    "inspect_header",
    "is_luks",
    "open_volume",
    "remove_passphrase",
]
