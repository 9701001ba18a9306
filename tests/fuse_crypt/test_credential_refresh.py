"""CredentialBox swaps under real clients, and RetryingTransport's bounded wait for newer
credentials after the store rejects the current ones.

S3, against a real third-party verifier: moto in server mode with its IAM authentication on
(``moto_s3(auth=True)``, tests/peers/moto_s3.py).  It refuses a deleted IAM access key
(``InvalidAccessKeyId``), a wrong secret (``SignatureDoesNotMatch``) and a session token
that is not the session's own (``InvalidToken``), and checks SigV4 signatures; it does not
expire STS sessions, refuse ``Inactive`` keys, or check the request date (pinned below in
``test_what_moto_verifies``).  So the refusal -> wait -> re-send path runs here over the
wire with a revoked key and with a replaced session token; the ``ExpiredToken`` code itself
is only classified in-process, and expiry over the wire runs against the OSS peer, whose
STS tokens do expire (tests/fuse_crypt/test_oss_rotation.py).  The real FUSE mount over
the auth-on moto: tests/fuse_crypt/test_s3_rotation.py."""

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


@pytest.fixture(scope="module")
def moto_auth() -> Iterator[MotoS3]:
    with moto_s3(auth=True) as m:
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


# -- over moto with IAM authentication on ------------------------------------------------------


class Wire:
    """An S3Transport signing from a CredentialBox over the auth-on moto, wrapped in the
    daemon's RetryingTransport, with every request counted as it leaves botocore (the
    access key id it was signed with, in order)."""

    def __init__(self, moto: MotoS3, box: CredentialBox, bucket: str, wait: float) -> None:
        self.raw = moto.transport(bucket, credential_box=box, max_attempts=1)
        self.t = RetryingTransport(self.raw, credentials=box, refresh_wait=wait)
        self.sent: list[str] = []
        self.raw._client.meta.events.register("before-send.s3", self._count)

    def _count(self, request: Any, **_: Any) -> None:
        auth = request.headers.get("Authorization", b"")
        text = auth.decode() if isinstance(auth, bytes) else str(auth)
        self.sent.append(text.partition("Credential=")[2].partition("/")[0])


def _refused(fn: Any) -> CredentialsRejected:
    with pytest.raises(AccessDenied) as e:
        fn()
    assert type(e.value) is CredentialsRejected, e.value  # not a policy refusal: EACCES forever
    return e.value


def _keyed_wire(
    moto_auth: MotoS3, wait: float, first: bytes
) -> tuple[str, str, tuple[str, str], CredentialBox, Wire]:
    """A new bucket and IAM user with one key (A) in the box, and object ``k`` written
    with it: (bucket, user, key A, box, wire)."""
    bucket = moto_auth.new_bucket()
    user = moto_auth.new_user()
    a = moto_auth.create_key(user)
    box = CredentialBox(a[0], a[1])
    w = Wire(moto_auth, box, bucket, wait=wait)
    w.t.put("k", first, metadata={})
    return bucket, user, a, box, w


