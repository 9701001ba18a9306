"""OssTransport (oss2) against the signature-checking OSS peer: the contract, then OSS's own
matters (V1 and V4 signing, STS, TLS policy, clock skew) and a hostile server's answers."""

from __future__ import annotations

import errno
import logging
import tempfile
from collections.abc import Callable, Iterator

import pytest

from fuse_crypt.backend.oss import OssCredentials, OssTransport
from fuse_crypt.backend.transport import (
    AccessDenied,
    BadResponse,
    ObjectNotFound,
    ObjectStoreError,
    ObjectTransport,
)
from tests.fuse_crypt.transport_contract import TransportContract
from tests.peers.oss_server import MIN_PART, OssServer

AK, SK = "LTAI-test-ak-0001", "test-secret-Zq8w7e6r5t4y"
STS_AK, STS_SK, STS_TOKEN = "STS.tmp-ak-0002", "sts-secret-Mn4b3v", "CAIS-token-Xy9+/=abc"
BUCKET = "coco-contract"


@pytest.fixture(scope="module")
def oss() -> Iterator[OssServer]:
    with tempfile.TemporaryDirectory(prefix="oss") as d, OssServer(tls_dir=d) as server:
        server.add_credentials(AK, SK)
        server.add_credentials(STS_AK, STS_SK, STS_TOKEN)
        server.create_bucket(BUCKET)
        yield server


def transport(oss: OssServer, **kw: object) -> OssTransport:
    args: dict[str, object] = {
        "region": "cn-hangzhou",
        "credentials": OssCredentials(AK, SK),
        "ca_file": oss.ca_path,
        "read_timeout": 10.0,
    }
    args.update(kw)
    return OssTransport(oss.endpoint, BUCKET, **args)  # type: ignore[arg-type]


class TestOssContractV4(TransportContract):
    part_size = MIN_PART

    @pytest.fixture
    def make_transport(self, oss: OssServer) -> Callable[..., ObjectTransport]:
        return lambda max_body=None: transport(oss, **({"max_body": max_body} if max_body else {}))


class TestOssContractV1(TestOssContractV4):
    """oss2's V1 signature (what ossfs 1.x sends by default) is verified too."""

    @pytest.fixture
    def make_transport(self, oss: OssServer) -> Callable[..., ObjectTransport]:
        return lambda max_body=None: transport(
            oss, auth_version="v1", **({"max_body": max_body} if max_body else {})
        )

    def test_list_pagination_past_1000_with_delimiter(self, *a: object) -> None:
        pytest.skip("covered under V4; the list request signs the same way")

    def test_list_page_size_is_bounded(self, *a: object) -> None:
        pytest.skip("covered under V4; the list request signs the same way")


# -- credentials and signing -----------------------------------------------------------------


def test_wrong_secret_is_access_denied_and_names_no_secret(oss: OssServer) -> None:
    t = transport(oss, credentials=OssCredentials(AK, "not-the-secret"))
    with pytest.raises(AccessDenied) as e:
        t.put("k", b"x", metadata={})
    assert e.value.errno == errno.EACCES
    assert "SignatureDoesNotMatch" in str(e.value)
    assert "not-the-secret" not in str(e.value) and AK not in str(e.value)
    last = oss.state.requests[-1]
    assert last["status"] == 403


def test_unknown_access_key(oss: OssServer) -> None:
    with pytest.raises(AccessDenied, match="InvalidAccessKeyId"):
        transport(oss, credentials=OssCredentials("LTAI-nobody", SK)).head("k")


def test_sts_token_required_and_sent(oss: OssServer) -> None:
    with pytest.raises(AccessDenied, match="InvalidSecurityToken"):
        transport(oss, credentials=OssCredentials(STS_AK, STS_SK)).head("k")
    for version in ("v4", "v1"):
        t = transport(
            oss, credentials=OssCredentials(STS_AK, STS_SK, STS_TOKEN), auth_version=version
        )
        t.put("sts/obj", b"data", metadata={})
        assert t.get("sts/obj") == b"data"


