"""Reading passwords and master keys the way gocryptfs does.

Why a line reader over ``sys.stdin.buffer``: several secrets can come through one pipe
(``passwd`` reads the old password, then the new one; ``init --masterkey stdin`` reads the
key, then the password), so each call must consume exactly one line and no more.
Secrets are kept as bytes and never echoed or put into exception messages.
"""

from __future__ import annotations

import getpass
import os
import sys

from fuse_crypt.cli.exitcodes import (
    MASTERKEY,
    PASSWORD_EMPTY,
    READ_PASSWORD,
    CliError,
)

MAX_PASSWORD_LEN = 2048
_MAX_LINE = MAX_PASSWORD_LEN + 2


def stdin_is_tty() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):
        return False


def _read_stdin_line(what: str) -> bytes:
    stream = sys.stdin.buffer
    line = stream.readline(_MAX_LINE)
    if len(line) > MAX_PASSWORD_LEN + 1 or (
        len(line) > MAX_PASSWORD_LEN and not line.endswith(b"\n")
    ):
        raise CliError(f"{what} on stdin is longer than {MAX_PASSWORD_LEN} bytes", READ_PASSWORD)
    if line.endswith(b"\n"):
        line = line[:-1]
    return line


def _check(pw: bytes, what: str) -> bytes:
    if not pw:
        raise CliError(f"{what} is empty", PASSWORD_EMPTY)
    if len(pw) > MAX_PASSWORD_LEN:
        raise CliError(f"{what} is longer than {MAX_PASSWORD_LEN} bytes", READ_PASSWORD)
    return pw


def read_passfile(path: str) -> bytes:
    """First line of ``path`` (gocryptfs -passfile rules), via configfile.read_passfile."""
    from fuse_crypt.configfile import read_passfile as _read
    from fuse_crypt.errors import FuseCryptError

    try:  # open it ourselves first so an unreadable file is a READ_PASSWORD (9) error
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CliError(f"cannot read password file {path}: {e.strerror}", READ_PASSWORD) from None
    try:
        pw = _read(path)
    except (FuseCryptError, ValueError) as e:
        # The message describes the file's shape (e.g. "first line is empty"), not its content.
        code = PASSWORD_EMPTY if "empty" in str(e) else READ_PASSWORD
        raise CliError(str(e), code) from None
    return _check(pw, f"password from {path}")


def read_password(
    passfile: str | None,
    *,
    prompt: str = "Password: ",
    confirm: bool = False,
    what: str = "password",
) -> bytes:
    """A password from --passfile, else the terminal (asked twice if ``confirm``), else one
    line of stdin."""
    if passfile:
        return read_passfile(passfile)
    if stdin_is_tty():
        try:
            first = getpass.getpass(prompt).encode()
            if confirm:
                again = getpass.getpass("Repeat: ").encode()
                if again != first:
                    raise CliError("passwords do not match", READ_PASSWORD)
        except (EOFError, KeyboardInterrupt):
            raise CliError(f"no {what} entered", READ_PASSWORD) from None
        return _check(first, what)
    return _check(_read_stdin_line(what), f"{what} from stdin")


def read_master_key(value: str) -> bytes:
    """``--masterkey HEX`` or ``--masterkey stdin`` → 32 key bytes (never echoed)."""
    from fuse_crypt.configfile import parse_master_key

    if value == "stdin":
        if stdin_is_tty():
            try:
                text = getpass.getpass("Master key: ")
            except (EOFError, KeyboardInterrupt):
                raise CliError("no master key entered", MASTERKEY) from None
        else:
            text = _read_stdin_line("master key").decode("ascii", "replace")
    else:
        text = value
    try:
        key = parse_master_key(text.strip())
    except Exception:  # noqa: BLE001 - whatever the parser raises, never show the input
        raise CliError("invalid master key: expected 64 hex digits", MASTERKEY) from None
    if len(key) != 32:
        raise CliError("invalid master key: expected 64 hex digits", MASTERKEY)
    return key
