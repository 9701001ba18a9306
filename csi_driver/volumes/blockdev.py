"""Which disk a block volume is, whether it holds anything, and how to make its filesystem.

Everything here reads a request or the device; both are hostile. A request names the disk
in CDH's terms (``devicePath``, ``deviceId`` as ``MAJ:MIN``, or a ``/dev/disk/by-id`` name
in ``devicePath``); the node accepts only block devices under ``/dev`` (an image file only
below an operator's ``--block-image-root``, for tests), resolved once.

"Never destroy data": before ``sourceType: empty`` formats a disk, ``probe`` must find
nothing: no signature ``blkid -p`` knows (filesystems, partition tables, LUKS, RAID, swap,
...), no LUKS magic in either header slot, and only zero bytes in the first 16 MiB and the
last 1 MiB (so random bytes, e.g. another tool's ciphertext, count as data too).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from csi_driver import errors, hostfile, validate
from csi_driver.proc import tail

CTX_DEVICE_PATH = "devicePath"
CTX_DEVICE_ID = "deviceId"
CTX_SOURCE_TYPE = "sourceType"
CTX_MKFS_OPTS = "mkfsOpts"
CTX_FS_TYPE = "fsType"
CTX_DATA_INTEGRITY = "dataIntegrity"
# Key rotation: the key the volume was opened with until now (same forms as keyResource /
# passphrase); staging then adds the new key's slot before it removes this one's.
CTX_PREVIOUS_KEY_RESOURCE = "previousKeyResource"
CTX_PREVIOUS_PASSPHRASE = "previousPassphrase"
SOURCE_EMPTY = "empty"
SOURCE_ENCRYPTED = "encrypted"
DEV_ROOT = "/dev"
SYS_DEV_BLOCK = "/sys/dev/block"

HEAD_SCAN = 16 << 20
TAIL_SCAN = 1 << 20
PROBE_TIMEOUT = 30.0
LUKS_MAGICS = (b"LUKS\xba\xbe", b"SKUL\xba\xbe")
# Where a LUKS2 secondary header may start (luks2.md §1): each offset is probed.
LUKS2_SECONDARY = tuple(0x4000 << i for i in range(9))

FILESYSTEMS = ("ext4", "xfs")
_DEVNAME = r"[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9._+-]+)*"
# mkfsOpts come from the StorageClass (control plane): only options that shape the new
# filesystem, never ones that name files, devices or external journals.
_MKFS_ALLOWED: dict[str, dict[str, str | None]] = {
    "ext4": {
        "-b": r"(1024|2048|4096)",
        "-i": r"[0-9]{4,8}",
        "-I": r"(128|256|512|1024)",
        "-m": r"[0-9]{1,2}",
        "-N": r"[0-9]{1,10}",
        "-L": r"[A-Za-z0-9._-]{1,16}",
        "-E": r"(lazy_itable_init=[01]|lazy_journal_init=[01]|stride=[0-9]+|stripe_width=[0-9]+)"
        r"(,(lazy_itable_init=[01]|lazy_journal_init=[01]|stride=[0-9]+|stripe_width=[0-9]+))*",
        "-O": r"\^?[a-z_0-9]+(,\^?[a-z_0-9]+)*",
        "-T": r"(default|small|floppy|news|largefile|largefile4|huge|big)",
        "-j": None,
    },
    "xfs": {
        "-b": r"size=(1024|2048|4096)",
        "-L": r"[A-Za-z0-9._-]{1,12}",
        "-i": r"(size=(256|512|1024|2048)|maxpct=[0-9]{1,2})",
        "-m": r"(crc|finobt|reflink|bigtime)=[01](,(crc|finobt|reflink|bigtime)=[01])*",
    },
}


@dataclass(frozen=True)
class Device:
    """A resolved device: the path we open, and whether it is an operator's image file."""

    path: str
    is_image: bool = False


