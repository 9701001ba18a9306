"""The ``fuse-crypt`` subcommands: init, mount, unmount, passwd, info.

Each function takes the parsed argparse namespace and returns an exit code, or raises
CliError for the one-line message + exit code path in ``main``.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat as stat_mod
import sys
from typing import Any

from fuse_crypt import daemon, safeio
from fuse_crypt.cli import confio, objectloc, passinput
from fuse_crypt.cli.exitcodes import (
    CIPHERDIR,
    CIPHERDIR_NOT_NEW,
    CONFIG,
    INIT,
    MOUNTPOINT,
    PASSWORD_INCORRECT,
    SCRYPT_PARAMS,
    USAGE,
    CliError,
)
from fuse_crypt.configfile import MAX_LOGN as SCRYPT_LOGN_MAX
from fuse_crypt.configfile import MIN_LOGN as SCRYPT_LOGN_MIN
from fuse_crypt.configfile import TMP_NAME
from fuse_crypt.hardening import disable_core_dumps
from fuse_crypt.nametransform import CONF_NAME, DIRIV_NAME

#: What an interrupted ``init`` can leave behind (the conf is written last): a directory
#: holding nothing else is still new and ``init`` completes it.
INIT_LEFTOVERS = frozenset({DIRIV_NAME, TMP_NAME})


_quiet = False


def set_quiet(quiet: bool) -> None:
    """``-q``: informational lines off; errors are still printed by ``main``."""
    global _quiet
    _quiet = quiet


def _say(msg: str) -> None:
    if not _quiet:
        print(msg, file=sys.stderr)


def _cipherdir(path: str) -> str:
    p = os.path.abspath(path)
    if not os.path.exists(p):
        raise CliError(f"cipher directory {p} does not exist", CIPHERDIR)
    if not os.path.isdir(p):
        raise CliError(f"cipher directory {p} is not a directory", CIPHERDIR)
    return p


def _check_scryptn(logn: int | None) -> None:
    if logn is not None and not SCRYPT_LOGN_MIN <= logn <= SCRYPT_LOGN_MAX:
        raise CliError(
            f"--scryptn must be between {SCRYPT_LOGN_MIN} and {SCRYPT_LOGN_MAX}", SCRYPT_PARAMS
        )


def _unlock(conf: Any, password: bytes) -> bytes:
    from fuse_crypt.errors import WrongKeyError

    try:
        key: bytes = conf.unlock(password)
        return key
    except WrongKeyError:
        raise CliError("password incorrect", PASSWORD_INCORRECT) from None


def _check_master_key(cipherdir: str, key: bytes, conf: Any | None) -> None:
    from fuse_crypt.cli.keycheck import verify_master_key

    if verify_master_key(cipherdir, key, conf) is False:
        raise CliError("master key incorrect: it does not decrypt this volume", PASSWORD_INCORRECT)


# --------------------------------------------------------------------------- init


def _init_leftovers(cdir: str) -> list[str]:
    """Names an interrupted ``init`` left in ``cdir`` (to be replaced), or CliError if
    ``cdir`` is not new: it holds a conf, or anything an init does not write.

    Why: the conf is init's commit point.  A directory without one that holds other
    files may be a volume whose conf the host deleted; re-initialising it would hide its
    data under a new key, so it is refused with its own exit code."""
    try:
        entries = os.listdir(cdir)
    except OSError as e:
        raise CliError(f"cannot list {cdir}: {e.strerror}", CIPHERDIR) from None
    if CONF_NAME in entries:
        raise CliError(f"cipher directory {cdir} already holds a volume", CIPHERDIR_NOT_NEW)
    for name in entries:
        try:
            st = os.lstat(os.path.join(cdir, name))
        except OSError as e:
            raise CliError(f"cannot inspect {cdir}: {e.strerror}", CIPHERDIR) from None
        if name not in INIT_LEFTOVERS or not stat_mod.S_ISREG(st.st_mode):
            raise CliError(
                f"cipher directory {cdir} is not empty (and not an interrupted init)",
                CIPHERDIR_NOT_NEW,
            )
    return sorted(entries)


def cmd_init(args: argparse.Namespace) -> int:
    """Create a volume.  Order (a crash at any point leaves a directory that is either
    still "new" or a complete volume): remove an earlier init's leftovers, write the
    root ``gocryptfs.diriv`` (fsync file and directory), then the conf via tmp + fsync +
    rename + directory fsync: the rename is the commit point."""
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.nametransform import NameTransform

    disable_core_dumps()
    _check_scryptn(args.scryptn)
    if objectloc.is_object_url(args.cipherdir):
        return _init_object(args)
    cdir = _cipherdir(args.cipherdir)
    leftovers = _init_leftovers(cdir)
    master_key = passinput.read_master_key(args.masterkey) if args.masterkey else None
    password = passinput.read_password(args.passfile, prompt="Choose a password: ", confirm=True)
    logn = args.scryptn if args.scryptn is not None else 16
    conf, master_key = ConfFile.create(password, scrypt_logn=logn, master_key=master_key)
    if _init_leftovers(cdir) != leftovers:  # changed while we asked for the password
        raise CliError(f"cipher directory {cdir} changed during init", CIPHERDIR_NOT_NEW)
    try:
        for name in leftovers:
            os.unlink(os.path.join(cdir, name))
        if "DirIV" in conf.feature_flags:
            safeio.write_new_file(os.path.join(cdir, DIRIV_NAME), NameTransform.new_dir_iv(), 0o444)
        safeio.fsync_dir(cdir)
    except OSError as e:
        raise CliError(f"cannot create {DIRIV_NAME} in {cdir}: {e.strerror}", INIT) from None
    confio.write_conf(cdir, conf)
    _announce(cdir, master_key)
    return 0


def _announce(where: str, master_key: bytes) -> None:
    from fuse_crypt.configfile import format_master_key

    _say(f"fuse-crypt: created gocryptfs-compatible volume in {where}")
    if sys.stdout.isatty():
        print(
            "Master key (shown once, only on a terminal):\n\n    "
            + format_master_key(master_key)
            + "\n\nKeep it offline. It mounts the volume (--masterkey) and resets the "
            "password\n(passwd --masterkey) when gocryptfs.conf or the password is lost."
        )
    else:
        _say("fuse-crypt: not running on a terminal, suppressing master key display")


def _store(loc: objectloc.ObjectLocation) -> Any:
    """The volume's backend; a refused endpoint (plain http, bad URL) is a usage error."""
    try:
        return loc.backend()
    except ValueError as e:
        raise CliError(f"--endpoint: {e}", USAGE) from None


