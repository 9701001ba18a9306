"""Node core: publish, unpublish and measure encrypted volumes, and survive restarts.

Everything the CSI spec says about NodePublishVolume/NodeUnpublishVolume lives here as plain
Python; csi_driver/node.py only translates protobuf to these calls and CsiError to status
codes. Keys are resolved per request inside the guest (csi_driver/keys.py) and handed to
the mount daemon on stdin; they are kept in memory only so the supervisor can restart a
crashed daemon, and never written to the state file or logs.

Staging (NodeStageVolume for block devices) would mount the decrypted filesystem once at the
staging path and bind-mount it to each target; ``_locate`` and the Mounter interface are
where a device-backed cipher location would slot in.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from coco_proto import csi_pb2
from csi_driver import errors
from csi_driver.constants import CTX_CIPHER_DIR, CTX_EPHEMERAL
from csi_driver.core.volcap import READONLY_MODES, unsupported_reason
from csi_driver.keys import Resolver, resolve_volume_key
from csi_driver.metrics import Metrics
from csi_driver.mounter import DEFAULT_MOUNTER, Mounter, make_mounter, proc_start_time
from csi_driver.state import Publication, StateStore
from csi_driver.supervisor import MountSupervisor, pid_alive, pid_serves
from fuse_crypt import mounttable

log = logging.getLogger(__name__)

_VOLUME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PublishRequest:
    """The parts of NodePublishVolumeRequest the core needs. Never log secrets/volume_context."""

    volume_id: str
    target_path: str
    capability: csi_pb2.VolumeCapability | None
    readonly: bool = False
    secrets: Mapping[str, str] | None = None
    volume_context: Mapping[str, str] | None = None
    staging_target_path: str = ""


@dataclass(frozen=True)
class VolumeStats:
    bytes_total: int
    bytes_available: int
    bytes_used: int
    inodes_total: int
    inodes_available: int
    inodes_used: int


def _require(value: str, name: str) -> None:
    if not value:
        raise errors.InvalidArgument(f"{name} is required")


class NodeCore:
    """State and operations of one node plugin instance."""

    def __init__(
        self,
        node_id: str,
        state_dir: str,
        resolver: Resolver | None,
        *,
        mounter: str = DEFAULT_MOUNTER,
        mounters: Mapping[str, Mounter] | None = None,
        backend_root: str | None = None,
        allow_other: bool = True,
        max_volumes: int = 0,
        metrics: Metrics | None = None,
        monitor_interval: float = 0.5,
    ) -> None:
        self.node_id = node_id
        self.state_dir = os.path.abspath(state_dir)
        self.resolver = resolver
        self.backend_root = os.path.abspath(backend_root) if backend_root else None
        self.max_volumes = max_volumes
        self.metrics = metrics or Metrics()
        self.mounters: dict[str, Mounter] = dict(mounters or {mounter: make_mounter(mounter)})
        if mounter not in self.mounters:
            self.mounters[mounter] = make_mounter(mounter)
        self.mounter_name = mounter
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        self.ephemeral_root = os.path.join(self.state_dir, "ephemeral")
        self._store = StateStore(self.state_dir)
        self._lock = threading.Lock()
        self._target_locks: dict[str, threading.Lock] = {}
        self._volume_locks: dict[str, threading.Lock] = {}
        self._pubs: dict[str, Publication] = {}
        self.supervisor = MountSupervisor(
            self.mounters,
            os.path.join(self.state_dir, "logs"),
            allow_other=allow_other,
            on_change=self._refresh_gauge,
            on_restart=self.metrics.mount_restarts.inc,
            monitor_interval=monitor_interval,
        )
        self.recover()
        # Warm mount helpers (fuse-crypt-prefork's zygote, ~0.3 s) before serving requests,
        # so the first NodePublishVolume is as fast as the rest.
        self.mounters[mounter].warm()

    # -- helpers -------------------------------------------------------------------------

    def _lock_for(self, table: dict[str, threading.Lock], key: str) -> threading.Lock:
        with self._lock:
            return table.setdefault(key, threading.Lock())

    def _save(self) -> None:
        with self._lock:
            snapshot = dict(self._pubs)
        self._store.save(snapshot)
        self._refresh_gauge()

    def _refresh_gauge(self) -> None:
        with self._lock:
            self.metrics.mounted.set(len(self._pubs))

    def _our_fs_types(self) -> set[str]:
        return {m.fs_type for m in self.mounters.values()} | {"fuse.gocryptfs", "fuse.fuse-crypt"}

    @staticmethod
    def _live(target: str) -> bool:
        entry = mounttable.find_mount(target, resolve=True)
        return (
            entry is not None
            and entry.fstype.startswith("fuse")
            and not mounttable.is_dead_mount(target)
        )

    def publications(self) -> list[Publication]:
        with self._lock:
            return list(self._pubs.values())

    # -- identity ------------------------------------------------------------------------

    def probe(self) -> tuple[bool, str]:
        """Ready only if FUSE works here, a key resolver is configured and the mounter's
        tool is installed."""
        try:
            fd = os.open("/dev/fuse", os.O_RDWR)
            os.close(fd)
        except OSError as exc:
            return False, f"/dev/fuse unusable: {exc.strerror}"
        if self.resolver is None:
            return False, "no key resolver configured"
        missing = self.mounters[self.mounter_name].unavailable()
        if missing:
            return False, missing
        return True, "ready"

    # -- restart recovery ----------------------------------------------------------------

    def recover(self) -> None:
        """Rediscover publications of a previous plugin instance (state file + mountinfo)."""
        loaded = self._store.load()
        if not loaded:
            return
        mounts = mounttable.mounts_by_point()
        for target, pub in loaded.items():
            fields = {"volume_id": pub.volume_id, "target": target}
            entry = mounts.get(target)
            if entry is not None and entry.fstype.startswith("fuse"):
                if mounttable.is_dead_mount(target):
                    log.warning(
                        "cleaning dead mount left by previous run", extra={"fields": fields}
                    )
                    try:
                        mounttable.detach(target, lazy=True)
                    except OSError as exc:
                        log.error(
                            "cannot clean dead mount", extra={"fields": {**fields, "err": exc}}
                        )
                elif pid_alive(pub.pid) and pid_serves(pub.pid, target, pub.pid_start):
                    self.supervisor.adopt(
                        target, pub.cipher_dir, pub.mounter, pub.pid, readonly=pub.readonly
                    )
                    log.info("adopted running mount", extra={"fields": {**fields, "pid": pub.pid}})
            else:
                log.warning("published volume is not mounted", extra={"fields": fields})
            # Keep the record either way: NodePublish remounts it, NodeUnpublish cleans it.
            self._pubs[target] = pub
        self._save()

    # -- publish -------------------------------------------------------------------------

    def _locate(self, req: PublishRequest, ctx: Mapping[str, str], ephemeral: bool) -> str:
        """The volume's ciphertext directory (NOT_FOUND if it does not exist)."""
        if ephemeral:
            path = os.path.join(self.ephemeral_root, req.volume_id)
            os.makedirs(path, mode=0o700, exist_ok=True)
            return path
        if self.backend_root:
            path = os.path.join(self.backend_root, req.volume_id)
        else:
            path = ctx.get(CTX_CIPHER_DIR, "")
            if not path:
                raise errors.NotFound(
                    f"volume {req.volume_id}: no {CTX_CIPHER_DIR} in volume_context and no "
                    "--backend-root on this node"
                )
            if not os.path.isabs(path):
                raise errors.InvalidArgument(f"volume_context {CTX_CIPHER_DIR} must be absolute")
        if not os.path.isdir(path):
            raise errors.NotFound(f"volume {req.volume_id} does not exist")
        return path

    def publish(self, req: PublishRequest) -> None:
        """NodePublishVolume: idempotent; see module docstring for the rules."""
        _require(req.volume_id, "volume_id")
        _require(req.target_path, "target_path")
        if req.capability is None:
            raise errors.InvalidArgument("volume_capability is required")
        if not _VOLUME_ID.match(req.volume_id):
            raise errors.InvalidArgument("volume_id has invalid characters or length")
        if not os.path.isabs(req.target_path):
            raise errors.InvalidArgument("target_path must be absolute")
        reason = unsupported_reason(req.capability)
        if reason is not None:
            if "required" in reason:
                raise errors.InvalidArgument(reason)
            raise errors.FailedPrecondition(reason)
        mode = req.capability.access_mode.mode
        flags = list(req.capability.mount.mount_flags)
        readonly = bool(req.readonly) or mode in READONLY_MODES or "ro" in flags
        ctx = dict(req.volume_context or {})
        ephemeral = ctx.get(CTX_EPHEMERAL, "").lower() == "true"
        target = os.path.normpath(req.target_path)

        with self._lock_for(self._target_locks, target):
            if self._reuse_existing(req.volume_id, target, readonly, mode):
                return
            # The volume lock makes "check conflicts, init, mount, record" atomic per volume,
            # so two targets of one volume cannot both pass the single-writer check.
            with self._lock_for(self._volume_locks, req.volume_id):
                self._check_conflicts(req.volume_id, target, readonly)
                pub = self._mount_new(req, ctx, target, readonly, int(mode), ephemeral)
                with self._lock:
                    self._pubs[target] = pub
            self._save()
            log.info(
                "published",
                extra={
                    "fields": {
                        "volume_id": req.volume_id,
                        "target": target,
                        "readonly": readonly,
                        "mounter": self.mounter_name,
                        "pid": pub.pid,
                    }
                },
            )

    def _mount_new(
        self,
        req: PublishRequest,
        ctx: Mapping[str, str],
        target: str,
        readonly: bool,
        mode: int,
        ephemeral: bool,
    ) -> Publication:
        """Locate, key, initialise if new, create the target and start the daemon."""
        cipher_dir = self._locate(req, ctx, ephemeral)
        try:
            key = resolve_volume_key(
                req.volume_id, ctx, dict(req.secrets or {}), self.resolver, ephemeral=ephemeral
            )
            mounter = self.mounters[self.mounter_name]
            if key.source == "ephemeral-random" and mounter.is_initialised(cipher_dir):
                # Its random key died with the plugin instance that made it: the old data is
                # unreadable by anyone, so start the scratch volume afresh.
                log.warning(
                    "re-creating ephemeral volume whose key is gone",
                    extra={"fields": {"volume_id": req.volume_id}},
                )
                shutil.rmtree(cipher_dir)
                os.makedirs(cipher_dir, mode=0o700)
            if mounter.ensure_initialised(cipher_dir, key):
                log.info(
                    "initialised volume",
                    extra={"fields": {"volume_id": req.volume_id, "key_source": key.source}},
                )
            created = self._make_target(target)
            try:
                handle = self.supervisor.start(
                    target, cipher_dir, self.mounter_name, key, readonly=readonly
                )
            except BaseException:
                if created:
                    self._remove_target(target)
                raise
        except BaseException:
            if ephemeral:
                shutil.rmtree(cipher_dir, ignore_errors=True)
            raise
        return Publication(
            req.volume_id,
            target,
            cipher_dir,
            self.mounter_name,
            readonly,
            mode,
            handle.pid,
            ephemeral,
            proc_start_time(handle.pid),
        )

    def _reuse_existing(self, volume_id: str, target: str, readonly: bool, mode: int) -> bool:
        """True if an identical publication is already live (idempotent OK)."""
        with self._lock:
            pub = self._pubs.get(target)
        if pub is None:
            entry = mounttable.find_mount(target, resolve=True)
            if entry is None:
                return False
            if mounttable.is_dead_mount(target):
                mounttable.detach(target, lazy=True)  # stale FUSE mount: let kubelet's retry in
                return False
            raise errors.AlreadyExists(f"target_path {target} is already a mount point")
        if pub.volume_id != volume_id:
            raise errors.AlreadyExists(
                f"target_path {target} is already used by volume {pub.volume_id}"
            )
        if self._live(target):
            if pub.readonly != readonly or pub.access_mode != int(mode):
                raise errors.AlreadyExists(
                    f"volume {volume_id} is already published at {target} with a different "
                    "readonly flag or access mode"
                )
            return True
        # Recorded but dead (daemon crashed, or the plugin restarted): clean and remount.
        log.warning("remounting dead publication", extra={"fields": {"target": target}})
        self.supervisor.stop(target)
        with self._lock:
            self._pubs.pop(target, None)
        return False

    def _check_conflicts(self, volume_id: str, target: str, readonly: bool) -> None:
        with self._lock:
            others = [p for p in self._pubs.values() if p.volume_id == volume_id]
            count = len(self._pubs)
        for other in others:
            if other.target_path != target and not (readonly and other.readonly):
                raise errors.FailedPrecondition(
                    f"volume {volume_id} is already published writable elsewhere on this node; "
                    "two gocryptfs daemons must not write one ciphertext directory"
                )
        if self.max_volumes and count >= self.max_volumes:
            raise errors.ResourceExhausted(f"node already serves {count} volumes")

    @staticmethod
    def _make_target(target: str) -> bool:
        """mkdir the target (kubelet only creates its parent); True if we created it."""
        try:
            os.mkdir(target, 0o750)
            return True
        except FileExistsError:
            if not os.path.isdir(target):
                raise errors.FailedPrecondition(
                    f"target_path {target} exists and is not a directory"
                ) from None
            if os.listdir(target):
                raise errors.FailedPrecondition(f"target_path {target} is not empty") from None
            return False
        except FileNotFoundError:
            os.makedirs(target, 0o750, exist_ok=True)
            return True

    # -- unpublish -----------------------------------------------------------------------

    def unpublish(self, volume_id: str, target_path: str) -> None:
        """NodeUnpublishVolume: unmount, remove target_path; OK if already gone."""
        _require(volume_id, "volume_id")
        _require(target_path, "target_path")
        target = os.path.normpath(target_path)
        with self._lock_for(self._target_locks, target):
            with self._lock:
                pub = self._pubs.get(target)
            if pub is not None and pub.volume_id != volume_id:
                raise errors.NotFound(f"volume {volume_id} is not published at {target}")
            entry = mounttable.find_mount(target, resolve=True)
            foreign = entry is not None and entry.fstype not in self._our_fs_types()
            if pub is None and foreign and not mounttable.is_dead_mount(target):
                raise errors.FailedPrecondition(
                    f"target_path {target} is a {entry.fstype} mount this driver did not make"
                )
            try:
                self.supervisor.stop(target)
            except OSError as exc:
                raise errors.Internal(f"cannot unmount {target}: {exc.strerror or exc}") from None
            self._remove_target(target)
            if pub is not None and pub.ephemeral:
                shutil.rmtree(pub.cipher_dir, ignore_errors=True)
            with self._lock:
                self._pubs.pop(target, None)
            self._save()
            log.info("unpublished", extra={"fields": {"volume_id": volume_id, "target": target}})

    @staticmethod
    def _remove_target(target: str) -> None:
        if mounttable.find_mount(target, resolve=True) is not None:
            raise errors.Internal(f"{target} is still mounted; not removing it")
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            os.unlink(target)
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:
                raise errors.Internal(f"cannot remove {target}: {exc.strerror}") from None
            shutil.rmtree(target)

    # -- stats ---------------------------------------------------------------------------

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        _require(volume_id, "volume_id")
        _require(volume_path, "volume_path")
        target = os.path.normpath(volume_path)
        with self._lock:
            pub = self._pubs.get(target)
        if pub is None or pub.volume_id != volume_id:
            raise errors.NotFound(f"volume {volume_id} is not published at {volume_path}")
        if not self._live(target):
            raise errors.NotFound(f"volume {volume_id} at {volume_path} is not mounted")
        st = os.statvfs(target)
        return VolumeStats(
            bytes_total=st.f_blocks * st.f_frsize,
            bytes_available=st.f_bavail * st.f_frsize,
            bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
            inodes_total=st.f_files,
            inodes_available=st.f_favail,
            inodes_used=st.f_files - st.f_ffree,
        )

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self, *, unmount: bool = False) -> None:
        """Stop supervising. Mounts stay up unless ``unmount`` (they outlive the plugin)."""
        if unmount:
            for pub in self.publications():
                try:
                    self.unpublish(pub.volume_id, pub.target_path)
                except errors.CsiError as exc:
                    log.error("unpublish at shutdown failed", extra={"fields": {"err": exc}})
        self.supervisor.shutdown()
