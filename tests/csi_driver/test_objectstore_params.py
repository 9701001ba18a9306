"""Object-store volume parameters: CDH's alibaba-cloud-oss options unchanged, S3 names,
sealed-only credentials, endpoint and prefix policy, and a fuzz of hostile parameter maps."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver import errors
from csi_driver.volumes.objectstore import (
    ObjectStorePolicy,
    SecretValue,
    parse_object_volume,
)
from tests.fuzzing import fuzz, long_fuzz

SEALED_AK = "sealed.fakejwsheader.YWtJZA.fakesignature"
SEALED_SK = "sealed.fakejwsheader.c2VjcmV0.fakesignature"
SEALED_PW = "sealed.fakejwsheader.cGFzcw.fakesignature"

CDH_SPEC = {  # the doc example of CDH's secure mount, with sealed values
    "akId": SEALED_AK,
    "akSecret": SEALED_SK,
    "annotations": "",
    "bucket": "tenant-models",
    "encrypted": "gocryptfs",
    "encPasswd": SEALED_PW,
    "kmsKeyId": "",
    "otherOpts": "-o max_stat_cache_size=0 -o allow_other",
    "path": "/datasets/v1",
    "readonly": "false",
    "targetPath": "/mnt/target",
    "url": "https://oss-cn-beijing.aliyuncs.com",
    "volumeId": "vol-1",
}


def test_cdh_spec_works_unchanged() -> None:
    spec = parse_object_volume(CDH_SPEC, {})
    assert spec.kind == "oss"
    assert spec.endpoint == "https://oss-cn-beijing.aliyuncs.com"
    assert spec.region == "cn-beijing"
    assert spec.bucket == "tenant-models"
    assert spec.prefix == "datasets/v1/"
    assert spec.access_key_id.sealed == SEALED_AK
    assert spec.access_key_secret.sealed == SEALED_SK
    assert spec.passphrase is not None and spec.passphrase.sealed == SEALED_PW
    assert spec.security_token is None and not spec.read_only and not spec.insecure_http
    assert set(spec.ignored) == {"annotations", "kmsKeyId", "otherOpts", "targetPath", "volumeId"}


def test_secrets_in_node_publish_secrets_and_internal_endpoint() -> None:
    ctx = {"bucket": "b-01", "url": "oss-cn-hangzhou-internal.aliyuncs.com", "path": "/"}
    sec = {"akId": SEALED_AK, "akSecret": SEALED_SK, "securityToken": SEALED_PW}
    spec = parse_object_volume(ctx, sec)
    assert spec.region == "cn-hangzhou" and spec.prefix == ""
    assert spec.endpoint == "https://oss-cn-hangzhou-internal.aliyuncs.com"
    assert spec.security_token is not None and spec.security_token.where == "secrets[securityToken]"
    assert spec.passphrase is None  # the key comes from keyResource


def test_s3_names() -> None:
    spec = parse_object_volume(
        {
            "objectStore": "s3",
            "bucket": "my.data-bucket",
            "prefix": "team/a",
            "endpoint": "https://minio.internal:9000",
            "pathStyle": "true",
            "readonly": "true",
        },
        {"accessKeyId": SEALED_AK, "secretAccessKey": SEALED_SK, "sessionToken": SEALED_PW},
    )
    assert (spec.kind, spec.region, spec.prefix) == ("s3", "us-east-1", "team/a/")
    assert spec.endpoint == "https://minio.internal:9000"
    assert spec.path_style and spec.read_only
    assert spec.security_token is not None


def test_kind_is_inferred_or_refused_when_ambiguous() -> None:
    base = {"bucket": "bkt", "endpoint": "https://s3.example", "region": "eu-1"}
    s3 = parse_object_volume(base, {"accessKeyId": SEALED_AK, "secretAccessKey": SEALED_SK})
    assert s3.kind == "s3"
    with pytest.raises(errors.InvalidArgument, match="cannot tell"):
        parse_object_volume(base, {"akId": SEALED_AK, "accessKeyId": SEALED_AK})
    with pytest.raises(errors.InvalidArgument):
        parse_object_volume({**base, "objectStore": "gcs"}, {})


@pytest.mark.parametrize("field", ["akId", "akSecret", "encPasswd"])
def test_plaintext_secrets_refused_unless_operator_allows(field: str) -> None:
    spec = {**CDH_SPEC, field: "plain-text-value-123"}
    with pytest.raises(errors.InvalidArgument, match="sealed") as e:
        parse_object_volume(spec, {})
    assert "plain-text-value-123" not in str(e.value)
    ok = parse_object_volume(spec, {}, ObjectStorePolicy(allow_plaintext_secrets=True))
    value = {"akId": ok.access_key_id, "akSecret": ok.access_key_secret}.get(field, ok.passphrase)
    assert isinstance(value, SecretValue) and value.plaintext == "plain-text-value-123"
    assert "plain-text-value-123" not in repr(ok)


def test_plain_http_needs_operator_flag() -> None:
    spec = {**CDH_SPEC, "url": "http://127.0.0.1:9000", "region": "cn-hangzhou"}
    with pytest.raises(errors.PermissionDenied, match="https"):
        parse_object_volume(spec, {})
    ok = parse_object_volume(spec, {}, ObjectStorePolicy(allow_insecure_http=True))
    assert ok.insecure_http and ok.endpoint == "http://127.0.0.1:9000"


def test_allowed_endpoints() -> None:
    policy = ObjectStorePolicy(allowed_endpoints=("*.aliyuncs.com", "minio.internal"))
    assert parse_object_volume(CDH_SPEC, {}, policy).bucket == "tenant-models"
    with pytest.raises(errors.PermissionDenied):
        parse_object_volume({**CDH_SPEC, "url": "https://evil.example"}, {}, policy)
    with pytest.raises(errors.PermissionDenied):
        parse_object_volume(
            {**CDH_SPEC, "url": "https://oss-cn-beijing.aliyuncs.com.evil.example"}, {}, policy
        )


@pytest.mark.parametrize(
    "url",
    [
        "ftp://oss-cn-beijing.aliyuncs.com",
        "https://user:pw@oss-cn-beijing.aliyuncs.com",
        "https://oss-cn-beijing.aliyuncs.com/bucket",
        "https://oss-cn-beijing.aliyuncs.com?x=1",
        "https://oss-cn-beijing.aliyuncs.com:99999",
        "https://bad_host.example",
        "",
        "http://[::1",  # urlsplit raises ValueError on these: must still be typed
        "https://[x]",
        "https://a]b",
        "https://oss-cn-beijing.aliyuncs.com:0",
    ],
)
def test_bad_endpoints(url: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_object_volume({**CDH_SPEC, "url": url}, {})


def test_region_needed_for_foreign_oss_endpoint() -> None:
    with pytest.raises(errors.InvalidArgument, match="region"):
        parse_object_volume({**CDH_SPEC, "url": "https://oss.example"}, {})
    spec = parse_object_volume({**CDH_SPEC, "url": "https://oss.example", "region": "ap-1"}, {})
    assert spec.region == "ap-1"


@pytest.mark.parametrize(
    "path", ["../x", "a/../b", "a//b", "a/./b", "a\\b", "a\nb", "a\x00b", "x/" * 300]
)
def test_bad_prefixes(path: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_object_volume({**CDH_SPEC, "path": path}, {})


@pytest.mark.parametrize("bucket", ["ab", "UPPER", "-x-", "a--b", "dot.ted", "a" * 64, ""])
def test_bad_oss_buckets(bucket: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_object_volume({**CDH_SPEC, "bucket": bucket}, {})


def test_value_given_twice_must_agree() -> None:
    assert parse_object_volume(CDH_SPEC, {"akId": SEALED_AK}).access_key_id.sealed == SEALED_AK
    with pytest.raises(errors.InvalidArgument, match="differently"):
        parse_object_volume(CDH_SPEC, {"akSecret": SEALED_PW})


def test_encrypted_must_be_gocryptfs() -> None:
    with pytest.raises(errors.InvalidArgument, match="gocryptfs"):
        parse_object_volume({**CDH_SPEC, "encrypted": "none"}, {})


def test_reveal_unseals_through_the_resolver() -> None:
    class Resolver:
        def __init__(self) -> None:
            self.seen: list[tuple[str, Any]] = []

        def unseal(self, value: str, allowed_kids: Any = ()) -> bytes:
            self.seen.append((value, tuple(allowed_kids)))
            return b"unsealed"

    r = Resolver()
    spec = parse_object_volume(CDH_SPEC, {})
    assert spec.access_key_secret.reveal(r, ("kid-",)) == b"unsealed"  # type: ignore[arg-type]
    assert r.seen == [(SEALED_SK, ("kid-",))]
    with pytest.raises(errors.FailedPrecondition):
        spec.access_key_id.reveal(None)


_names = st.sampled_from(
    [
        "akId",
        "akSecret",
        "bucket",
        "path",
        "url",
        "region",
        "encrypted",
        "encPasswd",
        "readonly",
        "objectStore",
        "accessKeyId",
        "secretAccessKey",
        "endpoint",
        "prefix",
        "pathStyle",
        "securityToken",
        "otherOpts",
    ]
)
_urlish = st.builds(
    lambda scheme, rest: scheme + rest,
    st.sampled_from(["https://", "http://", "", "https://[", "ftp://", "//"]),
    st.text(alphabet="ab.-:[]@/?#%1_\\ \n", max_size=30),
)
_values = st.one_of(
    st.text(max_size=60),
    _urlish,
    st.sampled_from(
        [
            SEALED_AK,
            "gocryptfs",
            "https://oss-cn-beijing.aliyuncs.com",
            "http://[::1]:80",
            "oss",
            "s3",
            "true",
            "bkt-1",
            "/a/b",
        ]
    ),
)


@long_fuzz
@fuzz(quick=300)
@given(
    ctx=st.builds(
        lambda base, extra: {**base, **extra},
        st.sampled_from([{}, CDH_SPEC]),  # a valid spec with a few values replaced, or none
        st.dictionaries(_names, _values, max_size=10),
    ),
    sec=st.dictionaries(_names, _values, max_size=4),
    plain=st.booleans(),
    http=st.booleans(),
)
def test_fuzz_only_typed_errors(
    ctx: dict[str, str], sec: dict[str, str], plain: bool, http: bool
) -> None:
    policy = ObjectStorePolicy(allow_plaintext_secrets=plain, allow_insecure_http=http)
    try:
        spec = parse_object_volume(ctx, sec, policy)
    except (errors.InvalidArgument, errors.PermissionDenied):
        return
    assert spec.kind in ("oss", "s3")
    assert spec.endpoint.startswith("https://") or (http and spec.insecure_http)
    assert ".." not in spec.prefix.split("/") and "\0" not in spec.prefix
    assert len(spec.prefix.encode()) <= 512
    for value in (spec.access_key_id, spec.access_key_secret):
        assert value.sealed is not None or (plain and value.plaintext)
