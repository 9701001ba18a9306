"""Reading and atomically replacing ``gocryptfs.conf`` in a cipher directory.

Why atomic: the conf holds the only password-wrapped copy of the master key. A crash or
full disk halfway through ``passwd`` must leave either the old or the new file, never a
torn one, so we write ``gocryptfs.conf.tmp`` (O_EXCL, 0400), fsync it, rename it over the
old file and fsync the directory, as gocryptfs does.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from fuse_crypt.cli.exitcodes import CONFIG, WRITE_CONF, CliError

CONF_NAME = "gocryptfs.conf"
TMP_NAME = "gocryptfs.conf.tmp"
BAK_NAME = "gocryptfs.conf.bak"
MAX_CONF_BYTES = 1 << 20


def conf_path(cipherdir: str) -> str:
    return os.path.join(cipherdir, CONF_NAME)


def read_conf_bytes(cipherdir: str) -> bytes:
    path = conf_path(cipherdir)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF_BYTES + 1)
    except FileNotFoundError:
        raise CliError(f"cannot open config file {path}: no such file", CONFIG) from None
    except OSError as e:
        raise CliError(f"cannot open config file {path}: {e.strerror}", CONFIG) from None
    if len(data) > MAX_CONF_BYTES:
        raise CliError(f"config file {path} is implausibly large", CONFIG)
    return data


def load_conf(cipherdir: str) -> Any:
    """Parse and validate the conf; any problem is a CONFIG (23) error, nothing is changed."""
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.errors import ConfigError

    data = read_conf_bytes(cipherdir)
    try:
        return ConfFile.loads(data)
    except ConfigError as e:
        raise CliError(f"config file {conf_path(cipherdir)}: {e}", CONFIG) from None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_conf_atomic(cipherdir: str, data: bytes) -> None:
    """Create or replace ``gocryptfs.conf`` with ``data`` (tmp + fsync + rename)."""
    tmp = os.path.join(cipherdir, TMP_NAME)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except FileExistsError:
        raise CliError(
            f"{tmp} exists: another passwd/init may be running; remove it if not", WRITE_CONF
        ) from None
    except OSError as e:
        raise CliError(f"cannot write {tmp}: {e.strerror}", WRITE_CONF) from None
    try:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, conf_path(cipherdir))
        _fsync_dir(cipherdir)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CliError(f"cannot write config file: {e.strerror}", WRITE_CONF) from None


def backup_conf(cipherdir: str) -> str:
    """Hard-link the current conf to ``gocryptfs.conf.bak`` before a master-key reset."""
    bak = os.path.join(cipherdir, BAK_NAME)
    try:
        os.link(conf_path(cipherdir), bak)
    except FileExistsError:
        raise CliError(f"{bak} already exists; move it away first", WRITE_CONF) from None
    except OSError as e:
        raise CliError(f"cannot create {bak}: {e.strerror}", WRITE_CONF) from None
    return bak
