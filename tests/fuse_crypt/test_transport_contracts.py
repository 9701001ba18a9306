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


def _known(reason: str) -> pytest.MarkDecorator:
    """A contract finding in a file another helper owns (h10a), reported to the lead;
    not strict, so the fix there turns it into an XPASS rather than a red suite."""
    return pytest.mark.xfail(reason=reason, strict=False)


class TestS3TransportContract(TransportContract):
    @_known("S3Transport.get raises an untyped ValueError when length > max_body")
    def test_answer_over_max_body_is_bad_response(
        self, make_transport: Callable[..., ObjectTransport], p: str
    ) -> None:
        super().test_answer_over_max_body_is_bad_response(make_transport, p)

    @_known("S3Transport.copy with only content_type drops the user metadata (REPLACE)")
    def test_copy_new_content_type_keeps_metadata(self, t: ObjectTransport, p: str) -> None:
        super().test_copy_new_content_type_keeps_metadata(t, p)

    @pytest.fixture
    def make_transport(self, moto: MotoS3) -> Callable[..., ObjectTransport]:
        bucket = moto.new_bucket("contract")
        return lambda max_body=None: moto.transport(
            bucket, **({"max_body": max_body} if max_body else {})
        )


class TestFakeTransportContract(TransportContract):
    bounds_bodies = False

    @_known("FakeTransport keeps metadata names as given (S3/OSS lower-case them)")
    def test_metadata_names_are_lower_case(self, t: ObjectTransport, p: str) -> None:
        super().test_metadata_names_are_lower_case(t, p)

    @_known("FakeTransport.get from past the end raises a 416 error instead of b''")
    def test_ranged_get_past_end_is_empty(self, t: ObjectTransport, p: str) -> None:
        super().test_ranged_get_past_end_is_empty(t, p)

    @pytest.fixture
    def make_transport(self) -> Callable[..., ObjectTransport]:
        fake = FakeTransport()
        return lambda max_body=None: fake
