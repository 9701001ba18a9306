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

Requests overlap, boundedly (:class:`_InFlight`): a page's DeleteObjects request runs while
the next page is listed (at most ``BATCHES_IN_FLIGHT`` batches at once), and the aborts of
one page of uploads run ``ABORT_PARALLEL`` at a time.  What does not change with that:
nothing of a page is sent before the whole page was checked; every request started has
ended before the call returns (no thread goes on deleting after the RPC answered); and the
first request to fail, in the order the sequential code would have sent them, fails the
call with the same code as before.  Requests after it that were already in flight may
have succeeded; the rest were never sent.  Either way the record stays and the
provisioner's retry lists again and finishes the job.

Unfinished multipart uploads (a daemon killed mid-upload leaves them; ListObjectsV2 does not
show them, yet they hold ciphertext and cost the tenant money) are aborted too
(:func:`abort_uploads`): ListMultipartUploads with the same prefix, paged by the
``(key-marker, upload-id-marker)`` pair (which must move on, at most ``MAX_PAGES`` pages of
at most 1,000), every listed key checked against the prefix exactly as for objects (a page
naming one key outside it is refused before any abort of that page), every upload id one
printable token, then one AbortMultipartUpload per upload (``NoSuchUpload`` = already
gone), at most ``ABORT_PARALLEL`` at a time, every abort of a page ended before the next
page is listed.
Uploads are aborted before the objects are deleted (a completing upload then fails instead
of landing an object after the listing) and listed once more after.

Idempotent: a prefix that is already empty (or a volume deleted before) is success.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