def _object_leftovers(loc: objectloc.ObjectLocation, backend: Any) -> list[str]:
    """Like :func:`_init_leftovers`, for a bucket prefix (absent = empty)."""
    try:
        entries = backend.scandir("")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise objectloc.store_error(loc, e) from None
    names = [e.name for e in entries]
    if CONF_NAME in names:
        raise CliError(f"{loc.display} already holds a volume", CIPHERDIR_NOT_NEW)
    for entry in entries:
        if entry.name not in INIT_LEFTOVERS or entry.type == stat_mod.S_IFDIR:
            raise CliError(
                f"{loc.display} is not empty (and not an interrupted init)", CIPHERDIR_NOT_NEW
            )
    return sorted(names)


def _init_object(args: argparse.Namespace) -> int:
    """``init s3://BUCKET/PREFIX``: same order as for a directory (leftovers removed,
    root dir IV, then the conf as the commit point); each object is one create-only PUT."""
    from fuse_crypt.configfile import ConfFile
    from fuse_crypt.nametransform import NameTransform

    loc = objectloc.location_from_args(args, args.cipherdir)
    backend = _store(loc)
    try:
        leftovers = _object_leftovers(loc, backend)
        master_key = passinput.read_master_key(args.masterkey) if args.masterkey else None
        password = passinput.read_password(
            args.passfile, prompt="Choose a password: ", confirm=True
        )
        logn = args.scryptn if args.scryptn is not None else 16
        conf, master_key = ConfFile.create(password, scrypt_logn=logn, master_key=master_key)
        if _object_leftovers(loc, backend) != leftovers:
            raise CliError(f"{loc.display} changed during init", CIPHERDIR_NOT_NEW)
        try:
            for name in leftovers:
                backend.unlink(name)
            if "DirIV" in conf.feature_flags:
                backend.write_small_file_excl(DIRIV_NAME, NameTransform.new_dir_iv(), 0o444)
            backend.write_small_file_excl(CONF_NAME, conf.dumps(), 0o400)
        except OSError as e:
            raise CliError(f"cannot initialise {loc.display}: {e.strerror}", INIT) from None
    finally:
        backend.destroy()
    _announce(loc.display, master_key)
    return 0


