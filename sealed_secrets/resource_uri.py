"""CoCo resource URIs: ``kbs[+plugin]://[host[:port]]/seg/seg/...[?query]``.

The host part is ignored (CDH does the same): which broker answers is the resolver's
configuration, not the secret's. Segments are validated strictly because they become both
KBS URL paths and offline-fs keys; a ``..`` segment must never reach either.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Collection
from dataclasses import dataclass

from sealed_secrets.errors import ResolverError

DEFAULT_PLUGIN = "resource"
PLAIN_PREFIX = "kbs:///"  # the default `resource` plugin, no host
_SEGMENT = re.compile(r"^[A-Za-z0-9._\-]+$")
_PLUGIN = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


@dataclass(frozen=True)
class ResourceUri:
    """A parsed resource URI; ``segments`` are the path parts after the host."""

    plugin: str
    segments: tuple[str, ...]
    query: str = ""
    host: str = ""

    @property
    def path(self) -> str:
        """``repo/type/tag``: the offline-fs key and the KBS resource path."""
        return "/".join(self.segments)

    def kbs_path(self) -> str:
        """The KBS v0 endpoint path, e.g. ``/kbs/v0/resource/repo/type/tag``."""
        return f"/kbs/v0/{self.plugin}/{self.path}"

    def __str__(self) -> str:
        scheme = "kbs" if self.plugin == DEFAULT_PLUGIN else f"kbs+{self.plugin}"
        query = f"?{self.query}" if self.query else ""
        return f"{scheme}:///{self.path}{query}"


_HOSTLESS = re.compile(r"kbs(\+[a-z0-9][a-z0-9_-]*)?:///([A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*)")


def is_resource_uri(text: str) -> bool:
    """True for a ``kbs://`` / ``kbs+plugin://`` reference (sealing key ids, vault names)."""
    return text.startswith("kbs://") or text.startswith("kbs+")


def is_hostless_prefix(text: str) -> bool:
    """Starts like a host-free resource URI (``kbs:///`` or ``kbs+plugin``): allow-list flags."""
    return text.startswith((PLAIN_PREFIX, "kbs+"))


def hostless_segments(uri: str, *, plugins: bool = False) -> tuple[str, ...] | None:
    """The path segments of a host-free ``kbs:///a/b/c`` (with ``plugins``, also
    ``kbs+plugin:///…``): no host, query or fragment, each segment ``[A-Za-z0-9._-]+``;
    None if ``uri`` is not of that form. ``.``/``..`` segments are returned: callers refuse
    them with their own message. The strict form that CSI parameters and allowed signing kids
    must have, where :func:`parse_resource_uri` is what a broker accepts.
    """
    match = _HOSTLESS.fullmatch(uri)
    if match is None or (match.group(1) and not plugins):
        return None
    return tuple(match.group(2).split("/"))


def has_dot_segment(segments: tuple[str, ...]) -> bool:
    return any(seg in (".", "..") for seg in segments)


def parse_resource_uri(uri: str) -> ResourceUri:
    """Parse and validate; raises ResolverError with a message naming the problem."""
    if not isinstance(uri, str) or not uri:
        raise ResolverError("resource URI is empty")
    if len(uri) > 2048:
        raise ResolverError("resource URI is too long")
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "kbs":
        plugin = DEFAULT_PLUGIN
    elif scheme.startswith("kbs+"):
        plugin = scheme[4:]
        if not _PLUGIN.match(plugin):
            raise ResolverError(f"resource URI has an invalid plugin name: {plugin!r}")
    else:
        raise ResolverError("resource URI must start with kbs:// or kbs+<plugin>://")
    if parts.fragment:
        raise ResolverError("resource URI must not have a fragment")
    raw = parts.path
    if not raw.startswith("/"):
        raise ResolverError("resource URI has no path")
    segments = tuple(raw[1:].split("/"))
    for seg in segments:
        if seg in ("", ".", "..") or not _SEGMENT.match(seg):
            raise ResolverError(f"resource URI has an invalid path segment: {seg!r}")
    if plugin == DEFAULT_PLUGIN and len(segments) != 3:
        raise ResolverError("kbs resource URI must have exactly three segments: repo/type/tag")
    return ResourceUri(plugin=plugin, segments=segments, query=parts.query, host=parts.netloc)


def uri_allowed(uri: str, prefixes: Collection[str]) -> bool:
    """The one allow-list rule for resource URIs (signing-key kids, volume key resources):
    ``uri`` equals an entry or lies below it, on a segment boundary (``kbs:///a/b`` and
    ``kbs:///a/b/`` allow ``kbs:///a/b/c`` but not ``kbs:///a/bc``)."""
    for prefix in prefixes:
        if uri == prefix or uri.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return True
    return False
