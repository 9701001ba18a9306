"""The CLI's view of ``gocryptfs.conf``: ConfFile's reader and writer, errors as CliError.

Reading, validating and the atomic write (``gocryptfs.conf.tmp`` O_EXCL 0400, fsync,
rename, directory fsync) live in one place, :class:`fuse_crypt.configfile.ConfFile`; this
module only turns their failures into one-line CLI messages with gocryptfs' exit codes.
"""

from __future__ import annotations

import os
from typing import Any

from fuse_crypt.cli.exitcodes import CONFIG, WRITE_CONF, CliError
from fuse_crypt.configfile import BAK_NAME, TMP_NAME
from fuse_crypt.nametransform import CONF_NAME

__all__ = [
    "BAK_NAME",
    "CONF_NAME",
    "TMP_NAME",
    "backup_conf",
    "conf_path",
    "load_conf",
    "write_conf",
]


def conf_path(cipherdir: str) -> str:
    return os.path.join(cipherdir, CONF_NAME)


def load_conf(cipherdir: str) -> Any:
    """Parse and validate the conf; any problem is a CONFIG (23) error, nothing is changed."""
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.errors import ConfigError

    path = conf_path(cipherdir)
    try:
        return ConfFile.read(path)
    except FileNotFoundError:
        raise CliError(f"cannot open config file {path}: no such file", CONFIG) from None
    except ConfigError as e:
        msg = str(e)
        if not msg.startswith("config file"):
            msg = f"config file {path}: {msg}"
        raise CliError(msg, CONFIG) from None


def write_conf(cipherdir: str, conf: Any) -> None:
    """Create or replace ``gocryptfs.conf`` atomically (see ConfFile.write)."""
    tmp = os.path.join(cipherdir, TMP_NAME)
    try:
        conf.write(conf_path(cipherdir))
    except FileExistsError:
        raise CliError(
            f"{tmp} exists: another passwd/init may be running; remove it if not", WRITE_CONF
        ) from None
    except OSError as e:
        raise CliError(f"cannot write config file: {e.strerror}", WRITE_CONF) from None


def backup_conf(cipherdir: str) -> str:
    """Hard-link the current conf to ``gocryptfs.conf.bak`` before a master-key reset."""
    bak = os.path.join(cipherdir, BAK_NAME)
    try:
        os.link(conf_path(cipherdir), bak, follow_symlinks=False)
    except FileExistsError:
        raise CliError(f"{bak} already exists; move it away first", WRITE_CONF) from None
    except OSError as e:
        raise CliError(f"cannot create {bak}: {e.strerror}", WRITE_CONF) from None
    return bak
