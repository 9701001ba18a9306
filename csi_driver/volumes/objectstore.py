"""Object-store volume parameters -> a typed :class:`ObjectVolumeSpec` (pure: no I/O).

Why a parser of its own: the parameters come from the StorageClass (through the PV's
volume attributes) and from node-publish secrets, both written outside the TEE.  Every
value is checked here, once, before anything is unsealed or a request is signed.

Names.  CDH's ``alibaba-cloud-oss`` secure-mount options are accepted unchanged
(coco-interfaces.md §4.1), so a spec written for CDH works as it is:

=============  ===========================  ==========================================
OSS (CDH)      S3                           meaning
=============  ===========================  ==========================================
``akId``       ``accessKeyId``              access key id (sealed)
``akSecret``   ``secretAccessKey``          access key secret (sealed)
``securityToken`` ``sessionToken``          STS token (sealed, optional)
``bucket``     ``bucket``                   bucket name
``path``       ``path`` / ``prefix``        the volume's prefix in the bucket
``url``        ``endpoint`` / ``url``       endpoint, ``https://host[:port]``
``region``     ``region``                   signing region (OSS: derived from ``url``)
``encrypted``  ``encrypted``                must be ``gocryptfs`` when given
``encPasswd``  ``encPasswd`` / ``passphrase`` gocryptfs password (sealed, optional:
                                            else the volume key comes from ``keyResource``)
``readonly``   ``readonly``                 ``true`` mounts read-only
-              ``pathStyle``                ``true``: path-style S3 addressing
=============  ===========================  ==========================================

``objectStore`` (``oss`` | ``s3``) names the kind; without it, CDH's ``akId``/``url`` mean
OSS and ``accessKeyId``/``endpoint`` mean S3.  CDH's unused options (``annotations``,
``kmsKeyId``, ``otherOpts``, ``targetPath``, ``volumeId``) are accepted and ignored: there is
no ossfs to pass ``otherOpts`` to.  Keys this parser does not know are left to others.

Policy (the node's own flags, :class:`ObjectStorePolicy`, never the request):

* Credentials and passphrases must be sealed strings (``sealed.…``), unsealed later in the
  guest; plaintext is refused unless ``allow_plaintext_secrets``.
* ``https`` only, unless ``allow_insecure_http``; with ``allowed_endpoints`` set, the
  endpoint's host must be one of them (``*.suffix`` matches subdomains).
* Buckets as the store names them; prefixes without ``.``/``..``/empty components or
  control characters, at most 512 bytes.
* A value given both in the secrets and in the volume attributes must be the same.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import urllib.parse
from collections.abc import Collection, Mapping

from csi_driver import errors
from csi_driver.keys import _unseal
from sealed_secrets.resolver import Resolver, is_sealed

__all__ = [
    "ObjectStorePolicy",
    "ObjectVolumeSpec",
    "SecretValue",
    "normalise_prefix",
    "parse_object_volume",
]

PARAM_KIND = "objectStore"
MAX_VALUE = 16 * 1024
MAX_PREFIX = 512
OSS_REGION_FROM_HOST = re.compile(
    r"(?:[a-z0-9-]+\.)?oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com"
)
_OSS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HOST = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

OSS_NAMES = {
    "akId": "access_key_id",
    "akSecret": "access_key_secret",
    "securityToken": "security_token",
    "url": "endpoint",
    "encPasswd": "passphrase",
}
S3_NAMES = {
    "accessKeyId": "access_key_id",
    "secretAccessKey": "access_key_secret",
    "sessionToken": "security_token",
    "endpoint": "endpoint",
    "url": "endpoint",
    "encPasswd": "passphrase",
    "passphrase": "passphrase",
    "prefix": "path",
    "pathStyle": "path_style",
}
COMMON_NAMES = {
    "bucket": "bucket",
    "path": "path",
    "region": "region",
    "encrypted": "encrypted",
    "readonly": "readonly",
}
CDH_IGNORED = ("annotations", "kmsKeyId", "otherOpts", "targetPath", "volumeId")
SECRET_FIELDS = ("access_key_id", "access_key_secret", "security_token", "passphrase")


@dataclasses.dataclass(frozen=True)
class ObjectStorePolicy:
    """What the node's operator allows (flags pinned by the measured configuration)."""

    allow_plaintext_secrets: bool = False
    allow_insecure_http: bool = False
    allowed_endpoints: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SecretValue:
    """A credential or passphrase as the request carried it; ``where`` is safe to log."""

    where: str
    sealed: str | None = dataclasses.field(default=None, repr=False)
    plaintext: str | None = dataclasses.field(default=None, repr=False)

    def reveal(
        self,
        resolver: Resolver | None,
        allowed_kids: Collection[str] = (),
        *,
        fresh: bool = False,
    ) -> bytes:
        """The value, unsealed in the guest (the same path as a sealed passphrase).
        ``fresh``: past the resolver's resource cache (a republish wants the newest)."""
        if self.sealed is not None:
            return _unseal(resolver, self.sealed, self.where, allowed_kids, fresh=fresh)
        assert self.plaintext is not None
        return self.plaintext.encode()


