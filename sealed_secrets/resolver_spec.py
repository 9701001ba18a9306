"""Resolver spec strings (``offline-fs:…``, ``kbs:…``, ``cdh:…``) -> a configured resolver.

The spec is a deployment choice (a node plugin flag, a CLI option); parsing it is kept apart
from the resolvers so that its strict checks (unknown or repeated parameters, absolute paths,
https only unless a test says otherwise) can be read and fuzzed alone.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from sealed_secrets.errors import ResolverError
from sealed_secrets.resolvers import CachingResolver, CdhResolver, Resolver

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
        return bool(value == "true")
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
