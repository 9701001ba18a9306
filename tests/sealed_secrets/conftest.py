"""Fixtures shared by the sealed_secrets tests. Each name means one thing in every module:

* ``aa``: an Attestation Agent test peer (gRPC, sample TEE) on a short unix socket;
* ``peers``: a KBS test peer serving ``tests.peers.harness.RESOURCES`` and an AA peer.

A module that needs a variant (another transport, other resources) gives it another name.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers.aa_server import AaServer
from tests.peers.harness import kbs_and_aa, short_tmpdir
from tests.peers.kbs_server import KbsServer


@pytest.fixture
def aa() -> Iterator[AaServer]:
    with short_tmpdir() as d, AaServer(f"{d}/aa.sock") as server:
        yield server


@pytest.fixture
def peers() -> Iterator[tuple[KbsServer, AaServer]]:
    with kbs_and_aa() as pair:
        yield pair