@dataclasses.dataclass(frozen=True)
class ObjectVolumeSpec:
    """One bucket prefix as an encrypted volume; secrets still sealed."""

    kind: str  # "oss" | "s3"
    endpoint: str  # scheme://host[:port]
    region: str
    bucket: str
    prefix: str  # "" (the bucket root) or "a/b/"
    access_key_id: SecretValue
    access_key_secret: SecretValue
    security_token: SecretValue | None
    passphrase: SecretValue | None  # None: the key comes from keyResource
    read_only: bool = False
    path_style: bool = False
    insecure_http: bool = False
    ignored: tuple[str, ...] = ()  # CDH options accepted and ignored (names only)


def _lookup(
    name: str, volume_context: Mapping[str, str], secrets: Mapping[str, str]
) -> tuple[str, str] | None:
    """(value, where) from the secrets or the attributes; both must agree if both set."""
    found = []
    for where, source in (("secrets", secrets), ("volume_context", volume_context)):
        if name in source:
            value = source[name]
            if not isinstance(value, str) or len(value) > MAX_VALUE or "\0" in value:
                raise errors.InvalidArgument(f"{where}[{name}] is not a valid value")
            found.append((value, f"{where}[{name}]"))
    if not found:
        return None
    if len(found) == 2 and found[0][0] != found[1][0]:
        raise errors.InvalidArgument(f"{name} is given differently in secrets and volume_context")
    return found[0]


def _kind(volume_context: Mapping[str, str], secrets: Mapping[str, str]) -> str:
    given = _lookup(PARAM_KIND, volume_context, secrets)
    if given is not None:
        if given[0] not in ("oss", "s3"):
            raise errors.InvalidArgument(f"{PARAM_KIND} must be oss or s3")
        return given[0]
    merged = {**volume_context, **secrets}
    oss = any(k in merged for k in ("akId", "akSecret"))
    s3 = any(k in merged for k in ("accessKeyId", "secretAccessKey"))
    if oss == s3:
        raise errors.InvalidArgument(
            f"cannot tell the object store kind: set {PARAM_KIND} to oss or s3 "
            "(with akId/akSecret or accessKeyId/secretAccessKey)"
        )
    return "oss" if oss else "s3"


def _secret(found: tuple[str, str], policy: ObjectStorePolicy) -> SecretValue:
    value, where = found
    if is_sealed(value):
        return SecretValue(where, sealed=value)
    if not policy.allow_plaintext_secrets:
        raise errors.InvalidArgument(
            f"{where} must be a sealed secret (sealed.*); plaintext credentials are visible "
            "outside the TEE (the node allows them only with an explicit operator flag)"
        )
    if not value or _CONTROL.search(value):
        raise errors.InvalidArgument(f"{where} is empty or has control characters")
    return SecretValue(where, plaintext=value)


def _bool(found: tuple[str, str] | None) -> bool:
    if found is None:
        return False
    value = found[0].strip().lower()
    if value not in ("true", "false", ""):
        raise errors.InvalidArgument(f"{found[1]} must be true or false")
    return value == "true"