# --------------------------------------------------------------------------- mount


def _prepare_mountpoint(path: str) -> str:
    mp = os.path.abspath(path)
    if daemon.is_dead_mount(mp):
        try:
            daemon.cleanup_stale_mount(mp)
        except daemon.DaemonError as e:
            raise CliError(f"stale mount at {mp}: {e}", MOUNTPOINT) from None
        _say(f"fuse-crypt: cleaned up a dead mount at {mp}")
    if not os.path.exists(mp):
        raise CliError(f"mountpoint {mp} does not exist", MOUNTPOINT)
    if not os.path.isdir(mp):
        raise CliError(f"mountpoint {mp} is not a directory", MOUNTPOINT)
    if daemon.find_mount(mp) is not None:
        raise CliError(f"mountpoint {mp} is already mounted", MOUNTPOINT)
    try:
        if os.listdir(mp):
            raise CliError(f"mountpoint {mp} is not empty", MOUNTPOINT)
    except OSError as e:
        raise CliError(f"mountpoint {mp}: {e.strerror}", MOUNTPOINT) from None
    return mp


def _load_keys(args: argparse.Namespace, cdir: str) -> tuple[Any | None, bytes]:
    """(conf or None, master key), unlocked before any fork so errors reach the user."""
    if args.masterkey:
        key = passinput.read_master_key(args.masterkey)
        conf = confio.load_conf(cdir) if os.path.lexists(confio.conf_path(cdir)) else None
        _check_master_key(cdir, key, conf)
        return conf, key
    conf = confio.load_conf(cdir)
    password = passinput.read_password(args.passfile)
    return conf, _unlock(conf, password)


def cmd_mount(args: argparse.Namespace) -> int:
    from fuse_crypt.cli.mountrun import MountSpec

    if args.metrics_addr:
        from fuse_crypt.cli.metrics import parse_addr

        parse_addr(args.metrics_addr)  # a typo is a usage error, before any unlock or fork
    disable_core_dumps()
    if objectloc.is_object_url(args.cipherdir):
        loc = objectloc.location_from_args(args, args.cipherdir)
        mp = _prepare_mountpoint(args.mountpoint)
        conf, key = _load_keys_object(args, loc)
        return _run_mount(
            args, MountSpec(loc.display, mp, key, conf, objectstore=loc, **_mount_opts(args))
        )
    cdir = _cipherdir(args.cipherdir)
    mp = _prepare_mountpoint(args.mountpoint)
    if os.path.realpath(mp) == os.path.realpath(cdir) or os.path.realpath(mp).startswith(
        os.path.realpath(cdir) + os.sep
    ):
        raise CliError("mountpoint must not be inside the cipher directory", MOUNTPOINT)
    conf, key = _load_keys(args, cdir)
    return _run_mount(args, MountSpec(cdir, mp, key, conf, **_mount_opts(args)))


def _mount_opts(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "read_only": args.ro,
        "allow_other": args.allow_other,
        "capacity": args.capacity,
        "metrics_addr": args.metrics_addr,
        "quiet": args.quiet,
    }


