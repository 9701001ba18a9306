"""CredentialBox swaps under real clients, and RetryingTransport's bounded wait for newer
credentials after the store rejects the current ones.

S3: moto (server mode) does not authenticate requests, so it cannot refuse an expired
session token; what is checked over it is that boto3 *signs* each request with the box's
current key and sends its session token (the request as it leaves botocore). The refusal
path itself runs against the OSS peer, which does expire STS tokens
(tests/fuse_crypt/test_oss_rotation.py)."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fuse_crypt.backend.credentials import CredentialBox
from fuse_crypt.backend.retrying import MAX_REFRESH_RETRIES, RetryingTransport
from fuse_crypt.backend.s3 import S3Transport
from fuse_crypt.backend.transport import AccessDenied, CredentialsRejected
from tests.peers.moto_s3 import MotoS3, moto_s3


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


def test_s3_requests_are_signed_with_the_current_box_value(moto: MotoS3) -> None:
    bucket = moto.new_bucket()
    box = CredentialBox("AKIDFIRST0001", "first-secret", "first-token")
    t = S3Transport(bucket, credential_box=box, endpoint_url=moto.url, allow_insecure_http=True)
    seen: list[tuple[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        auth = request.headers.get("Authorization", b"")
        tok = request.headers.get("X-Amz-Security-Token", b"")
        as_text = [v.decode() if isinstance(v, bytes) else str(v) for v in (auth, tok)]
        seen.append((as_text[0], as_text[1]))

    t._client.meta.events.register("before-send.s3", capture)
    t.put("k", b"v", metadata={})
    assert "Credential=AKIDFIRST0001/" in seen[-1][0] and seen[-1][1] == "first-token"
    assert box.set("AKIDSECOND002", "second-secret", "second-token") is True
    assert t.get("k") == b"v"
    assert "Credential=AKIDSECOND002/" in seen[-1][0] and seen[-1][1] == "second-token"
    assert box.set("AKIDSECOND002", "second-secret", "second-token") is False  # unchanged
    assert box.version == 1


def test_s3_expired_token_codes_are_credentials_rejected() -> None:
    class E:
        def __init__(self, code: str, status: int) -> None:
            self.response = {
                "Error": {"Code": code},
                "ResponseMetadata": {"HTTPStatusCode": status},
            }

    for code, status in (("ExpiredToken", 400), ("InvalidAccessKeyId", 403)):
        assert isinstance(S3Transport._client_error("get", E(code, status)), CredentialsRejected)
    policy = S3Transport._client_error("get", E("AccessDenied", 403))
    assert isinstance(policy, AccessDenied) and not isinstance(policy, CredentialsRejected)


class Flaky:
    """An inner transport whose ``head`` is refused until the box holds ``good``."""

    def __init__(self, box: CredentialBox, good: str) -> None:
        self.box, self.good, self.calls = box, good, 0

    def head(self, key: str) -> str:
        self.calls += 1
        if self.box.get()[0] != self.good:
            raise CredentialsRejected("head: HTTP 403 SecurityTokenExpired")
        return "ok"


def test_rejected_request_waits_for_a_refresh_then_succeeds() -> None:
    box = CredentialBox("OLD", "s", "t")
    inner = Flaky(box, "NEW")
    t = RetryingTransport(inner, credentials=box, refresh_wait=5.0)  # type: ignore[arg-type]
    threading.Timer(0.3, lambda: box.set("NEW", "s2", "t2")).start()
    t0 = time.monotonic()
    assert t.head("k") == "ok"
    assert 0.2 < time.monotonic() - t0 < 4.0 and inner.calls == 2


def test_no_refresh_is_eio_after_the_wait_and_not_retried_forever() -> None:
    box = CredentialBox("OLD", "s", "t")
    inner = Flaky(box, "NEVER")
    t = RetryingTransport(inner, credentials=box, refresh_wait=0.3)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(CredentialsRejected) as e:
        t.head("k")
    assert e.value.errno == errno.EIO and 0.25 < time.monotonic() - t0 < 3
    assert inner.calls == 1
    # New credentials that are refused too: a bounded number of refreshes, then EIO.
    stop = threading.Event()

    def keep_rotating() -> None:
        n = 0
        while not stop.wait(0.05):
            n += 1
            box.set(f"BAD{n}", "s", "t")

    th = threading.Thread(target=keep_rotating)
    th.start()
    try:
        inner.calls = 0
        with pytest.raises(CredentialsRejected):
            RetryingTransport(inner, credentials=box, refresh_wait=2.0).head("k")  # type: ignore[arg-type]
        assert inner.calls == MAX_REFRESH_RETRIES + 1
    finally:
        stop.set()
        th.join()


def test_without_a_box_the_refusal_is_immediate_access_denied() -> None:
    box = CredentialBox("OLD", "s", "t")
    t = RetryingTransport(Flaky(box, "NEW"))  # type: ignore[arg-type]
    with pytest.raises(AccessDenied) as e:
        t.head("k")
    assert e.value.errno == errno.EACCES


def test_box_repr_never_shows_a_credential() -> None:
    box = CredentialBox("AKIDSHOWN", "secret-shown", "token-shown")
    assert "SHOWN" not in repr(box).upper() and "secret" not in repr(box)
