"""Node core: publish, unpublish and measure encrypted volumes, and survive restarts.

Everything the CSI spec says about NodePublishVolume/NodeUnpublishVolume lives here as plain
Python; csi_driver/node.py only translates protobuf to these calls and CsiError to status
codes. Keys are resolved per request inside the guest (csi_driver/keys.py) and handed to
the mount daemon on stdin; they are kept in memory only so the supervisor can restart a
crashed daemon, and never written to the state file or logs.

Staging (NodeStageVolume) serves block volumes (csi_driver/volumes/block.py): the decrypted
filesystem is mounted once at the staging path and bind-mounted to each target. For the
directory-backed gocryptfs volumes staging is a validated no-op and publish works as before.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import shutil
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from csi_driver import errors, fsprobe, usage, validate
from csi_driver.constants import CTX_CAPACITY, CTX_CIPHER_DIR, CTX_EPHEMERAL
from csi_driver.core.store import INTENT, MOUNTED, Publication, PublicationStore
from csi_driver.core.volcap import AccessType, Capability, unsupported
from csi_driver.deadline import Deadline
from csi_driver.keys import VolumeKey, resolve_volume_key
from csi_driver.metrics import Metrics
from csi_driver.mounter import DEFAULT_MOUNTER, Mounter, make_mounter
from csi_driver.mounts import MountBusy, MountEntry, MountTable
from csi_driver.supervisor import READY_TIMEOUT, MountSupervisor
from csi_driver.volumes.block import BlockVolumes, is_block
from csi_driver.volumes.block import StageRequest as StageRequest  # NodeCore.stage's argument
from csi_driver.volumes.objectmount import (
    OBJECT_MOUNTER,
    ObjectKey,
    ObjectNodePolicy,
    ObjectStoreMounter,
    check_object_location,
    is_object_volume,
    object_location,
    object_readonly,
    resolve_object_volume,
)
from sealed_secrets.resolver import Resolver

log = logging.getLogger(__name__)

DEFAULT_KUBELET_DIR = "/var/lib/kubelet"
# Publish/unpublish/stats calls running at once. Each may block on a hung FUSE daemon or a
# slow KBS; the gRPC pool has more workers than this, so Identity/Probe always finds one.
DEFAULT_MAX_PARALLEL = 8
# How long a stat/statfs of a mount may take before it counts as hung (csi_driver/fsprobe.py).
PROBE_TIMEOUT = 5.0
# CSI's VolumeUsage fields are int64.
_INT64_MAX = (1 << 63) - 1


class _LockEntry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


@dataclass(frozen=True)
class PublishRequest:
    """The parts of NodePublishVolumeRequest the core needs. Never log secrets/volume_context."""

    volume_id: str
    target_path: str
    capability: Capability | None
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
    #: Why the volume is abnormal (CSI VolumeCondition), None while it is served normally.
    abnormal: str | None = None


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
        kubelet_dir: str = DEFAULT_KUBELET_DIR,
        cipher_roots: Sequence[str] = (),
        allowed_key_resources: Sequence[str] = (),
        allowed_signing_kids: Sequence[str] = (),
        max_parallel: int = DEFAULT_MAX_PARALLEL,
        mount_table: MountTable | None = None,
        block_image_roots: Sequence[str] = (),
        block_require_binding: bool = True,
        object_policy: ObjectNodePolicy | None = None,
        daemon_metrics: bool = False,
    ) -> None:
        self.node_id = node_id
        os.makedirs(os.path.abspath(state_dir), mode=0o700, exist_ok=True)
        self.state_dir = validate.real_root(state_dir)
        self.resolver = resolver
        self.backend_root = validate.real_root(backend_root) if backend_root else None
        # Where target paths may lie (kubelet's root, e.g. /var/lib/kubelet), resolved once.
        self.kubelet_root = validate.real_root(kubelet_dir)
        # Where a volume_context cipherDir may lie; the controller cannot name other paths.
        self.cipher_roots = tuple(validate.real_root(r) for r in cipher_roots)
        self.allowed_key_resources = tuple(allowed_key_resources)
        self.allowed_signing_kids = tuple(allowed_signing_kids)
        self.max_parallel = max(1, max_parallel)
        self._busy_slots = threading.BoundedSemaphore(self.max_parallel)
        self.max_volumes = max_volumes
        self.metrics = metrics or Metrics()
        self.mounters: dict[str, Mounter] = dict(mounters or {mounter: make_mounter(mounter)})
        if mounter not in self.mounters:
            self.mounters[mounter] = make_mounter(mounter)
        self.mounter_name = mounter
        # Bucket volumes (csi_driver/volumes/objectmount.py): None or no allowed endpoint
        # refuses them. Their daemon is spawned the way the node's own mounter does it.
        self.object_policy = object_policy
        self.mounters.setdefault(
            OBJECT_MOUNTER,
            ObjectStoreMounter(
                self.mounters[mounter],
                ca_bundle=object_policy.ca_bundle if object_policy else None,
                control_dir=object_policy.control_dir if object_policy else None,
            ),
        )
        self.ephemeral_root = os.path.join(self.state_dir, "ephemeral")
        # The one record of what this node published; the supervisor writes to it too.
        self.store = PublicationStore(self.state_dir, self._check_record)
        self.mounts = mount_table or MountTable()
        self._lock = threading.Lock()
        self._target_locks: dict[str, _LockEntry] = {}
        self._volume_locks: dict[str, _LockEntry] = {}
        self.supervisor = MountSupervisor(
            self.mounters,
            os.path.join(self.state_dir, "logs"),
            self.store,
            mounts=self.mounts,
            allow_other=allow_other,
            on_change=self._refresh_gauge,
            on_restart=self.metrics.mount_restarts.inc,
            monitor_interval=monitor_interval,
            daemon_metrics=daemon_metrics,
        )
        # Block volumes keep their own records (<state-dir>/block/node-state.json).
        self.block = BlockVolumes(
            self.state_dir,
            self.supervisor,
            self.mounts,
            resolver,
            kubelet_root=self.kubelet_root,
            image_roots=block_image_roots,
            require_binding=block_require_binding,
            allowed_key_resources=self.allowed_key_resources,
            allowed_signing_kids=self.allowed_signing_kids,
        )
        self.recover()
        # Warm mount helpers (fuse-crypt-prefork's zygote, ~0.3 s) before serving requests,
        # so the first NodePublishVolume is as fast as the rest.
        self.mounters[mounter].warm()

    # -- helpers -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _holding(
        self, table: dict[str, _LockEntry], key: str, deadline: Deadline, what: str
    ) -> Iterator[None]:
        """Hold the per-key lock of ``table``; the entry is dropped when nobody uses it, so
        the tables stay as small as the set of operations in flight."""
        with self._lock:
            entry = table.get(key)
            if entry is None:
                entry = table[key] = _LockEntry()
            entry.users += 1
        try:
            if not entry.lock.acquire(timeout=deadline.remaining()):
                raise errors.Aborted(f"an operation on {what} is still in progress")
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    table.pop(key, None)

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """One of ``max_parallel`` slots for slow work, or RESOURCE_EXHAUSTED at once: a
        caller never waits here, so hung volumes cannot take every gRPC worker."""
        if not self._busy_slots.acquire(blocking=False):
            raise errors.ResourceExhausted(
                f"node plugin is busy with {self.max_parallel} volume operations; retry later"
            )
        try:
            yield
        finally:
            self._busy_slots.release()

    def lock_table_sizes(self) -> tuple[int, int]:
        """(per-target, per-volume) lock entries in use (tests, debugging)."""
        with self._lock:
            return len(self._target_locks), len(self._volume_locks)

    def _target(self, path: object, name: str = "target_path") -> str:
        """A request's target path, validated and resolved once under the kubelet root."""
        return validate.resolve_under(path, (self.kubelet_root,), name)

    def _refresh_gauge(self) -> None:
        self.metrics.mounted.set(sum(p.phase == MOUNTED for p in self.store.all()))

    def _our_fs_types(self) -> set[str]:
        return {m.fs_type for m in self.mounters.values()} | {"fuse.gocryptfs", "fuse.fuse-crypt"}

    def _live(self, target: str) -> bool:
        """A FUSE mount at exactly ``target`` that answers (a hung one counts as live: its
        daemon is there, it is just slow, and remounting would not help)."""
        entry = self.mounts.find(target)
        return (
            entry is not None
            and entry.fstype.startswith("fuse")
            and self.mounts.probe(target, PROBE_TIMEOUT) != "dead"
        )

    def _dead(self, target: str) -> bool:
        return self.mounts.probe(target, PROBE_TIMEOUT) == "dead"

    def publications(self) -> list[Publication]:
        """Every record of the store, intents of publishes in flight included."""
        return self.store.all()

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
        """Pick up where a previous plugin instance stopped: its state file + mountinfo.

        * ``mounted`` record, live mount, its daemon still there: adopt the daemon.
        * ``mounted`` record, dead (ENOTCONN) mount: detach it; the record stays, so
          kubelet's NodePublishVolume retry remounts and NodeUnpublishVolume cleans up.
        * ``intent`` record: the plugin died during that publish, before recording the
          mount. A mount of ours at the target (our fs type, our cipher dir as source) is
          the half-finished publish: undo it (unmount, rmdir the target, drop the record),
          so kubelet's retry publishes afresh instead of meeting ALREADY_EXISTS forever.
        """
        mounts = self.mounts.all()
        for pub in self.store.load():
            target = pub.target_path
            fields = {"volume_id": pub.volume_id, "target": target}
            entry = mounts.get(target)
            if pub.phase == INTENT:
                log.warning("undoing a publish interrupted by a restart", extra={"fields": fields})
                self._undo_intent(pub, entry)
                continue
            if entry is None or not entry.fstype.startswith("fuse"):
                log.warning("published volume is not mounted", extra={"fields": fields})
            elif self._dead(target):
                log.warning("cleaning dead mount left by previous run", extra={"fields": fields})
                try:
                    self.mounts.detach(target, lazy=True)
                except OSError as exc:
                    log.error("cannot clean dead mount", extra={"fields": {**fields, "err": exc}})
            elif self.mounters[pub.mounter].serves(pub.pid, target, pub.pid_start):
                self.supervisor.adopt(pub)
                log.info("adopted running mount", extra={"fields": {**fields, "pid": pub.pid}})
        self.store.save()  # what load dropped is dropped from the file too
        self.block.recover()
        self._refresh_gauge()

    def _is_ours(self, pub: Publication, entry: MountEntry | None) -> bool:
        """A mount at the record's target made by one of our mounters: our fs type, and as
        source the cipher dir (gocryptfs) or the daemon's name (fuse-crypt's fsname)."""
        return (
            entry is not None
            and entry.fstype in self._our_fs_types()
            and entry.source in (pub.cipher_dir, entry.fstype.removeprefix("fuse."))
        )

    def _undo_intent(self, pub: Publication, entry: MountEntry | None) -> None:
        target = pub.target_path
        if self._is_ours(pub, entry):
            try:
                self.supervisor.stop(target, dead=self._dead(target))
            except OSError as exc:
                log.error("cannot undo interrupted mount", extra={"fields": {"err": exc}})
                return  # keep the intent: the next start tries again
        elif entry is not None:
            # Not ours: leave it alone and forget the intent (publish will report it).
            log.warning("foreign mount at an interrupted publish's target; left alone")
        with contextlib.suppress(errors.CsiError):
            self._remove_target(target)
        if pub.ephemeral:
            self._remove_ephemeral(pub.volume_id)  # its random key died with the old plugin
        self.store.remove(target)

    def _check_record(self, pub: Publication) -> None:
        """A state record passes the same checks as a request (the state dir is a hostPath:
        a forged record must not steer an unmount, a removal or a kill)."""
        validate.volume_id(pub.volume_id)
        if self._target(pub.target_path) != pub.target_path:
            raise errors.InvalidArgument("target_path is not in resolved form")
        if pub.mounter == OBJECT_MOUNTER:
            check_object_location(pub.cipher_dir)
        else:
            validate.absolute_path(pub.cipher_dir, "cipher_dir")
        if pub.mounter not in self.mounters:
            raise errors.InvalidArgument("unknown mounter")
        if pub.ephemeral and pub.cipher_dir != self._ephemeral_dir(pub.volume_id):
            raise errors.InvalidArgument("ephemeral cipher_dir is not the plugin's own")
        if min(pub.pid, pub.pid_start, pub.access_mode, pub.capacity_bytes) < 0:
            raise errors.InvalidArgument("negative number")

    def _ephemeral_dir(self, volume_id: str) -> str:
        return os.path.join(self.ephemeral_root, validate.volume_id(volume_id))

    # -- publish -------------------------------------------------------------------------

    def _locate(self, req: PublishRequest, ctx: Mapping[str, str], ephemeral: bool) -> str:
        """The volume's ciphertext directory (NOT_FOUND if it does not exist)."""
        if ephemeral:
            path = self._ephemeral_dir(req.volume_id)
            os.makedirs(self.ephemeral_root, mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
        elif self.backend_root:
            path = os.path.join(self.backend_root, req.volume_id)
        else:
            raw = ctx.get(CTX_CIPHER_DIR, "")
            if not raw:
                raise errors.NotFound(
                    f"volume {req.volume_id}: no {CTX_CIPHER_DIR} in volume_context and no "
                    "--backend-root on this node"
                )
            if not self.cipher_roots:
                raise errors.InvalidArgument(
                    f"volume_context {CTX_CIPHER_DIR} is not accepted: this node has no "
                    "--cipher-dir-root"
                )
            path = validate.resolve_under(
                raw, self.cipher_roots, f"volume_context {CTX_CIPHER_DIR}"
            )
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise errors.NotFound(f"volume {req.volume_id} does not exist") from None
        except OSError as exc:
            raise errors.FailedPrecondition(
                f"volume {req.volume_id}: cannot inspect its directory: {exc.strerror}"
            ) from None
        if not stat.S_ISDIR(st.st_mode):  # a symlink would lead anywhere in the guest
            raise errors.FailedPrecondition(
                f"volume {req.volume_id}: {path} is not a directory (symlinks are refused)"
            )
        return path

    @staticmethod
    def _capacity_hint(ctx: Mapping[str, str], cipher_dir: str) -> int:
        """The capacity the controller recorded (0: none). The control plane is untrusted:
        a decimal byte count or INVALID_ARGUMENT, and never more than the storage under the
        cipher dir holds (the node's own bound)."""
        raw = ctx.get(CTX_CAPACITY)
        if raw is None:
            return 0
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 20):
            raise errors.InvalidArgument(
                f"volume_context {CTX_CAPACITY} must be a decimal number of bytes"
            )
        try:
            st = fsprobe.call(cipher_dir, os.statvfs, PROBE_TIMEOUT)
        except OSError:
            raise errors.Unavailable("the volume's storage is not answering") from None
        return min(int(raw), st.f_blocks * st.f_frsize)

    @staticmethod
    def _object_capacity(ctx: Mapping[str, str]) -> int:
        """A bucket volume's recorded capacity (0: none): the size its PVC asked for, which
        NodeGetVolumeStats reports as total. A bucket has no quota, so nothing clamps or
        enforces it; the control plane is untrusted, so a decimal count or INVALID_ARGUMENT."""
        raw = ctx.get(CTX_CAPACITY)
        if raw is None:
            return 0
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
            raise errors.InvalidArgument(
                f"volume_context {CTX_CAPACITY} must be a decimal number of bytes"
            )
        return int(raw)

    def publish(self, req: PublishRequest, deadline: Deadline | None = None) -> None:
        """NodePublishVolume: idempotent; see module docstring for the rules."""
        deadline = deadline or Deadline()
        validate.volume_id(req.volume_id)
        _require(req.target_path, "target_path")
        if req.capability is None:
            raise errors.InvalidArgument("volume_capability is required")
        target = self._target(req.target_path)
        ctx = dict(req.volume_context or {})
        bucket = is_object_volume(ctx, dict(req.secrets or {}))
        block_route = (
            bool(req.staging_target_path)
            and not bucket
            and (
                is_block(ctx)
                or self.block.owns(target)
                or self._staged_block(req.staging_target_path)
            )
        )
        problem = unsupported(req.capability, allow_block=block_route)
        if problem is not None:
            raise (errors.InvalidArgument if problem.missing else errors.FailedPrecondition)(
                problem.message
            )
        mode = req.capability.access_mode
        readonly = bool(req.readonly) or req.capability.readonly_mode
        readonly = readonly or "ro" in req.capability.mount_flags
        ephemeral = ctx.get(CTX_EPHEMERAL, "").lower() == "true"
        readonly = readonly or (bucket and object_readonly(ctx, dict(req.secrets or {})))
        if block_route:
            with (
                self._busy(),
                self._holding(self._target_locks, target, deadline, f"target {target}"),
            ):
                self.block.publish(
                    req.volume_id,
                    target,
                    req.staging_target_path,
                    readonly,
                    int(mode),
                    raw=req.capability.access_type is AccessType.BLOCK,
                )
            return

        with (
            self._busy(),
            self._holding(self._target_locks, target, deadline, f"target {target}"),
        ):
            if self._reuse_existing(req.volume_id, target, readonly, mode):
                if bucket:  # kubelet's periodic republish (requiresRepublish)
                    self._republish_object(req, ctx, target, ephemeral)
                return
            # The volume lock makes "check conflicts, init, mount, record" atomic per volume,
            # so two targets of one volume cannot both pass the single-writer check.
            with self._holding(
                self._volume_locks, req.volume_id, deadline, f"volume {req.volume_id}"
            ):
                self._check_conflicts(req.volume_id, target, readonly)
                if bucket:
                    pub = self._mount_object(
                        req, ctx, target, readonly, int(mode), ephemeral, deadline
                    )
                else:
                    pub = self._mount_new(
                        req, ctx, target, readonly, int(mode), ephemeral, deadline
                    )
            self._refresh_gauge()
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
        deadline: Deadline,
    ) -> Publication:
        """Locate, key, initialise if new, create the target and start the daemon.

        Any failure, the deadline included, undoes what this call made (target directory,
        ephemeral ciphertext); the deadline is checked between the steps and bounds each
        subprocess.
        """
        cipher_dir = self._locate(req, ctx, ephemeral)
        capacity = 0 if ephemeral else self._capacity_hint(ctx, cipher_dir)
        key: VolumeKey
        try:
            key = resolve_volume_key(
                req.volume_id,
                ctx,
                dict(req.secrets or {}),
                self.resolver,
                ephemeral=ephemeral,
                allowed_key_resources=self.allowed_key_resources,
                allowed_kids=self.allowed_signing_kids,
            )
            deadline.check("initialising the volume")
            mounter = self.mounters[self.mounter_name]
            if key.source == "ephemeral-random" and mounter.is_initialised(cipher_dir):
                # Its random key died with the plugin instance that made it: the old data is
                # unreadable by anyone, so start the scratch volume afresh.
                log.warning(
                    "re-creating ephemeral volume whose key is gone",
                    extra={"fields": {"volume_id": req.volume_id}},
                )
                self._remove_ephemeral(req.volume_id)
                os.mkdir(cipher_dir, 0o700)
            intent = Publication(
                req.volume_id,
                target,
                cipher_dir,
                self.mounter_name,
                readonly,
                mode,
                ephemeral=ephemeral,
                phase=INTENT,
                capacity_bytes=capacity,
            )
            return self._init_and_start(intent, key, deadline)
        except BaseException:
            if ephemeral:
                self._remove_ephemeral(req.volume_id)
            raise

    def _mount_object(
        self,
        req: PublishRequest,
        ctx: Mapping[str, str],
        target: str,
        readonly: bool,
        mode: int,
        ephemeral: bool,
        deadline: Deadline,
    ) -> Publication:
        """A bucket prefix (csi_driver/volumes/objectmount.py): parameters checked against
        the node's flags, credentials and key resolved here, first publish initialises an
        empty prefix. Recorded as not ephemeral: unpublish never deletes bucket data."""
        key = self._resolve_object(req, ctx, ephemeral, fresh_credentials=False)
        assert key.spec is not None
        location = object_location(key.spec)
        readonly = readonly or key.spec.read_only
        # One lock per location (volume ids cannot hold ':'), so two volume ids naming one
        # prefix cannot both pass the single-writer check.
        with self._holding(self._volume_locks, f"object:{location}", deadline, location):
            for other in self.store.all():
                if (
                    other.mounter == OBJECT_MOUNTER
                    and other.cipher_dir == location
                    and other.volume_id != req.volume_id
                    and not (readonly and other.readonly)
                ):
                    raise errors.FailedPrecondition(
                        f"{location} is already published writable by volume {other.volume_id}; "
                        "two daemons must not write one prefix"
                    )
            intent = Publication(
                req.volume_id,
                target,
                location,
                OBJECT_MOUNTER,
                readonly,
                mode,
                phase=INTENT,
                capacity_bytes=self._object_capacity(ctx),
            )
            return self._init_and_start(intent, key, deadline)

    def _resolve_object(
        self,
        req: PublishRequest,
        ctx: Mapping[str, str],
        ephemeral: bool,
        *,
        fresh_credentials: bool,
    ) -> ObjectKey:
        return resolve_object_volume(
            req.volume_id,
            ctx,
            dict(req.secrets or {}),
            self.resolver,
            self.object_policy,
            ephemeral=ephemeral,
            allowed_key_resources=self.allowed_key_resources,
            allowed_kids=self.allowed_signing_kids,
            fresh_credentials=fresh_credentials,
        )

    def _republish_object(
        self, req: PublishRequest, ctx: Mapping[str, str], target: str, ephemeral: bool
    ) -> None:
        """A NodePublishVolume for a live bucket publication: re-resolve the credentials
        from the request (sealed values unsealed past the resolver cache; kubelet sends
        the newest node-publish secret) and hand them to the running daemon if they
        changed, without a remount. Nothing else may change: another location, endpoint,
        region or volume key is ALREADY_EXISTS (the CSI spec's "published but
        incompatible"), and the daemon checks location and endpoint once more itself."""
        key = self._resolve_object(req, ctx, ephemeral, fresh_credentials=True)
        assert key.spec is not None
        pub = self.store.get(target)
        assert pub is not None  # _reuse_existing found it live under our target lock
        incompatible = errors.AlreadyExists(
            f"volume {req.volume_id} is already published at {target} from another bucket, "
            "prefix, endpoint or volume key; a republish may only refresh credentials"
        )
        if pub.mounter != OBJECT_MOUNTER or pub.cipher_dir != object_location(key.spec):
            raise incompatible
        handle = self.supervisor.get(target)
        held = handle.key if handle is not None and isinstance(handle.key, ObjectKey) else None
        if held is not None:
            assert held.spec is not None
            same_place = (held.spec.kind, held.spec.endpoint, held.spec.region) == (
                key.spec.kind,
                key.spec.endpoint,
                key.spec.region,
            )
            same_key = held.scrypt_logn == key.scrypt_logn and hmac.compare_digest(
                held.password, key.password
            )
            if not (same_place and same_key):
                raise incompatible
            if held.credentials_equal(key):
                return  # the idempotent, cheap case: nothing to hand over
        mounter = self.mounters[OBJECT_MOUNTER]
        assert isinstance(mounter, ObjectStoreMounter)
        changed = mounter.push_credentials(target, key)
        if handle is not None and held is not None:
            # A daemon restarted by the supervisor from now on starts with these.
            handle.key = held.with_credentials(key)
        log.info(
            "object-store credentials refreshed",
            extra={"fields": {"volume_id": req.volume_id, "target": target, "changed": changed}},
        )

    def _init_and_start(
        self, intent: Publication, key: VolumeKey, deadline: Deadline
    ) -> Publication:
        """Initialise a new volume, record the intent, create the target, start the
        daemon, record it mounted; undo what this call made on any failure."""
        deadline.check("initialising the volume")
        mounter = self.mounters[intent.mounter]
        if mounter.ensure_initialised(intent.cipher_dir, key, deadline):
            log.info(
                "initialised volume",
                extra={"fields": {"volume_id": intent.volume_id, "key_source": key.source}},
            )
        deadline.check("mounting the volume")
        target = intent.target_path
        # Recorded before anything is mounted: a restart at any later step finds it
        # and undoes the half-done publish (recover).
        self.store.put(intent)
        try:
            created = self._make_target(target)
            try:
                handle = self.supervisor.start(intent, key, timeout=deadline.timeout(READY_TIMEOUT))
            except BaseException:
                if created:
                    with contextlib.suppress(errors.CsiError):
                        self._remove_target(target)
                raise
        except BaseException:
            self.store.remove(target)
            raise
        started = mounter.start_time(handle.pid)
        pub = self.store.update(target, phase=MOUNTED, pid=handle.pid, pid_start=started)
        assert pub is not None  # the target lock keeps the intent ours
        return pub

    def _reuse_existing(self, volume_id: str, target: str, readonly: bool, mode: int) -> bool:
        """True if an identical publication is already live (idempotent OK)."""
        pub = self.store.get(target)
        if pub is None:
            entry = self.mounts.find(target)
            if entry is None:
                return False
            if self._dead(target):
                self.mounts.detach(target, lazy=True)  # stale FUSE mount: let kubelet's retry in
                return False
            raise errors.AlreadyExists(f"target_path {target} is already a mount point")
        if pub.volume_id != volume_id:
            raise errors.AlreadyExists(
                f"target_path {target} is already used by volume {pub.volume_id}"
            )
        if pub.phase == MOUNTED and self._live(target):
            if pub.readonly != readonly or pub.access_mode != int(mode):
                raise errors.AlreadyExists(
                    f"volume {volume_id} is already published at {target} with a different "
                    "readonly flag or access mode"
                )
            return True
        # Recorded but dead (daemon crashed, or the plugin restarted): clean and remount.
        log.warning("remounting dead publication", extra={"fields": {"target": target}})
        self.supervisor.stop(target, dead=True)
        self.store.remove(target)
        return False

    def _check_conflicts(self, volume_id: str, target: str, readonly: bool) -> None:
        others = self.store.of_volume(volume_id)
        count = len(self.store)
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
            with os.scandir(target) as it:
                if next(it, None) is not None:
                    raise errors.FailedPrecondition(f"target_path {target} is not empty") from None
            return False
        except FileNotFoundError:
            os.makedirs(target, 0o750, exist_ok=True)
            return True

    # -- unpublish -----------------------------------------------------------------------

    def unpublish(self, volume_id: str, target_path: str, deadline: Deadline | None = None) -> None:
        """NodeUnpublishVolume: unmount, then rmdir the target; OK if already gone.

        Never deletes data: the target is only ever rmdir'ed (a non-empty one is kept and
        reported), nothing is removed across a mount point, and the target must be an
        absolute path below the kubelet root, resolved once.
        """
        deadline = deadline or Deadline()
        validate.volume_id(volume_id)
        target = self._target(target_path)
        with (
            self._busy(),
            self._holding(self._target_locks, target, deadline, f"target {target}"),
        ):
            if self.block.owns(target):
                self.block.unpublish(volume_id, target)
                return
            pub = self.store.get(target)
            if pub is not None and pub.volume_id != volume_id:
                raise errors.NotFound(f"volume {volume_id} is not published at {target}")
            mounts = self.mounts.all()
            entry = mounts.get(target)
            foreign = entry is not None and entry.fstype not in self._our_fs_types()
            if pub is None and foreign and entry is not None and not self._dead(target):
                raise errors.FailedPrecondition(
                    f"target_path {target} is a {entry.fstype} mount this driver did not make"
                )
            below = [mp for mp in mounts if validate.is_below(mp, target)]
            if below:
                raise errors.FailedPrecondition(
                    f"target_path {target} has {len(below)} other mount(s) below it; "
                    "not unmounting or removing anything"
                )
            state = self.mounts.probe(target, PROBE_TIMEOUT) if entry is not None else ""
            try:
                self.supervisor.stop(target, hung=state == "hung", dead=state == "dead")
            except MountBusy as exc:
                raise errors.FailedPrecondition(f"target_path {exc.strerror}") from None
            except OSError as exc:
                raise errors.Internal(f"cannot unmount {target}: {exc.strerror or exc}") from None
            self.store.remove(target)
            self._refresh_gauge()
            if pub is not None and pub.ephemeral:
                self._remove_ephemeral(pub.volume_id)
            self._remove_target(target)
            log.info("unpublished", extra={"fields": {"volume_id": volume_id, "target": target}})

    def _remove_target(self, target: str) -> None:
        """rmdir only: whatever is left in an unmounted target is somebody's data."""
        if self.mounts.find(target) is not None:
            raise errors.Internal(f"{target} is still mounted; not removing it")
        try:
            os.rmdir(target)
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise errors.FailedPrecondition(
                f"target_path {target} is not a directory; not removing it"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise errors.FailedPrecondition(
                    f"target_path {target} is unmounted but not empty; its contents are kept "
                    "(remove them by hand if they are not needed)"
                ) from None
            raise errors.Internal(f"cannot remove {target}: {exc.strerror}") from None

    def _remove_ephemeral(self, volume_id: str) -> None:
        """Delete an inline ephemeral volume's ciphertext: only ever the directory
        ``<ephemeral_root>/<valid volume id>``, not a symlink, nothing mounted inside."""
        path = self._ephemeral_dir(volume_id)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        fields = {"volume_id": volume_id}
        if not stat.S_ISDIR(st.st_mode) or os.path.realpath(path) != path:
            log.error(
                "ephemeral directory is not a plain directory; kept", extra={"fields": fields}
            )
            return
        if any(mp == path or validate.is_below(mp, path) for mp in self.mounts.all()):
            log.error("ephemeral directory has a mount inside; kept", extra={"fields": fields})
            return
        # fd-based on Linux (shutil.rmtree.avoids_symlink_attacks): links are removed, not
        # followed.
        shutil.rmtree(path, ignore_errors=True)

    # -- stats ---------------------------------------------------------------------------

    def stats(self, volume_id: str, volume_path: str) -> VolumeStats:
        validate.volume_id(volume_id)
        try:
            target = self._target(volume_path, "volume_path")
        except errors.InvalidArgument:
            # Malformed (empty, NUL, oversize) stays INVALID_ARGUMENT; a well-formed path we
            # do not serve is, by the spec, a volume not published there.
            validate.path_text(volume_path, "volume_path")
            raise errors.NotFound(f"volume {volume_id} is not published at that path") from None
        block = self.block.store.get(target)
        if block is not None:
            if block.volume_id != volume_id or block.phase != MOUNTED:
                raise errors.NotFound(f"volume {volume_id} is not published at {target}")
            with self._busy():
                why = self.block.condition(target)
                raw = self.block.raw_size(target)
                if raw is not None:  # raw block access: a size, no filesystem to measure
                    return VolumeStats(raw, 0, 0, 0, 0, 0, abnormal=why)
                return replace(_vfs_stats(self.block.statvfs(target)), abnormal=why)
        pub = self.store.get(target)
        if pub is None or pub.volume_id != volume_id or pub.phase != MOUNTED:
            raise errors.NotFound(f"volume {volume_id} is not published at {target}")
        with self._busy():
            if not self._live(target):
                raise errors.NotFound(f"volume {volume_id} at {target} is not mounted")
            try:
                st = self.mounts.statvfs(target, PROBE_TIMEOUT)
            except fsprobe.MountHung:
                raise errors.Unavailable(
                    f"volume {volume_id} at {target} is not answering (storage hung?)"
                ) from None
            except OSError as exc:
                raise errors.NotFound(
                    f"volume {volume_id} at {target} is not usable: {exc.strerror}"
                ) from None
            if pub.mounter == OBJECT_MOUNTER:
                return self._object_stats(pub, st)
            if pub.capacity_bytes:
                return self._own_stats(pub, st)
        return _vfs_stats(st)

    def _object_stats(self, pub: Publication, st: os.statvfs_result) -> VolumeStats:
        """A bucket volume's own numbers, measured by its daemon (which holds the
        credentials and the listing code) over its control socket: BYTES used = the
        ciphertext stored under the prefix plus what open files have grown by and not yet
        uploaded, INODES used = objects (directory markers included). Total = the recorded
        capacity, else the mount's synthetic statfs size (a bucket has no size); inodes
        total = the synthetic statfs count. A daemon that cannot say (no socket, from
        before STATS) leaves the synthetic statfs numbers, as before."""
        mounter = self.mounters[OBJECT_MOUNTER]
        assert isinstance(mounter, ObjectStoreMounter)
        got = mounter.volume_usage(pub.target_path, pub.cipher_dir)
        if got is None:
            return _vfs_stats(st)
        used = min(got.stored_bytes + got.pending_bytes, _INT64_MAX)
        total = pub.capacity_bytes or min(st.f_blocks * st.f_frsize, _INT64_MAX)
        return VolumeStats(
            bytes_total=total,
            bytes_available=max(0, total - used),
            bytes_used=used,
            inodes_total=st.f_files,
            inodes_available=max(0, st.f_files - got.objects),
            inodes_used=min(got.objects, _INT64_MAX),
        )

    def _own_stats(self, pub: Publication, st: os.statvfs_result) -> VolumeStats:
        """The volume's own numbers: its recorded capacity and what its ciphertext
        directory holds (not the host filesystem's, which the volume merely shares)."""
        try:
            used, entries = fsprobe.call(pub.cipher_dir, usage.tree_usage, PROBE_TIMEOUT)
        except fsprobe.MountHung:
            raise errors.Unavailable(
                f"volume {pub.volume_id}: its storage is not answering"
            ) from None
        except OSError as exc:
            raise errors.Internal(
                f"volume {pub.volume_id}: cannot measure its directory: {exc.strerror or exc}"
            ) from None
        return VolumeStats(
            bytes_total=pub.capacity_bytes,
            bytes_available=max(0, pub.capacity_bytes - used),
            bytes_used=used,
            inodes_total=st.f_files,
            inodes_available=st.f_favail,
            inodes_used=entries,
        )

    def _staged_block(self, staging_path: str) -> bool:
        """A block volume is staged there (its device may have come in publish_context,
        which NodePublishVolume does not repeat)."""
        try:
            return self.block.staged(self._target(staging_path, "staging_target_path")) is not None
        except errors.InvalidArgument:
            return False

    # -- staging (block volumes) ------------------------------------------------------------

    def stage(self, req: StageRequest, deadline: Deadline | None = None) -> None:
        """NodeStageVolume: block volumes are unlocked and mounted at the staging path;
        for directory volumes (no device named) it only validates the request."""
        deadline = deadline or Deadline()
        validate.volume_id(req.volume_id)
        _require(req.staging_target_path, "staging_target_path")
        if req.capability is None:
            raise errors.InvalidArgument("volume_capability is required")
        staging = self._target(req.staging_target_path, "staging_target_path")
        if not is_block(req.volume_context, req.publish_context):
            problem = unsupported(req.capability)
            if problem is not None:
                raise (errors.InvalidArgument if problem.missing else errors.FailedPrecondition)(
                    problem.message
                )
            return
        with (
            self._busy(),
            self._holding(self._target_locks, staging, deadline, f"staging path {staging}"),
            self._holding(self._volume_locks, req.volume_id, deadline, f"volume {req.volume_id}"),
        ):
            self.block.stage(req, deadline)

    def unstage(self, volume_id: str, staging_path: str, deadline: Deadline | None = None) -> None:
        """NodeUnstageVolume: undo a block stage (idempotent); a no-op for other volumes."""
        deadline = deadline or Deadline()
        validate.volume_id(volume_id)
        _require(staging_path, "staging_target_path")
        staging = self._target(staging_path, "staging_target_path")
        if not self.block.owns(staging):
            return
        with (
            self._busy(),
            self._holding(self._target_locks, staging, deadline, f"staging path {staging}"),
        ):
            self.block.unstage(volume_id, staging)

    def expand(self, volume_id: str, volume_path: str, staging_path: str = "") -> int:
        """NodeExpandVolume: block volumes grow with their disk; others have nothing to do
        (their capacity is a hint) and report 0 (kubelet then keeps the requested size)."""
        validate.volume_id(volume_id)
        _require(volume_path, "volume_path")
        try:
            path = self._target(volume_path, "volume_path")
            staging = self._target(staging_path, "staging_target_path") if staging_path else ""
        except errors.InvalidArgument:
            # As for stats: malformed stays INVALID_ARGUMENT, a path we do not serve is a
            # volume that is not there.
            validate.path_text(volume_path, "volume_path")
            raise errors.NotFound(f"volume {volume_id} is not published at that path") from None
        if not (self.block.owns(path) or (staging and self.block.owns(staging))):
            if self.store.get(path) is None:
                raise errors.NotFound(f"volume {volume_id} is not published at {path}")
            return 0
        with self._busy():
            return self.block.expand(volume_id, path, staging)

    # -- shutdown ------------------------------------------------------------------------

    def shutdown(self, *, unmount: bool = False) -> None:
        """Stop supervising. Mounts stay up unless ``unmount`` (they outlive the plugin)."""
        if unmount:
            for pub in self.publications():
                try:
                    self.unpublish(pub.volume_id, pub.target_path)
                except errors.CsiError as exc:
                    log.error("unpublish at shutdown failed", extra={"fields": {"err": exc}})
            self.block.shutdown()
        self.supervisor.shutdown()


def _vfs_stats(st: os.statvfs_result) -> VolumeStats:
    return VolumeStats(
        bytes_total=st.f_blocks * st.f_frsize,
        bytes_available=st.f_bavail * st.f_frsize,
        bytes_used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        inodes_total=st.f_files,
        inodes_available=st.f_favail,
        inodes_used=st.f_files - st.f_ffree,
    )
