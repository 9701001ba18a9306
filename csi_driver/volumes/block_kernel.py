"""The kernel engine: cryptsetup + dm-crypt (and dm-integrity) where device-mapper exists.

Same on-disk format as the userspace engine and as CoCo's CDH (luks2.md §6): ``luksFormat
--type luks2 --cipher aes-xts-plain64 --sector-size 4096`` and, for CDH's
``dataIntegrity``, ``--integrity hmac-sha256 --integrity-no-wipe``. The key bytes go to
cryptsetup on stdin (``--key-file -``), never in argv or a file.

Hostile headers: ``open`` always takes ``--header`` with the copy of the header the guest read
once and validated (``fuse_crypt.luks2.open_volume``: ``Opened.header``, zero-padded to 16 MiB),
kept in a memory-backed directory, and the *volume key* on stdin (``--volume-key-file
/dev/stdin``): cryptsetup runs no KDF and never reads the host's header after the check, so a
header swapped in between (A5, TOCTOU) or a forged secondary copy (A4) cannot be used.
``resize`` takes the same copy (without it cryptsetup would read the data offset from the
host's header and could map a hostile size).

Keyring: mappings are opened with ``--disable-keyring``, so the volume key sits in the
dm-crypt table (guest kernel memory, as with any dm-crypt) rather than in a kernel keyring
``logon`` key. Why: cryptsetup 2.6's ``resize`` of a keyring-backed LUKS2 mapping must unlock
a keyslot with a passphrase (it has no volume-key option there), our header copy has no
keyslot material, and NodeExpandVolume carries neither the key nor the volume context to
derive it. With the key in the table, ``resize`` reloads it and needs no secret at all. The
cost: root in the guest can read the key with ``dmsetup table --showkeys``; root in the
guest is inside the trust boundary anyway.

dataIntegrity (``--integrity hmac-sha256``): dm-integrity tags are interleaved with the
data, so such a mapping cannot be grown (cryptsetup >= 2.7 refuses; 2.6 would resize only
the dm-crypt layer); the node refuses NodeExpandVolume for it before running anything.

**Not exercised on the build machines**: they have no ``/dev/mapper/control``. The tests
check the command lines and the mapping of cryptsetup's failures (exit codes 1..5) only;
``available()`` tells the node which engine it can use.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from csi_driver import errors
from csi_driver.proc import tail

MAPPER_CONTROL = "/dev/mapper/control"
CRYPTSETUP = "cryptsetup"
TIMEOUT = 120.0
CDH_FORMAT = ("--type", "luks2", "--cipher", "aes-xts-plain64", "--sector-size", "4096")
INTEGRITY = ("--integrity", "hmac-sha256", "--integrity-no-wipe")
# Keyslot KDF for volumes this engine formats, the same costs as the userspace engine's
# (fuse_crypt.luks2.KdfCost): a random 256-bit key gains nothing from KDF cost, a human
# passphrase gets Argon2id 4 passes x 64 MiB. Explicit, because cryptsetup's benchmarked
# defaults (1 GiB, ~2 s, more passes on a fast CPU) could exceed what the header profile
# accepts and would eat a small guest's memory.
KDF_HIGH_ENTROPY = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
KDF_PASSPHRASE = ("--pbkdf", "argon2id", "--pbkdf-force-iterations", "4", "--pbkdf-memory",
                  "65536", "--pbkdf-parallel", "1")  # fmt: skip
VK_STDIN = ("--volume-key-file", "/dev/stdin")
NO_KEYRING = ("--disable-keyring",)
HEADER_COPY_SIZE = 16 << 20  # the copy zero-padded to a detached header cryptsetup accepts
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Result:
    returncode: int
    stderr: str


Runner = Callable[[list[str], bytes | None], Result]


def _subprocess_runner(argv: list[str], stdin: bytes | None) -> Result:
    # No input: /dev/null, never the plugin's own stdin (cryptsetup would wait on it for a
    # passphrase it should not need).
    try:
        if stdin is None:
            res = subprocess.run(
                argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT
            )
        else:
            res = subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise errors.DeadlineExceeded(f"{argv[0]} {argv[2]} timed out") from None
    except FileNotFoundError:
        raise errors.FailedPrecondition(f"{argv[0]} is not installed") from None
    return Result(res.returncode, res.stderr.decode("utf-8", "replace"))


def available(control: str = MAPPER_CONTROL) -> bool:
    """Whether this guest has device-mapper (the kernel engine's precondition): the control
    node must be a character device that opens; a node without the driver behind it (as
    on the build machines: ENODEV) does not count."""
    try:
        fd = os.open(control, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return stat.S_ISCHR(os.fstat(fd).st_mode)
    finally:
        os.close(fd)


def mapper_name(volume_id: str) -> str:
    """A dm name that says which volume it is without carrying the id's characters."""
    return "coco-" + hashlib.sha256(volume_id.encode()).hexdigest()[:24]


def _check_path(path: str, what: str) -> str:
    if not path.startswith("/") or "\0" in path or any(p == ".." for p in path.split("/")):
        raise errors.InvalidArgument(f"{what} must be an absolute path")
    return path


def format_argv(
    device: str, *, integrity: bool = False, header: str | None = None,
    kdf: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    argv = [CRYPTSETUP, "--batch-mode", "luksFormat", *CDH_FORMAT]
    if integrity:
        argv += INTEGRITY
    if header is not None:
        argv += ["--header", _check_path(header, "header")]
    return [*argv, *kdf, "--key-file", "-", "--", _check_path(device, "device")]


def header_backup_argv(device: str, out: str) -> list[str]:
    return [CRYPTSETUP, "--batch-mode", "luksHeaderBackup", "--header-backup-file",
            _check_path(out, "header copy"), "--", _check_path(device, "device")]  # fmt: skip


def open_argv(device: str, name: str, header_copy: str, *, readonly: bool = False) -> list[str]:
    """Activate from the guest's header copy with the volume key on stdin: cryptsetup runs no
    KDF and reads nothing of the host's header (the copy's keyslot area is zeros)."""
    if not _NAME.fullmatch(name):
        raise errors.InvalidArgument("invalid device-mapper name")
    argv = [CRYPTSETUP, "--batch-mode", "open", "--type", "luks2"]
    argv += ["--header", _check_path(header_copy, "header copy"), *VK_STDIN, *NO_KEYRING]
    if readonly:
        argv.append("--readonly")
    return [*argv, "--", _check_path(device, "device"), name]


def verify_argv(device: str, header_copy: str) -> list[str]:
    """``open --test-passphrase`` with the same header copy and key: needs no device-mapper."""
    argv = [CRYPTSETUP, "--batch-mode", "open", "--test-passphrase", "--type", "luks2"]
    argv += ["--header", _check_path(header_copy, "header copy"), *VK_STDIN]
    return [*argv, "--", _check_path(device, "device")]


def resize_argv(name: str, header_copy: str) -> list[str]:
    """Grow an active mapping to its device's size. No secret: the mapping was opened with
    ``--disable-keyring``; ``--disable-keyring`` here too makes cryptsetup fail instead of
    asking for a passphrase if it was not. The guest's header copy, never the host's."""
    if not _NAME.fullmatch(name):
        raise errors.InvalidArgument("invalid device-mapper name")
    return [CRYPTSETUP, "--batch-mode", "resize", *NO_KEYRING, "--header",
            _check_path(header_copy, "header copy"), "--", name]  # fmt: skip


def close_argv(name: str) -> list[str]:
    if not _NAME.fullmatch(name):
        raise errors.InvalidArgument("invalid device-mapper name")
    return [CRYPTSETUP, "--batch-mode", "close", name]


def _failure(res: Result, what: str) -> errors.CsiError:
    """cryptsetup's exit codes (man cryptsetup, RETURN CODES) → the CSI error."""
    detail = tail(res.stderr)
    if "device-mapper" in res.stderr.lower() or "dm-crypt" in res.stderr.lower():
        return errors.FailedPrecondition(f"{what}: device-mapper is unavailable ({detail})")
    if res.returncode == 2:
        return errors.WrongVolumeKey(f"{what}: the volume key does not open the container")
    if res.returncode == 4:
        return errors.NotFound(f"{what}: wrong or missing device ({detail})")
    if res.returncode == 5:
        return errors.FailedPrecondition(f"{what}: the device is busy or the name exists")
    if res.returncode == 3:
        return errors.ResourceExhausted(f"{what}: out of memory")
    return errors.Internal(f"{what} failed (exit {res.returncode}): {detail}")


class KernelEngine:
    """cryptsetup steps with the key on stdin; ``runner`` is the seam the tests replace."""

    def __init__(self, runner: Runner | None = None) -> None:
        self.run = runner or _subprocess_runner

    def _step(self, argv: list[str], stdin: bytes | None, what: str) -> None:
        res = self.run(argv, stdin)
        if res.returncode != 0:
            raise _failure(res, what)

    def format(
        self, device: str, passphrase: bytes, *, integrity: bool = False,
        high_entropy: bool | None = None,
    ) -> None:  # fmt: skip
        """luksFormat with CDH's options; ``high_entropy`` picks our KDF costs (None:
        cryptsetup's own defaults)."""
        kdf = () if high_entropy is None else KDF_HIGH_ENTROPY if high_entropy else KDF_PASSPHRASE
        self._step(format_argv(device, integrity=integrity, kdf=kdf), passphrase, "luksFormat")

    def open(
        self, device: str, volume_key: bytes, name: str, header_copy: str, *, readonly: bool
    ) -> str:
        """Activate ``/dev/mapper/<name>`` from the guest's validated header copy."""
        self._step(open_argv(device, name, header_copy, readonly=readonly), volume_key, "open")
        return f"/dev/mapper/{name}"

    def verify(self, device: str, volume_key: bytes, header_copy: str) -> None:
        self._step(verify_argv(device, header_copy), volume_key, "open --test-passphrase")

    def resize(self, name: str, header_copy: str) -> None:
        self._step(resize_argv(name, header_copy), None, "resize")

    def close(self, name: str) -> None:
        res = self.run(close_argv(name), None)
        if res.returncode != 0 and res.returncode != 4:  # 4: not active (idempotent)
            raise _failure(res, "close")