def test_revoked_key_is_refused_then_the_refresh_is_used(moto_auth: MotoS3) -> None:
    """Key A deleted in IAM: every operation, HEAD included (whose answer has no body), is
    CredentialsRejected; the wait picks up key B and the request succeeds, one refused try
    and one re-send, no remount, no storm."""
    bucket, user, a, box, w = _keyed_wire(moto_auth, 10.0, b"signed with A")
    assert w.t.head("k").size == len(b"signed with A")
    moto_auth.delete_key(user, a[0])
    for op in (
        lambda: w.raw.head("k"),
        lambda: w.raw.get("k"),
        lambda: w.raw.list(""),
        lambda: w.raw.put("k2", b"x", metadata={}),
        lambda: w.raw.delete("k"),
    ):
        err = _refused(op)
        assert a[0] not in str(err) and a[1] not in str(err)
    b = moto_auth.create_key(user)
    for op, want in ((lambda: w.t.get("k"), b"signed with A"), (lambda: w.t.head("k").size, 13)):
        if box.get()[0] == b[0]:
            box.set(a[0], a[1], None)  # back to the revoked key for the second round
        w.sent.clear()
        # The refresh lands after 1.5 s, well after the first (refused) try even on a
        # loaded VM, and well inside the 10 s wait.
        timer = threading.Timer(1.5, lambda: box.set(b[0], b[1], None))
        timer.start()
        t0 = time.monotonic()
        try:
            assert op() == want
        finally:
            timer.join()
        assert 1.4 < time.monotonic() - t0 < 9
        # One refused try with A (a HEAD's refusal is explained by one GET of its first
        # byte), then the re-send with B: waiting is not retrying.
        assert w.sent[-1] == b[0] and set(w.sent[:-1]) == {a[0]} and len(w.sent) <= 3, w.sent
    w.t.put("k3", b"signed with B", metadata={})
    assert moto_auth.client().get_object(Bucket=bucket, Key="k3")["Body"].read() == b"signed with B"


def test_revoked_key_without_a_refresh_is_eio_after_the_wait(moto_auth: MotoS3) -> None:
    bucket, user, a, box, w = _keyed_wire(moto_auth, 0.5, b"v")
    moto_auth.delete_key(user, a[0])
    ops = (lambda: w.t.get("k"), lambda: w.t.head("k"), lambda: w.t.put("k", b"w", metadata={}))
    for op in ops:
        w.sent.clear()
        t0 = time.monotonic()
        with pytest.raises(CredentialsRejected) as e:
            op()
        assert e.value.errno == errno.EIO and 0.45 < time.monotonic() - t0 < 5
        assert 1 <= len(w.sent) <= 2, w.sent  # a HEAD's refusal costs one GET to explain
    assert moto_auth.client().get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_replaced_session_token_then_a_new_session(moto_auth: MotoS3) -> None:
    """STS credentials from AssumeRole: a token that is not the session's (moto's stand-in
    for an expired one: it never expires sessions) is refused 400 InvalidToken, on HEAD
    too; a new session swapped in is used."""
    bucket = moto_auth.new_bucket()
    first = moto_auth.assume_role()
    box = CredentialBox(*first)
    w = Wire(moto_auth, box, bucket, wait=10.0)
    w.t.put("k", b"session one", metadata={})
    box.set(first[0], first[1], "not-the-session-token")
    _refused(lambda: w.raw.get("k"))
    _refused(lambda: w.raw.head("k"))
    second = moto_auth.assume_role()
    timer = threading.Timer(0.5, lambda: box.set(*second))
    timer.start()
    try:
        assert w.t.head("k").size == len(b"session one")
    finally:
        timer.join()
    assert w.t.get("k") == b"session one" and w.sent[-1] == second[0]


def test_what_moto_verifies(moto_auth: MotoS3) -> None:
    """The facts docs/fuse_crypt.md states about moto 5.2.5's checks, pinned: if moto
    starts refusing inactive keys or checking more, this says the docs are stale."""
    import botocore.exceptions

    bucket = moto_auth.new_bucket()
    moto_auth.client().put_object(Bucket=bucket, Key="k", Body=b"v")
    user = moto_auth.new_user()
    a = moto_auth.create_key(user)

    def code(key: tuple[str, str] | tuple[str, str, str | None]) -> str:
        try:
            moto_auth.client(key=key).get_object(Bucket=bucket, Key="k")
        except botocore.exceptions.ClientError as e:
            return str(e.response["Error"]["Code"])
        return "OK"

    assert code(a) == "OK"
    assert code(("AKIAUNKNOWNKEY000000", a[1])) == "InvalidAccessKeyId"
    assert code((a[0], a[1] + "x")) == "SignatureDoesNotMatch"
    assert code((a[0], a[1], "a-token")) == "InvalidToken"  # a user key with a token
    moto_auth.deactivate_key(user, a[0])
    assert code(a) == "OK"  # moto ignores the Inactive status
    s = moto_auth.assume_role()
    assert code(s) == "OK" and code((s[0], s[1])) == "InvalidAccessKeyId"
    gst = moto_auth.client("sts").get_session_token(DurationSeconds=900)["Credentials"]
    assert code((gst["AccessKeyId"], gst["SecretAccessKey"], gst["SessionToken"])) == (
        "InvalidAccessKeyId"
    )
    # Our classification of those answers: a wrong secret is a policy-style refusal
    # (EACCES at once), the others wait for newer credentials.
    t = moto_auth.transport(bucket, access_key=a[0], secret_key=a[1] + "x", max_attempts=1)
    with pytest.raises(AccessDenied) as e:
        t.get("k")
    assert type(e.value) is AccessDenied and "SignatureDoesNotMatch" in str(e.value)


