"""DeleteVolume for object-store volumes: remove ``<class path>/<volume_id>/`` and nothing else.

Why this lives apart from the controller's index: deleting objects needs the bucket's
credentials, which are sealed and may only be unsealed inside an attested TEE.  The
controller therefore deletes only when it was started *with a resolver* (then it runs as a
confidential pod, configured like the node: same ``--resolver``, same
``--allowed-object-*`` flags, same CA bundle), and only for StorageClasses that ask for it
with ``onDelete: delete``.  Without a resolver it keeps the objects, as before.

The name and values follow csi-driver-nfs and csi-driver-smb (``onDelete``); the default is
``retain``, unlike theirs, because (1) deleting a bucket prefix cannot be undone (there is no
snapshot or trash), (2) the StorageClass and the DeleteVolume call both come from the control
plane, which is outside the trust boundary, so the tenant opts in per class, and (3) every
object-store volume made before this version was kept, and upgrading must not change that.

What may be deleted is derived here, never taken from the bucket or the request alone:

* the volume id must be one the controller could have allocated (``validate.volume_id``);
* the class path goes through the same normaliser as the node's parser (no ``.``/``..``/
  empty components);
* the prefix is exactly ``<class path>/<volume_id>/``: never empty, never ``/``, never the
  class root, always ending in ``/`` (so ``coco-1`` does not cover ``coco-10/``);
* every listed key must start with that prefix, or the page is refused *before* its delete
  request (a hostile store that lists a key outside the volume gets no delete for it);
* listings are paged (continuation tokens that must advance, at most ``MAX_PAGES`` pages),
  deletes are batched (at most 1,000 keys per request, the S3/OSS limit), every request goes
  through the retrying transport, and the whole operation is bounded by the call's deadline.

Idempotent: a prefix that is already empty (or a volume deleted before) is success.
Unfinished multipart uploads are not listed by ListObjectsV2 and are left to the bucket's
lifecycle rule (they are invisible to readers and hold only ciphertext).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from csi_driver import errors, validate
from csi_driver.deadline import Deadline
from csi_driver.volumes.objectmount import (
    ObjectNodePolicy,
    check_object_location,
    object_location,
    unseal_credential,
)
from csi_driver.volumes.objectstore import (
    MAX_PREFIX,
    ObjectVolumeSpec,
    normalise_prefix,
    parse_object_volume,
)
from sealed_secrets.resolver import Resolver

__all__ = [
    "DEFAULT_ON_DELETE",
    "PARAM_ON_DELETE",
    "ObjectDeleter",
    "delete_prefix",
    "on_delete",
    "volume_prefix",
]

log = logging.getLogger(__name__)

PARAM_ON_DELETE = "onDelete"
ON_DELETE_VALUES = ("delete", "retain")
DEFAULT_ON_DELETE = "retain"
DELETE_BATCH = 1000  # S3 DeleteObjects / OSS DeleteMultipleObjects limit
MAX_PAGES = 100_000  # 100 M objects: more is a store paging forever
MAX_PASSES = 3  # list-and-delete passes until a listing comes back empty
MAX_KEY_BYTES = 1024
DEFAULT_BUDGET = 120.0  # seconds per DeleteVolume call; the provisioner retries the rest

#: (spec, access key, secret key, session token, ca bundle, retry budget) -> transport
TransportFactory = Callable[[ObjectVolumeSpec, str, str, "str | None", "str | None", float], Any]


def on_delete(parameters: Mapping[str, str]) -> str:
    """The class's ``onDelete`` (``delete`` | ``retain``; default ``retain``)."""
    value = parameters.get(PARAM_ON_DELETE, "").strip().lower()
    if not value:
        return DEFAULT_ON_DELETE
    if value not in ON_DELETE_VALUES:
        raise errors.InvalidArgument(
            f"StorageClass parameter {PARAM_ON_DELETE} must be delete or retain"
        )
    return value


def volume_prefix(class_path: str, volume_id: str) -> str:
    """``<class path>/<volume_id>/``, checked: the only prefix DeleteVolume may empty."""
    validate.volume_id(volume_id)
    base = normalise_prefix(class_path, "StorageClass parameter path")
    prefix = f"{base}{volume_id}/"
    if (
        not prefix.strip("/")
        or prefix == base
        or not prefix.startswith(base)
        or prefix.startswith("/")
        or prefix[len(base) :] != volume_id + "/"
        or len(prefix.encode()) > MAX_PREFIX
    ):
        raise errors.InvalidArgument("the volume's prefix would not be <class path>/<volume_id>/")
    return prefix


def _check_keys(keys: list[str], prefix: str) -> None:
    for key in keys:
        if (
            not isinstance(key, str)
            or not key.startswith(prefix)
            or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES
        ):
            # Never echo the key: it is hostile input and may be huge or contain anything.
            raise errors.FailedPrecondition(
                "the object store listed a key outside the volume's prefix; nothing of that "
                "page was deleted"
            )


