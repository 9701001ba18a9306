"""Mounters: how one volume's ciphertext directory becomes a plaintext FUSE mount.

A Mounter knows its tool's command line; the MountSupervisor owns process lifetime. Keys go
to the daemon on stdin only (never argv, never a file), so they do not show in
/proc/*/cmdline or on disk. Three implementations share the gocryptfs on-disk format:

* ``fuse-crypt-prefork`` (default, ``DEFAULT_MOUNTER``): this project's daemon forked from a
  warm zygote (csi_driver/zygote.py), the same `fuse-crypt mount --masterkey stdin` code
  without ~300 ms of interpreter start-up per publish;
* ``fuse-crypt``: the same daemon exec'd as `fuse-crypt mount --masterkey stdin`. Both
  fuse-crypt mounters unwrap the master key from gocryptfs.conf in the node plugin, so a
  wrong key is reported before any process starts;
* ``gocryptfs``: Debian's gocryptfs 2.3 as-is (password on stdin via -passfile /dev/stdin).

Staging for block devices would add a third kind whose mount source is a device; the
interface is per cipher location, not per directory, to leave room for that.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from csi_driver import errors, hostfile, proc
from csi_driver.deadline import Deadline
from csi_driver.keys import VolumeKey
from csi_driver.proc import PidProcess, Proc, tail
from fuse_crypt.configfile import CONF_NAME, MAX_CONF_BYTES, TMP_NAME

if TYPE_CHECKING:
    from csi_driver.core.store import Publication

__all__ = [
    "CONF_NAME",
    "DEFAULT_MOUNTER",
    "MOUNTERS",
    "FuseCryptMounter",
    "FuseCryptPreforkMounter",
    "GocryptfsMounter",
    "Mounter",
    "make_mounter",
]

INIT_TIMEOUT = 60.0
# What an interrupted init may leave behind: it writes the directory IV first and the conf
# last (atomically, as the commit point), so a directory holding only these was never used.
INIT_LEFTOVERS = frozenset({"gocryptfs.diriv", TMP_NAME})


def _tool(name: str) -> str:
    """Prefer the tool next to our interpreter (the venv), then $PATH."""
    local = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(local, os.X_OK):
        return local
    found = shutil.which(name)
    if not found:
        raise errors.FailedPrecondition(f"{name} is not installed")
    return found


def _checked(binary: str) -> str:
    if not os.access(binary, os.X_OK):
        raise errors.FailedPrecondition(f"{binary} is not installed or not executable")
    return binary


class Mounter(ABC):
    """One FUSE implementation of the gocryptfs format."""

    name: str
    fs_type: str  # fstype in /proc/self/mountinfo
    tool: str  # the program that inits and mounts (found by _bin)
    # Printed by the foreground daemon once it serves requests. The kernel mount shows up in
    # mountinfo earlier: go-fuse (gocryptfs) still opens a file in its own mount after that
    # (its epoll hack), and a request racing with it can deadlock the mount.
    READY_LINE = b"Filesystem mounted and ready."

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary

    def is_initialised(self, cipher_dir: str) -> bool:
        """True if the directory has a gocryptfs.conf that is a plain, sane-sized file.

        lstat only: the host may plant a FIFO (blocks every reader), a symlink or a huge
        sparse file there; those are refused before any tool opens them.
        """
        path = os.path.join(cipher_dir, CONF_NAME)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot inspect {CONF_NAME} in {cipher_dir}: {exc.strerror}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise errors.FailedPrecondition(f"{CONF_NAME} in {cipher_dir} is not a regular file")
        if st.st_size > MAX_CONF_BYTES:  # the cap of fuse_crypt's one conf reader
            raise errors.FailedPrecondition(f"{CONF_NAME} in {cipher_dir} is implausibly large")
        return True

    @staticmethod
    def init_leftovers(cipher_dir: str) -> list[str]:
        """Paths an interrupted init left, if that is all the directory holds.

        Raises FailedPrecondition if the directory holds anything else: a volume whose conf
        is missing has held data (or was tampered with) and must not silently become a new,
        empty volume under the same name.
        """
        found: list[str] = []
        with os.scandir(cipher_dir) as it:
            for entry in it:
                if entry.name in INIT_LEFTOVERS and entry.is_file(follow_symlinks=False):
                    found.append(entry.path)
                    continue
                raise errors.FailedPrecondition(
                    f"{CONF_NAME} is missing in {cipher_dir} but the directory is not empty: "
                    "the volume has held data and is not re-initialised (restore its "
                    f"{CONF_NAME} from a backup)"
                )
        return found

    def ensure_initialised(
        self, cipher_dir: str, key: VolumeKey, deadline: Deadline | None = None
    ) -> bool:
        """Create gocryptfs.conf on first use; never touch an existing one. True if created."""
        if self.is_initialised(cipher_dir):
            return False
        for path in self.init_leftovers(cipher_dir):
            os.unlink(path)  # never a symlink or directory: checked without following
        self._init(cipher_dir, key, deadline or Deadline(INIT_TIMEOUT))
        if not self.is_initialised(cipher_dir):
            raise errors.MountError(f"{self.name} init did not create {CONF_NAME}")
        return True

    def _run_init(self, argv: list[str], stdin: bytes, cipher_dir: str, deadline: Deadline) -> None:
        deadline.check("initialising the volume")
        try:
            res = subprocess.run(
                argv, input=stdin, capture_output=True, timeout=deadline.timeout(INIT_TIMEOUT)
            )
        except subprocess.TimeoutExpired:
            if deadline.remaining() <= 0:
                raise errors.DeadlineExceeded(
                    f"{self.name} init for {cipher_dir} outlived the deadline"
                ) from None
            raise errors.MountError(f"{self.name} init timed out for {cipher_dir}") from None
        if res.returncode != 0:
            raise self.init_failure(
                res.returncode, tail(res.stderr.decode("utf-8", "replace")), cipher_dir
            )

    def init_failure(self, returncode: int, log_tail: str, cipher_dir: str) -> errors.CsiError:
        """The error for an init that exited ``returncode`` (a mounter whose tool has
        meaningful exit codes maps them here)."""
        return errors.MountError(f"{self.name} init failed for {cipher_dir}: {log_tail}")

    @abstractmethod
    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None: ...

    def spawn(self, argv: list[str], stdin_data: bytes, log_path: str) -> Proc:
        """Start the daemon in its own session (it must outlive the plugin), key on stdin."""
        logfd = hostfile.open_append(log_path)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=logfd,
                stderr=logfd,
                start_new_session=True,
                close_fds=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            os.close(logfd)
        try:
            assert proc.stdin is not None
            proc.stdin.write(stdin_data)
            proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once; the supervisor reads why from the log
        return proc

    def attach(self, pid: int, started: int) -> Proc:
        """A daemon of ours started by a previous plugin instance, watched by pid + start
        time (0: take the current one)."""
        return PidProcess(pid, started or None)

    def start_time(self, pid: int) -> int:
        """What identifies the daemon ``pid`` for good, with its pid (csi_driver/proc.py)."""
        return proc.start_time(pid)

    def serves(self, pid: int, target: str, started: int) -> bool:
        """Whether ``pid`` (from the hostile state file) is this mount's daemon."""
        return proc.serves(pid, target, started)

    def unavailable(self) -> str | None:
        """Why this mounter cannot work here (for Probe), or None."""
        try:
            self._bin()
        except errors.CsiError as exc:
            return str(exc)
        return None

    def _bin(self) -> str:
        """The tool's path: the one given, else ``tool`` next to our interpreter or on $PATH."""
        return _checked(self.binary) if self.binary else _tool(self.tool)

    def warm(self) -> None:  # noqa: B027 - optional hook
        """Prepare helpers ahead of the first publish (the zygote); called at plugin start."""

    def close(self) -> None:  # noqa: B027 - optional hook, most mounters hold nothing
        """Release helper processes (the zygote); mounts are unaffected."""

    @abstractmethod
    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ) -> list[str]:
        """argv of a foreground mount daemon that reads its key from stdin. ``capacity``
        (bytes, 0: none) is enforced by mounters that can (fuse-crypt's --capacity);
        ``metrics_addr`` (HOST:PORT) is where a daemon that can (fuse-crypt's
        --metrics-addr) serves /metrics, and ignored by one that cannot (gocryptfs)."""

    def argv_for(
        self,
        pub: Publication,
        key: VolumeKey,
        *,
        allow_other: bool,
        metrics_addr: str | None = None,
    ) -> list[str]:
        """argv of the daemon serving ``pub``. Directory mounters need only the record;
        object-store mounts take their endpoint from the in-memory key, never the record."""
        return self.command(
            pub.cipher_dir,
            pub.target_path,
            readonly=pub.readonly,
            allow_other=allow_other,
            capacity=pub.capacity_bytes,
            metrics_addr=metrics_addr,
        )

    @abstractmethod
    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        """What to write to the daemon's stdin (raises WrongVolumeKey if checkable)."""

    def failure(self, returncode: int, log_tail: str, cipher_dir: str) -> errors.CsiError:
        return errors.MountError(
            f"{self.name} exited with code {returncode} for {cipher_dir}: {log_tail}"
        )


