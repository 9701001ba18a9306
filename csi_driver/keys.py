"""Per-volume keys, derived or unsealed inside the guest.

Two sources, in this order:

1. an explicit per-volume passphrase carried as a *sealed* secret (NodePublishVolume
   ``secrets["passphrase"]`` or ``volume_context["passphrase"]``); the guest unseals it. A
   plaintext passphrase is refused: it would have passed through the host and etcd in clear.
   Directory and object volumes use its first line (gocryptfs's passfile rule); block
   volumes use every byte (cryptsetup's ``--key-file`` rule, which CDH follows), so a disk
   CDH keyed with a resource that ends in a newline opens with the same resource.
2. a KBS key resource named by the StorageClass parameter ``keyResource``
   (``kbs:///repo/type/tag``). One resource serves every volume of the class; each volume
   gets a distinct 256-bit key via HKDF-SHA256 with the volume id as ``info``, so learning
   one volume's key reveals nothing about another's and the KBS holds a single secret.

The control plane writes ``keyResource`` but must not choose the key: the reference is
accepted only if it lies under one of the node's ``--allowed-key-resource`` prefixes (the
node's measured configuration), and the resource must be a coco-csi volume key JWK
(csi_driver/volume_key.py), 32 bytes, typed, so no other stored secret, public or not, can
be turned into volume keys. Sealed values are verified only with keys whose kid matches a
``--allowed-signing-kid`` prefix.

Inline ephemeral volumes without either source get a random key: their data dies with the
pod, so nothing needs to reopen them.

The resulting secret is the gocryptfs *password*, which wraps the volume's random master key
in ``gocryptfs.conf``. Derived passwords are 256-bit random, so scrypt's brute-force hardening
buys nothing and a low cost (logN 10) keeps publishing fast; human passphrases keep logN 16.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from csi_driver import errors
from csi_driver.constants import PARAM_KEY_RESOURCE, PARAM_PASSPHRASE
from csi_driver.volume_key import KEY_BYTES, VolumeKeyFormatError, parse_volume_key
from sealed_secrets import errors as se
from sealed_secrets.resolver import Resolver, is_sealed
from sealed_secrets.resource_uri import has_dot_segment, hostless_segments, uri_allowed

HKDF_SALT = b"coco-csi volume key v1"
MIN_ROOT_KEY_BYTES = KEY_BYTES
MAX_KEY_URI = 512
DERIVED_SCRYPT_LOGN = 10
PASSPHRASE_SCRYPT_LOGN = 16


@dataclass(frozen=True)
class VolumeKey:
    """The secret that opens one volume; its repr never shows the secret."""

    password: bytes = field(repr=False)
    source: str  # "kbs-derived" | "sealed-passphrase" | "ephemeral-random"
    scrypt_logn: int
    #: A whole-bytes passphrase (``whole_passphrase``) that spans lines: its first line,
    #: which block volumes staged before whole passphrases were used were keyed with.
    first_line: bytes | None = field(default=None, repr=False, kw_only=True)

    def __repr__(self) -> str:
        return f"VolumeKey(source={self.source}, scrypt_logn={self.scrypt_logn})"


def derive_volume_password(root_key: bytes, volume_id: str) -> bytes:
    """HKDF-SHA256(root_key, salt, info=volume_id) → 32 bytes, hex-encoded as the password.

    Hex keeps the password a single text line (gocryptfs reads the first line of a passfile).
    """
    if len(root_key) < MIN_ROOT_KEY_BYTES:
        raise errors.FailedPrecondition(
            f"key resource is too short to derive volume keys (need >= {MIN_ROOT_KEY_BYTES} bytes)"
        )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=volume_id.encode())
    return hkdf.derive(root_key).hex().encode("ascii")


def _map_resolver_error(exc: Exception, what: str) -> errors.CsiError:
    """Turn a sealed_secrets failure into the CSI code kubelet reacts to sensibly."""
    msg = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, (se.KbsUnavailable, se.AttestationError)):
        return errors.Unavailable(msg)  # transient: kubelet retries
    if isinstance(
        exc, (se.Unauthorized, se.PolicyDenied, se.BadSignature, se.UnknownKid, se.WrongKey)
    ):
        return errors.PermissionDenied(msg)
    if isinstance(exc, se.ResourceNotFound):
        return errors.FailedPrecondition(msg)
    if isinstance(
        exc, (se.MalformedSecret, se.UnsupportedVersion, se.UnsupportedType, se.UnknownProvider)
    ):
        return errors.InvalidArgument(msg)
    return errors.FailedPrecondition(msg)


def check_key_uri(uri: str) -> str:
    """A well-formed key resource URI (full match, no ``.``/``..`` segments)."""
    # kbs:///repo/type/tag (or kbs+plugin:///...): two or more segments, never . or ..
    segments = hostless_segments(uri, plugins=True) if len(uri) <= MAX_KEY_URI else None
    if segments is None or len(segments) < 2:
        raise errors.InvalidArgument(
            f"{PARAM_KEY_RESOURCE} must be a kbs:///repo/type/tag resource URI"
        )
    if has_dot_segment(segments):
        raise errors.InvalidArgument(f"{PARAM_KEY_RESOURCE} must not contain . or .. segments")
    return uri


def _check_key_resource(uri: str, allowed: Collection[str]) -> str:
    check_key_uri(uri)
    if not allowed:
        raise errors.PermissionDenied(
            f"{PARAM_KEY_RESOURCE} is not accepted: this node allows no key resources "
            "(start it with --allowed-key-resource PREFIX)"
        )
    if not uri_allowed(uri, allowed):
        raise errors.PermissionDenied(
            f"{PARAM_KEY_RESOURCE} {uri} is not under this node's --allowed-key-resource prefixes"
        )
    return uri


def _unseal(
    resolver: Resolver | None,
    value: str,
    what: str,
    allowed_kids: Collection[str] = (),
    *,
    fresh: bool = False,
) -> bytes:
    if resolver is None:
        raise errors.FailedPrecondition(f"{what} is sealed but no key resolver is configured")
    try:
        unseal_fresh = getattr(resolver, "unseal_fresh", None) if fresh else None
        if callable(unseal_fresh):  # past the resource cache (CachingResolver)
            return bytes(unseal_fresh(value, allowed_kids=allowed_kids))
        return resolver.unseal(value, allowed_kids=allowed_kids)
    except Exception as exc:  # resolver raises SealedSecretError subclasses
        raise _map_resolver_error(exc, f"cannot unseal {what}") from None


def root_key_from_resource(data: bytes, uri: str) -> bytes:
    """The 32-byte root key inside a key resource that is a coco-csi volume key JWK."""
    try:
        return parse_volume_key(data)
    except VolumeKeyFormatError as exc:
        raise errors.FailedPrecondition(
            f"key resource {uri} is not a coco-csi volume key ({exc}); make one with "
            "`coco-csi volume-key new`"
        ) from None


def resolve_volume_key(
    volume_id: str,
    volume_context: Mapping[str, str],
    secrets: Mapping[str, str],
    resolver: Resolver | None,
    *,
    ephemeral: bool = False,
    allowed_key_resources: Collection[str] = (),
    allowed_kids: Collection[str] = (),
    whole_passphrase: bool = False,
) -> VolumeKey:
    """Pick the key source for a NodePublishVolume request and produce the volume's password.

    ``allowed_key_resources``: kbs:/// prefixes a ``keyResource`` must lie under (none: every
    ``keyResource`` is refused). ``allowed_kids``: kid prefixes sealed values may be signed
    with, passed on to the resolver's unseal. ``whole_passphrase``: a sealed passphrase is
    used byte for byte, newlines included, as cryptsetup's ``--key-file`` and CDH use a LUKS2
    key (block volumes); otherwise only its first line counts, as gocryptfs reads a passfile.
    """
    for where, source in (("secrets", secrets), ("volume_context", volume_context)):
        value = source.get(PARAM_PASSPHRASE)
        if value is None:
            continue
        if not isinstance(value, str) or not is_sealed(value):
            raise errors.InvalidArgument(
                f"{where}[{PARAM_PASSPHRASE}] must be a sealed secret (sealed.*); "
                "a plaintext passphrase would be visible outside the TEE"
            )
        password = _unseal(resolver, value, f"{where}[{PARAM_PASSPHRASE}]", allowed_kids)
        line = password.split(b"\n", 1)[0]
        if whole_passphrase and password != line:
            return VolumeKey(
                password, "sealed-passphrase", PASSPHRASE_SCRYPT_LOGN, first_line=line or None
            )
        if not line:
            raise errors.InvalidArgument(f"{where}[{PARAM_PASSPHRASE}] unseals to an empty value")
        return VolumeKey(line, "sealed-passphrase", PASSPHRASE_SCRYPT_LOGN)

    for where, source in (("secrets", secrets), ("volume_context", volume_context)):
        ref = source.get(PARAM_KEY_RESOURCE)
        if ref is None:
            continue
        if is_sealed(ref):
            ref = _unseal(resolver, ref, f"{where}[{PARAM_KEY_RESOURCE}]", allowed_kids).decode(
                "utf-8", "replace"
            )
        uri = _check_key_resource(ref.strip(), allowed_key_resources)
        if resolver is None:
            raise errors.FailedPrecondition("volume needs a KBS key but no resolver is configured")
        try:
            data = resolver.get_resource(uri)
        except Exception as exc:
            raise _map_resolver_error(exc, f"cannot fetch key resource {uri}") from None
        root = root_key_from_resource(data, uri)
        return VolumeKey(
            derive_volume_password(root, volume_id), "kbs-derived", DERIVED_SCRYPT_LOGN
        )

    if ephemeral:
        return VolumeKey(
            os.urandom(32).hex().encode("ascii"), "ephemeral-random", DERIVED_SCRYPT_LOGN
        )
    raise errors.InvalidArgument(
        f"volume has no key source: set the StorageClass parameter {PARAM_KEY_RESOURCE} "
        f"or a sealed {PARAM_PASSPHRASE}"
    )
