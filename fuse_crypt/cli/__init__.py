"""``fuse-crypt``: create, mount and manage gocryptfs-compatible encrypted volumes.

Flags follow gocryptfs where they overlap (``--passfile``, ``--masterkey``, ``--scryptn``,
``--ro``, ``--allow-other``), and exit codes use gocryptfs's numbers, so scripts and
operators can move between the two tools. Every failure ends as one ``fuse-crypt: ...``
line on stderr and a non-zero exit code; tracebacks only with FUSE_CRYPT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from typing import NoReturn

from fuse_crypt.cli.exitcodes import CONFIG, OTHER, PASSWORD_INCORRECT, SIGINT, USAGE, CliError
from fuse_crypt.cli.objectloc import add_location_args
from fuse_crypt.daemon import DaemonError

PROG = "fuse-crypt"


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 1 (gocryptfs's Usage code)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{PROG}: {message} (see '{self.prog} --help')\n")
        raise SystemExit(USAGE)


def _capacity(text: str) -> int:
    """--capacity: a positive decimal number of bytes."""
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of bytes")
    return int(text)


def _add_key_source(p: argparse.ArgumentParser, *, masterkey_help: str) -> None:
    p.add_argument(
        "--passfile", metavar="FILE", help="read the password from the first line of FILE"
    )
    p.add_argument("--masterkey", metavar="HEX|stdin", help=masterkey_help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG, description="Create, mount and manage gocryptfs-compatible encrypted volumes."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    # Also accepted after the subcommand; SUPPRESS keeps it from resetting the global one.
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("init", parents=[common], help="create a new volume in an empty CIPHERDIR")
    _add_key_source(p, masterkey_help="build the volume around this master key")
    p.add_argument(
        "--scryptn", type=int, metavar="N", help="scrypt cost as log2(N), 10..28 (default 16)"
    )
    add_location_args(p)
    p.add_argument("cipherdir", metavar="CIPHERDIR", help="a directory, or s3://BUCKET/PREFIX")

    p = sub.add_parser("mount", parents=[common], help="mount CIPHERDIR on MOUNTPOINT")
    _add_key_source(p, masterkey_help="mount with this master key instead of a password")
    p.add_argument("--ro", action="store_true", help="mount read-only")
    p.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground (no fork)"
    )
    p.add_argument("--allow-other", action="store_true", help="let other users access the mount")
    p.add_argument(
        "--capacity",
        type=_capacity,
        default=0,
        metavar="BYTES",
        help="the volume's size: growth past it is ENOSPC, statfs shows it (default: none)",
    )
    p.add_argument(
        "--metrics-addr", metavar="HOST:PORT", help="serve Prometheus metrics on HOST:PORT"
    )
    add_location_args(p)
    p.add_argument("cipherdir", metavar="CIPHERDIR", help="a directory, or s3://BUCKET/PREFIX")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    p = sub.add_parser("unmount", parents=[common], aliases=["umount"], help="unmount MOUNTPOINT")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")

    p = sub.add_parser(
        "passwd", parents=[common], help="change the password (the master key stays the same)"
    )
    _add_key_source(p, masterkey_help="reset a forgotten password using the master key")
    p.add_argument("--new-passfile", metavar="FILE", help="read the new password from FILE")
    p.add_argument(
        "--scryptn", type=int, metavar="N", help="new scrypt cost (default: keep the current)"
    )
    p.add_argument("cipherdir", metavar="CIPHERDIR")

    p = sub.add_parser("info", parents=[common], help="show a volume's settings (no secrets)")
    p.add_argument("cipherdir", metavar="CIPHERDIR")

    p = sub.add_parser(
        "demo", parents=[common], help="show fuse-crypt at work on a throw-away volume"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")

    from fuse_crypt.blockfront.cli import add_parser as add_block_parser

    add_block_parser(sub, common)
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    from fuse_crypt.cli import commands

    commands.set_quiet(bool(getattr(args, "quiet", False)))
    both = getattr(args, "passfile", None) and getattr(args, "masterkey", None)
    if both and args.command in ("mount", "passwd"):
        raise CliError("--passfile and --masterkey are mutually exclusive", USAGE)
    if args.command == "init":
        return commands.cmd_init(args)
    if args.command == "mount":
        return commands.cmd_mount(args)
    if args.command in ("unmount", "umount"):
        return commands.cmd_unmount(args)
    if args.command == "passwd":
        return commands.cmd_passwd(args)
    if args.command == "info":
        return commands.cmd_info(args)
    if args.command == "block-serve":
        from fuse_crypt.blockfront.cli import cmd_block_serve

        return cmd_block_serve(args)
    if args.command == "demo":
        from fuse_crypt.demo import run_demo

        return run_demo(keep=args.keep)
    raise CliError(f"unknown command {args.command}", USAGE)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("FUSE_CRYPT_DEBUG") == "1"
    try:
        return _dispatch(args)
    except DaemonError as e:  # CliError and the daemon helpers' errors
        return _fail(str(e), e.code)
    except KeyboardInterrupt:
        return _fail("interrupted", SIGINT)
    except Exception as e:  # noqa: BLE001 - turn library errors into one line
        from fuse_crypt.daemon import describe_exception
        from fuse_crypt.errors import ConfigError, FuseCryptError, WrongKeyError

        if debug:
            traceback.print_exc()
        if isinstance(e, WrongKeyError):
            return _fail("password incorrect", PASSWORD_INCORRECT)
        if isinstance(e, ConfigError):
            return _fail(f"config: {e}", CONFIG)
        if isinstance(e, FuseCryptError):
            return _fail(str(e), OTHER)
        return _fail(describe_exception(e), OTHER)


if __name__ == "__main__":
    raise SystemExit(main())