class GocryptfsMounter(Mounter):
    """Debian's gocryptfs binary (2.3): -passfile /dev/stdin for both init and mount."""

    name = "gocryptfs"
    fs_type = "fuse.gocryptfs"
    tool = "gocryptfs"
    EXIT_PASSWORD_INCORRECT = 12

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        argv = [self._bin(), "-init", "-q", "-scryptn", str(key.scrypt_logn)]
        argv += ["-passfile", "/dev/stdin", "--", cipher_dir]
        self._run_init(argv, key.password, cipher_dir, deadline)

    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ) -> list[str]:
        argv = [self._bin(), "-fg", "-nosyslog", "-passfile", "/dev/stdin"]
        if readonly:
            argv.append("-ro")
        if allow_other:
            argv.append("-allow_other")
        return [*argv, "--", cipher_dir, target]

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        return key.password

    def failure(self, returncode: int, log_tail: str, cipher_dir: str) -> errors.CsiError:
        if returncode == self.EXIT_PASSWORD_INCORRECT:
            return errors.WrongVolumeKey(f"the volume key does not open {cipher_dir}")
        return super().failure(returncode, log_tail, cipher_dir)


class FuseCryptMounter(Mounter):
    """This project's `fuse-crypt` daemon, fed the unwrapped master key on stdin."""

    name = "fuse-crypt"
    fs_type = "fuse.fuse-crypt"
    tool = "fuse-crypt"

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        argv = [self._bin(), "init", "--passfile", "/dev/stdin"]
        argv += ["--scryptn", str(key.scrypt_logn), cipher_dir]
        self._run_init(argv, key.password, cipher_dir, deadline)

    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ) -> list[str]:
        args = self.mount_args(
            cipher_dir,
            target,
            readonly=readonly,
            allow_other=allow_other,
            capacity=capacity,
            metrics_addr=metrics_addr,
        )
        return [self._bin(), *args]

    @staticmethod
    def mount_args(
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int,
        metrics_addr: str | None = None,
        source: Sequence[str] = ("--masterkey", "stdin"),
    ) -> list[str]:
        """``fuse-crypt``'s arguments for a foreground mount reading its key from stdin.
        ``source``: where the key (and, for a bucket, the store) comes from;
        ``metrics_addr``: where the daemon serves /metrics (None: it does not)."""
        argv = ["mount", "--foreground", *source]
        if readonly:
            argv.append("--ro")
        if allow_other:
            argv.append("--allow-other")
        if capacity:
            argv += ["--capacity", str(capacity)]
        if metrics_addr is not None:
            argv += ["--metrics-addr", metrics_addr]
        return [*argv, cipher_dir, target]

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        from fuse_crypt.configfile import ConfFile, format_master_key
        from fuse_crypt.errors import FuseCryptError, WrongKeyError

        try:
            # The one bounded, non-blocking, no-follow reader of gocryptfs.conf.
            conf = ConfFile.read(os.path.join(cipher_dir, CONF_NAME))
            master = conf.unlock(key.password)
        except WrongKeyError:
            raise errors.WrongVolumeKey(f"the volume key does not open {cipher_dir}") from None
        except FuseCryptError as exc:
            raise errors.FailedPrecondition(
                f"unusable {CONF_NAME} in {cipher_dir}: {type(exc).__name__}: {exc}"
            ) from None
        except FileNotFoundError:
            raise errors.NotFound(f"{CONF_NAME} in {cipher_dir} is missing") from None
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"cannot read {CONF_NAME} in {cipher_dir}: {exc.strerror}"
            ) from None
        return (format_master_key(master) + "\n").encode("ascii")


