"""h10b's ObjectTransport contract applied to S3Transport over moto (a real third-party S3)
and to the in-process FakeTransport the backend tests use, so the fake cannot drift from
what S3 and OSS do (OssTransport applies it in test_oss_transport.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from fuse_crypt.backend.transport import ObjectTransport
from tests.fuse_crypt.fake_transport import FakeTransport
from tests.fuse_crypt.transport_contract import TransportContract
from tests.peers.moto_s3 import MotoS3, moto_s3


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


class TestS3TransportContract(TransportContract):
    @pytest.fixture
    def make_transport(self, moto: MotoS3) -> Callable[..., ObjectTransport]:
        bucket = moto.new_bucket("contract")
        return lambda max_body=None: moto.transport(
            bucket, **({"max_body": max_body} if max_body else {})
        )


class TestFakeTransportContract(TransportContract):
    bounds_bodies = False

    @pytest.fixture
    def make_transport(self) -> Callable[..., ObjectTransport]:
        fake = FakeTransport()
        return lambda max_body=None: fake