def test_refreshed_credentials_apply_without_a_new_transport(oss: OssServer) -> None:
    """STS rotation: the source is asked per request, so a refresh needs no remount."""
    current = {"creds": OssCredentials(STS_AK, STS_SK, STS_TOKEN)}
    t = transport(oss, credentials=lambda: current["creds"])
    t.put("rot/a", b"1", metadata={})
    oss.add_credentials("STS.rotated", "new-secret", "new-token")
    del oss.state.credentials[STS_AK]  # the old token expired
    with pytest.raises(AccessDenied):
        t.get("rot/a")
    current["creds"] = OssCredentials("STS.rotated", "new-secret", "new-token")
    assert t.get("rot/a") == b"1"
    oss.add_credentials(STS_AK, STS_SK, STS_TOKEN)


def test_failing_credential_source_is_access_denied(oss: OssServer) -> None:
    def broken() -> OssCredentials:
        raise RuntimeError("sealed source unreachable: secret-material")

    with pytest.raises(AccessDenied) as e:
        transport(oss, credentials=broken).head("k")
    assert "secret-material" not in str(e.value)


@pytest.mark.parametrize("skew", [-20 * 60, 20 * 60])
@pytest.mark.parametrize("version", ["v4", "v1"])
def test_clock_skew_refused(oss: OssServer, skew: int, version: str) -> None:
    import time

    oss.state.clock = lambda: time.time() + skew
    try:
        with pytest.raises(AccessDenied, match="RequestTimeTooSkewed"):
            transport(oss, auth_version=version).head("k")
    finally:
        oss.state.clock = time.time


def test_v4_scope_for_another_region_refused(oss: OssServer) -> None:
    with pytest.raises(AccessDenied, match="SignatureDoesNotMatch"):
        transport(oss, region="cn-beijing").head("k")


def test_credentials_never_in_repr() -> None:
    c = OssCredentials("ak", "very-secret", "sts-token")
    assert "very-secret" not in repr(c) and "sts-token" not in repr(c)


def test_no_secret_in_logs_even_at_debug(oss: OssServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = transport(oss, credentials=OssCredentials(STS_AK, STS_SK, STS_TOKEN))
    t.put("log/obj", b"data", metadata={"mode": "1"})
    t.get("log/obj")
    with pytest.raises(ObjectStoreError):
        t.head("log/missing")
    for secret in (STS_SK, STS_TOKEN, "OSS4-HMAC-SHA256"):
        assert secret not in caplog.text


# -- TLS and endpoint policy -------------------------------------------------------------------


def test_plain_http_needs_explicit_opt_in() -> None:
    with pytest.raises(ObjectStoreError) as e:
        OssTransport(
            "http://127.0.0.1:9", BUCKET, region="cn-hangzhou", credentials=OssCredentials(AK, SK)
        )
    assert e.value.errno == errno.EINVAL
    with OssServer() as plain:
        plain.add_credentials(AK, SK)
        plain.create_bucket(BUCKET)
        t = OssTransport(
            plain.endpoint,
            BUCKET,
            region="cn-hangzhou",
            credentials=OssCredentials(AK, SK),
            allow_insecure_http=True,
        )
        t.put("k", b"v", metadata={})
        assert t.get("k") == b"v"


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://oss.example",
        "https://user:pw@oss.example",
        "https://oss.example/path",
        "https://",
        "https://[::1]:9000",  # oss2 cannot address IPv6 literals: refused typed
        "https://[::1",  # urlsplit raises ValueError on these
        "https://[x]",
        "https://oss.example:0",
        "https://oss.example:99999",
        "https:// ",  # a blank host reached oss2, which raised TypeError (found by fuzzing)
        "https:// /",
        "https://a b",
    ],
)
def test_bad_endpoints_refused(endpoint: str) -> None:
    with pytest.raises(ObjectStoreError):
        OssTransport(endpoint, BUCKET, region="cn-hangzhou", credentials=OssCredentials(AK, SK))


@pytest.mark.parametrize("bucket", ["ab", "UPPER", "-lead", "trail-", "a" * 64, "dot.ted"])
def test_bad_bucket_names_refused(bucket: str) -> None:
    with pytest.raises(ObjectStoreError):
        OssTransport(
            "https://oss.example", bucket, region="cn-hangzhou", credentials=OssCredentials(AK, SK)
        )


def test_wrong_ca_pin_fails_typed_and_not_transient(oss: OssServer) -> None:
    with tempfile.TemporaryDirectory() as d, OssServer(tls_dir=d) as other:
        t = transport(oss, ca_file=other.ca_path)
        with pytest.raises(BadResponse, match="TLS"):
            t.head("k")