class FuseCryptPreforkMounter(FuseCryptMounter):
    """`fuse-crypt mount` forked from a warm zygote (csi_driver/zygote.py): same CLI code,
    without ~300 ms of interpreter start-up and imports per publish."""

    name = "fuse-crypt-prefork"

    def __init__(self, binary: str | None = None) -> None:
        super().__init__(binary)
        from csi_driver.zygote import ZygoteClient

        self._zygote = ZygoteClient()

    def command(
        self,
        cipher_dir: str,
        target: str,
        *,
        readonly: bool,
        allow_other: bool,
        capacity: int = 0,
        metrics_addr: str | None = None,
    ) -> list[str]:
        """No program: the zygote runs these arguments through ``fuse_crypt.cli.main``."""
        return self.mount_args(
            cipher_dir,
            target,
            readonly=readonly,
            allow_other=allow_other,
            capacity=capacity,
            metrics_addr=metrics_addr,
        )

    def spawn(self, argv: list[str], stdin_data: bytes, log_path: str) -> Proc:
        try:
            return PidProcess(self._zygote.spawn(argv, log_path, stdin_data))
        except OSError as exc:
            raise errors.MountError(f"{self.name}: {exc}") from None

    def warm(self) -> None:
        self._zygote.warm()

    def close(self) -> None:
        self._zygote.close()


MOUNTERS: dict[str, type[Mounter]] = {
    FuseCryptMounter.name: FuseCryptMounter,
    FuseCryptPreforkMounter.name: FuseCryptPreforkMounter,
    GocryptfsMounter.name: GocryptfsMounter,
}
DEFAULT_MOUNTER = FuseCryptPreforkMounter.name


def make_mounter(name: str) -> Mounter:
    try:
        return MOUNTERS[name]()
    except KeyError:
        raise ValueError(f"unknown mounter {name!r} (choose from {', '.join(MOUNTERS)})") from None
