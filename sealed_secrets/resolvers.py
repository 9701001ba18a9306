"""The resolvers: what consumers call to fetch a resource or unseal a sealed string.

``CachingResolver`` fronts any broker (offline-fs files, a KBS client) with the resource cache
and opens sealed strings itself; ``CdhResolver`` hands sealed strings to a Confidential Data
Hub. Which one a deployment gets is chosen by a spec string (:mod:`.resolver_spec`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol, runtime_checkable

from sealed_secrets.errors import SealedSecretError, UnsealFailed
from sealed_secrets.resource_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, ResourceCache
from sealed_secrets.resource_uri import parse_resource_uri

log = logging.getLogger("sealed_secrets.resolver")  # the name operators' log filters know

SEALED_PREFIX = "sealed."


@runtime_checkable
class Resolver(Protocol):
    """What consumers use: fetch a resource or unseal a sealed secret."""

    def get_resource(self, uri: str) -> bytes: ...

    def unseal(self, sealed: str, *, allowed_kids: Collection[str] = ()) -> bytes: ...


class ResourceSource(Protocol):
    """A broker that can fetch one resource (offline-fs, KBS client, CDH client)."""

    def get_resource(self, uri: str) -> bytes: ...


def is_sealed(value: str | bytes) -> bool:
    """True if ``value`` claims to be a sealed secret (``sealed.`` prefix, as kata checks).

    Deliberately prefix-only: a malformed sealed string must fail loudly in ``unseal`` rather
    than be passed through as if it were plaintext.
    """
    if isinstance(value, bytes):
        return value.startswith(SEALED_PREFIX.encode())
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


class CachingResolver:
    """Resolver over a ResourceSource; sealed strings are opened by ``unseal_secret``.

    Signature keys and vault payloads are fetched through ``self.get_resource`` so they share
    the cache and the broker's access policy.
    """

    def __init__(
        self,
        source: ResourceSource,
        *,
        cache_ttl: float = 60.0,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
        verify: bool = True,
        allow_unsigned: bool = False,
        key_dir: str | None = None,
        provider_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.source = source
        self.cache = ResourceCache(
            cache_ttl, max_entries=max_entries, max_bytes=max_bytes, clock=clock
        )
        self.verify = verify
        self.allow_unsigned = allow_unsigned
        self.key_dir = key_dir
        self.provider_options = provider_options

    def __repr__(self) -> str:
        return f"{type(self).__name__}(source={self.source!r}, cache={self.cache!r})"

    def get_resource(self, uri: str) -> bytes:
        key = str(parse_resource_uri(uri))  # host-free canonical form; validates early
        cached = self.cache.get(key)
        if cached is not None:
            log.debug("resource cache hit uri=%s", key)
            return cached
        value = self.source.get_resource(key)
        self.cache.put(key, value)
        log.info("resource fetched uri=%s source=%s", key, type(self.source).__name__)
        return value

    def unseal(self, sealed: str, *, allowed_kids: Collection[str] = ()) -> bytes:
        """Verify and open ``sealed``; only KBS signing-key kids in ``allowed_kids`` are used.

        The caller passes the allow-list from its own (measured) configuration; the default
        allows no KBS kid, so only key-directory kids verify.
        """
        from sealed_secrets.unseal import unseal_secret  # owned by the format package

        extra: dict[str, Any] = {}
        if self.provider_options is not None:  # guest-side KMS settings (credential dirs)
            extra["provider_options"] = self.provider_options
        return unseal_secret(
            sealed,
            get_resource=self.get_resource,
            verify=self.verify,
            allow_unsigned=self.allow_unsigned,
            key_dir=self.key_dir,
            allowed_kids=allowed_kids,
            **extra,
        )

    def unseal_fresh(self, sealed: str, *, allowed_kids: Collection[str] = ()) -> bytes:
        """As :meth:`unseal`, but every resource it needs (a ``vault`` payload) is fetched
        from the broker again, past the cache (whose entry is then replaced): a caller
        refreshing expiring credentials gets the tenant's newest value, not one cached
        up to ``cache_ttl`` ago."""
        from sealed_secrets.unseal import unseal_secret

        def fetch(uri: str) -> bytes:
            key = str(parse_resource_uri(uri))
            value = self.source.get_resource(key)
            self.cache.put(key, value)
            log.info("resource fetched uri=%s source=%s", key, type(self.source).__name__)
            return value

        extra: dict[str, Any] = {}
        if self.provider_options is not None:
            extra["provider_options"] = self.provider_options
        return unseal_secret(
            sealed,
            get_resource=fetch,
            verify=self.verify,
            allow_unsigned=self.allow_unsigned,
            key_dir=self.key_dir,
            allowed_kids=allowed_kids,
            **extra,
        )

    def clear_cache(self) -> None:
        self.cache.clear()


class UnsealingSource(ResourceSource, Protocol):
    """A broker that also verifies and opens sealed strings itself (the CDH client)."""

    def unseal(self, sealed: str) -> bytes: ...


class CdhResolver(CachingResolver):
    """Resolver delegating to a Confidential Data Hub, which verifies and unseals itself.

    ``verify``/``allow_unsigned``/``key_dir`` do not apply here: CDH's own configuration
    (``skip_sealed_secret_verification``) decides, so this process never sees signing keys.
    The kid gate does apply: CDH would fetch any ``kbs://`` kid with its attestation, so a
    string whose kid the caller does not allow never reaches CDH.
    """

    source: UnsealingSource

    def unseal(self, sealed: str, *, allowed_kids: Collection[str] = ()) -> bytes:
        from sealed_secrets import jws
        from sealed_secrets.keys import check_allowed_kids, is_local_kid, kid_allowed
        from sealed_secrets.unseal import UNSEAL_FAILED

        if not is_sealed(sealed):
            raise SealedSecretError("value is not a sealed secret (missing 'sealed.' prefix)")
        allowed = check_allowed_kids(allowed_kids)
        parsed = jws.parse(sealed)
        kid = parsed.kid
        if kid is not None and not is_local_kid(kid) and not kid_allowed(kid, allowed):
            log.debug("sealed secret verification failed cause=kid-not-allowed")
            raise UnsealFailed(UNSEAL_FAILED)
        return self.source.unseal(sealed)

    def unseal_fresh(self, sealed: str, *, allowed_kids: Collection[str] = ()) -> bytes:
        """CDH fetches what a sealed string names itself (this process caches nothing)."""
        return self.unseal(sealed, allowed_kids=allowed_kids)
