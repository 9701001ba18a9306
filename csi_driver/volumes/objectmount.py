"""Object-store volumes on the node: a bucket prefix published as an encrypted FUSE mount.

The parameters are parsed (and checked against the node's policy) by
:mod:`csi_driver.volumes.objectstore`; this module resolves what they name inside the
guest and runs the one daemon that serves the volume (``fuse-crypt mount
oss://BUCKET/PREFIX`` or ``s3://...``):

* Credentials: sealed values unsealed here with the existing resolver (plaintext only
  when the operator opted in). They reach the daemon on **stdin only**
  (``--credentials-stdin``, before the password): never argv (``/proc/*/cmdline``), never
  the environment of the long-lived daemon, never a file on host storage. Refreshed ones
  (kubelet's republish, STS expiry) go over the daemon's root-only control socket in guest
  memory (``--control-socket``, fuse_crypt/cli/credsocket.py), never a remount.
* Volume key: a sealed ``encPasswd``/``passphrase`` (CDH's gocryptfs password), else the
  StorageClass ``keyResource`` derived per volume as for directory volumes
  (csi_driver/keys.py). An inline ephemeral volume that names a bucket derives with the
  location (``kind://bucket/prefix``) instead of the per-pod volume id, so the next pod
  reads what the last one wrote; it never gets a random key (its data outlives the pod).
* Endpoint and bucket: the node's own flags decide (``--allowed-object-endpoint``, none:
  object volumes are refused; ``--allowed-object-bucket``, none: any bucket on an allowed
  endpoint). The control plane cannot point the guest anywhere else.
* First publish initialises an empty prefix (``fuse-crypt init``: create-only PUTs, and it
  refuses a prefix holding anything but an interrupted init); a prefix with a
  ``gocryptfs.conf`` is never re-initialised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import os
import re
import stat
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from csi_driver import errors
from csi_driver.core.store import Publication
from csi_driver.deadline import Deadline
from csi_driver.keys import PASSPHRASE_SCRYPT_LOGN, VolumeKey, resolve_volume_key
from csi_driver.mounter import INIT_TIMEOUT, FuseCryptMounter, FuseCryptPreforkMounter, Mounter
from csi_driver.proc import Proc
from csi_driver.volumes.objectstore import (
    PARAM_KIND,
    ObjectStorePolicy,
    ObjectVolumeSpec,
    SecretValue,
    parse_object_volume,
)
from fuse_crypt.configfile import CONF_NAME
from sealed_secrets.resolver import Resolver

if TYPE_CHECKING:
    from fuse_crypt.cli.credsocket import VolumeUsage

__all__ = [
    "DEFAULT_CONTROL_DIR",
    "OBJECT_MOUNTER",
    "ObjectKey",
    "ObjectNodePolicy",
    "ObjectStoreMounter",
    "check_object_location",
    "is_object_volume",
    "object_location",
    "object_readonly",
    "resolve_object_volume",
    "unseal_credential",
]


@contextlib.contextmanager
def store_errors(purpose: str, where: str | None = None) -> Iterator[None]:
    """Object-store failures as the codes the CSI spec names, for every caller (publish,
    CreateVolume's initialisation, DeleteVolume): one mapping, so a refused credential is
    PERMISSION_DENIED and a store that is down is UNAVAILABLE wherever it shows.  Only the
    exception's own fixed text is kept (never a response body).  ``ObjectNotFound`` is an
    ``ObjectStoreError`` too: callers that expect it catch it inside."""
    from fuse_crypt.backend.transport import AccessDenied, ObjectStoreError, TransientError

    store = "object store" if where is None else f"object store for {where}"
    try:
        yield
    except AccessDenied:
        raise errors.PermissionDenied(
            f"the object store refused these credentials for {purpose}"
        ) from None
    except TransientError as exc:
        raise errors.Unavailable(f"{store}: {exc.strerror}") from None
    except ObjectStoreError as exc:
        raise errors.FailedPrecondition(f"{store}: {exc.strerror}") from None


OBJECT_MOUNTER = "fuse-crypt-object"
# What the fuse-crypt CLI exits with (fuse_crypt/cli/exitcodes.py).
_EXIT_STORE = 6
_EXIT_PASSWORD_INCORRECT = 12
_EXIT_CONFIG = 23
_EXIT_NOT_NEW = 40
DEFAULT_CONTROL_DIR = "/run/coco-csi/object-ctl"
_CRED_VALUE = re.compile(rb"[\x21-\x7e]{1,8192}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_object_volume(volume_context: Mapping[str, str], secrets: Mapping[str, str]) -> bool:
    """A bucket volume: ``objectStore`` given, or a ``bucket`` attribute (CDH's spec)."""
    return PARAM_KIND in volume_context or PARAM_KIND in secrets or "bucket" in volume_context


def object_readonly(volume_context: Mapping[str, str], secrets: Mapping[str, str]) -> bool:
    """CDH's ``readonly`` option, read before the publish is compared with a live one
    (the parser checks the value properly later)."""
    return any(
        src.get("readonly", "").strip().lower() == "true" for src in (volume_context, secrets)
    )


@dataclass(frozen=True)
class ObjectNodePolicy:
    """The node operator's object-store flags (pinned by the measured configuration)."""

    allowed_endpoints: tuple[str, ...] = ()
    allowed_buckets: tuple[str, ...] = ()  # "bucket" or "bucket/prefix/" entries
    allow_plaintext_secrets: bool = False
    allow_insecure_http: bool = False
    ca_bundle: str | None = None
    #: Where the daemons' credential control sockets live: guest memory (tmpfs), never a
    #: hostPath (fuse_crypt/cli/credsocket.py).
    control_dir: str = DEFAULT_CONTROL_DIR

    def parser_policy(self) -> ObjectStorePolicy:
        return ObjectStorePolicy(
            allow_plaintext_secrets=self.allow_plaintext_secrets,
            allow_insecure_http=self.allow_insecure_http,
            allowed_endpoints=self.allowed_endpoints,
        )

    def check(self, spec: ObjectVolumeSpec) -> None:
        """The bucket allow-list (the endpoint one is applied by the parser)."""
        if not self.allowed_buckets:
            return
        for entry in self.allowed_buckets:
            bucket, _, prefix = entry.partition("/")
            prefix = prefix.strip("/")
            if bucket == spec.bucket and (
                not prefix or spec.prefix == prefix + "/" or spec.prefix.startswith(prefix + "/")
            ):
                return
        raise errors.PermissionDenied(
            f"bucket {spec.bucket} (or this prefix in it) is not allowed by this node's "
            "--allowed-object-bucket"
        )


@dataclass(frozen=True, repr=False)
class ObjectKey(VolumeKey):
    """The volume password plus what the daemon needs to reach the bucket. Kept in memory
    only (the supervisor restarts a crashed daemon with it); never in repr or logs."""

    spec: ObjectVolumeSpec | None = field(default=None, compare=False)
    access_key: str = field(default="", compare=False)
    secret_key: str = field(default="", compare=False)
    session_token: str | None = field(default=None, compare=False)

    def credentials_equal(self, other: ObjectKey) -> bool:
        """Whether ``other`` carries the same credentials (constant time)."""
        return hmac.compare_digest(self.credentials, other.credentials)

    def with_credentials(self, other: ObjectKey) -> ObjectKey:
        """This key with ``other``'s credentials (a refresh changes nothing else)."""
        return dataclasses.replace(
            self,
            access_key=other.access_key,
            secret_key=other.secret_key,
            session_token=other.session_token,
        )

    @property
    def credentials(self) -> bytes:
        """``KEY=VALUE`` lines and an empty line: fuse-crypt's ``--credentials-stdin``."""
        assert self.spec is not None
        env = "OSS" if self.spec.kind == "oss" else "AWS"
        secret = "ACCESS_KEY_SECRET" if self.spec.kind == "oss" else "SECRET_ACCESS_KEY"
        lines = [f"{env}_ACCESS_KEY_ID={self.access_key}", f"{env}_{secret}={self.secret_key}"]
        if self.session_token is not None:
            lines.append(f"{env}_SESSION_TOKEN={self.session_token}")
        return ("\n".join(lines) + "\n\n").encode("ascii")


def object_location(spec: ObjectVolumeSpec) -> str:
    """``kind://bucket/prefix``: the fuse-crypt CLI's location, and the record's name."""
    return f"{spec.kind}://{spec.bucket}/{spec.prefix.rstrip('/')}"


def check_object_location(text: str) -> str:
    """A location as fuse-crypt's parser (fuse_crypt/cli/objectloc.py) accepts it: checked
    for every request (the parser of parameters allows names the CLI would refuse, such as
    C1 control characters) and for every record read back from the hostile state file."""
    kind, sep, rest = text.partition("://")
    bucket, _, prefix = rest.partition("/")
    parts = prefix.split("/") if prefix else []
    if (
        kind not in ("s3", "oss")
        or not sep
        or not _BUCKET.fullmatch(bucket)
        or len(prefix) > 512
        or any(p in ("", ".", "..") or not p.isprintable() or "\\" in p for p in parts)
    ):
        raise errors.InvalidArgument("object-store location is malformed")
    return text


def unseal_credential(
    value: SecretValue, resolver: Resolver | None, kids: Collection[str], fresh: bool = False
) -> str:
    """One access key, secret or token, unsealed in this (guest) process and checked to be
    one token of printable ASCII (so it cannot add lines to what the daemon reads)."""
    data = value.reveal(resolver, kids, fresh=fresh).strip()
    if not _CRED_VALUE.fullmatch(data):
        raise errors.InvalidArgument(f"{value.where} is not a usable credential (after unsealing)")
    return data.decode("ascii")


def resolve_object_volume(
    volume_id: str,
    volume_context: Mapping[str, str],
    secrets: Mapping[str, str],
    resolver: Resolver | None,
    policy: ObjectNodePolicy | None,
    *,
    ephemeral: bool = False,
    allowed_key_resources: Collection[str] = (),
    allowed_kids: Collection[str] = (),
    fresh_credentials: bool = False,
) -> ObjectKey:
    """Check the parameters against the node's policy, unseal the credentials and resolve
    the volume key, all in the guest. Raises CsiError with the CSI code to answer.

    ``fresh_credentials`` (a republish): the credentials are unsealed past any resolver
    cache, so a ``vault`` sealed secret returns the tenant's newest value from the KBS."""
    if policy is None or not policy.allowed_endpoints:
        raise errors.PermissionDenied(
            "object-store volumes are not accepted: this node allows no endpoints "
            "(start it with --allowed-object-endpoint HOST)"
        )
    spec = parse_object_volume(volume_context, secrets, policy.parser_policy())
    check_object_location(object_location(spec))
    policy.check(spec)
    fresh = fresh_credentials
    creds = (
        unseal_credential(spec.access_key_id, resolver, allowed_kids, fresh),
        unseal_credential(spec.access_key_secret, resolver, allowed_kids, fresh),
        None
        if spec.security_token is None
        else unseal_credential(spec.security_token, resolver, allowed_kids, fresh),
    )
    if spec.passphrase is not None:
        password = spec.passphrase.reveal(resolver, allowed_kids).split(b"\n", 1)[0]
        if not password:
            raise errors.InvalidArgument(f"{spec.passphrase.where} unseals to an empty value")
        return ObjectKey(password, "sealed-passphrase", PASSPHRASE_SCRYPT_LOGN, spec, *creds)
    base = resolve_volume_key(
        object_location(spec) if ephemeral else volume_id,
        volume_context,
        secrets,
        resolver,
        ephemeral=False,
        allowed_key_resources=allowed_key_resources,
        allowed_kids=allowed_kids,
    )
    return ObjectKey(base.password, base.source, base.scrypt_logn, spec, *creds)


def _spec_of(key: VolumeKey) -> ObjectKey:
    if not isinstance(key, ObjectKey) or key.spec is None:
        raise errors.Internal("an object-store volume needs its ObjectKey")
    return key


class ObjectStoreMounter(FuseCryptMounter):
    """``fuse-crypt`` over a bucket: spawned the way the node's fuse-crypt mounter does it
    (the prefork zygote, or exec), credentials and password on stdin."""

    name = OBJECT_MOUNTER

    def __init__(
        self,
        via: Mounter | None = None,
        *,
        ca_bundle: str | None = None,
        control_dir: str | None = DEFAULT_CONTROL_DIR,
    ) -> None:
        super().__init__(getattr(via, "binary", None))
        self.via = via if isinstance(via, FuseCryptMounter) else None
        self.ca_bundle = ca_bundle
        self.control_dir = control_dir

    def location_args(self, key: ObjectKey) -> list[str]:
        assert key.spec is not None
        spec = key.spec
        argv = ["--endpoint", spec.endpoint, "--region", spec.region, "--credentials-stdin"]
        if spec.insecure_http:
            argv.append("--insecure-http")
        if self.ca_bundle:
            argv += ["--ca-bundle", self.ca_bundle]
        return argv

    # -- credential refresh (fuse_crypt/cli/credsocket.py) -----------------------------------

    def control_socket(self, target: str) -> str | None:
        """The daemon's control socket for ``target``: derived from the target alone, so a
        restarted plugin finds the socket of a daemon it adopts."""
        if self.control_dir is None:
            return None
        digest = hashlib.sha256(target.encode("utf-8", "surrogateescape")).hexdigest()[:24]
        return os.path.join(self.control_dir, f"{digest}.sock")

    def _make_control_dir(self) -> None:
        assert self.control_dir is not None
        os.makedirs(self.control_dir, mode=0o700, exist_ok=True)
        st = os.lstat(self.control_dir)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise errors.FailedPrecondition(
                f"object-store control directory {self.control_dir} must be ours, mode 0700"
            )

    def push_credentials(self, target: str, key: ObjectKey, timeout: float = 10.0) -> bool:
        """Hand ``key``'s credentials to the running daemon of ``target``; True if they
        changed. The daemon checks that location, endpoint and region are its own."""
        from fuse_crypt.cli.credsocket import send_credentials

        assert key.spec is not None
        path = self.control_socket(target)
        if path is None:
            raise errors.FailedPrecondition("this node runs object daemons without a socket")
        identity = (object_location(key.spec), key.spec.endpoint, key.spec.region)
        creds = bytearray(key.credentials)
        try:
            answer = send_credentials(path, identity, bytes(creds), timeout=timeout)
        except OSError as exc:
            raise errors.Unavailable(
                f"cannot hand refreshed credentials to the daemon of {target}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        finally:
            creds[:] = bytes(len(creds))
        if answer == "OK changed":
            return True
        if answer == "OK unchanged":
            return False
        if "another volume location or endpoint" in answer:
            raise errors.AlreadyExists(
                f"the volume at {target} is mounted from another location or endpoint"
            )
        reason = answer.removeprefix("ERR ")[:200] if answer.startswith("ERR ") else "no answer"
        raise errors.FailedPrecondition(f"the daemon of {target} refused the credentials: {reason}")

    def volume_usage(
        self, target: str, location: str, timeout: float | None = None
    ) -> VolumeUsage | None:
        """What the daemon of ``target`` measured of its prefix (bytes and objects from a
        listing it caches; fuse_crypt/cli/credsocket.py, STATS).  None when the daemon
        cannot say: no control socket (a node without ``--object-control-dir``, or a
        daemon started before it had one) or a daemon that predates STATS.  A daemon that
        does not answer in time -> UNAVAILABLE, as for a hung mount."""
        from fuse_crypt.cli.credsocket import USAGE_TIMEOUT, UsageRefused, query_usage

        path = self.control_socket(target)
        if path is None:
            return None
        try:
            return query_usage(path, location, timeout=timeout or USAGE_TIMEOUT)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise errors.Unavailable(
                f"the daemon of {target} did not report the volume's usage: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        except UsageRefused as exc:
            if exc.reason == "malformed request":
                return None  # a daemon from before STATS
            if exc.reason == "too many objects to measure":
                raise errors.FailedPrecondition(
                    f"the volume at {target} holds too many objects to measure"
                ) from None
            raise errors.Unavailable(
                f"the daemon of {target} could not measure the volume: {exc.reason}"
            ) from None

    def argv_for(
        self,
        pub: Publication,
        key: VolumeKey,
        *,
        allow_other: bool,
        metrics_addr: str | None = None,
    ) -> list[str]:
        source = self.location_args(_spec_of(key))
        control = self.control_socket(pub.target_path)
        if control is not None:
            self._make_control_dir()
            source += ["--control-socket", control]
        args = self.mount_args(
            pub.cipher_dir,
            pub.target_path,
            readonly=pub.readonly,
            allow_other=allow_other,
            capacity=0,
            metrics_addr=metrics_addr,
            source=source,
        )
        if isinstance(self.via, FuseCryptPreforkMounter):
            return args
        return [self._bin(), *args]

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
        raise errors.Internal("object-store mounts are built by argv_for (they need the key)")

    def stdin_for(self, cipher_dir: str, key: VolumeKey) -> bytes:
        okey = _spec_of(key)
        return okey.credentials + okey.password + b"\n"

    def spawn(self, argv: list[str], stdin_data: bytes, log_path: str) -> Proc:
        if self.via is not None:
            return self.via.spawn(argv, stdin_data, log_path)
        return super().spawn(argv, stdin_data, log_path)

    def warm(self) -> None:
        pass  # the node's own mounter warms the zygote

    def close(self) -> None:
        pass

    # -- first publish -------------------------------------------------------------------

    def is_initialised(self, cipher_dir: str) -> bool:
        raise errors.Internal("object-store volumes are probed with their key")

    def _probe_conf(self, key: ObjectKey, deadline: Deadline) -> bool:
        """Whether the prefix holds a gocryptfs.conf: one HEAD, in this (guest) process,
        through the same transport code the daemon uses."""
        from fuse_crypt.backend.transport import ObjectNotFound
        from fuse_crypt.cli.objectloc import ObjectLocation

        assert key.spec is not None
        spec = key.spec
        loc = ObjectLocation(
            bucket=spec.bucket,
            prefix=spec.prefix.rstrip("/"),
            endpoint=spec.endpoint,
            region=spec.region,
            ca_bundle=self.ca_bundle,
            insecure_http=spec.insecure_http,
            access_key=key.access_key,
            secret_key=key.secret_key,
            session_token=key.session_token,
            kind=spec.kind,
        )
        where = object_location(spec)
        with store_errors(where, where):
            try:
                transport = loc.transport(retry_budget=max(1.0, deadline.timeout(30.0) / 2))
                transport.head(loc.key(CONF_NAME))
                return True
            except ObjectNotFound:
                return False
            except ValueError as exc:
                raise errors.InvalidArgument(f"object store endpoint: {exc}") from None

    def ensure_initialised(
        self, cipher_dir: str, key: VolumeKey, deadline: Deadline | None = None
    ) -> bool:
        okey = _spec_of(key)
        deadline = deadline or Deadline(INIT_TIMEOUT)
        if self._probe_conf(okey, deadline):
            return False
        self._init(cipher_dir, okey, deadline)
        return True

    def _init(self, cipher_dir: str, key: VolumeKey, deadline: Deadline) -> None:
        okey = _spec_of(key)
        argv = [self._bin(), "init", "--scryptn", str(key.scrypt_logn)]
        argv += [*self.location_args(okey), cipher_dir]
        self._run_init(argv, self.stdin_for(cipher_dir, okey), cipher_dir, deadline)

    def init_failure(self, returncode: int, log_tail: str, cipher_dir: str) -> errors.CsiError:
        if returncode == _EXIT_NOT_NEW:
            return errors.FailedPrecondition(
                f"{cipher_dir} holds objects but no {CONF_NAME}: it has held data and is not "
                f"re-initialised (restore its {CONF_NAME} from a backup)"
            )
        return self.failure(returncode, log_tail, cipher_dir)

    def failure(self, returncode: int, log_tail: str, cipher_dir: str) -> errors.CsiError:
        if returncode == _EXIT_PASSWORD_INCORRECT:
            return errors.WrongVolumeKey(f"the volume key does not open {cipher_dir}")
        if returncode == _EXIT_STORE:
            return errors.Unavailable(f"object store for {cipher_dir}: {log_tail}")
        if returncode == _EXIT_CONFIG:
            return errors.FailedPrecondition(f"{cipher_dir}: {log_tail}")
        return super().failure(returncode, log_tail, cipher_dir)