def _endpoint(found: tuple[str, str] | None, policy: ObjectStorePolicy) -> tuple[str, str, bool]:
    """(scheme://host[:port], host, insecure)."""
    if found is None or not found[0].strip():
        raise errors.InvalidArgument("the object store endpoint (url / endpoint) is required")
    text, where = found[0].strip(), found[1]
    try:  # urlsplit, .port and .hostname raise ValueError on bad IPv6 literals and ports
        url = urllib.parse.urlsplit(text if "://" in text else "https://" + text)
        port = url.port
        host = url.hostname or ""
    except ValueError:
        raise errors.InvalidArgument(f"{where} must be https://host[:port]") from None
    if port == 0:
        raise errors.InvalidArgument(f"{where} has an invalid port")
    if (
        url.scheme not in ("https", "http")
        or url.username is not None
        or url.password is not None
        or url.path not in ("", "/")
        or url.query
        or url.fragment
        or not host
        or len(host) > 253
    ):
        raise errors.InvalidArgument(f"{where} must be https://host[:port]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.fullmatch(host):
            raise errors.InvalidArgument(f"{where} has an invalid host name") from None
    insecure = url.scheme == "http"
    if insecure and not policy.allow_insecure_http:
        raise errors.PermissionDenied(
            f"{where} uses plain http; this node requires https (operator flag to allow it)"
        )
    if policy.allowed_endpoints and not any(
        host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
        for allowed in (a.lower() for a in policy.allowed_endpoints)
    ):
        raise errors.PermissionDenied(f"{where} is not one of this node's allowed endpoints")
    netloc = host if port is None else f"{host}:{port}"
    if ":" in host:  # IPv6 literal
        netloc = f"[{host}]" if port is None else f"[{host}]:{port}"
    return f"{url.scheme}://{netloc}", host, insecure


def _prefix(found: tuple[str, str] | None) -> str:
    if found is None:
        return ""
    text, where = found
    if _CONTROL.search(text) or "\\" in text:
        raise errors.InvalidArgument(f"{where} has control characters or backslashes")
    parts = text.strip("/").split("/") if text.strip("/") else []
    if any(p in ("", ".", "..") for p in parts):
        raise errors.InvalidArgument(f"{where} must be normalised (no '.', '..' or '//')")
    prefix = "".join(p + "/" for p in parts)
    if len(prefix.encode("utf-8", "surrogatepass")) > MAX_PREFIX:
        raise errors.InvalidArgument(f"{where} is longer than {MAX_PREFIX} bytes")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError:
        raise errors.InvalidArgument(f"{where} is not valid UTF-8") from None
    return prefix


def normalise_prefix(text: str, where: str) -> str:
    """A path parameter as the parser checks it: ``""`` or ``"a/b/"`` (the controller
    derives the prefix DeleteVolume may empty with exactly this rule)."""
    return _prefix((text, where))


def _bucket(found: tuple[str, str] | None, kind: str) -> str:
    if found is None:
        raise errors.InvalidArgument("bucket is required")
    name, where = found
    pattern = _OSS_BUCKET if kind == "oss" else _S3_BUCKET
    bad = not pattern.fullmatch(name) or (kind == "oss" and "--" in name)
    if kind == "s3":
        bad = bad or ".." in name or ".-" in name or "-." in name
        bad = bad or bool(re.fullmatch(r"\d+\.\d+\.\d+\.\d+", name))
    if bad:
        raise errors.InvalidArgument(f"{where} is not a valid {kind} bucket name")
    return name


def parse_object_volume(
    volume_context: Mapping[str, str],
    secrets: Mapping[str, str],
    policy: ObjectStorePolicy = ObjectStorePolicy(),  # noqa: B008 - frozen, shared
) -> ObjectVolumeSpec:
    """Check every object-store parameter; raise InvalidArgument / PermissionDenied."""
    kind = _kind(volume_context, secrets)
    names = {**COMMON_NAMES, **(OSS_NAMES if kind == "oss" else S3_NAMES)}
    fields: dict[str, tuple[str, str]] = {}
    for name, field in names.items():
        found = _lookup(name, volume_context, secrets)
        if found is None:
            continue
        if field in fields and fields[field][0] != found[0]:
            raise errors.InvalidArgument(f"{name} conflicts with another name for {field}")
        fields[field] = found

    encrypted = fields.get("encrypted")
    if encrypted is not None and encrypted[0] not in ("gocryptfs", ""):
        raise errors.InvalidArgument(
            f"{encrypted[1]}: coco-csi object volumes are always gocryptfs-encrypted"
        )
    for required in ("access_key_id", "access_key_secret"):
        if required not in fields:
            raise errors.InvalidArgument(f"the {kind} {required.replace('_', ' ')} is required")
    endpoint, host, insecure = _endpoint(fields.get("endpoint"), policy)
    region_found = fields.get("region")
    if region_found is not None:
        region = region_found[0]
        if not _REGION.fullmatch(region):
            raise errors.InvalidArgument(f"{region_found[1]} is not a valid region")
    elif kind == "oss":
        m = OSS_REGION_FROM_HOST.fullmatch(host.lower())
        if m is None:
            raise errors.InvalidArgument(
                "region is required when the OSS endpoint is not oss-<region>.aliyuncs.com"
            )
        region = m.group(1)
    else:
        region = "us-east-1"
    token = fields.get("security_token")
    passphrase = fields.get("passphrase")
    return ObjectVolumeSpec(
        kind=kind,
        endpoint=endpoint,
        region=region,
        bucket=_bucket(fields.get("bucket"), kind),
        prefix=_prefix(fields.get("path")),
        access_key_id=_secret(fields["access_key_id"], policy),
        access_key_secret=_secret(fields["access_key_secret"], policy),
        security_token=None if token is None else _secret(token, policy),
        passphrase=None if passphrase is None or not passphrase[0] else _secret(passphrase, policy),
        read_only=_bool(fields.get("readonly")),
        path_style=_bool(fields.get("path_style")),
        insecure_http=insecure,
        ignored=tuple(
            n for n in CDH_IGNORED if kind == "oss" and (n in volume_context or n in secrets)
        ),
    )
