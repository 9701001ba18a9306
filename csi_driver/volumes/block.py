"""Block volumes: a LUKS2 container on a host-attached disk, staged once, bind-mounted per pod.

NodeStageVolume (userspace engine, the one that runs without device-mapper):

1. resolve the device (csi_driver/volumes/blockdev.py) and the key (csi_driver/keys.py:
   a ``keyResource`` derived per volume, a sealed ``passphrase``, or a random key when
   neither is given and ``sourceType`` is ``empty``, CDH's ephemeral behaviour);
2. ``sourceType: empty``: prove the device empty (any signature or non-zero byte →
   FAILED_PRECONDITION naming it, nothing written), then format LUKS2 (CDH's profile);
   ``encrypted``: nothing is written before the key has opened the container;
3. unlock (csi_driver/volumes/block_luks.py) → volume key + segment geometry;
4. record an intent, start ``fuse-crypt block-serve`` under the MountSupervisor (key on
   stdin) on a private directory ``<state-dir>/block/<hash>``, ``losetup --direct-io=on
   --sector-size 4096`` its ``disk``, mkfs when new, mount at the staging path, record it.

NodePublishVolume binds the staging mount to the target (read-only if asked); several
targets share one staging. Raw block access (CSI AccessType BLOCK) stops the stage after
``losetup`` (stage records with mounter ``fuse-crypt-block-raw``) and publishes the loop
device node, bind-mounted onto a file at the target. Unpublish/unstage undo every step,
each one idempotent. A restarted plugin finds its staged volumes in
``<state-dir>/block/node-state.json`` (a PublicationStore: stage records have mounter
``fuse-crypt-block``, publish records ``bind``) and adopts the daemons that still serve them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from csi_driver import errors, fsprobe, validate
from csi_driver.constants import PARAM_KEY_RESOURCE, PARAM_PASSPHRASE
from csi_driver.core.store import INTENT, MOUNTED, Publication, PublicationStore
from csi_driver.core.volcap import AccessType, Capability, unsupported
from csi_driver.deadline import Deadline
from csi_driver.keys import VolumeKey, resolve_volume_key
from csi_driver.mounter import Mounter, _tool
from csi_driver.mounts import MountBusy, MountTable, umount_when_idle
from csi_driver.proc import tail
from csi_driver.supervisor import READY_TIMEOUT, MountSupervisor
from csi_driver.volumes import block_kernel, blockdev
from csi_driver.volumes.block_luks import (
    LuksEngine,
    Unlocked,
    default_engine,
    integrity_mismatch,
    unlocked_from,
)
from sealed_secrets.resolver import Resolver

log = logging.getLogger(__name__)
_T = TypeVar("_T")

BLOCK_MOUNTER = "fuse-crypt-block"
DM_CRYPT = "dm-crypt"  # stage records of the kernel engine
#: stage records of raw block access (CSI AccessType BLOCK): the loop device, no filesystem
BLOCK_RAW = "fuse-crypt-block-raw"
#: the kernel engine's raw block stages: /dev/mapper/<name>, no filesystem
DM_CRYPT_RAW = "dm-crypt-raw"
_STAGES = (BLOCK_MOUNTER, BLOCK_RAW, DM_CRYPT, DM_CRYPT_RAW)
_KERNEL = (DM_CRYPT, DM_CRYPT_RAW)
_RAW = (BLOCK_RAW, DM_CRYPT_RAW)
MAPPER_DIR = "/dev/mapper"
BIND = "bind"
HEADER_DIR = "/run/coco-csi/luks-headers"  # memory-backed in the guest: never the state dir
DISK_NAME = "disk"  # fuse_crypt.blockfront.DISK_NAME
TOOL_TIMEOUT = 120.0
PROBE_TIMEOUT = 5.0
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_NOSUID, _MS_NODEV = 1, 32, 4096, 2, 4


@dataclass(frozen=True)
class StageRequest:
    """The parts of NodeStageVolumeRequest the block kind needs. Never log secrets."""

    volume_id: str
    staging_target_path: str
    capability: Capability | None
    secrets: Mapping[str, str] | None = None
    volume_context: Mapping[str, str] | None = None
    publish_context: Mapping[str, str] | None = None


def is_block(*contexts: Mapping[str, str] | None) -> bool:
    """A block volume names its device (CDH's keys) in volume or publish context."""
    return blockdev.is_block_context(*contexts)


class BlockServeMounter(Mounter):
    """``fuse-crypt block-serve``: the geometry of each daemon is planned before start."""

    name = BLOCK_MOUNTER
    fs_type = "fuse." + BLOCK_MOUNTER
    tool = "fuse-crypt"

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary
        self._plans: dict[str, tuple[Unlocked, bool]] = {}

    def _bin(self) -> str:
        return self.binary or _tool(self.tool)

    def plan(self, mnt: str, unlocked: Unlocked, is_image: bool) -> None:
        self._plans[mnt] = (unlocked, is_image)

    def unplan(self, mnt: str) -> None:
        self._plans.pop(mnt, None)

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        raise errors.Internal("block volumes are formatted by the stage step")

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
        u, is_image = self._plans[target]
        argv = [self._bin(), "block-serve", "--masterkey", "stdin", "--offset", str(u.offset)]
        argv += ["--size", "dynamic" if u.size is None else str(u.size)]
        argv += ["--sector-size", str(u.sector_size), "--cipher", u.cipher]
        if readonly:
            argv.append("--ro")
        if is_image:
            argv.append("--allow-regular-file")
        if metrics_addr is not None:
            argv += ["--metrics-addr", metrics_addr]
        return [*argv, cipher_dir, target]

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        return key.password  # the volume key as one hex line (BlockVolumes._daemon_key)


def _run(argv: list[str], what: str, timeout: float = TOOL_TIMEOUT) -> str:
    res = blockdev.run_tool(argv, timeout, what)
    if res.returncode != 0:
        raise errors.Internal(f"{what} failed: {tail(res.stderr.decode('utf-8', 'replace'))}")
    return res.stdout.decode("utf-8", "replace")


def _passphrases(key: VolumeKey) -> list[bytes]:
    """What a key may open a container with, in order: the whole passphrase, then the first
    line of one that spans lines (how block volumes staged before whole passphrases were
    keyed: they keep opening, and their slot is never rewritten for it)."""
    return [key.password, key.first_line] if key.first_line else [key.password]


def _with_each(passphrases: list[bytes], attempt: Callable[[bytes], _T]) -> _T:
    """``attempt`` with each passphrase in turn: a wrong key moves on to the next, and the
    last one's error is the one raised."""
    *firsts, last = passphrases
    for pw in firsts:
        with contextlib.suppress(errors.WrongVolumeKey):
            return attempt(pw)
    return attempt(last)


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _libc_mount(source: str, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(os.fsencode(source), os.fsencode(target), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


class BlockVolumes:
    """Stage, publish, unpublish, unstage, expand and measure block volumes."""

    def __init__(
        self,
        state_dir: str,
        supervisor: MountSupervisor,
        mounts: MountTable,
        resolver: Resolver | None,
        *,
        kubelet_root: str,
        image_roots: Sequence[str] = (),
        allowed_key_resources: Sequence[str] = (),
        allowed_signing_kids: Sequence[str] = (),
        engine: LuksEngine | None = None,
        require_binding: bool = True,
        kernel: block_kernel.KernelEngine | None = None,
        header_dir: str = HEADER_DIR,
        tool: Callable[[list[str], str], str] | None = None,
        mapper_dir: str = MAPPER_DIR,
    ) -> None:
        self.root = os.path.join(state_dir, "block")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.supervisor = supervisor
        self.mounts = mounts
        self.resolver = resolver
        self.kubelet_root = kubelet_root
        self.image_roots = tuple(validate.real_root(r) for r in image_roots)
        self.allowed_key_resources = tuple(allowed_key_resources)
        self.allowed_signing_kids = tuple(allowed_signing_kids)
        self.engine = engine or default_engine(require_binding=require_binding)
        # The kernel engine where device-mapper works (block_kernel.available), else FUSE.
        if kernel is None and block_kernel.available():
            kernel = block_kernel.KernelEngine()
        self.kernel = kernel
        self.header_dir = header_dir
        self.tool = tool or _run  # mkfs/mount of the kernel path (a seam for its tests)
        self.mapper_dir = mapper_dir  # where dm-crypt mappings appear (a seam for tests)
        self.mounter = BlockServeMounter()
        supervisor.mounters.setdefault(BLOCK_MOUNTER, self.mounter)
        mounter = supervisor.mounters[BLOCK_MOUNTER]
        assert isinstance(mounter, BlockServeMounter)
        self.mounter = mounter
        self.store = PublicationStore(self.root, self._check_record)

    # -- records -------------------------------------------------------------------------

    def _path(self, path: object, name: str) -> str:
        return validate.resolve_under(path, (self.kubelet_root,), name)

    def _check_record(self, pub: Publication) -> None:
        validate.volume_id(pub.volume_id)
        if self._path(pub.target_path, "target_path") != pub.target_path:
            raise errors.InvalidArgument("target_path is not in resolved form")
        if pub.mounter in _STAGES:
            validate.absolute_path(pub.cipher_dir, "device")
        elif pub.mounter == BIND:
            if self._path(pub.cipher_dir, "staging") != pub.cipher_dir:
                raise errors.InvalidArgument("staging path is not in resolved form")
        else:
            raise errors.InvalidArgument("unknown block record kind")
        if min(pub.pid, pub.pid_start, pub.access_mode, pub.capacity_bytes) < 0:
            raise errors.InvalidArgument("negative number")

    def daemon_dir(self, staging: str) -> str:
        """The block daemon's private mount point for one staging path."""
        return os.path.join(self.root, hashlib.sha256(staging.encode()).hexdigest()[:24])

    def owns(self, path: str) -> bool:
        return self.store.get(path) is not None

    def staged(self, staging: str) -> Publication | None:
        pub = self.store.get(staging)
        return pub if pub is not None and pub.mounter in _STAGES else None

    # -- stage -----------------------------------------------------------------------------

    def stage(self, req: StageRequest, deadline: Deadline) -> None:
        validate.volume_id(req.volume_id)
        staging = self._path(req.staging_target_path, "staging_target_path")
        cap = req.capability
        if cap is None:
            raise errors.InvalidArgument("volume_capability is required")
        why = unsupported(cap, allow_block=True)
        if why is not None:
            raise (errors.InvalidArgument if why.missing else errors.FailedPrecondition)(str(why))
        ctx = {**(req.volume_context or {}), **(req.publish_context or {})}
        readonly = cap.readonly_mode or "ro" in cap.mount_flags
        existing = self.store.get(staging)
        if existing is not None:
            if existing.volume_id != req.volume_id or existing.mounter == BIND:
                raise errors.AlreadyExists(f"{staging} is already used by another volume")
            if (existing.mounter in _RAW) != (cap.access_type is AccessType.BLOCK):
                raise errors.AlreadyExists(f"{staging} is staged for another access type")
            if existing.phase == MOUNTED and self._live_stage(existing):
                if existing.readonly != readonly:
                    raise errors.AlreadyExists(f"{staging} is staged with another readonly flag")
                return
            self._teardown(existing)  # a half-done or dead stage: clean, then stage afresh
        source, fs, mkfs_opts = blockdev.stage_parameters(ctx, cap.fs_type, readonly)
        integrity = blockdev.data_integrity(ctx)
        if integrity and self.kernel is None:
            raise errors.FailedPrecondition(
                "dataIntegrity needs the kernel engine (device-mapper), absent on this node: "
                "the userspace engine cannot serve dm-integrity"
            )
        device = blockdev.resolve_device(ctx, self.image_roots)
        key = resolve_volume_key(
            req.volume_id,
            ctx,
            dict(req.secrets or {}),
            self.resolver,
            ephemeral=source == blockdev.SOURCE_EMPTY,
            allowed_key_resources=self.allowed_key_resources,
            allowed_kids=self.allowed_signing_kids,
            whole_passphrase=True,
        )
        new = source == blockdev.SOURCE_EMPTY
        high_entropy = key.source != "sealed-passphrase"
        unlocked: Unlocked | None = None
        if new and key.source != "ephemeral-random":
            # A PV with sourceType empty is staged again after a reboot or a move: the disk
            # now holds the container its first stage made. Opened, never formatted again,
            # and that one unlock is the stage's (the KDF runs once).
            unlocked = self._own_container(device, key, integrity)
            if unlocked is not None:
                new = False
                log.info(
                    "sourceType empty: the device holds this volume's own LUKS2 container; "
                    "opening it",
                    extra={"fields": {"volume_id": req.volume_id}},
                )
        if new:
            self._prove_empty(device)
            deadline.check("formatting the volume")
            if integrity:
                # Only cryptsetup writes the dm-integrity superblock (through a temporary
                # mapping), and it writes no binding token: add ours to the header this
                # guest just made, and take the volume from that one validation.
                assert self.kernel is not None
                self.kernel.format(
                    device.path, key.password, integrity=True, high_entropy=high_entropy
                )
                unlocked = self.engine.bind(device.path, key.password, integrity=True)
            else:
                self.engine.format(device.path, key.password, high_entropy=high_entropy)
            log.info("formatted block volume", extra={"fields": {"volume_id": req.volume_id}})
        if unlocked is None:
            deadline.check("unlocking the volume")
            unlocked = self._unlock(req, ctx, device, key, integrity, new, deadline)
        mode = cap.access_mode
        raw = cap.access_type is AccessType.BLOCK
        if self.kernel is not None:
            self._stage_kernel(req.volume_id, staging, device, unlocked, readonly, int(mode),
                               (fs, mkfs_opts) if new else None, deadline, raw=raw)  # fmt: skip
            return
        kind = BLOCK_RAW if raw else BLOCK_MOUNTER
        intent = Publication(
            req.volume_id, staging, device.path, kind, readonly, int(mode), phase=INTENT
        )
        self.store.put(intent)
        try:
            pid, started = self._bring_up(intent, unlocked, device.is_image, deadline)
            if raw:
                # No filesystem: the plaintext loop device is what publish exposes. The
                # staging path is only a name for it (created so kubelet finds it there).
                os.makedirs(staging, 0o750, exist_ok=True)
            elif new:
                loop = self._loop_of(self.daemon_dir(staging))
                assert loop is not None
                _run(blockdev.mkfs_argv(fs, mkfs_opts, loop), f"mkfs.{fs}")
            if not raw:
                self._mount_staging(intent, fs, deadline)
        except BaseException:
            self._teardown(self.store.get(staging) or intent)
            raise
        self.store.update(staging, phase=MOUNTED, pid=pid, pid_start=started)
        log.info(
            "staged block volume",
            extra={"fields": {"volume_id": req.volume_id, "staging": staging}},
        )

    def _unlock(
        self,
        req: StageRequest,
        ctx: Mapping[str, str],
        device: blockdev.Device,
        key: VolumeKey,
        integrity: bool,
        new: bool,
        deadline: Deadline,
    ) -> Unlocked:
        """Unlock with the current key; if it does not open and the request names the
        previous key, rotate (add the new slot, check it, remove the old) and unlock.

        If the current key opens and the request still names the previous key, the old
        slot must not outlive the rotation: a crash between its two steps leaves both
        slots, and without this the old (perhaps revoked) key would open the volume for
        good. So the old slot is removed now, if the previous key still opens one."""
        try:
            unlocked = self._unlock_with(device, key, integrity)
        except errors.WrongVolumeKey:
            previous = None if new else self._previous_key(req, ctx)
            if previous is None:
                raise
            deadline.check("rotating the volume key")
            self._rotate_from(device, previous, key, integrity)
            log.info("rotated block volume key", extra={"fields": {"volume_id": req.volume_id}})
            return self.engine.unlock(device.path, key.password, integrity=integrity)
        if new:
            return unlocked
        try:
            previous = self._previous_key(req, ctx)
        except (errors.Unavailable, errors.FailedPrecondition) as exc:
            # The old key may be gone from the KBS after the rotation; the volume opens
            # with its current key either way. A bad reference still fails the stage.
            log.warning(
                "previous key not checked",
                extra={"fields": {"volume_id": req.volume_id, "error": str(exc)}},
            )
            return unlocked
        if previous is None:
            return unlocked
        deadline.check("removing the previous volume key")
        old = [pw for pw in _passphrases(previous) if pw not in _passphrases(key)]
        if not any(self.engine.retire(device.path, pw, integrity=integrity) for pw in old):
            return unlocked
        log.info(
            "removed the previous block volume key left by an interrupted rotation",
            extra={"fields": {"volume_id": req.volume_id}},
        )
        return self._unlock_with(device, key, integrity)

    def _unlock_with(self, device: blockdev.Device, key: VolumeKey, integrity: bool) -> Unlocked:
        """Unlock with the key's whole passphrase, or its first line: the key of a volume
        staged before block volumes used whole passphrases."""
        return _with_each(
            _passphrases(key), lambda pw: self.engine.unlock(device.path, pw, integrity=integrity)
        )

    def _rotate_from(
        self, device: blockdev.Device, previous: VolumeKey, key: VolumeKey, integrity: bool
    ) -> None:
        high_entropy = key.source != "sealed-passphrase"
        _with_each(
            _passphrases(previous),
            lambda old: self.engine.rotate(
                device.path, old, key.password, high_entropy=high_entropy, integrity=integrity
            ),
        )

    def _previous_key(self, req: StageRequest, ctx: Mapping[str, str]) -> VolumeKey | None:
        """The key before a rotation, if the request names one (previousKeyResource in the
        context, or a sealed previousPassphrase in secrets/context), resolved under the same
        rules as the current key (allowed prefixes, signing kids, per-volume derivation)."""
        secrets = dict(req.secrets or {})
        prev_res = ctx.get(blockdev.CTX_PREVIOUS_KEY_RESOURCE)
        prev_pass = secrets.get(blockdev.CTX_PREVIOUS_PASSPHRASE) or ctx.get(
            blockdev.CTX_PREVIOUS_PASSPHRASE
        )
        if prev_pass is not None:
            sub = {PARAM_PASSPHRASE: prev_pass}
        elif prev_res is not None:
            sub = {PARAM_KEY_RESOURCE: prev_res}
        else:
            return None
        return resolve_volume_key(
            req.volume_id,
            sub,
            {},
            self.resolver,
            allowed_key_resources=self.allowed_key_resources,
            allowed_kids=self.allowed_signing_kids,
            whole_passphrase=True,
        )

    # -- the kernel engine --------------------------------------------------------------------

    def header_copy_path(self, volume_id: str) -> str:
        return os.path.join(self.header_dir, block_kernel.mapper_name(volume_id) + ".header")

    def _stage_kernel(
        self,
        volume_id: str,
        staging: str,
        device: blockdev.Device,
        u: Unlocked,
        readonly: bool,
        mode: int,
        mkfs: tuple[str, list[str]] | None,
        deadline: Deadline,
        *,
        raw: bool = False,
    ) -> None:
        """dm-crypt from the guest's validated header copy (block_kernel.py): write the copy
        to memory-backed storage, ``cryptsetup open`` with the volume key on stdin, then
        mkfs when new (an ext4 whose device grew is grown offline) and mount; with ``raw``
        (CSI AccessType BLOCK) no filesystem at all: publish exposes ``/dev/mapper/<name>``
        (read-only mapping for a read-only stage).
        A dataIntegrity volume gets dm-integrity under dm-crypt from the same header.
        Not exercised on the build machines (no device-mapper)."""
        assert self.kernel is not None
        if not u.header:
            raise errors.FailedPrecondition(
                "the LUKS2 library returned no validated header copy; the kernel engine needs it"
            )
        kind = DM_CRYPT_RAW if raw else DM_CRYPT
        intent = Publication(volume_id, staging, device.path, kind, readonly, mode,
                             phase=INTENT)  # fmt: skip
        self.store.put(intent)
        try:
            copy = self.header_copy_path(volume_id)
            os.makedirs(self.header_dir, mode=0o700, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(copy)
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(u.header)
                f.truncate(block_kernel.HEADER_COPY_SIZE)
            name = block_kernel.mapper_name(volume_id)
            self.kernel.open(device.path, u.volume_key, name, copy, readonly=readonly)
            dev = self.mapper_path(volume_id)
            os.makedirs(staging, 0o750, exist_ok=True)
            if not raw:
                if mkfs is not None:
                    argv = blockdev.mkfs_argv(
                        mkfs[0], mkfs[1], dev, integrity=u.integrity is not None
                    )
                    self.tool(argv, f"mkfs.{mkfs[0]}")
                elif not readonly:
                    self._grow_unmounted(volume_id, dev, deadline)
                opts = ["nosuid", "nodev"] + (["ro"] if readonly else [])
                self.tool(["mount", "-o", ",".join(opts), dev, staging], "mount")
        except BaseException:
            self._teardown(self.store.get(staging) or intent)
            raise
        self.store.update(staging, phase=MOUNTED)

    def mapper_path(self, volume_id: str) -> str:
        """``/dev/mapper/<name>`` of the kernel engine's mapping for ``volume_id``."""
        return os.path.join(self.mapper_dir, block_kernel.mapper_name(volume_id))

    def _teardown_kernel(self, pub: Publication) -> None:
        assert self.kernel is not None
        staging = pub.target_path
        name = block_kernel.mapper_name(pub.volume_id)
        entry = self.mounts.find(staging)
        mapped = self.mapper_path(pub.volume_id)
        ours = entry is not None and entry.source in (mapped, os.path.realpath(mapped))
        if ours:
            self._umount(staging, "staging path", self.tool)
        self.kernel.close(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.header_copy_path(pub.volume_id))
        self.store.remove(staging)

    @staticmethod
    def _own_container(device: blockdev.Device, key: VolumeKey, integrity: bool) -> Unlocked | None:
        """The volume, unlocked, if the device holds a LUKS2 container that this volume's key
        opens *and* whose binding token (a MAC keyed from the volume key) verifies: a
        container this volume made. Else None: anything else, including an unbound header
        that the operator's ``--block-accept-unbound-header`` would let ``encrypted`` volumes
        open, is left to :meth:`_prove_empty`, which refuses it. One unlock: the stage uses
        this result instead of unlocking again. Our own container made with the other
        dataIntegrity setting is refused here (FAILED_PRECONDITION, nothing written)."""
        from fuse_crypt.blockfront import DeviceError, open_device
        from fuse_crypt.errors import FuseCryptError
        from fuse_crypt.luks2 import is_luks, open_volume

        try:
            fd = open_device(device.path, read_only=True, allow_regular=device.is_image)
        except DeviceError:
            return None
        try:
            if not is_luks(fd):
                return None
            # allow_integrity only to recognise it: a mismatch is refused just below, so an
            # integrity volume is never handed on as plain.
            opened = None
            for pw in _passphrases(key):
                with contextlib.suppress(FuseCryptError):  # another key, a hostile header
                    opened = open_volume(fd, pw, require_binding=True, allow_integrity=True)
                    break
            if opened is None:
                return None
        except FuseCryptError:  # an unbound or hostile header: not ours
            return None
        finally:
            os.close(fd)
        if (opened.segment.integrity is not None) != integrity:
            raise integrity_mismatch(integrity)
        return unlocked_from(opened)

    def _prove_empty(self, device: blockdev.Device) -> None:
        from fuse_crypt.blockfront import DeviceError, device_size, open_device

        try:
            fd = open_device(device.path, read_only=True, allow_regular=device.is_image)
        except DeviceError as exc:
            raise errors.FailedPrecondition(f"device {device.path}: {exc.strerror}") from None
        try:
            found = blockdev.probe(fd, device.path, device_size(fd))
        finally:
            os.close(fd)
        if found:
            raise errors.FailedPrecondition(
                f"sourceType empty, but device {device.path} holds {'; '.join(found)}: "
                "refusing to format it (nothing was written)"
            )

    def _bring_up(
        self, intent: Publication, u: Unlocked, is_image: bool, deadline: Deadline
    ) -> tuple[int, int]:
        mnt = self.daemon_dir(intent.target_path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(mnt, 0o700)
        self.mounter.plan(mnt, u, is_image)
        key = VolumeKey((u.volume_key.hex() + "\n").encode("ascii"), "luks-volume-key", 0)
        daemon_pub = Publication(
            intent.volume_id, mnt, intent.cipher_dir, BLOCK_MOUNTER, intent.readonly, 0
        )
        try:
            handle = self.supervisor.start(
                daemon_pub,
                key,
                timeout=deadline.timeout(READY_TIMEOUT),
                kubelet_path=intent.target_path,
            )
        finally:
            self.mounter.unplan(mnt)
        # The supervisor keeps no key for these: a dead block daemon cannot be restarted
        # under a live loop device; unstage + stage is the way back.
        handle.key = None
        argv = ["losetup", "--direct-io=on", "--sector-size", str(u.sector_size)]
        if intent.readonly:
            argv.append("--read-only")
        _run([*argv, "--find", "--show", os.path.join(mnt, DISK_NAME)], "losetup")
        return handle.pid, self.mounter.start_time(handle.pid)

    def _mount_staging(self, pub: Publication, fs: str, deadline: Deadline) -> None:
        """Mount the filesystem on the plaintext loop device at the staging path; an ext4
        whose device grew while it could not grow online (no CAP_SYS_RESOURCE for
        NodeExpandVolume) grows first, offline (blockdev.grow_ext4_unmounted)."""
        staging = pub.target_path
        loop = self._loop_of(self.daemon_dir(staging))
        if loop is None:
            raise errors.Internal("the loop device vanished")
        if fs == "ext4" and not pub.readonly:
            self._grow_unmounted(pub.volume_id, loop, deadline)
        os.makedirs(staging, 0o750, exist_ok=True)
        opts = ["nosuid", "nodev"] + (["ro"] if pub.readonly else [])
        if fs == "xfs" and pub.readonly:
            opts.append("norecovery")
        _run(["mount", "-t", fs, "-o", ",".join(opts), loop, staging], "mount")

    @staticmethod
    def _grow_unmounted(volume_id: str, dev: str, deadline: Deadline) -> None:
        deadline.check("growing the filesystem")
        grown = blockdev.grow_ext4_unmounted(dev, deadline.timeout(TOOL_TIMEOUT))
        if grown is not None:
            log.info(
                "grew the filesystem to its device before mounting it",
                extra={"fields": {"volume_id": volume_id, "bytes": grown}},
            )

    # -- state probes ----------------------------------------------------------------------

    @staticmethod
    def _loop_of(mnt: str) -> str | None:
        """The loop device attached to ``mnt/disk`` (losetup -j), if any."""
        try:
            out = _run(["losetup", "-j", os.path.join(mnt, DISK_NAME)], "losetup -j", 30)
        except errors.CsiError:
            return None
        for line in out.splitlines():
            dev = line.split(":", 1)[0]
            if dev.startswith("/dev/loop"):
                return dev
        return None

    @staticmethod
    def _our_dead_loop(source: str, mnt: str) -> str | None:
        """``source`` if it is a loop device still backed by this stage's block daemon
        ``disk`` when ``losetup -j`` cannot say so: the daemon died and its FUSE mount is
        either still there (ENOTCONN: the kernel still names ``mnt/disk``) or detached by
        the supervisor (lazily: the kernel then names the file from the detached mount's
        own root, ``/disk``). Either form gets " (deleted)" appended once a lookup on the
        dead connection has invalidated the dentry; whether that happened first is a race
        (a writer on the volume usually wins it), so all four forms are ours. Only the
        staging mount's own source is ever tested, so a bare ``/disk`` means nothing else.
        """
        m = re.fullmatch(r"/dev/(loop[0-9]{1,6})", source)
        if not m:
            return None
        try:
            with open(f"/sys/block/{m.group(1)}/loop/backing_file") as f:
                backing = f.read(4096).strip()
        except OSError:
            return None  # detached
        backing = backing.removesuffix(" (deleted)")
        if backing in (os.path.join(mnt, DISK_NAME), "/" + DISK_NAME):
            return source
        return None

    def _raw_device(self, stage: Publication) -> str | None:
        """The plaintext device a raw block stage exposes: the loop device over the block
        daemon's ``disk`` (userspace) or ``/dev/mapper/<name>`` (kernel); None if gone."""
        if stage.mounter == DM_CRYPT_RAW:
            path = self.mapper_path(stage.volume_id)
            return path if os.path.exists(path) else None
        return self._loop_of(self.daemon_dir(stage.target_path))

    def _live_stage(self, pub: Publication) -> bool:
        entry = self.mounts.find(pub.target_path)
        mnt = self.daemon_dir(pub.target_path)
        if pub.mounter == DM_CRYPT_RAW:
            return self._raw_device(pub) is not None
        if pub.mounter == DM_CRYPT:
            mapped = self.mapper_path(pub.volume_id)
            return entry is not None and entry.source in (mapped, os.path.realpath(mapped))
        if pub.mounter == BLOCK_RAW:
            return self._loop_of(mnt) is not None and self.mounter.serves(
                pub.pid, mnt, pub.pid_start
            )
        return (
            entry is not None
            and entry.source.startswith("/dev/loop")
            and self.mounter.serves(pub.pid, mnt, pub.pid_start)
        )

    # -- unstage ---------------------------------------------------------------------------

    def unstage(self, volume_id: str, staging_path: str) -> None:
        validate.volume_id(volume_id)
        staging = self._path(staging_path, "staging_target_path")
        pub = self.store.get(staging)
        if pub is not None and pub.volume_id != volume_id:
            raise errors.NotFound(f"volume {volume_id} is not staged at {staging}")
        users = [p for p in self.store.all() if p.mounter == BIND and p.cipher_dir == staging]
        if users:
            raise errors.FailedPrecondition(
                f"volume {volume_id} is still published at {len(users)} target(s)"
            )
        if pub is None:
            return  # nothing of ours was ever recorded there
        self._teardown(pub)
        log.info("unstaged block volume", extra={"fields": {"volume_id": volume_id}})

    def _teardown(self, pub: Publication) -> None:
        """Undo a stage from whatever point it reached; every step tolerates 'not there'."""
        if pub.mounter in _KERNEL and self.kernel is not None:
            self._teardown_kernel(pub)
            return
        staging = pub.target_path
        mnt = self.daemon_dir(staging)
        loop = self._loop_of(mnt)
        entry = self.mounts.find(staging)
        if loop is None and entry is not None:
            # A dead daemon: losetup -j cannot find the loop by its path (ENOTCONN, or the
            # FUSE mount already detached); the staging mount still names it.
            loop = self._our_dead_loop(entry.source, mnt)
        ours = entry is not None and loop is not None and entry.source == loop
        if entry is not None and not ours and entry.source.startswith("/dev/loop"):
            # Never report an unstage done with a loop-backed filesystem still mounted
            # here: a dead daemon's loop in a form _our_dead_loop does not know once made
            # unstage return OK with the mount and the loop device left behind.
            raise errors.Internal(
                f"the staging path is mounted from {entry.source}, which is not this "
                "volume's loop device; left in place"
            )
        if ours:
            self._umount(staging, "staging path", _run)
        for _ in range(100):  # a busy loop device is only marked for auto-clear
            if loop is None:
                break
            with contextlib.suppress(errors.Internal):
                _run(["losetup", "-d", loop], "losetup -d")
            time.sleep(0.05)
            gone = self._our_dead_loop(loop, mnt) is None
            loop = self._loop_of(mnt) or (None if gone else loop)
        else:
            raise errors.Internal(f"loop device {loop} stays attached (still in use?)")
        if self.supervisor.get(mnt) is None and pub.pid and pub.phase == MOUNTED:
            self.supervisor.adopt(
                Publication(
                    pub.volume_id,
                    mnt,
                    pub.cipher_dir,
                    BLOCK_MOUNTER,
                    pub.readonly,
                    0,
                    pid=pub.pid,
                    pid_start=pub.pid_start,
                ),
                kubelet_path=staging,
            )
        try:
            self.supervisor.stop(mnt)
        except OSError as exc:
            raise errors.Internal(f"cannot stop the block daemon: {exc.strerror or exc}") from None
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(mnt)
        self.store.remove(staging)

    # -- publish / unpublish -----------------------------------------------------------------

    def publish(
        self,
        volume_id: str,
        target: str,
        staging_path: str,
        readonly: bool,
        mode: int,
        *,
        raw: bool = False,
    ) -> None:
        """Bind the staged filesystem to ``target`` (a directory), or with ``raw`` (CSI
        AccessType BLOCK) the plaintext device node (the loop device, or the kernel engine's
        ``/dev/mapper/<name>``) to ``target`` (a file we create, as kubelet expects for block
        volumes)."""
        staging = self._path(staging_path, "staging_target_path")
        stage = self.staged(staging)
        if stage is None or stage.volume_id != volume_id or stage.phase != MOUNTED:
            raise errors.FailedPrecondition(f"volume {volume_id} is not staged at {staging}")
        if raw != (stage.mounter in _RAW):
            raise errors.FailedPrecondition(
                f"volume {volume_id} is staged for "
                f"{'block' if stage.mounter in _RAW else 'mount'} access, not "
                f"{'block' if raw else 'mount'}"
            )
        if raw and readonly and not stage.readonly:
            # A read-only bind does not stop writes through a device node; only a read-only
            # loop device or mapping does, and that is chosen at stage time.
            raise errors.FailedPrecondition(
                "a read-only publish of a raw block volume needs a read-only stage"
            )
        readonly = readonly or stage.readonly
        pub = self.store.get(target)
        if pub is not None:
            if pub.volume_id != volume_id or pub.mounter != BIND:
                raise errors.AlreadyExists(f"target_path {target} is used by another volume")
            if pub.phase == MOUNTED and self.mounts.find(target) is not None:
                if pub.readonly != readonly or pub.cipher_dir != staging:
                    raise errors.AlreadyExists(
                        f"volume {volume_id} is published at {target} with other options"
                    )
                return
            self._unbind(target)
        elif self.mounts.find(target) is not None:
            raise errors.AlreadyExists(f"target_path {target} is already a mount point")
        self.store.put(Publication(volume_id, target, staging, BIND, readonly, mode, phase=INTENT))
        try:
            if raw:
                loop = self._raw_device(stage)
                if loop is None:
                    raise OSError(errno.ENODEV, "the volume's device is gone")
                os.makedirs(os.path.dirname(target), 0o750, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
                if not stat.S_ISREG(os.lstat(target).st_mode):
                    raise OSError(errno.EEXIST, "the target is not a regular file")
                _libc_mount(loop, target, _MS_BIND)  # the loop is read-only if the stage is
            else:
                os.makedirs(target, 0o750, exist_ok=True)
                _libc_mount(staging, target, _MS_BIND)
            if readonly and not raw:
                _libc_mount(
                    staging, target, _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
                )
        except OSError as exc:
            with contextlib.suppress(errors.CsiError):
                self._unbind(target)
            self.store.remove(target)
            raise errors.Internal(f"bind mount failed: {exc.strerror}") from None
        self.store.update(target, phase=MOUNTED)

    def unpublish(self, volume_id: str, target: str) -> None:
        pub = self.store.get(target)
        if pub is not None and pub.volume_id != volume_id:
            raise errors.NotFound(f"volume {volume_id} is not published at {target}")
        self._unbind(target)

    def _unbind(self, target: str) -> None:
        if self.mounts.find(target) is not None:
            self._umount(target, "target_path", _run)
        try:
            st = os.lstat(target)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(target)  # a raw block target: the empty file the bind covered
            else:
                os.rmdir(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise errors.FailedPrecondition(
                    f"target_path {target} is unmounted but not empty; kept"
                ) from None
            raise errors.Internal(f"cannot remove {target}: {exc.strerror}") from None
        self.store.remove(target)

    def _umount(self, path: str, what: str, run: Callable[[list[str], str], object]) -> None:
        """Unmount a pod target or the staging path, waiting out a short EBUSY.

        Never a lazy detach: that would leave a pod writing to a volume the node thinks is
        gone (and, at unstage, a loop device and daemon torn down under it). Past
        BUSY_WAIT: FAILED_PRECONDITION naming the path, with the mount and its record left
        as they were, so kubelet's retry finds a consistent state and finishes the job once
        the holder is gone. Failures no wait cures go to umount(8), which says why.
        """
        try:
            err = umount_when_idle(path, lambda: self.mounts.find(path) is not None)
        except MountBusy as exc:
            raise errors.FailedPrecondition(f"{what} {exc.strerror}") from None
        if err != 0:
            run(["umount", path], f"umount of the {what}")

    # -- stats / expand ------------------------------------------------------------------------

    def statvfs(self, path: str) -> os.statvfs_result:
        try:
            return self.mounts.statvfs(path, PROBE_TIMEOUT)
        except fsprobe.MountHung:
            raise errors.Unavailable("the block volume is not answering") from None
        except OSError as exc:
            raise errors.NotFound(f"the block volume is not usable: {exc.strerror}") from None

    def _stage_of(self, path: str) -> Publication | None:
        """The stage record behind ``path``: its own, or the staging one of a target."""
        pub = self.store.get(path)
        if pub is not None and pub.mounter == BIND:
            return self.staged(pub.cipher_dir)
        return pub

    def condition(self, path: str) -> str | None:
        """Why the block volume at ``path`` (its staging path or a target) is abnormal, or
        None. A userspace stage whose daemon has exited fails every read and write: its
        loop device holds the dead daemon's file, so the daemon cannot be restarted under
        it (the supervisor does not try) and only unstage + stage bring the volume back.
        Statistics alone would not show it (the filesystem's counters stay in memory)."""
        pub = self._stage_of(path)
        if pub is None or pub.phase != MOUNTED or pub.mounter not in (BLOCK_MOUNTER, BLOCK_RAW):
            return None
        if self.mounter.serves(pub.pid, self.daemon_dir(pub.target_path), pub.pid_start):
            return None
        return (
            f"the block daemon of volume {pub.volume_id} has exited: its reads and writes "
            "fail until the volume is unstaged and staged again (restart the pods using it)"
        )

    def raw_size(self, path: str) -> int | None:
        """Bytes of the loop device behind a raw block stage or publish, else None."""
        pub = self._stage_of(path)
        if pub is None or pub.mounter not in _RAW:
            return None
        dev = self._raw_device(pub)
        if dev is None:
            raise errors.NotFound("the block volume's device is gone")
        run = self.tool if pub.mounter == DM_CRYPT_RAW else _run
        return int(run(["blockdev", "--getsize64", dev], "blockdev").strip() or 0)

    def expand(self, volume_id: str, volume_path: str, staging_path: str) -> int:
        """Grow the loop device to the disk's new size and the filesystem to the loop's."""
        validate.volume_id(volume_id)
        path = self._path(staging_path or volume_path, "volume_path")
        pub = self._stage_of(path)
        if pub is None or pub.volume_id != volume_id or pub.phase != MOUNTED:
            raise errors.NotFound(f"volume {volume_id} is not staged at {path}")
        if pub.mounter in _KERNEL:
            return self._expand_kernel(pub)
        loop = self._loop_of(self.daemon_dir(pub.target_path))
        if loop is None:
            raise errors.FailedPrecondition(f"volume {volume_id} has no loop device")
        _run(["losetup", "-c", loop], "losetup -c")
        if pub.mounter == BLOCK_RAW:  # no filesystem of ours: the consumer grows its own
            return int(_run(["blockdev", "--getsize64", loop], "blockdev").strip() or 0)
        self._grow_fs(_run, pub.target_path, loop)
        size = int(_run(["blockdev", "--getsize64", loop], "blockdev").strip() or 0)
        return size

    def _grow_fs(self, run: Callable[[list[str], str], str], mountpoint: str, dev: str) -> None:
        """Grow the mounted filesystem at ``mountpoint`` (on ``dev``) to the device's size."""
        entry = self.mounts.find(mountpoint)
        fs = entry.fstype if entry is not None else "ext4"
        if fs == "xfs":
            run(["xfs_growfs", mountpoint], "xfs_growfs")
            return
        try:
            run(["resize2fs", dev], "resize2fs")
        except errors.Internal as exc:
            if "Permission denied" in str(exc):
                raise errors.FailedPrecondition(
                    "online ext4 resize needs CAP_SYS_RESOURCE, which this node plugin "
                    "lacks; the device grew, the filesystem grows when the volume is next "
                    "staged"
                ) from None
            raise

    def _copy_integrity(self, volume_id: str) -> str | None:
        """The dataIntegrity of a kernel stage, from the guest's validated header copy in
        memory-backed storage (never the host's header)."""
        from fuse_crypt.errors import FuseCryptError
        from fuse_crypt.luks2 import inspect_header

        try:
            with open(self.header_copy_path(volume_id), "rb", opener=_nofollow) as f:
                raw = f.read(32 << 10)  # both header copies
            segment = inspect_header(raw, allow_integrity=True)
        except FileNotFoundError:
            raise errors.FailedPrecondition(
                "the volume's validated header copy is gone (was /run cleared?): unstage and "
                "stage it again before growing it"
            ) from None
        except (OSError, FuseCryptError) as exc:
            raise errors.Internal(f"the volume's header copy is unusable: {exc}") from None
        return segment.integrity

    def _expand_kernel(self, pub: Publication) -> int:
        """``cryptsetup resize`` of the mapping (from the guest's header copy; no secret,
        see block_kernel), then the filesystem (resize2fs / xfs_growfs); a raw block stage
        only grows the mapping. A dataIntegrity volume is refused before anything runs: its
        tags are interleaved with the data, so it cannot grow in place."""
        assert self.kernel is not None
        if self._copy_integrity(pub.volume_id) is not None:
            raise errors.FailedPrecondition(
                "a dataIntegrity volume cannot be grown: dm-integrity keeps its tags "
                "interleaved with the data (cryptsetup refuses such a resize); nothing changed"
            )
        self.kernel.resize(
            block_kernel.mapper_name(pub.volume_id), self.header_copy_path(pub.volume_id)
        )
        dev = self.mapper_path(pub.volume_id)
        if pub.mounter == DM_CRYPT:
            self._grow_fs(self.tool, pub.target_path, dev)
        return int(self.tool(["blockdev", "--getsize64", dev], "blockdev").strip() or 0)

    # -- restart -------------------------------------------------------------------------------

    def recover(self) -> None:
        """Adopt the daemons of staged volumes; undo stages and binds a crash interrupted."""
        for pub in self.store.load():
            fields = {"volume_id": pub.volume_id, "path": pub.target_path}
            try:
                if pub.mounter == BIND:
                    if pub.phase == INTENT:
                        self._unbind(pub.target_path)
                    continue
                if pub.phase == INTENT:
                    log.warning(
                        "undoing a stage interrupted by a restart", extra={"fields": fields}
                    )
                    self._teardown(pub)
                elif pub.mounter in _KERNEL:
                    log.info("staged block volume (dm-crypt) found", extra={"fields": fields})
                elif self._live_stage(pub):
                    mnt = self.daemon_dir(pub.target_path)
                    self.supervisor.adopt(
                        Publication(
                            pub.volume_id,
                            mnt,
                            pub.cipher_dir,
                            BLOCK_MOUNTER,
                            pub.readonly,
                            0,
                            pid=pub.pid,
                            pid_start=pub.pid_start,
                        ),
                        kubelet_path=pub.target_path,
                    )
                    log.info("adopted staged block volume", extra={"fields": fields})
                else:
                    log.warning(
                        "staged block volume is down; unstage cleans it", extra={"fields": fields}
                    )
            except errors.CsiError as exc:
                log.error("block recovery step failed", extra={"fields": {**fields, "err": exc}})
        self.store.save()

    def shutdown(self) -> None:
        """Unpublish and unstage everything (tests, --unmount-on-exit)."""
        pubs = sorted(self.store.all(), key=lambda p: p.mounter != BIND)
        for pub in pubs:
            try:
                if pub.mounter == BIND:
                    self.unpublish(pub.volume_id, pub.target_path)
                else:
                    self.unstage(pub.volume_id, pub.target_path)
            except errors.CsiError as exc:
                log.error("block teardown at shutdown failed", extra={"fields": {"err": exc}})

    def tools_missing(self) -> str | None:
        for tool in ("losetup", "mount", "blkid", "mkfs.ext4", "resize2fs"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed"
        return None
