"""The KBS URL and certificate from CoCo's own Confidential Data Hub configuration.

Why read CDH's file rather than take a URL on our command line: in CoCo the CDH config
(``cdh.toml`` in the pod's initdata) is part of what the TEE evidence measures, so a KBS
address and certificate taken from it are the ones the tenant's attestation policy vouched
for. A URL passed as a flag is only as trustworthy as whoever wrote the flag.

Format (guest-components ``hub/src/config``): TOML with a ``[kbc]`` table holding ``name``
(``cc_kbc`` talks to a KBS), ``url`` and the optional ``kbs_cert`` (PEM text, not a path;
CDH hands it to its KBS client as a trust anchor). Everything else in the file is ignored.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass

from sealed_secrets.errors import ResolverError
from sealed_secrets.files import read_small_file

DEFAULT_CDH_CONFIG = "/etc/confidential-data-hub.conf"
MAX_CONFIG_BYTES = 256 * 1024
KBS_KBC = "cc_kbc"


@dataclass(frozen=True)
class CdhKbsConfig:
    """The part of a CDH config that says which KBS to trust."""

    url: str
    kbs_cert: str | None  # PEM text; None when absent or empty
    source: str

    def __repr__(self) -> str:
        return f"CdhKbsConfig(url={self.url!r}, kbs_cert={self.kbs_cert is not None})"


def parse_cdh_config(data: bytes, *, source: str) -> CdhKbsConfig:
    """Parse CDH config bytes; raise ResolverError naming ``source`` and the problem."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ResolverError(f"CDH config {source} is not UTF-8 text") from None
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        raise ResolverError(f"CDH config {source} is not valid TOML") from None
    kbc = doc.get("kbc")
    if not isinstance(kbc, dict):
        raise ResolverError(f"CDH config {source} has no [kbc] table")
    name = kbc.get("name")
    if name != KBS_KBC:
        shown = name[:40] if isinstance(name, str) else type(name).__name__
        raise ResolverError(
            f"CDH config {source} [kbc] name is {shown!r}: only {KBS_KBC} talks to a KBS"
        )
    url = kbc.get("url")
    if not isinstance(url, str) or not url:
        raise ResolverError(f"CDH config {source} [kbc] url is missing or not a string")
    cert = kbc.get("kbs_cert")
    if cert is not None and not isinstance(cert, str):
        raise ResolverError(f"CDH config {source} [kbc] kbs_cert is not a string")
    return CdhKbsConfig(url=url, kbs_cert=cert or None, source=source)


def load_cdh_config(path: str = DEFAULT_CDH_CONFIG) -> CdhKbsConfig:
    """Read and parse the CDH config at ``path`` (regular file, no symlink, bounded size)."""
    return parse_cdh_config(
        read_small_file(path, limit=MAX_CONFIG_BYTES, what="CDH config"), source=path
    )
