"""Build the in-guest key resolver from a --resolver spec (sealed_secrets contract)."""

from __future__ import annotations

from sealed_secrets.errors import SealedSecretError
from sealed_secrets.resolver import Resolver, build_resolver


class ResolverSpecError(ValueError):
    """The --resolver spec cannot be turned into a resolver (message is safe to print)."""


def build(spec: str) -> Resolver:
    """``offline-fs:/path.json``, ``kbs:https://...``, ``cdh:unix:///...`` → Resolver.

    Wrapped so the CLI can print one line and exit instead of a traceback at start-up.
    """
    try:
        return build_resolver(spec)
    except (SealedSecretError, ValueError, OSError) as exc:
        raise ResolverSpecError(f"bad --resolver {spec!r}: {type(exc).__name__}: {exc}") from None
