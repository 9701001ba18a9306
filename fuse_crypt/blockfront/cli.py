"""``fuse-crypt block-serve``: serve a LUKS2 data segment as ``MOUNTPOINT/disk``.

Always in the foreground (the CSI node plugin supervises it); prints the same
``Filesystem mounted and ready.`` line as ``fuse-crypt mount --foreground`` once live.

Secrets come on stdin only (never argv, environment or a file): with ``--masterkey stdin``
the volume key as one line of hex (64 or 128 digits) and the segment's geometry from the
flags (what the CSI node plugin uses: it unlocked the header itself); with ``--passphrase
stdin`` the LUKS2 passphrase, and key and geometry come from the header, read once through
the descriptor the daemon then serves (fuse_crypt.luks2.open_volume). Secret bytes are kept
in bytearrays that are zeroed once the cipher holds its own copy.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from fuse_crypt.cli.exitcodes import (
    CONFIG,
    FUSE_MOUNT,
    MASTERKEY,
    OTHER,
    PASSWORD_INCORRECT,
    USAGE,
    CliError,
)
from fuse_crypt.luks2 import SegmentError, XtsSegment

if TYPE_CHECKING:
    from .device import CryptDevice
    from .metrics import BlockMetrics

MAX_KEY_LINE = 1024
MAX_PASSPHRASE = 8 << 20


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
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--masterkey",
        choices=["stdin"],
        help="read the volume key (hex, one line) from stdin; geometry from the flags",
    )
    src.add_argument(
        "--passphrase",
        choices=["stdin"],
        help="read the LUKS2 passphrase from stdin (all of it, up to 8 MiB, as cryptsetup's "
        "--key-file -) and take key and geometry from the validated header",
    )
    p.add_argument(
        "--accept-unbound-header",
        action="store_true",
        help="with --passphrase: open a header without coco-csi's binding token (CDH disks)",
    )
    p.add_argument(
        "--offset",
        type=_nonneg,
        default=None,
        metavar="BYTES",
        help="data segment offset on DEVICE (required with --masterkey)",
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
    p.add_argument(
        "--metrics-addr",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on HOST:PORT (empty HOST = 127.0.0.1)",
    )
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")


def _from_key_line(args: argparse.Namespace) -> XtsSegment:
    key = read_key_line()
    try:
        return XtsSegment(bytes(key), sector_size=args.sector_size, cipher=args.cipher)
    except SegmentError as e:
        raise CliError(str(e), MASTERKEY) from None
    finally:
        key[:] = bytes(len(key))


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


def _from_header(fd: int, args: argparse.Namespace) -> tuple[XtsSegment, int, int | None]:
    """--passphrase: unlock from the header read once through ``fd`` (validated, bound)."""
    from fuse_crypt.errors import BadInputError, WrongKeyError
    from fuse_crypt.luks2 import Luks2Error, open_volume

    secret = bytearray(sys.stdin.buffer.read(MAX_PASSPHRASE + 1))
    try:
        if len(secret) > MAX_PASSPHRASE:
            raise CliError("passphrase on stdin is longer than 8 MiB", USAGE)
        opened = open_volume(fd, bytes(secret), require_binding=not args.accept_unbound_header)
    except WrongKeyError:
        raise CliError("passphrase incorrect", PASSWORD_INCORRECT) from None
    except (Luks2Error, BadInputError) as e:
        raise CliError(f"LUKS2: {e}", CONFIG) from None
    finally:
        secret[:] = bytes(len(secret))
    seg = opened.segment
    xts = XtsSegment(opened.volume_key, sector_size=seg.sector_size, cipher=seg.cipher)
    return xts, seg.offset, seg.size


def cmd_block_serve(args: argparse.Namespace) -> int:
    from fuse_crypt.cli.mountrun import _setup_logging

    from .device import CryptDevice, DeviceError, open_device
    from .serve import serve_block

    if args.masterkey and args.offset is None:
        raise CliError("--masterkey needs --offset", USAGE)
    if args.metrics_addr:
        from fuse_crypt.cli.metrics import parse_addr

        parse_addr(args.metrics_addr)  # a typo is a usage error, before any secret is read
    try:
        fd = open_device(args.device, read_only=args.ro, allow_regular=args.allow_regular_file)
    except DeviceError as e:
        raise CliError(f"device {args.device}: {e.strerror}", OTHER) from None
    try:
        if args.passphrase:
            segment, offset, size = _from_header(fd, args)
        else:
            segment, offset, size = _from_key_line(args), args.offset, args.size
    except BaseException:
        os.close(fd)
        raise
    try:
        device = CryptDevice(fd, segment, offset=offset, size=size, read_only=args.ro)
    except DeviceError as e:
        segment.wipe()
        os.close(fd)
        raise CliError(f"device {args.device}: {e.strerror}", OTHER) from None

    observer = _start_metrics(args, device) if args.metrics_addr else None

    def ready() -> None:
        if not getattr(args, "quiet", False):
            print("Filesystem mounted and ready.", flush=True)

    _setup_logging(daemon=False)
    try:
        serve_block(
            device,
            args.mountpoint,
            on_ready=ready,
            allow_other=args.allow_other,
            metrics=observer,
        )
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        raise CliError(f"cannot mount {args.mountpoint}: {e.strerror or e}", FUSE_MOUNT) from None
    return 0


def _start_metrics(args: argparse.Namespace, device: CryptDevice) -> BlockMetrics:
    """Serve /metrics before mounting: a port in use fails the daemon (exit 11) with the
    key wiped and nothing mounted."""
    from fuse_crypt.cli import metrics

    from . import native
    from .metrics import BLOCK_INFO, BlockMetrics

    observer = BlockMetrics(device, native=native.chosen(device))
    try:
        metrics.start(
            args.metrics_addr,
            BLOCK_INFO,
            observer.collectors(),
            read_only=device.read_only,
            device=os.path.abspath(args.device),
            mountpoint=os.path.abspath(args.mountpoint),
            sector_size=str(device.sector_size),
        )
    except BaseException:
        device.close()
        raise
    return observer


__all__ = ["add_parser", "cmd_block_serve"]
