"""The one front door for secrets: resource URIs and sealed strings → bytes.

The CSI node plugin and the CLIs only ever see ``Resolver``; which broker sits behind it
(offline-fs files, a KBS reached with AA evidence, or a CDH socket) is a deployment choice
expressed as a spec string. This module only gathers the public names; each job has its own
module: :mod:`.resource_cache` (the bounded cache), :mod:`.resolvers` (the resolvers and the
``Resolver`` protocol) and :mod:`.resolver_spec` (spec string -> resolver).
"""

from __future__ import annotations

from sealed_secrets.resolver_spec import CDH_CONFIG_SOURCE, build_resolver
from sealed_secrets.resolvers import (
    SEALED_PREFIX,
    CachingResolver,
    CdhResolver,
    Resolver,
    ResourceSource,
    is_sealed,
)
from sealed_secrets.resource_cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, ResourceCache

__all__ = [
    "CDH_CONFIG_SOURCE",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "SEALED_PREFIX",
    "CachingResolver",
    "CdhResolver",
    "Resolver",
    "ResourceCache",
    "ResourceSource",
    "build_resolver",
    "is_sealed",
]
