"""The one front door for secrets: resource URIs and sealed strings → bytes.

The CSI node plugin and the CLIs only ever see ``Resolver``; which broker sits behind it
(offline-fs files, a KBS reached with AA evidence, or a CDH socket) is a deployment choice
expressed as a spec string. Resources are cached briefly (bounded in time, count and bytes)
because one pod start may ask for the same signing key and volume key several times, and
every KBS round trip may cost an attestation.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol, runtime_checkable

from sealed_secrets.errors import ResolverError, SealedSecretError, UnsealFailed
from sealed_secrets.resource_uri import parse_resource_uri

log = logging.getLogger(__name__)

SEALED_PREFIX = "sealed."
DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


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


class ResourceCache:
    """Thread-safe LRU cache bounded by TTL, entry count and total bytes.

    Bounded in time so a rotated or revoked resource is picked up; bounded in size so a
    misbehaving caller cannot pin unbounded secret material in memory.
    """

    def __init__(
        self,
        ttl: float,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or max_entries < 0 or max_bytes < 0:
            raise ResolverError("cache bounds must be non-negative")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0 and self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._items)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __repr__(self) -> str:  # keys are URIs (not secret) but keep reprs minimal anyway
        return f"ResourceCache(ttl={self.ttl}, entries={len(self._items)})"

    def _drop(self, key: str) -> None:
        _, value = self._items.pop(key)
        self._bytes -= len(value)

    def _expire(self, now: float) -> None:
        for key in [k for k, (exp, _) in self._items.items() if exp <= now]:
            self._drop(key)

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if item[0] <= self._clock():
                self._drop(key)
                return None
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: str, value: bytes) -> None:
        if not self.enabled or len(value) > self.max_bytes:
            return
        with self._lock:
            now = self._clock()
            if key in self._items:
                self._drop(key)
            self._expire(now)
            while self._items and (
                len(self._items) >= self.max_entries or self._bytes + len(value) > self.max_bytes
            ):
                self._drop(next(iter(self._items)))
            self._items[key] = (now + self.ttl, value)
            self._bytes += len(value)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


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

    def clear_cache(self) -> None:
        self.cache.clear()


class CdhResolver(CachingResolver):
    """Resolver delegating to a Confidential Data Hub, which verifies and unseals itself.

    ``verify``/``allow_unsigned``/``key_dir`` do not apply here: CDH's own configuration
    (``skip_sealed_secret_verification``) decides, so this process never sees signing keys.
    The kid gate does apply: CDH would fetch any ``kbs://`` kid with its attestation, so a
    string whose kid the caller does not allow never reaches CDH.
    """

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
        return self.source.unseal(sealed)  # type: ignore[attr-defined]


_RESOLVER_OPTS = {
    "max_entries",
    "max_bytes",
    "clock",
    "verify",
    "allow_unsigned",
    "key_dir",
    "provider_options",
}
_KBS_OPTS = {
    "evidence_provider",
    "token_provider",
    "attest",
    "ca",
    "ca_pem",
    "cert_sha256",
    "insecure_http",
    "timeout",
    "tee_key_type",
    "retries",
    "backoff",
    "refresh_margin",
    "aa",
}
_CDH_OPTS = {"timeout"}


def _split(opts: dict[str, Any], allowed: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    unknown = set(opts) - allowed - _RESOLVER_OPTS
    if unknown:
        raise ResolverError(f"unknown resolver options: {sorted(unknown)}")
    return (
        {k: v for k, v in opts.items() if k in _RESOLVER_OPTS},
        {k: v for k, v in opts.items() if k in allowed},
    )


# Spec query parameter -> KbsClient option. Dashes are the spec spelling of new options.
_KBS_QUERY = {
    "aa": "aa",
    "ca": "ca",
    "cert-sha256": "cert_sha256",
    "insecure-http": "insecure_http",
    "timeout": "timeout",
    "tee_key_type": "tee_key_type",
    "retries": "retries",
    "attest": "attest",
}
CDH_CONFIG_SOURCE = "cdh-config"


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ResolverError(f"kbs resolver option {name} must be true or false")


def _kbs_query(query: str) -> dict[str, Any]:
    # A literal '+' stays a '+' (``aa=ttrpc+unix:///…``); form encoding would make it a space.
    query = query.replace("+", "%2B")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    names = [k for k, _ in pairs]
    unknown = set(names) - set(_KBS_QUERY)
    if unknown:
        raise ResolverError(f"unknown kbs resolver spec parameters: {sorted(unknown)}")
    dupes = {k for k in names if names.count(k) > 1}
    if dupes:
        raise ResolverError(f"kbs resolver spec parameters given twice: {sorted(dupes)}")
    return {_KBS_QUERY[k]: v for k, v in pairs}


def _kbs_target(rest: str) -> tuple[str, dict[str, Any], str | None]:
    """Split ``kbs:`` spec text into (URL, query options, CDH config path or None)."""
    head, _, query = rest.partition("?")
    try:
        options = _kbs_query(query)
    except ValueError:
        raise ResolverError("kbs resolver spec has a malformed query") from None
    if head == CDH_CONFIG_SOURCE or head.startswith(CDH_CONFIG_SOURCE + ":"):
        from sealed_secrets.cdh_config import DEFAULT_CDH_CONFIG

        path = head[len(CDH_CONFIG_SOURCE) + 1 :] or DEFAULT_CDH_CONFIG
        if not path.startswith("/"):
            raise ResolverError("kbs:cdh-config:PATH needs an absolute path")
        return "", options, path
    parts = urllib.parse.urlsplit(head)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ResolverError(
            "kbs resolver spec needs https://host:port or cdh-config[:PATH], e.g. "
            "kbs:https://kbs:8080?aa=unix:///…/attestation-agent.sock&ca=/etc/kbs-ca.pem"
        )
    return head, options, None


def _build_kbs(rest: str, cache_ttl: float, opts: dict[str, Any]) -> CachingResolver:
    common, kbs_opts = _split(opts, _KBS_OPTS)
    base_url, query, cdh_path = _kbs_target(rest)
    for key, value in query.items():
        kbs_opts.setdefault(key, value)
    if cdh_path is not None:
        from sealed_secrets.cdh_config import load_cdh_config

        cdh = load_cdh_config(cdh_path)
        base_url = cdh.url
        if cdh.kbs_cert is not None:
            if "ca" in kbs_opts or "ca_pem" in kbs_opts:
                raise ResolverError(
                    f"CDH config {cdh_path} pins kbs_cert; do not also give ca= (one source)"
                )
            kbs_opts["ca_pem"] = cdh.kbs_cert
    for key, conv in (("timeout", float), ("retries", int)):
        if key in kbs_opts:
            try:
                kbs_opts[key] = conv(kbs_opts[key])
            except (TypeError, ValueError):
                raise ResolverError(f"kbs resolver option {key} is not a number") from None
    if "insecure_http" in kbs_opts:
        kbs_opts["insecure_http"] = _flag(kbs_opts["insecure_http"], "insecure-http")
    aa = kbs_opts.pop("aa", None)
    attest = kbs_opts.pop("attest", "evidence")
    if attest not in ("evidence", "token"):
        raise ResolverError("kbs resolver attest= must be 'evidence' or 'token'")
    if "evidence_provider" not in kbs_opts and "token_provider" not in kbs_opts:
        from sealed_secrets.evidence import DEFAULT_AA_SOCKET, AaEvidenceProvider, AaTokenProvider

        aa = aa or DEFAULT_AA_SOCKET  # stock CoCo: ttrpc-aa on its default socket

        if attest == "token":
            kbs_opts["token_provider"] = AaTokenProvider(aa)
        else:
            kbs_opts["evidence_provider"] = AaEvidenceProvider(aa)
    from sealed_secrets.kbs_client import KbsClient

    client = KbsClient(base_url, **kbs_opts)
    return CachingResolver(client, cache_ttl=cache_ttl, **common)


def _build_cdh(rest: str, cache_ttl: float, opts: dict[str, Any]) -> CachingResolver:
    common, cdh_opts = _split(opts, _CDH_OPTS)
    from sealed_secrets.cdh_client import DEFAULT_CDH_SOCKET, CdhClient

    client = CdhClient(rest or DEFAULT_CDH_SOCKET, **cdh_opts)  # default: stock ttrpc-cdh
    return CdhResolver(client, cache_ttl=cache_ttl, **common)


def build_resolver(spec: str, *, cache_ttl: float = 60.0, **opts: Any) -> Resolver:
    """Build a resolver from a spec string (see docs/architecture.md).

    ``offline-fs:/a.json[,/b.json]`` (``offline-fs:`` alone = CoCo default files),
    ``kbs:https://host:port?aa=unix:///…/attestation-agent.sock&ca=/path/ca.pem`` (or
    ``&cert-sha256=<hex>``; add ``&attest=token`` to let the AA run the handshake via
    GetToken("kbs")), ``kbs:cdh-config[:/path/cdh.toml]?aa=…`` (URL and ``kbs_cert`` from
    CoCo's CDH config, default /etc/confidential-data-hub.conf),
    ``kbs:http://…?aa=…&insecure-http=true`` (tests only),
    ``cdh:unix:///run/confidential-containers/cdh.sock``.
    AA/CDH addresses (sealed_secrets.guest_rpc): ``unix:///…`` and ``ttrpc+unix:///…`` speak
    ttrpc (stock CoCo), ``grpc+unix:///…`` and ``host:port`` gRPC; ``aa=`` left out and
    ``cdh:`` alone mean CoCo's default ttrpc sockets.
    Options: cache bounds (``max_entries``, ``max_bytes``), unseal policy (``verify``,
    ``allow_unsigned``, ``key_dir``, ``provider_options``) and broker options (``ca``,
    ``ca_pem``, ``cert_sha256``, ``insecure_http``, ``timeout``, ``retries``, ``backoff``,
    ``refresh_margin``, ``tee_key_type``, ``evidence_provider``, ``token_provider``).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ResolverError(
            "resolver spec must look like offline-fs:/path.json, kbs:URL or cdh:TARGET"
        )
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "offline-fs":
        from sealed_secrets.offline_fs import OfflineFsKbc

        common, _ = _split(opts, set())
        paths = [p.strip() for p in rest.split(",") if p.strip()]
        source = OfflineFsKbc(paths) if paths else OfflineFsKbc.from_environment()
        return CachingResolver(source, cache_ttl=cache_ttl, **common)
    if kind == "kbs":
        return _build_kbs(rest, cache_ttl, opts)
    if kind == "cdh":
        return _build_cdh(rest, cache_ttl, opts)
    raise ResolverError(f"unknown resolver kind: {kind!r} (use offline-fs, kbs or cdh)")