def _load_keys_object(
    args: argparse.Namespace, loc: objectloc.ObjectLocation
) -> tuple[Any | None, bytes]:
    """(conf or None, master key) for a bucket volume, read in this (parent) process
    with a transport of its own; the daemon builds its own after the fork.
    With ``--masterkey`` the key is not checked against samples (as for a directory):
    a wrong one mounts and shows EIO/undecryptable names only."""
    from fuse_crypt.configfile import MAX_CONF_BYTES, ConfFile
    from fuse_crypt.errors import ConfigError

    backend = _store(loc)
    try:
        try:
            data = backend.read_small_file(CONF_NAME, MAX_CONF_BYTES)
        except FileNotFoundError:
            data = None
        except OSError as e:
            if e.errno == errno.EFBIG:
                raise CliError(f"config file in {loc.display} is too large", CONFIG) from None
            raise objectloc.store_error(loc, e) from None
    finally:
        backend.destroy()
    conf = None
    if data is not None:
        try:
            conf = ConfFile.loads(data)
        except ConfigError as e:
            raise CliError(f"config file in {loc.display}: {e}", CONFIG) from None
    if args.masterkey:
        return conf, passinput.read_master_key(args.masterkey)
    if conf is None:
        raise CliError(f"cannot open config file in {loc.display}: no such object", CONFIG)
    password = passinput.read_password(args.passfile)
    return conf, _unlock(conf, password)


def _run_mount(args: argparse.Namespace, spec: Any) -> int:
    from fuse_crypt.cli.mountrun import print_ready, run_foreground, run_in_daemon

    if args.foreground:
        return run_foreground(spec)
    try:
        daemon.run_daemonized(lambda notifier: run_in_daemon(spec, notifier))
    except daemon.DaemonError as e:
        raise CliError(str(e), e.code) from None
    print_ready(spec)
    return 0


# --------------------------------------------------------------------------- unmount


def cmd_unmount(args: argparse.Namespace) -> int:
    mp = os.path.abspath(args.mountpoint)
    try:
        # Lazy detach only for dead mounts: a live, busy mount must fail loudly (like
        # fusermount3 -u) rather than vanish while files are still open in it.
        daemon.unmount(mp, lazy_fallback=daemon.is_dead_mount(mp))
    except daemon.DaemonError as e:
        raise CliError(str(e), e.code) from None
    return 0


# --------------------------------------------------------------------------- passwd


def cmd_passwd(args: argparse.Namespace) -> int:
    disable_core_dumps()
    _check_scryptn(args.scryptn)
    cdir = _cipherdir(args.cipherdir)
    conf = confio.load_conf(cdir)
    if args.masterkey:
        if args.passfile:
            raise CliError("--passfile and --masterkey are mutually exclusive", USAGE)
        key = passinput.read_master_key(args.masterkey)
        _check_master_key(cdir, key, conf)
    else:
        old = passinput.read_password(args.passfile, prompt="Old password: ", what="old password")
        key = _unlock(conf, old)
    new = passinput.read_password(
        args.new_passfile, prompt="New password: ", confirm=True, what="new password"
    )
    new_conf = conf.rewrap(key, new, scrypt_logn=args.scryptn)
    if args.masterkey:
        bak = confio.backup_conf(cdir)
        _say(f"fuse-crypt: saved the old config as {bak}")
    confio.write_conf(cdir, new_conf)
    _say("fuse-crypt: password changed")
    return 0


# --------------------------------------------------------------------------- info


def _content_algo(flags: tuple[str, ...]) -> str:
    if "XChaCha20Poly1305" in flags:
        return "XChaCha20-Poly1305"
    if "AESSIV" in flags:
        return "AES-SIV-512"
    return "AES-GCM-256"


def cmd_info(args: argparse.Namespace) -> int:
    cdir = _cipherdir(args.cipherdir)
    conf = confio.load_conf(cdir)  # validates: unknown flags / corruption are refused
    flags = tuple(conf.feature_flags)
    lines = [
        ("Creator", conf.creator or "(not recorded)"),
        ("FeatureFlags", " ".join(flags)),
        ("EncryptedKey", f"{len(conf.encrypted_key)}B"),
        (
            "ScryptObject",
            f"Salt={len(conf.salt)}B N={conf.scrypt_n} R={conf.scrypt_r} "
            f"P={conf.scrypt_p} KeyLen={conf.key_len}",
        ),
    ]
    if "LongNameMax" in flags:
        lines.append(("LongNameMax", str(conf.long_name_max)))
    lines.append(("contentEncryption", _content_algo(flags)))
    width = max(len(k) for k, _ in lines) + 2
    for k, v in lines:
        print(f"{k + ':':<{width}}{v}")
    return 0