def delete_prefix(transport: Any, prefix: str, deadline: Deadline) -> int:
    """Delete every object under ``prefix`` (which must come from :func:`volume_prefix`);
    returns how many keys were sent for deletion.  Raises CsiError; store errors map to
    UNAVAILABLE (transient) or FAILED_PRECONDITION / PERMISSION_DENIED."""
    from fuse_crypt.backend.transport import AccessDenied, ObjectStoreError, TransientError

    if not prefix.endswith("/") or not prefix.strip("/"):
        raise errors.InvalidArgument("refusing to delete an empty or root prefix")
    deleted = 0
    try:
        for _ in range(MAX_PASSES):
            found = 0
            token: str | None = None
            for _page in range(MAX_PAGES):
                deadline.check("listing the volume's objects")
                page = transport.list(prefix, delimiter="", token=token, max_keys=DELETE_BATCH)
                keys = [o.key for o in page.objects]
                if len(keys) > DELETE_BATCH:
                    raise errors.FailedPrecondition("the object store listed an oversize page")
                _check_keys(keys, prefix)
                if keys:
                    deadline.check("deleting the volume's objects")
                    transport.delete_many(keys)
                    found += len(keys)
                if page.next_token is None:
                    break
                if page.next_token == token:
                    raise errors.FailedPrecondition(
                        "the object store's continuation token did not advance"
                    )
                token = page.next_token
            else:
                raise errors.FailedPrecondition("the object store listed too many pages")
            deleted += found
            if not found:
                return deleted
    except AccessDenied:
        raise errors.PermissionDenied(
            "the object store refused these credentials for deleting the volume"
        ) from None
    except TransientError as exc:
        raise errors.Unavailable(f"object store: {exc.strerror}") from None
    except ObjectStoreError as exc:
        raise errors.FailedPrecondition(f"object store: {exc.strerror}") from None
    raise errors.Unavailable(
        "objects kept appearing under the volume's prefix while it was deleted; retry"
    )


def _default_transport(
    spec: ObjectVolumeSpec,
    access_key: str,
    secret_key: str,
    session_token: str | None,
    ca_bundle: str | None,
    budget: float,
) -> Any:
    from fuse_crypt.cli.objectloc import ObjectLocation

    loc = ObjectLocation(
        bucket=spec.bucket,
        prefix=spec.prefix.rstrip("/"),
        endpoint=spec.endpoint,
        region=spec.region,
        ca_bundle=ca_bundle,
        insecure_http=spec.insecure_http,
        access_key=access_key,
        secret_key=secret_key,
        session_token=session_token,
        kind=spec.kind,
    )
    try:
        return loc.transport(retry_budget=budget)
    except ValueError as exc:
        raise errors.InvalidArgument(f"object store endpoint: {exc}") from None


@dataclass(frozen=True)
class ObjectDeleter:
    """What the controller needs to delete object-store volumes in a TEE: the resolver and
    the same operator policy as the node (``--allowed-object-*``, CA bundle, opt-ins)."""

    resolver: Resolver | None
    policy: ObjectNodePolicy
    allowed_kids: tuple[str, ...] = ()
    # Not in repr: a factory (a test's, say) may hold what it was called with.
    transport_factory: TransportFactory = field(default=_default_transport, repr=False)
    budget: float = DEFAULT_BUDGET

    @property
    def enabled(self) -> bool:
        return self.resolver is not None and bool(self.policy.allowed_endpoints)

    def _spec(
        self, parameters: Mapping[str, str], volume_id: str, secrets: Mapping[str, str]
    ) -> tuple[ObjectVolumeSpec, str]:
        class_path = (parameters.get("path") or parameters.get("prefix") or "").strip("/")
        prefix = volume_prefix(class_path, volume_id)
        ctx = {k: v for k, v in parameters.items() if k not in ("prefix", PARAM_ON_DELETE)}
        ctx["path"] = prefix.rstrip("/")
        spec = parse_object_volume(ctx, secrets, self.policy.parser_policy())
        check_object_location(object_location(spec))
        self.policy.check(spec)
        if spec.prefix != prefix:
            raise errors.InvalidArgument(
                "the volume's prefix would not be <class path>/<volume_id>/"
            )
        return spec, prefix

    def check_class(
        self, parameters: Mapping[str, str], volume_id: str, secrets: Mapping[str, str]
    ) -> None:
        """At CreateVolume, for ``onDelete: delete``: refuse a class this controller could
        not delete later (no resolver, endpoint or bucket not allowed, credentials missing),
        so the tenant learns it now and not when the data should be gone."""
        if not self.enabled:
            raise errors.FailedPrecondition(
                f"{PARAM_ON_DELETE}: delete needs a controller that can unseal bucket "
                "credentials (a confidential controller pod started with --resolver and "
                "--allowed-object-endpoint); this one keeps objects, so the class is refused"
            )
        self._spec(parameters, volume_id, secrets)

    def delete(
        self,
        parameters: Mapping[str, str],
        volume_id: str,
        secrets: Mapping[str, str],
        deadline: Deadline,
    ) -> int:
        """Unseal the credentials in this (attested) process and empty the volume's prefix."""
        if not self.enabled:
            raise errors.FailedPrecondition(
                f"volume {volume_id} has {PARAM_ON_DELETE}: delete but this controller has no "
                "resolver (or no --allowed-object-endpoint): its objects are kept and the "
                "call fails so the PV stays until a confidential controller deletes it"
            )
        spec, prefix = self._spec(parameters, volume_id, secrets)
        creds = (
            unseal_credential(spec.access_key_id, self.resolver, self.allowed_kids),
            unseal_credential(spec.access_key_secret, self.resolver, self.allowed_kids),
            None
            if spec.security_token is None
            else unseal_credential(spec.security_token, self.resolver, self.allowed_kids),
        )
        budget = max(1.0, min(self.budget, deadline.remaining()))
        transport = self.transport_factory(
            spec, *creds, self.policy.ca_bundle, max(1.0, budget / 2)
        )
        bounded = Deadline(budget)
        count = delete_prefix(transport, prefix, bounded)
        log.info(
            "deleted object-store volume prefix",
            extra={
                "fields": {
                    "volume_id": volume_id,
                    "location": f"{spec.kind}://{spec.bucket}/{prefix}",
                    "objects": count,
                }
            },
        )
        return count
