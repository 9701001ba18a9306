"""Exit codes of ``fuse-crypt``: gocryptfs's numbers where gocryptfs has one.

Scripts written for gocryptfs (e.g. "12 means wrong password") keep working.
"""

from __future__ import annotations

from fuse_crypt.daemon import DaemonError

USAGE = 1
CIPHERDIR = 6
INIT = 7
READ_PASSWORD = 9
MOUNTPOINT = 10
OTHER = 11
PASSWORD_INCORRECT = 12
SCRYPT_PARAMS = 13
MASTERKEY = 14
SIGINT = 15
FORK_CHILD = 17
FUSE_MOUNT = 19
PASSWORD_EMPTY = 22
CONFIG = 23
WRITE_CONF = 24
#: ``init`` on a directory that is not new: it holds a conf, or files an interrupted init
#: does not leave (gocryptfs says 6 here; ours is distinct so the CSI plugin can answer
#: FAILED_PRECONDITION without parsing messages).  Not a gocryptfs number.
CIPHERDIR_NOT_NEW = 40


class CliError(DaemonError):
    """A user-facing failure: printed as one ``fuse-crypt: ...`` line, then exit ``code``.

    A DaemonError, so one raised inside a mount daemon travels up the readiness pipe with
    its code intact. The message must never contain a password or key.
    """

    def __init__(self, message: str, code: int = OTHER) -> None:
        super().__init__(message, code)
