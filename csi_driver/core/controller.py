"""Controller core: the `coco` StorageClass's volumes as subdirectories of a local root.

The controller runs outside the TEE and never sees a key: it only allocates ciphertext
directories and passes the StorageClass's key resource *reference* on to the node in
volume_context. The gocryptfs volume itself is initialised by the node plugin, inside the
guest, on first publish (object-store prefixes: see below, a confidential controller
initialises them in CreateVolume).

Capacity is recorded, checked against the backing filesystem's free space and passed on in
volume_context (capacityBytes); the node enforces it in the mount (fuse-crypt --capacity),
since a plain directory has no quota of its own.

Object-store StorageClasses (parameters naming a ``bucket`` or ``objectStore``,
csi_driver/volumes/objectstore.py) get a *prefix*, not a directory: CreateVolume allocates
the name ``<path>/<volume_id>`` and records it. Credential and passphrase parameters must be
sealed strings (or come from a secret): the controller passes them on unopened. Who writes
the prefix's ``gocryptfs.conf`` and root diriv: a *confidential* controller (started with a
resolver, like the node; an :class:`ObjectDeleter`) does it in CreateVolume, by the node's
own code and with the same volume key, when the class parameters and the provisioner
secret carry the credentials and the key (``ObjectDeleter.initialise``); otherwise the node
initialises the empty prefix at first publish, inside the guest, as before.

DeleteVolume of an object-store volume depends on the class's ``onDelete``
(csi_driver/volumes/objectdelete.py): ``retain`` (the default) forgets the record and leaves
the objects; ``delete`` empties exactly ``<path>/<volume_id>/``, which needs the bucket's
credentials and so a controller that may unseal them: one started with a resolver, as a
confidential pod configured like the node (an :class:`ObjectDeleter`). A controller without
one refuses ``onDelete: delete`` classes at CreateVolume and fails DeleteVolume for such
volumes (FAILED_PRECONDITION, objects kept) rather than silently keeping what the class said
to delete.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Any

from csi_driver import errors, validate
from csi_driver.constants import (
    CTX_CAPACITY,
    CTX_CIPHER_DIR,
    PARAM_KEY_RESOURCE,
    RESERVED_PREFIX,
)
from csi_driver.core.volcap import Capability, unsupported
from csi_driver.deadline import Deadline
from csi_driver.hostfile import read_json, write_json_atomic
from csi_driver.keys import check_key_uri
from csi_driver.volumes import blockdev
from csi_driver.volumes.objectdelete import PARAM_ON_DELETE, ObjectDeleter, on_delete
from csi_driver.volumes.objectstore import (
    CDH_IGNORED,
    COMMON_NAMES,
    OSS_NAMES,
    PARAM_KIND,
    S3_NAMES,
    SECRET_FIELDS,
)
from sealed_secrets.resolver import is_sealed

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1 << 30  # 1 GiB when the claim asks for nothing specific
MAX_NAME_BYTES = 1024
_BANNED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
KNOWN_PARAMETERS = frozenset({PARAM_KEY_RESOURCE})
OBJECT_PARAMETERS = frozenset(
    {
        PARAM_KIND,
        PARAM_KEY_RESOURCE,
        PARAM_ON_DELETE,
        *COMMON_NAMES,
        *OSS_NAMES,
        *S3_NAMES,
        *CDH_IGNORED,
    }
)
OBJECT_SECRET_PARAMETERS = frozenset(
    name
    for names in (OSS_NAMES, S3_NAMES)
    for name, field_ in names.items()
    if field_ in SECRET_FIELDS
)


def is_object_parameters(parameters: Mapping[str, str]) -> bool:
    """A StorageClass for bucket volumes (the node's test, csi_driver/volumes/objectmount)."""
    return "bucket" in parameters or PARAM_KIND in parameters


INDEX_DIR = ".coco-csi"
INIT_BUDGET = 60.0  # seconds for a CreateVolume's prefix init (HEAD, scrypt, create-only PUTs)
MAX_INDEX_BYTES = 64 << 20


@dataclass
class VolumeRecord:
    volume_id: str
    name: str
    capacity_bytes: int
    parameters: dict[str, str] = field(default_factory=dict)
    kind: str = "dir"  # "dir" | "object"

    def context(self, root: str) -> dict[str, str]:
        if self.kind == "object":
            # The StorageClass's (non-secret or sealed) parameters, with the volume's own
            # prefix under the class's base path. A bucket has no quota: the capacity is
            # recorded only so NodeGetVolumeStats can report it as the volume's total.
            ctx = {k: v for k, v in self.parameters.items() if k not in ("prefix", PARAM_ON_DELETE)}
            base = (self.parameters.get("path") or self.parameters.get("prefix") or "").strip("/")
            ctx["path"] = f"{base}/{self.volume_id}" if base else self.volume_id
            if self.capacity_bytes:
                ctx[CTX_CAPACITY] = str(self.capacity_bytes)
            return ctx
        ctx = {
            CTX_CIPHER_DIR: os.path.join(root, self.volume_id),
            CTX_CAPACITY: str(self.capacity_bytes),
        }
        if PARAM_KEY_RESOURCE in self.parameters:
            ctx[PARAM_KEY_RESOURCE] = self.parameters[PARAM_KEY_RESOURCE]
        return ctx


class LocalBackend:
    """Volume allocation under ``root``; index in ``root/.coco-csi/volumes.json``."""

    def __init__(
        self,
        root: str,
        *,
        default_key_resource: str | None = None,
        object_deleter: ObjectDeleter | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.default_key_resource = default_key_resource
        # None, or one without a resolver: object-store volumes are never deleted here.
        self.object_deleter = object_deleter
        os.makedirs(os.path.join(self.root, INDEX_DIR), mode=0o700, exist_ok=True)
        self._index_path = os.path.join(self.root, INDEX_DIR, "volumes.json")
        self._lock_path = os.path.join(self.root, INDEX_DIR, "lock")
        self._lock = threading.Lock()

    # -- index (file-locked so two controller replicas cannot race) -----------------------

    def _locked(self) -> AbstractContextManager[dict[str, VolumeRecord]]:
        backend = self

        class _Ctx:
            def __enter__(self) -> dict[str, VolumeRecord]:
                backend._lock.acquire()
                self.fd = os.open(backend._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
                return backend._load()

            def __exit__(self, *exc: object) -> None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                backend._lock.release()

        return _Ctx()

    def _load(self) -> dict[str, VolumeRecord]:
        try:
            doc: Any = read_json(self._index_path, MAX_INDEX_BYTES)  # checked by use, below
            return {v["volume_id"]: VolumeRecord(**v) for v in doc.get("volumes", [])}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            raise errors.Internal(f"volume index {self._index_path} is unreadable") from None

    def _store(self, vols: Mapping[str, VolumeRecord]) -> None:
        # Durable: the controller's index must survive a reboot of its host.
        write_json_atomic(
            self._index_path, {"volumes": [asdict(v) for v in vols.values()]}, durable=True
        )

    # -- operations ----------------------------------------------------------------------

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _check_parameters(self, parameters: Mapping[str, str]) -> dict[str, str]:
        params = {k: v for k, v in parameters.items() if not k.startswith(RESERVED_PREFIX)}
        unknown = sorted(set(params) - KNOWN_PARAMETERS)
        if unknown:
            raise errors.InvalidArgument(f"unknown StorageClass parameters: {', '.join(unknown)}")
        if PARAM_KEY_RESOURCE not in params:
            if not self.default_key_resource:
                raise errors.InvalidArgument(
                    f"StorageClass parameter {PARAM_KEY_RESOURCE} (kbs:///repo/type/tag) "
                    "is required"
                )
            params[PARAM_KEY_RESOURCE] = self.default_key_resource
        check_key_uri(params[PARAM_KEY_RESOURCE])
        return params

    @staticmethod
    def _capacity(required: int, limit: int) -> int:
        if required < 0 or limit < 0:
            raise errors.InvalidArgument("capacity_range values must not be negative")
        if limit and required > limit:
            raise errors.InvalidArgument("capacity_range.required_bytes exceeds limit_bytes")
        if required:
            return required
        return min(DEFAULT_CAPACITY, limit) if limit else DEFAULT_CAPACITY

    def create(
        self,
        name: str,
        capabilities: Sequence[Capability],
        parameters: Mapping[str, str],
        *,
        required_bytes: int = 0,
        limit_bytes: int = 0,
        has_content_source: bool = False,
        secrets: Mapping[str, str] | None = None,
    ) -> tuple[VolumeRecord, dict[str, str]]:
        """CreateVolume; idempotent by name. Returns the record and its volume_context.
        ``secrets`` (the provisioner secret) is read only for an object-store class with
        ``onDelete: delete``, to check now that the volume can be deleted later."""
        if not name:
            raise errors.InvalidArgument("name is required")
        if len(name.encode()) > MAX_NAME_BYTES or _BANNED.search(name):
            raise errors.InvalidArgument("name is too long or contains control characters")
        if not capabilities:
            raise errors.InvalidArgument("volume_capabilities is required")
        for cap in capabilities:
            problem = unsupported(cap)
            if problem:
                raise errors.InvalidArgument(problem.message)
        if has_content_source:
            raise errors.InvalidArgument(
                "volume content sources (clone/snapshot) are not supported"
            )
        if is_object_parameters(parameters):
            return self._create_object(name, parameters, required_bytes, limit_bytes, secrets or {})
        params = self._check_parameters(parameters)
        capacity = self._capacity(required_bytes, limit_bytes)
        with self._locked() as vols:
            for rec in vols.values():
                if rec.name != name:
                    continue
                fits = rec.capacity_bytes >= required_bytes and (
                    not limit_bytes or rec.capacity_bytes <= limit_bytes
                )
                if not fits or rec.parameters != params:
                    raise errors.AlreadyExists(
                        f"volume {name!r} exists with a different capacity or parameters"
                    )
                os.makedirs(os.path.join(self.root, rec.volume_id), mode=0o700, exist_ok=True)
                return rec, rec.context(self.root)
            if capacity > self.free_bytes():
                raise errors.OutOfRange(
                    f"requested {capacity} bytes but the backend has only {self.free_bytes()} free"
                )
            rec = VolumeRecord(f"coco-{uuid.uuid4().hex}", name, capacity, params)
            os.mkdir(os.path.join(self.root, rec.volume_id), 0o700)
            vols[rec.volume_id] = rec
            self._store(vols)
        log.info(
            "created volume", extra={"fields": {"volume_id": rec.volume_id, "bytes": capacity}}
        )
        return rec, rec.context(self.root)

    def _check_object_parameters(self, parameters: Mapping[str, str]) -> dict[str, str]:
        """Known names only; credentials and passphrases sealed (the controller must not
        hold them in plaintext, unless its operator opted in like the node's); a
        keyResource well formed; onDelete delete|retain. Everything else (endpoint, bucket,
        allow-lists) is the node's to check against its own flags (and, for onDelete:
        delete, the controller's own, in _create_object)."""
        deleter = self.object_deleter
        plaintext_ok = deleter is not None and deleter.policy.allow_plaintext_secrets
        params = {k: v for k, v in parameters.items() if not k.startswith(RESERVED_PREFIX)}
        unknown = sorted(set(params) - OBJECT_PARAMETERS)
        if unknown:
            raise errors.InvalidArgument(
                f"unknown object-store StorageClass parameters: {', '.join(unknown)}"
            )
        for name in sorted(OBJECT_SECRET_PARAMETERS & set(params)):
            if params[name] and not is_sealed(params[name]) and not plaintext_ok:
                raise errors.InvalidArgument(
                    f"StorageClass parameter {name} must be a sealed secret (sealed.*) or "
                    "come from the node-publish secret"
                )
        if PARAM_KEY_RESOURCE in params:
            check_key_uri(params[PARAM_KEY_RESOURCE])
        if not params.get("bucket"):
            raise errors.InvalidArgument("object-store StorageClass parameter bucket is required")
        on_delete(params)
        return params

    def _create_object(
        self,
        name: str,
        parameters: Mapping[str, str],
        required_bytes: int,
        limit_bytes: int,
        secrets: Mapping[str, str],
    ) -> tuple[VolumeRecord, dict[str, str]]:
        """Allocate a prefix name (idempotent by name); then, with a confidential
        controller, initialise the prefix (see the module docstring)."""
        params = self._check_object_parameters(parameters)
        capacity = self._capacity(required_bytes, limit_bytes)
        with self._locked() as vols:
            rec = next((r for r in vols.values() if r.name == name), None)
            if rec is not None:
                # A repeated CreateVolume: its init may have failed or not run yet.
                if rec.kind != "object" or rec.parameters != params:
                    raise errors.AlreadyExists(f"volume {name!r} exists with different parameters")
            else:
                rec = self._new_object_record(name, capacity, params, secrets)
                vols[rec.volume_id] = rec
                self._store(vols)
                log.info(
                    "allocated object-store volume",
                    extra={"fields": {"volume_id": rec.volume_id}},
                )
        self._initialise_object(rec, secrets)
        return rec, rec.context(self.root)

    def _new_object_record(
        self, name: str, capacity: int, params: dict[str, str], secrets: Mapping[str, str]
    ) -> VolumeRecord:
        """A new record; a class with ``onDelete: delete`` only if it can be deleted later."""
        rec = VolumeRecord(f"coco-{uuid.uuid4().hex}", name, capacity, params, "object")
        if on_delete(params) == "delete":
            if self.object_deleter is None:
                raise errors.FailedPrecondition(
                    f"{PARAM_ON_DELETE}: delete needs a controller started with --resolver "
                    "(a confidential pod that may unseal bucket credentials); this one "
                    "keeps objects, so the class is refused"
                )
            self.object_deleter.check_class(params, rec.volume_id, secrets)
        return rec

    def _initialise_object(self, rec: VolumeRecord, secrets: Mapping[str, str]) -> None:
        """With a confidential controller, initialise the new prefix now (the node's own
        code, csi_driver/volumes/objectdelete.py ``ObjectDeleter.initialise``); without
        one, the node initialises it at first publish.  Runs after the record is stored
        and without the index lock: a failure leaves the record, and the provisioner's
        retry of CreateVolume (same name, same volume id) finishes the init idempotently."""
        if self.object_deleter is None:
            return
        self.object_deleter.initialise(
            rec.volume_id, rec.context(self.root), secrets, Deadline(INIT_BUDGET)
        )

    def delete(
        self,
        volume_id: str,
        *,
        secrets: Mapping[str, str] | None = None,
        deadline: Deadline | None = None,
    ) -> None:
        """DeleteVolume; unknown ids are OK (idempotent). An object-store volume's objects
        are removed first when its class says ``onDelete: delete`` (the bucket work runs
        without the index lock: it may take the whole call), then the record is dropped;
        with ``retain`` only the record goes (see the module docstring)."""
        validate.volume_id(volume_id)
        rec = self.get(volume_id)
        if rec is not None and rec.kind == "object" and on_delete(rec.parameters) == "delete":
            if self.object_deleter is None:
                raise errors.FailedPrecondition(
                    f"volume {volume_id} has {PARAM_ON_DELETE}: delete but this controller "
                    "has no resolver: its objects are kept and the call fails so the PV stays "
                    "until a confidential controller deletes it"
                )
            self.object_deleter.delete(
                rec.parameters, volume_id, secrets or {}, deadline or Deadline()
            )
        with self._locked() as vols:
            rec = vols.pop(volume_id, None)
            if rec is None:
                return
            path = os.path.join(self.root, volume_id)
            if rec.kind != "object" and os.path.isdir(path):
                shutil.rmtree(path)
            self._store(vols)
        log.info("deleted volume", extra={"fields": {"volume_id": volume_id}})

    def get(self, volume_id: str) -> VolumeRecord | None:
        with self._locked() as vols:
            return vols.get(volume_id)

    def validate(
        self,
        volume_id: str,
        capabilities: Sequence[Capability],
        volume_context: Mapping[str, str] | None = None,
    ) -> str | None:
        """ValidateVolumeCapabilities: None if all confirmed, else why not.

        Volumes of the index (directory and object-store volumes) are checked against
        their kind: mount access only. A block volume is a static PV the controller never
        created: it is known by the volume context the node will stage it with (a
        ``devicePath`` or ``deviceId``), and confirmed, raw block access included, when that
        context and each capability pass the node's own stage checks that need no device
        (csi_driver/volumes/blockdev.py). Whether the disk exists, is empty, or opens with
        its key, and whether the node has the kernel engine a ``dataIntegrity`` volume
        needs, only the node can tell at NodeStageVolume.
        """
        validate.volume_id(volume_id)
        if not capabilities:
            raise errors.InvalidArgument("volume_capabilities is required")
        if self.get(volume_id) is None:
            if blockdev.is_block_context(volume_context):
                assert volume_context is not None
                return _block_problem(capabilities, volume_context)
            raise errors.NotFound(f"volume {volume_id} does not exist")
        for cap in capabilities:
            problem = unsupported(cap)
            if problem:
                return problem.message
        return None


def _block_problem(capabilities: Sequence[Capability], ctx: Mapping[str, str]) -> str | None:
    """Why a static block PV's capabilities or context would not stage, or None."""
    try:
        blockdev.check_device_names(ctx)
        for cap in capabilities:
            problem = unsupported(cap, allow_block=True)
            if problem:
                return problem.message
            readonly = cap.readonly_mode or "ro" in cap.mount_flags
            blockdev.stage_parameters(ctx, cap.fs_type, readonly)
        if ctx.get(PARAM_KEY_RESOURCE):
            check_key_uri(ctx[PARAM_KEY_RESOURCE])
    except errors.CsiError as exc:
        return str(exc)
    return None
