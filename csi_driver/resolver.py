"""Build the in-guest key resolver from a --resolver spec (sealed_secrets contract)."""

from __future__ import annotations

from csi_driver.keys import Resolver


class ResolverSpecError(ValueError):
    """The --resolver spec cannot be turned into a resolver (message is safe to print)."""


def build(spec: str) -> Resolver:
    """``offline-fs:/path.json``, ``kbs:https://...``, ``cdh:unix:///...`` → Resolver."""
    try:
        from sealed_secrets.resolver import build_resolver
    except ImportError as exc:  # pragma: no cover - only while sealed_secrets is incomplete
        raise ResolverSpecError(f"sealed_secrets.resolver is unavailable: {exc}") from None
    try:
        return build_resolver(spec)
    except Exception as exc:
        raise ResolverSpecError(f"bad --resolver {spec!r}: {type(exc).__name__}: {exc}") from None
