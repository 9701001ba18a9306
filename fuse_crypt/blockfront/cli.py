"""``fuse-crypt block-serve``: serve a LUKS2 data segment as ``MOUNTPOINT/disk``.

Always in the foreground (the CSI node plugin supervises it); prints the same
``Filesystem mounted and ready.`` line as ``fuse-crypt mount --foreground`` once live.

The volume key comes on stdin only (never argv, environment or a file), as one line of
hex (64 or 128 digits); the segment's geometry comes from the flags. The key bytes are
kept in a bytearray that is zeroed once the cipher holds its own copy.
"""

from __future__ import annotations

import argparse
import sys

from fuse_crypt.cli.exitcodes import FUSE_MOUNT, MASTERKEY, OTHER, CliError

MAX_KEY_LINE = 1024


def _nonneg(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError("must be a decimal number of bytes")
    return int(text)


def _size(text: str) -> int | None:
    if text == "dynamic":
        return None
    value = _nonneg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive or 'dynamic'")
    return value


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "block-serve",
        parents=[common],
        help="serve the plaintext of a LUKS2 data segment as MOUNTPOINT/disk (foreground)",
    )
    p.add_argument(
        "--masterkey",
        required=True,
        choices=["stdin"],
        help="read the volume key (hex, one line) from stdin",
    )
    p.add_argument(
        "--offset",
        type=_nonneg,
        required=True,
        metavar="BYTES",
        help="data segment offset on DEVICE",
    )
    p.add_argument(
        "--size",
        type=_size,
        default=None,
        metavar="BYTES|dynamic",
        help="segment size (default dynamic: to the end of DEVICE)",
    )
    p.add_argument("--sector-size", type=int, default=4096, choices=[512, 1024, 2048, 4096])
    p.add_argument(
        "--cipher", default="aes-xts-plain64", choices=["aes-xts-plain64", "aes-xts-plain"]
    )
    p.add_argument("--ro", action="store_true", help="serve read-only")
    p.add_argument(
        "--allow-regular-file",
        action="store_true",
        help="accept an image file as DEVICE (tests; default: block devices only)",
    )
    p.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


def read_key_line() -> bytearray:
    """One hex line from stdin → key bytes (a bytearray the caller zeroes)."""
    raw = bytearray(sys.stdin.buffer.readline(MAX_KEY_LINE))
    try:
        text = raw.strip()
        if len(text) not in (64, 128):
            raise CliError("volume key on stdin must be 64 or 128 hex digits", MASTERKEY)
        try:
            return bytearray.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise CliError("volume key on stdin is not hex", MASTERKEY) from None
    finally:
        raw[:] = bytes(len(raw))


def cmd_block_serve(args: argparse.Namespace) -> int:
    from fuse_crypt.cli.mountrun import _setup_logging
    from fuse_crypt.luks2.segment import SegmentError, XtsSegment

    from .device import CryptDevice, DeviceError, open_device
    from .serve import serve_block

    key = read_key_line()
    try:
        segment = XtsSegment(
            bytes(key), sector_size=args.sector_size, cipher=args.cipher, iv_tweak=0
        )
    except SegmentError as e:
        raise CliError(str(e), MASTERKEY) from None
    finally:
        key[:] = bytes(len(key))
    try:
        fd = open_device(args.device, read_only=args.ro, allow_regular=args.allow_regular_file)
        device = CryptDevice(fd, segment, offset=args.offset, size=args.size, read_only=args.ro)
    except DeviceError as e:
        segment.wipe()
        raise CliError(f"device {args.device}: {e.strerror}", OTHER) from None

    def ready() -> None:
        if not getattr(args, "quiet", False):
            print("Filesystem mounted and ready.", flush=True)

    _setup_logging(daemon=False)
    try:
        serve_block(device, args.mountpoint, on_ready=ready, allow_other=args.allow_other)
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        raise CliError(f"cannot mount {args.mountpoint}: {e.strerror or e}", FUSE_MOUNT) from None
    return 0


__all__ = ["add_parser", "cmd_block_serve"]