from csi_driver import errors, validate
from csi_driver.deadline import Deadline
from csi_driver.volumes.objectmount import (
    ObjectKey,
    ObjectNodePolicy,
    ObjectStoreMounter,
    check_object_location,
    object_location,
    resolve_object_volume,
    store_errors,
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
    "ABORT_PARALLEL",
    "BATCHES_IN_FLIGHT",
    "DEFAULT_ON_DELETE",
    "PARAM_ON_DELETE",
    "ObjectDeleter",
    "abort_uploads",
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
MAX_UPLOAD_ID = 1024
DEFAULT_BUDGET = 120.0  # seconds per DeleteVolume call; the provisioner retries the rest

#: AbortMultipartUpload requests in flight at once (one listed page's, never past it).
#: Why: one abort is one round trip with next to no work for either side, so sent one at a
#: time they spend the call's budget waiting (1,005 uploads on the OSS peer took 4-9 s at
#: ~4-9 ms each; a cloud endpoint 10-50 ms away would need 10-50 s).  Why 8 and not more:
#: the transports keep 16 pooled connections (s3.py, oss.py ``max_pool``/``pool_size``),
#: so 8 never wait for a connection and leave room for retries; 8 aborts a round trip is
#: still far below the store's per-prefix write rate (S3: 3,500 requests/s), so they do not
#: provoke the SlowDown answers that a wider burst would only turn into retries.
ABORT_PARALLEL = 8
#: DeleteObjects batches (<= 1,000 keys each) in flight while the next page is listed.
#: Why a pipeline and not more: the listing is sequential (each page names the next), so
#: a batch can only overlap the listings after it; a store deletes a batch in about the
#: time it lists a page, so two or three in flight keep up with the listing, and each
#: batch already counts as up to 1,000 writes against the store's per-prefix rate (S3:
#: 3,500/s), so more would buy SlowDown retries, not speed.  Bounded, as are the keys held
#: in memory (at most this many pages of <= 1 KiB keys).
BATCHES_IN_FLIGHT = 4

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


class _InFlight:
    """Store requests run on at most ``width`` threads, each one started only when a slot
    is free (so at most ``width`` are ever queued or running: memory and request rate stay
    bounded).  Why ordered failures: the sequential code raised the first failing request
    and sent nothing after it; here :meth:`wait` (and leaving the ``with``) waits for every
    request started, then raises the failure of the earliest one *in submission order*,
    so the call fails with the code it failed with before, and a request not yet started
    when one failed is never sent.  Leaving the ``with`` always waits: no request outlives
    the call that made it."""

    def __init__(self, width: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max(1, width), thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(max(1, width))
        self._futures: list[Future[None]] = []
        self._failed = threading.Event()

    def __enter__(self) -> _InFlight:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        first = self._first_failure()
        # A request that failed came before the step that was running in this thread
        # (it was sent earlier): its failure is the call's, as it was sequentially.
        if first is not None and exc is not None and exc is not first:
            raise first

    def _run(self, request: Callable[[], object]) -> None:
        try:
            if not self._failed.is_set():  # an earlier request failed: never sent
                request()
        except BaseException:
            self._failed.set()
            raise
        finally:
            self._slots.release()

    def _first_failure(self) -> BaseException | None:
        for f in self._futures:
            exc = f.exception() if f.done() and not f.cancelled() else None
            if exc is not None:
                return exc
        return None

    def submit(self, request: Callable[[], object], deadline: Deadline, step: str) -> None:
        """Send ``request`` once a slot is free and the deadline allows ``step``; raises
        (after the requests in flight ended) if one of them failed meanwhile."""
        self._slots.acquire()
        try:
            if self._failed.is_set():
                self.wait()
            deadline.check(step)
        except BaseException:
            self._slots.release()
            raise
        self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
        self._futures.append(self._pool.submit(self._run, request))

    def wait(self) -> None:
        """Wait for every request sent so far; raise the earliest failure among them."""
        wait_futures(self._futures)
        first = self._first_failure()
        self._futures = []
        if first is not None:
            raise first


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


def delete_prefix(
    transport: Any, prefix: str, deadline: Deadline, in_flight: int = BATCHES_IN_FLIGHT
) -> int:
    """Delete every object under ``prefix`` (which must come from :func:`volume_prefix`),
    at most ``in_flight`` DeleteObjects batches at once beside the listing; returns how
    many keys were sent for deletion.  Raises CsiError; store errors map to UNAVAILABLE
    (transient) or FAILED_PRECONDITION / PERMISSION_DENIED."""
    if not prefix.endswith("/") or not prefix.strip("/"):
        raise errors.InvalidArgument("refusing to delete an empty or root prefix")
    deleted = 0
    with store_errors("deleting the volume"), _InFlight(in_flight, "delete-objects") as io:
        for _ in range(MAX_PASSES):
            found = 0
            token: str | None = None
            for _page in range(MAX_PAGES):
                deadline.check("listing the volume's objects")
                page = transport.list(prefix, delimiter="", token=token, max_keys=DELETE_BATCH)
                keys = [o.key for o in page.objects]
                if len(keys) > DELETE_BATCH:
                    raise errors.FailedPrecondition("the object store listed an oversize page")
                _check_keys(keys, prefix)  # the whole page, before its delete is sent
                # Its batch runs while the next page is listed: S3's and OSS's tokens name
                # the last key listed, so deleting what came before does not move them (a
                # store paging by offset would skip keys in this pass; the next pass, of
                # MAX_PASSES, lists them again).
                if keys:
                    io.submit(
                        partial(transport.delete_many, keys),
                        deadline,
                        "deleting the volume's objects",
                    )
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
            io.wait()  # every batch of this pass deleted before the prefix is listed again
            deleted += found
            if not found:
                return deleted
    raise errors.Unavailable(
        "objects kept appearing under the volume's prefix while it was deleted; retry"
    )


def _check_uploads(uploads: Any, prefix: str) -> list[tuple[str, str]]:
    """(key, upload id) pairs of one hostile page, or FailedPrecondition (nothing echoed)."""
    if not isinstance(uploads, tuple | list) or len(uploads) > DELETE_BATCH:
        raise errors.FailedPrecondition("the object store listed an oversize page of uploads")
    keys = [getattr(u, "key", None) for u in uploads]
    _check_keys(keys, prefix)  # type: ignore[arg-type]  # checked there, str or refused
    out = []
    for key, u in zip(keys, uploads, strict=True):
        uid = getattr(u, "upload_id", None)
        if (
            not isinstance(uid, str)
            or not 0 < len(uid) <= MAX_UPLOAD_ID
            or not all(0x21 <= ord(c) <= 0x7E for c in uid)
        ):
            raise errors.FailedPrecondition(
                "the object store listed a malformed upload id; nothing of that page was aborted"
            )
        assert isinstance(key, str)
        out.append((key, uid))
    return out


def abort_uploads(
    transport: Any, prefix: str, deadline: Deadline, parallel: int = ABORT_PARALLEL
) -> int:
    """Abort every unfinished multipart upload under ``prefix`` (which must come from
    :func:`volume_prefix`), ``parallel`` at a time; returns how many were aborted.  Errors
    map as in :func:`delete_prefix`."""
    if not prefix.endswith("/") or not prefix.strip("/"):
        raise errors.InvalidArgument("refusing to abort uploads under an empty or root prefix")
    aborted = 0
    marker = ("", "")
    with store_errors("aborting the volume's uploads"), _InFlight(parallel, "abort-uploads") as io:
        for _page in range(MAX_PAGES):
            deadline.check("listing the volume's unfinished uploads")
            page = transport.list_uploads(
                prefix, key_marker=marker[0], upload_id_marker=marker[1], max_uploads=DELETE_BATCH
            )
            checked = _check_uploads(page.uploads, prefix)  # the whole page, before any abort
            for key, uid in checked:
                io.submit(
                    partial(transport.abort_multipart, key, uid),
                    deadline,
                    "aborting the volume's unfinished uploads",
                )
            io.wait()  # the page's aborts all ended before the next page is listed
            aborted += len(checked)
            nxt = page.next_marker
            if nxt is None:
                return aborted
            if (
                not isinstance(nxt, tuple)
                or len(nxt) != 2
                or not all(isinstance(m, str) for m in nxt)
                or nxt == marker
                or nxt[0] < marker[0]
            ):
                raise errors.FailedPrecondition(
                    "the object store's upload listing markers did not advance"
                )
            marker = nxt
        raise errors.FailedPrecondition("the object store listed too many pages of uploads")


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
    #: ``--allowed-key-resource`` (the node's): kbs:/// prefixes a class's keyResource may
    #: name for the controller to derive the volume key and initialise the prefix.
    allowed_key_resources: tuple[str, ...] = ()
    #: The fuse-crypt binary (None: next to our interpreter or on $PATH, as on the node).
    fuse_crypt: str | None = None

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
        uploads = abort_uploads(transport, prefix, bounded)
        count = delete_prefix(transport, prefix, bounded)
        uploads += abort_uploads(transport, prefix, bounded)
        log.info(
            "deleted object-store volume prefix",
            extra={
                "fields": {
                    "volume_id": volume_id,
                    "location": f"{spec.kind}://{spec.bucket}/{prefix}",
                    "objects": count,
                    "uploads_aborted": uploads,
                }
            },
        )
        return count

    # -- CreateVolume: initialise the prefix ----------------------------------------------

    def _can_initialise(self, context: Mapping[str, str], secrets: Mapping[str, str]) -> str | None:
        """Why this controller leaves the init to the node (None: it initialises).

        Only what the node would use anyway decides: the credentials and the key must be
        in the class parameters or the provisioner secret (a class that passes them only in
        the node-publish secret keeps today's behaviour: the node initialises at first
        publish), and a keyResource needs ``--allowed-key-resource``, as on the node."""
        from csi_driver.volumes.objectstore import OSS_NAMES, S3_NAMES

        if not self.enabled:
            return "this controller has no resolver or --allowed-object-endpoint"
        names = {**OSS_NAMES, **S3_NAMES}
        seen = {names[n] for n in (*context, *secrets) if n in names}
        if not {"access_key_id", "access_key_secret"} <= seen:
            return "the bucket credentials come only with the node-publish secret"
        if "passphrase" in seen:
            return None
        if "keyResource" not in context and "keyResource" not in secrets:
            return "the volume key comes only with the node-publish secret"
        if not self.allowed_key_resources:
            return "this controller has no --allowed-key-resource"
        return None

    def initialise(
        self,
        volume_id: str,
        context: Mapping[str, str],
        secrets: Mapping[str, str],
        deadline: Deadline,
    ) -> bool:
        """CreateVolume's half of "allocates and initialises a prefix": write
        ``gocryptfs.conf`` and the root diriv at ``<path>/<volume_id>/`` exactly as the node
        would at first publish, by the node's own code: the key from
        :func:`resolve_object_volume` (same derivation from the same volume id and
        context), the conf by :meth:`ObjectStoreMounter.ensure_initialised` (one HEAD, then
        ``fuse-crypt init``: create-only PUTs).  Idempotent: a conf already there must open
        with the volume key (then success, nothing written); one that does not is
        FAILED_PRECONDITION and is never overwritten; a prefix holding objects but no conf
        is refused by ``fuse-crypt init``.  Returns False when the node is left to
        initialise (see :meth:`_can_initialise`), True when the prefix is initialised."""
        why = self._can_initialise(context, secrets)
        if why is not None:
            log.info(
                "object-store volume left for the node to initialise at first publish",
                extra={"fields": {"volume_id": volume_id, "reason": why}},
            )
            return False
        key = resolve_object_volume(
            volume_id,
            context,
            secrets,
            self.resolver,
            self.policy,
            allowed_key_resources=self.allowed_key_resources,
            allowed_kids=self.allowed_kids,
        )
        assert key.spec is not None
        where = object_location(key.spec)
        mounter = ObjectStoreMounter(ca_bundle=self.policy.ca_bundle, control_dir=None)
        if self.fuse_crypt is not None:
            mounter.binary = self.fuse_crypt
        created = mounter.ensure_initialised(where, key, deadline)
        if not created:
            self._check_conf_opens(key, where, deadline)
        log.info(
            "initialised object-store volume prefix"
            if created
            else "object-store volume prefix already initialised with this volume's key",
            extra={"fields": {"volume_id": volume_id, "location": where, "key_source": key.source}},
        )
        return True

    def _check_conf_opens(self, key: ObjectKey, where: str, deadline: Deadline) -> None:
        """Read the prefix's conf (bounded: the one conf reader's cap) and unlock it with
        the volume key, in this process; never written or replaced."""
        from fuse_crypt.backend.transport import (
            ObjectNotFound,
        )
        from fuse_crypt.configfile import CONF_NAME, MAX_CONF_BYTES, ConfFile
        from fuse_crypt.errors import ConfigError, WrongKeyError

        assert key.spec is not None
        budget = max(1.0, min(self.budget, deadline.remaining()) / 2)
        transport = self.transport_factory(
            key.spec,
            key.access_key,
            key.secret_key,
            key.session_token,
            self.policy.ca_bundle,
            budget,
        )
        with store_errors(where, where):
            try:
                data = transport.get(key.spec.prefix + CONF_NAME, 0, MAX_CONF_BYTES + 1)
            except ObjectNotFound:
                raise errors.Unavailable(f"{CONF_NAME} at {where} vanished while checked") from None
        if len(data) > MAX_CONF_BYTES:
            raise errors.FailedPrecondition(f"{CONF_NAME} at {where} is implausibly large")
        try:
            ConfFile.loads(bytes(data)).unlock(key.password)
        except WrongKeyError:
            raise errors.FailedPrecondition(
                f"{where} already holds a {CONF_NAME} that this volume's key does not open: "
                "it is not overwritten (remove the prefix, or restore the right key)"
            ) from None
        except ConfigError:
            raise errors.FailedPrecondition(
                f"{where} already holds a {CONF_NAME} that is not a valid gocryptfs config: "
                "it is not overwritten"
            ) from None
