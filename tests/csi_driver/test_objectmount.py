"""The node's object-volume pieces in-process (no FUSE): policy, unsealing through a fake
resolver, what the daemon gets on argv vs stdin, and fuzzes of the hostile inputs (request
parameters; a state-file location)."""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Collection

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver import errors
from csi_driver.core.store import Publication
from csi_driver.volumes.objectmount import (
    ObjectKey,
    ObjectNodePolicy,
    ObjectStoreMounter,
    check_object_location,
    is_object_volume,
    object_location,
    resolve_object_volume,
)
from fuse_crypt.cli import objectloc
from tests.csi_driver.test_objectstore_params import CDH_SPEC, _names, _values
from tests.fuzzing import fuzz, long_fuzz

SECRETS = {
    "sealed.fakejwsheader.YWtJZA.fakesignature": b"LTAI-unit-ak",
    "sealed.fakejwsheader.c2VjcmV0.fakesignature": b"unit-secret-value",
    "sealed.fakejwsheader.cGFzcw.fakesignature": b"tenant password\n",
}
POLICY = ObjectNodePolicy(allowed_endpoints=("*.aliyuncs.com",))


class FakeResolver:
    def unseal(self, value: str, allowed_kids: Collection[str] = ()) -> bytes:
        if value not in SECRETS:
            from sealed_secrets.errors import BadSignature

            raise BadSignature("not ours")
        return SECRETS[value]

    def get_resource(self, uri: str) -> bytes:
        raise AssertionError("no resource expected")


def resolve(ctx: dict[str, str], policy: ObjectNodePolicy | None = POLICY) -> ObjectKey:
    return resolve_object_volume("vol-1", ctx, {}, FakeResolver(), policy)  # type: ignore[arg-type]


def test_cdh_spec_resolves_and_stays_out_of_argv() -> None:
    assert is_object_volume(CDH_SPEC, {})
    key = resolve(CDH_SPEC)
    assert key.source == "sealed-passphrase" and key.password == b"tenant password"
    assert "unit-secret" not in repr(key) and "LTAI" not in repr(key)
    assert key.spec is not None
    loc = object_location(key.spec)
    assert loc == "oss://tenant-models/datasets/v1" and check_object_location(loc) == loc
    m = ObjectStoreMounter()
    m.binary = sys.executable  # any executable: only the argv shape matters here
    pub = Publication("vol-1", "/k/t", loc, m.name, False, 1)
    argv = m.argv_for(pub, key, allow_other=True)
    joined = " ".join(argv)
    assert "unit-secret" not in joined and "LTAI" not in joined and "password" not in joined
    assert "--credentials-stdin" in argv and argv[-2:] == [loc, "/k/t"]
    stdin = m.stdin_for(loc, key)
    # What fuse-crypt reads back from that stdin: the one credentials parser, then the password.
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        ns = argparse.Namespace(
            endpoint="https://oss-cn-beijing.aliyuncs.com",
            insecure_http=False,
            ca_bundle=None,
            credentials_file=None,
            credentials_stdin=True,
            region=None,
            spool_dir=None,
        )
        parsed = objectloc.location_from_args(ns, loc)
        rest = sys.stdin.buffer.read()
    finally:
        sys.stdin = old
    assert (parsed.access_key, parsed.secret_key) == ("LTAI-unit-ak", "unit-secret-value")
    assert parsed.kind == "oss" and parsed.region == "cn-beijing"
    assert rest == b"tenant password\n"


def test_policy_refuses_what_the_node_did_not_allow() -> None:
    with pytest.raises(errors.PermissionDenied):
        resolve(CDH_SPEC, None)  # no policy: object volumes off
    with pytest.raises(errors.PermissionDenied):
        resolve(CDH_SPEC, ObjectNodePolicy(allowed_endpoints=("s3.example.com",)))
    only = ObjectNodePolicy(allowed_endpoints=POLICY.allowed_endpoints, allowed_buckets=("x/y",))
    with pytest.raises(errors.PermissionDenied):
        resolve(CDH_SPEC, only)
    under = ObjectNodePolicy(
        allowed_endpoints=POLICY.allowed_endpoints, allowed_buckets=("tenant-models/datasets",)
    )
    assert resolve(CDH_SPEC, under).spec is not None
    sibling = ObjectNodePolicy(
        allowed_endpoints=POLICY.allowed_endpoints, allowed_buckets=("tenant-models/data",)
    )
    with pytest.raises(errors.PermissionDenied):  # a prefix, not a string prefix
        resolve(CDH_SPEC, sibling)


@pytest.mark.parametrize(
    "bad",
    [
        "oss://b-1/a/../x",
        "oss://b-1/./x",
        "s3://bkt//x",
        "s3://bkt/x/",
        "ftp://bkt/x",
        "s3://bkt/\x80",  # the parameter parser allows C1 controls; fuse-crypt does not
        "s3://bkt/a\\b",
    ],
)
def test_recorded_location_refuses_dot_segments(bad: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        check_object_location(bad)
    assert check_object_location("s3://bkt/") == "s3://bkt/"


def test_a_prefix_fuse_crypt_would_refuse_is_invalid_argument_at_once() -> None:
    """Found by the fuzz: U+0080 passed the parameter parser, then failed late in init."""
    with pytest.raises(errors.InvalidArgument):
        resolve({**CDH_SPEC, "path": "\x80"})
    assert resolve({**CDH_SPEC, "path": "data sets/ünï"}).spec is not None


def test_unsealed_credential_with_a_newline_cannot_inject_stdin_lines() -> None:
    SECRETS["sealed.fakejwsheader.aW5q.fakesignature"] = b"ak\nAWS_SECRET_ACCESS_KEY=x"
    try:
        with pytest.raises(errors.InvalidArgument):
            resolve({**CDH_SPEC, "akId": "sealed.fakejwsheader.aW5q.fakesignature"})
    finally:
        del SECRETS["sealed.fakejwsheader.aW5q.fakesignature"]


@long_fuzz
@fuzz(quick=200)
@given(
    ctx=st.builds(
        lambda base, extra: {**base, **extra},
        st.sampled_from([{}, CDH_SPEC]),
        st.dictionaries(_names, _values, max_size=10),
    ),
    sec=st.dictionaries(_names, _values, max_size=4),
)
def test_fuzz_resolve_only_typed_errors(ctx: dict[str, str], sec: dict[str, str]) -> None:
    try:
        key = resolve_object_volume("vol-1", ctx, sec, FakeResolver(), POLICY)  # type: ignore[arg-type]
    except errors.CsiError:
        return
    assert key.spec is not None
    check_object_location(object_location(key.spec))
    for value in (key.access_key, key.secret_key):
        assert value.isprintable() and " " not in value and "\n" not in value


@long_fuzz
@fuzz(quick=300)
@given(st.one_of(st.text(max_size=80), st.from_regex(r"(s3|oss)://[a-z0-9.-]{0,8}/.{0,20}")))
def test_fuzz_recorded_location(text: str) -> None:
    try:
        check_object_location(text)
    except errors.InvalidArgument:
        return
    kind, rest = text.split("://", 1)
    parts = rest.split("/")[1:]
    assert kind in ("s3", "oss") and "\0" not in rest
    assert not {".", ".."} & set(parts) and (parts == [""] or "" not in parts)
    assert all(p.isprintable() for p in parts)