def _block_at(path: str, name: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise errors.NotFound(f"{name} {path}: {exc.strerror}") from None
    return st


def check_device_names(ctx: Mapping[str, str]) -> None:
    """The device naming of a request, by syntax alone (no file is looked at): exactly one
    of ``devicePath`` (absolute, normalised) or ``deviceId`` (``MAJ:MIN``). What the
    controller can check of a static block PV; the node resolves the name afterwards."""
    dev_id = ctx.get(CTX_DEVICE_ID, "")
    dev_path = ctx.get(CTX_DEVICE_PATH, "")
    if dev_id and dev_path:
        raise errors.InvalidArgument(f"give {CTX_DEVICE_PATH} or {CTX_DEVICE_ID}, not both")
    if dev_id:
        if not _DEV_ID.fullmatch(dev_id):
            raise errors.InvalidArgument(f"{CTX_DEVICE_ID} must be MAJ:MIN")
        return
    if not dev_path:
        raise errors.InvalidArgument(f"a block volume needs {CTX_DEVICE_PATH} or {CTX_DEVICE_ID}")
    path = validate.absolute_path(dev_path, CTX_DEVICE_PATH)
    if any(part in (".", "..") for part in path.split("/")) or os.path.normpath(path) != path:
        raise errors.InvalidArgument(f"{CTX_DEVICE_PATH} must be a normalised absolute path")


def resolve_device(ctx: Mapping[str, str], image_roots: Sequence[str] = ()) -> Device:
    """The device a stage request names (publish_context and volume_context merged)."""
    check_device_names(ctx)
    dev_id = ctx.get(CTX_DEVICE_ID, "")
    if dev_id:
        return Device(_from_dev_id(dev_id))
    return _from_path(ctx.get(CTX_DEVICE_PATH, ""), image_roots)


_DEV_ID = re.compile(r"([0-9]{1,9}):([0-9]{1,9})")


def _from_dev_id(dev_id: str) -> str:
    m = _DEV_ID.fullmatch(dev_id)
    if not m:
        raise errors.InvalidArgument(f"{CTX_DEVICE_ID} must be MAJ:MIN")
    major, minor = int(m.group(1)), int(m.group(2))
    uevent = os.path.join(SYS_DEV_BLOCK, f"{major}:{minor}", "uevent")
    try:
        text = hostfile.read_bounded(uevent, 64 * 1024).decode("ascii", "replace")
    except OSError:
        raise errors.NotFound(f"no block device {major}:{minor} on this node") from None
    names = re.findall(r"^DEVNAME=(.*)$", text, re.M)
    name_ok = len(names) == 1 and re.fullmatch(_DEVNAME, names[0]) and ".." not in names[0]
    if not name_ok:
        raise errors.FailedPrecondition(f"block device {major}:{minor} has no usable name")
    path = os.path.join(DEV_ROOT, names[0])
    st = _block_at(path, CTX_DEVICE_ID)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(major, minor):
        raise errors.FailedPrecondition(f"{path} is not block device {major}:{minor}")
    return path


def _from_path(raw: str, image_roots: Sequence[str]) -> Device:
    path = validate.absolute_path(raw, CTX_DEVICE_PATH)
    if any(part in (".", "..") for part in path.split("/")) or os.path.normpath(path) != path:
        raise errors.InvalidArgument(f"{CTX_DEVICE_PATH} must be a normalised absolute path")
    real = os.path.realpath(path)  # /dev/disk/by-id/* are links into /dev
    if validate.is_below(path, DEV_ROOT) and validate.is_below(real, DEV_ROOT):
        st = _block_at(real, CTX_DEVICE_PATH)
        if not stat.S_ISBLK(st.st_mode):
            raise errors.FailedPrecondition(f"{CTX_DEVICE_PATH} {path} is not a block device")
        return Device(real)
    for root in image_roots:
        if validate.is_below(real, root) and real == path:
            st = _block_at(real, CTX_DEVICE_PATH)
            if not stat.S_ISREG(st.st_mode):
                raise errors.FailedPrecondition(f"{CTX_DEVICE_PATH} {path} is not an image file")
            return Device(real, is_image=True)
    raise errors.InvalidArgument(
        f"{CTX_DEVICE_PATH} must name a block device under {DEV_ROOT}"
        + (" or an image below --block-image-root" if image_roots else "")
    )


# -- "is there anything on it?" -------------------------------------------------------------


def _blkid(path: str) -> list[str]:
    tool = shutil.which("blkid")
    if tool is None:
        raise errors.FailedPrecondition("blkid is not installed; cannot prove the disk is empty")
    try:
        res = subprocess.run(
            [tool, "-p", "-o", "export", "--", path], capture_output=True, timeout=PROBE_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise errors.Unavailable(f"blkid on {path} timed out") from None
    if res.returncode == 2:  # nothing found
        return []
    lines = res.stdout.decode("ascii", "replace").splitlines()
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    found = []
    if "PTTYPE" in fields:
        found.append(f"a {_safe(fields['PTTYPE'])} partition table")
    if "TYPE" in fields:
        usage = _safe(fields.get("USAGE", "data"))
        found.append(f"a {_safe(fields['TYPE'])} signature ({usage})")
    if not found and res.returncode != 0:
        # "ambivalent result" (rc 8) and the like: something is there.
        found.append(f"signatures blkid cannot tell apart (exit {res.returncode})")
    return found


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "?", text)[:32]


def probe(fd: int, path: str, size: int) -> list[str]:
    """What the device holds (empty list: nothing, it may be formatted). ``fd`` is an open
    read descriptor of the device; blkid gets the path (it opens it itself, read-only)."""
    found = _blkid(path)
    head = os.pread(fd, min(HEAD_SCAN, size), 0)
    for off in (0, *LUKS2_SECONDARY):
        if head[off : off + 6] in LUKS_MAGICS:
            found.append(f"a LUKS header at byte {off}")
            break
    nz = _first_nonzero(head)
    if nz is None and size > len(head):
        tail_at = max(len(head), size - TAIL_SCAN)
        tail = os.pread(fd, size - tail_at, tail_at)
        inner = _first_nonzero(tail)
        nz = None if inner is None else tail_at + inner
    if nz is not None and not found:
        found.append(f"non-zero data at byte {nz} (no known signature)")
    return found


def _first_nonzero(data: bytes) -> int | None:
    stripped = data.lstrip(b"\0")
    return None if not stripped else len(data) - len(stripped)


# -- the new filesystem ---------------------------------------------------------------------


def stage_parameters(
    ctx: Mapping[str, str], cap_fs_type: str, readonly: bool
) -> tuple[str, str, list[str]]:
    """``(sourceType, fsType, mkfs options)`` of a stage request, checked before any I/O.

    One home for what a PV's volumeAttributes may say besides the device and the key, so
    that the stage step and tests/examples (which keeps the examples from drifting) agree.
    """
    source = ctx.get(CTX_SOURCE_TYPE, SOURCE_ENCRYPTED)
    if source not in (SOURCE_EMPTY, SOURCE_ENCRYPTED):
        raise errors.InvalidArgument(f"sourceType must be {SOURCE_EMPTY!r} or {SOURCE_ENCRYPTED!r}")
    data_integrity(ctx)  # its value is checked here; which engine serves it, by the stage
    fs = fs_type(ctx, cap_fs_type)
    mkfs_opts = mkfs_options(fs, ctx.get(CTX_MKFS_OPTS, ""))
    if readonly and source == SOURCE_EMPTY:
        raise errors.InvalidArgument("a new (sourceType empty) volume cannot be read-only")
    return source, fs, mkfs_opts


def data_integrity(ctx: Mapping[str, str]) -> bool:
    """CDH's ``dataIntegrity`` ("true"/"false", default false): dm-integrity under dm-crypt
    (``luksFormat --integrity hmac-sha256``). Anything else is refused rather than read as
    false: a typo must not silently give a volume without the integrity it asked for."""
    value = ctx.get(CTX_DATA_INTEGRITY, "false")
    if value not in ("true", "false"):
        raise errors.InvalidArgument(f'{CTX_DATA_INTEGRITY} must be "true" or "false"')
    return value == "true"


def is_block_context(*contexts: Mapping[str, str] | None) -> bool:
    """A block volume names its device (CDH's keys) in volume or publish context."""
    return any(ctx and (ctx.get(CTX_DEVICE_PATH) or ctx.get(CTX_DEVICE_ID)) for ctx in contexts)


def fs_type(ctx: Mapping[str, str], cap_fs_type: str) -> str:
    fs = cap_fs_type or ctx.get(CTX_FS_TYPE, "") or "ext4"
    if fs not in FILESYSTEMS:
        raise errors.InvalidArgument(f"fsType {fs!r} is not supported (use {FILESYSTEMS})")
    return fs


def mkfs_options(fs: str, raw: str) -> list[str]:
    """``mkfsOpts`` split on spaces, every option and value checked against the allow-list."""
    if len(raw) > 512:
        raise errors.InvalidArgument(f"{CTX_MKFS_OPTS} is too long")
    words = raw.split()
    allowed = _MKFS_ALLOWED[fs]
    out: list[str] = []
    i = 0
    while i < len(words):
        flag = words[i]
        if flag not in allowed:
            raise errors.InvalidArgument(f"{CTX_MKFS_OPTS}: option {_safe(flag)} is not allowed")
        pattern = allowed[flag]
        if pattern is None:
            out.append(flag)
            i += 1
            continue
        if i + 1 >= len(words) or not re.fullmatch(pattern, words[i + 1]):
            raise errors.InvalidArgument(f"{CTX_MKFS_OPTS}: bad value for {flag}")
        out += [flag, words[i + 1]]
        i += 2
    return out


# With dataIntegrity the tags are not initialised (--integrity-no-wipe, CDH's choice), so a
# sector never written reads as an I/O error: ext4 must write its inode tables and journal
# at mkfs time instead of leaving them to lazy init (CDH does the same). Last, so they win
# over an -E in mkfsOpts.
EXT4_INTEGRITY = ["-E", "lazy_itable_init=0,lazy_journal_init=0"]


def mkfs_argv(fs: str, opts: list[str], device: str, *, integrity: bool = False) -> list[str]:
    if fs == "ext4":
        # -F: the loop device is ours and was just proved empty (mkfs would otherwise ask).
        extra = EXT4_INTEGRITY if integrity else []
        return ["mkfs.ext4", "-q", "-F", *opts, *extra, "--", device]
    return ["mkfs.xfs", "-q", *opts, device]


# -- growing an ext4 that is not mounted ----------------------------------------------------

#: A stage grows the filesystem only when its device is at least this much larger: below
#: it, the gap may be a tail resize2fs leaves unused (shorter than a block group's overhead),
#: and checking the filesystem at every stage for nothing would cost an e2fsck each time.
GROW_MIN = 16 << 20


def ext4_size(dumpe2fs_header: str) -> int | None:
    """Bytes of the filesystem from ``dumpe2fs -h`` (block count x block size)."""
    count = re.search(r"^Block count:\s+([0-9]{1,20})$", dumpe2fs_header, re.M)
    size = re.search(r"^Block size:\s+([0-9]{1,7})$", dumpe2fs_header, re.M)
    if count is None or size is None:
        return None
    return int(count.group(1)) * int(size.group(1))


def run_tool(
    argv: list[str], timeout: float, what: str | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a system tool with a bound on its time; its exit code is the caller's to judge.
    A timeout is DEADLINE_EXCEEDED, a missing tool FAILED_PRECONDITION."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise errors.DeadlineExceeded(f"{what or argv[0]} timed out") from None
    except FileNotFoundError:
        raise errors.FailedPrecondition(f"{argv[0]} is not installed") from None


def _size_of(device: str) -> int | None:
    from fuse_crypt.blockfront import device_size

    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return device_size(fd)
    finally:
        os.close(fd)


def grow_ext4_unmounted(device: str, timeout: float) -> int | None:
    """Grow the ext4 on ``device`` (ours: the plaintext loop device or mapping, not mounted)
    to the device's size if the device grew by GROW_MIN or more; the new size, or None when
    nothing was done.

    Why at stage: online growth (NodeExpandVolume on a mounted ext4) is an ioctl that needs
    CAP_SYS_RESOURCE, which a node plugin may lack; offline growth needs none, so a volume
    whose expansion was refused grows when it is next staged. resize2fs asks for a checked
    filesystem first: ``e2fsck -f -p`` (preen: only the fixes that are always safe). A
    filesystem e2fsck cannot preen is left as it is (the mount then decides), and the device
    is never shrunk: only a larger device leads here.
    """
    device_size = _size_of(device)
    if device_size is None:
        return None
    head = run_tool(["dumpe2fs", "-h", "--", device], timeout)
    fs_size = ext4_size(head.stdout.decode("utf-8", "replace")) if head.returncode == 0 else None
    if fs_size is None or device_size < fs_size + GROW_MIN:
        return None
    check = run_tool(["e2fsck", "-f", "-p", "--", device], timeout)
    if check.returncode not in (0, 1):  # 1: errors corrected; anything else: not ours to fix
        return None
    grown = run_tool(["resize2fs", "--", device], timeout)
    if grown.returncode != 0:
        raise errors.Internal(
            "growing the filesystem to its device failed (run e2fsck -fy on it): "
            + tail(grown.stderr.decode("utf-8", "replace"))
        )
    return device_size
