"""Shared wiring for tests: a KBS peer plus an AA peer on a short unix-socket path."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from tests.peers.aa_server import AaServer
from tests.peers.kbs_server import KbsServer

RESOURCES = {
    "default/key/1": b"\x01kbs-resource-one\x00\xff",
    "default/key/2": b"second-resource-value-abcdef",
    "default/sealed-secret/test": b"unsealed_secret_value",
    "denied/key/1": b"never-released-value",
}


@contextlib.contextmanager
def short_tmpdir(prefix: str = "cc") -> Iterator[str]:
    """unix socket paths are limited to 107 bytes; pytest's tmp_path may be longer."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def kbs_spec(kbs: KbsServer, aa: AaServer, extra: str = "") -> str:
    """The ``kbs:`` resolver spec for these peers: pinned CA over TLS, else insecure-http
    (the explicit test-only flag plain http needs)."""
    trust = f"ca={kbs.ca_path}" if kbs.ca_path else "insecure-http=true"
    return f"kbs:{kbs.url}?aa={aa.target}&{trust}{extra}"


@contextlib.contextmanager
def kbs_and_aa(
    resources: dict[str, bytes] | None = None,
    *,
    tls: bool = False,
    aa_transport: str = "grpc",
    aa_tee: str = "sample",
    **kbs_kwargs: Any,
) -> Iterator[tuple[KbsServer, AaServer]]:
    """A KBS peer and an AA peer; ``aa_transport="ttrpc"`` serves the AA as stock CoCo does."""
    with short_tmpdir() as d:
        kbs = KbsServer(
            RESOURCES if resources is None else resources,
            tls_dir=d if tls else None,
            deny=kbs_kwargs.pop("deny", ["denied/*"]),
            **kbs_kwargs,
        )
        with kbs, AaServer(f"{d}/aa.sock", transport=aa_transport, tee=aa_tee) as aa:
            yield kbs, aa