def test_policy_refusal_of_a_head_is_not_waited_for(moto_auth: MotoS3) -> None:
    """A HEAD refused by IAM policy (a bare 403 as well) stays AccessDenied: EACCES at
    once, no wait for credentials that would not help."""
    import json

    bucket = moto_auth.new_bucket()
    moto_auth.client().put_object(Bucket=bucket, Key="k", Body=b"v")
    put_only = json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:PutObject", "Resource": "*"}],
        }
    )
    user = moto_auth.new_user(policy=put_only)
    a = moto_auth.create_key(user)
    box = CredentialBox(a[0], a[1])
    w = Wire(moto_auth, box, bucket, wait=10.0)
    w.t.put("mine", b"allowed", metadata={})
    t0 = time.monotonic()
    for op in (lambda: w.t.head("k"), lambda: w.t.get("k")):
        with pytest.raises(AccessDenied) as e:
            op()
        assert type(e.value) is AccessDenied and e.value.errno == errno.EACCES
    assert time.monotonic() - t0 < 5


def test_head_refusal_explained_only_by_a_credential_code() -> None:
    """In-process (botocore's Stubber): what the explaining GET answers decides. Only a
    credential code turns the bare HEAD refusal into CredentialsRejected; a successful
    GET, a 404 or a policy refusal leave it as it was. AWS answers an expired session's
    HEAD with a bare 400 and its GET with 400 ExpiredToken (moto never expires)."""
    import io

    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    box = CredentialBox("AKIDHEAD", "secret", "token")
    t = S3Transport("bucket", credential_box=box, endpoint_url="https://s3.invalid", max_attempts=1)
    cases: list[tuple[int, Any, type[Exception], int]] = [
        (400, ("ExpiredToken", 400), CredentialsRejected, errno.EACCES),
        (403, ("InvalidAccessKeyId", 403), CredentialsRejected, errno.EACCES),
        (403, ("AccessDenied", 403), AccessDenied, errno.EACCES),
        (403, ("NoSuchKey", 404), AccessDenied, errno.EACCES),
        (403, None, AccessDenied, errno.EACCES),  # the GET succeeds
        (400, None, Exception, errno.EIO),  # a bare 400 stays what it was: EIO, not waited
    ]
    for head_status, probe, want, want_errno in cases:
        with Stubber(t._client) as stub:
            stub.add_client_error(
                "head_object",
                service_error_code=str(head_status),
                http_status_code=head_status,
            )
            if probe is None:
                body = StreamingBody(io.BytesIO(b"x"), 1)
                stub.add_response("get_object", {"Body": body, "ContentLength": 1})
            else:
                stub.add_client_error(
                    "get_object", service_error_code=probe[0], http_status_code=probe[1]
                )
            with pytest.raises(OSError) as e:
                t.head("k")
            stub.assert_no_pending_responses()
        assert isinstance(e.value, want) and e.value.errno == want_errno, (head_status, probe)
        assert (type(e.value) is CredentialsRejected) == (want is CredentialsRejected)