def test_environment_ca_bundle_and_proxy_ignored(
    oss: OssServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nonexistent")
    t = transport(oss)
    t.put("env/k", b"v", metadata={})
    assert t.get("env/k") == b"v"


# -- a hostile server --------------------------------------------------------------------------


@pytest.fixture
def hostile(oss: OssServer) -> Iterator[tuple[OssServer, OssTransport]]:
    t = transport(oss)
    t.put("hostile/obj", bytes(range(100)), metadata={})
    for i in range(5):
        t.put(f"hostile/list/{i}", b"", metadata={})
    yield oss, t
    oss.state.misbehave.clear()


@pytest.mark.parametrize(
    "mode,call",
    [
        ("ignore-range", lambda t: t.get("hostile/obj", 10, 10)),
        ("long-body", lambda t: t.get("hostile/obj", 0, 10)),
        ("long-body", lambda t: t.get("hostile/obj")),
        ("bad-content-range", lambda t: t.get("hostile/obj", 10, 10)),
        ("short-range", lambda t: t.get("hostile/obj", 10, 10)),
        ("short-range", lambda t: t.get("hostile/obj", 10)),
        ("huge-list", lambda t: t.list("hostile/list/", max_keys=3)),
        ("redirect", lambda t: t.get("hostile/obj", 0, 10)),
        ("gzip", lambda t: t.get("hostile/obj", 0, 10)),
        ("bad-meta", lambda t: t.head("hostile/obj")),
        ("many-meta", lambda t: t.head("hostile/obj")),
    ],
)
def test_hostile_answers_are_bad_response(
    hostile: tuple[OssServer, OssTransport], mode: str, call: Callable[[OssTransport], object]
) -> None:
    oss, t = hostile
    oss.state.misbehave.add(mode)
    with pytest.raises(BadResponse) as e:
        call(t)
    assert e.value.errno == errno.EIO


def test_listing_token_that_does_not_move(hostile: tuple[OssServer, OssTransport]) -> None:
    oss, t = hostile
    first = t.list("hostile/list/", max_keys=2)
    assert first.next_token
    oss.state.misbehave.add("same-token")
    with pytest.raises(BadResponse, match="token"):
        t.list("hostile/list/", max_keys=2, token=first.next_token)


def test_redirect_is_not_followed(hostile: tuple[OssServer, OssTransport]) -> None:
    oss, t = hostile
    oss.state.misbehave.add("redirect")
    before = len(oss.state.requests)
    with pytest.raises(BadResponse):
        t.get("hostile/obj")
    assert len(oss.state.requests) == before + 1


def test_metadata_we_send_is_checked() -> None:
    t = OssTransport(
        "https://oss.example", BUCKET, region="cn-hangzhou", credentials=OssCredentials(AK, SK)
    )
    for bad in ({"mode": "1\r\nx-oss-acl: public"}, {"bad name": "1"}, {"m": "é"}):
        with pytest.raises(ObjectStoreError) as e:
            t.put("k", b"", metadata=bad)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(ObjectStoreError) as e:
        t.put("k", b"", metadata={f"k{i}": "v" * 200 for i in range(60)})
    assert e.value.errno == errno.E2BIG


def test_keys_we_send_are_checked() -> None:
    t = OssTransport(
        "https://oss.example", BUCKET, region="cn-hangzhou", credentials=OssCredentials(AK, SK)
    )
    for bad in ("", "/lead", "\\lead", "x" * 1024, "lone-\udc80-surrogate"):
        with pytest.raises(ObjectStoreError) as e:
            t.head(bad)
        assert e.value.errno == errno.EINVAL


def test_aborted_upload_is_not_found_on_oss(oss: OssServer) -> None:
    """Stricter than the contract (which moto's 500 there must pass): OSS says NoSuchUpload."""
    t = transport(oss)
    uid = t.create_multipart("abort/k", metadata={})
    e1 = t.upload_part("abort/k", uid, 1, b"x")
    t.abort_multipart("abort/k", uid)
    with pytest.raises(ObjectNotFound):
        t.upload_part("abort/k", uid, 2, b"y")
    with pytest.raises(ObjectNotFound):
        t.complete_multipart("abort/k", uid, [(1, e1)])
