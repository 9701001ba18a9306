"""S3Transport against a real S3 implementation (moto server on loopback), and the object
backend over it."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator

import pytest

from fuse_crypt.backend.objectstore import ObjectStoreBackend
from fuse_crypt.backend.s3 import S3Transport
from fuse_crypt.backend.transport import (
    ObjectNotFound,
    ObjectStoreError,
    PreconditionFailed,
    TransientError,
)
from fuse_crypt.fusefrontend.mount import build_operations
from fuse_crypt.nametransform import DIRIV_NAME, NameTransform
from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY, MotoS3, moto_s3

MiB = 1 << 20


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


@pytest.fixture
def bucket(moto: MotoS3) -> str:
    return moto.new_bucket()


@pytest.fixture
def t(moto: MotoS3, bucket: str) -> S3Transport:
    return moto.transport(bucket)


def test_object_roundtrip_ranges_and_meta(t: S3Transport) -> None:
    etag = t.put("a/b", b"0123456789", metadata={"mode": "33188", "MTime": "5"})
    info = t.head("a/b")
    assert info.size == 10 and info.etag == etag
    assert info.metadata == {"mode": "33188", "mtime": "5"}
    assert info.content_type == "application/octet-stream"
    assert t.get("a/b", 2, 4) == b"2345"
    assert t.get("a/b", 8, 100) == b"89"  # short at the end
    assert t.get("a/b", 10, 5) == b""  # 416 -> empty
    assert t.get("a/b") == b"0123456789"
    with pytest.raises(PreconditionFailed):
        t.put("a/b", b"x", metadata={}, if_none_match=True)
    with pytest.raises(ObjectNotFound) as ei:
        t.head("missing")
    assert ei.value.errno == 2
    with pytest.raises(ObjectNotFound):
        t.get("missing")
    t.copy("a/b", "a/b", metadata={"mode": "33152"}, content_type="application/x-directory")
    info = t.head("a/b")
    assert info.metadata == {"mode": "33152"} and info.content_type == "application/x-directory"
    t.copy("a/b", "c")
    assert t.head("c").metadata == {"mode": "33152"}
    t.delete("c")
    t.delete("c")  # absent: fine
    t.delete_many(["a/b", "nope"])
    with pytest.raises(ObjectNotFound):
        t.head("a/b")


def test_listing_pages_and_prefixes(t: S3Transport) -> None:
    for i in range(7):
        t.put(f"d/f{i}", b"", metadata={})
    t.put("d/sub/x", b"", metadata={})
    t.put("d/", b"", metadata={}, content_type="application/x-directory")
    seen: list[str] = []
    prefixes: list[str] = []
    token = None
    pages = 0
    while True:
        page = t.list("d/", token=token, max_keys=3)
        pages += 1
        seen += [o.key for o in page.objects]
        prefixes += page.common_prefixes
        token = page.next_token
        if token is None:
            break
    assert pages >= 3
    assert sorted(seen) == ["d/"] + [f"d/f{i}" for i in range(7)]
    assert prefixes == ["d/sub/"]
    flat = t.list("d/", delimiter="")
    assert "d/sub/x" in [o.key for o in flat.objects]


def test_multipart_with_part_copy(t: S3Transport) -> None:
    base = os.urandom(11 * MiB)
    t.put("big", base, metadata={"mode": "33188"})
    up = t.create_multipart("big", metadata={"mode": "33188"})
    e1 = t.upload_part_copy("big", up, 1, "big", 0, 5 * MiB)
    e2 = t.upload_part("big", up, 2, b"Z" * (5 * MiB))
    e3 = t.upload_part_copy("big", up, 3, "big", 10 * MiB, MiB)
    assert t.head("big").size == len(base)  # unchanged until complete
    t.complete_multipart("big", up, [(1, e1), (2, e2), (3, e3)])
    assert t.get("big") == base[: 5 * MiB] + b"Z" * (5 * MiB) + base[10 * MiB :]
    up = t.create_multipart("big", metadata={})
    t.abort_multipart("big", up)
    t.abort_multipart("big", up)  # unknown id: fine


def test_max_body_bound(moto: MotoS3, bucket: str) -> None:
    small = moto.transport(bucket, max_body=1000)
    small.put("k", b"x" * 2000, metadata={})
    with pytest.raises(ObjectStoreError):
        small.get("k")
    assert small.get("k", 0, 1000) == b"x" * 1000


def test_plain_http_needs_explicit_opt_in(moto: MotoS3, bucket: str) -> None:
    with pytest.raises(ValueError, match="plain-http"):
        S3Transport(bucket, access_key="a", secret_key="b", endpoint_url=moto.url)
    with pytest.raises(ValueError):
        S3Transport(bucket, access_key="a", secret_key="b", endpoint_url="https://u:p@127.0.0.1:1/")


def test_unreachable_endpoint_is_transient_and_bounded(bucket: str) -> None:
    dead = S3Transport(
        bucket,
        access_key="a",
        secret_key="b",
        endpoint_url="http://127.0.0.1:9",
        allow_insecure_http=True,
        connect_timeout=1,
        read_timeout=1,
        max_attempts=1,
    )
    t0 = time.monotonic()
    with pytest.raises(TransientError):
        dead.head("x")
    assert time.monotonic() - t0 < 10


def test_tls_ca_pin() -> None:
    with tempfile.TemporaryDirectory() as d, moto_s3(tls_dir=d) as m:
        b = m.new_bucket()
        pinned = m.transport(b)
        pinned.put("k", b"v", metadata={})
        assert pinned.get("k") == b"v"
        other = S3Transport(
            b,
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            endpoint_url=m.url,
            ca_bundle="/etc/ssl/certs/ca-certificates.crt",
            max_attempts=1,
        )
        with pytest.raises(ObjectStoreError) as ei:
            other.get("k")
        assert "TLS" in str(ei.value)


def test_backend_over_moto_layout_and_io(moto: MotoS3, bucket: str, t: S3Transport) -> None:
    t.put("v/" + DIRIV_NAME, NameTransform.new_dir_iv(), metadata={"mode": "33060"})
    be = ObjectStoreBackend(t, "v", part_size=5 * MiB, multipart_threshold=6 * MiB)
    ops, _ = build_operations(be, bytes(32), None)
    ops.mkdir("/d", 0o755)
    data = os.urandom(13 * MiB + 5)
    fh = ops.create("/d/big", 0o644)
    ops.write("/d/big", data, 0, fh)
    ops.flush("/d/big", fh)
    ops.write("/d/big", b"patch", 7 * MiB, fh)
    ops.release("/d/big", fh)
    data = data[: 7 * MiB] + b"patch" + data[7 * MiB + 5 :]
    ops.rename("/d", "/e")
    objs = moto.objects(bucket, "v/")
    cd = ops.paths.cipher_path("/e")
    assert objs[f"v/{cd}/"]["ctype"] == "application/x-directory"
    assert objs[f"v/{cd}/"]["meta"]["mode"] == "493"
    be2 = ObjectStoreBackend(t, "v")
    ops2, _ = build_operations(be2, bytes(32), None)
    fh = ops2.open("/e/big", os.O_RDONLY)
    got = b"".join(ops2.read(None, MiB, off, fh) for off in range(0, len(data), MiB))
    ops2.release(None, fh)
    assert got == data
    be.destroy()
    be2.destroy()


def test_credentials_are_re_read_from_their_source(
    moto: MotoS3, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Rotated (STS) keys are picked up without a new transport; a failing source keeps
    the last keys until they are due (then requests fail with EACCES), and its error
    text (which may name secrets) is not logged."""
    import logging

    keys = {"n": 0, "fail": False}

    def source() -> tuple[str, str, str | None]:
        if keys["fail"]:
            raise RuntimeError("sealed source unavailable: secret-text-not-to-leak")
        keys["n"] += 1
        return f"AKID{keys['n']:04d}", "secret", f"token{keys['n']}"

    t = S3Transport(
        bucket,
        credential_source=source,
        refresh_seconds=0,  # due at once: every request re-reads the source
        endpoint_url=moto.url,
        allow_insecure_http=True,
        max_attempts=1,
    )
    t.put("k", b"v", metadata={})
    t.get("k")
    signer = t._client._request_signer  # what signed the last request
    assert keys["n"] >= 2
    assert signer._credentials.get_frozen_credentials().access_key == f"AKID{keys['n']:04d}"
    keys["fail"] = True
    with caplog.at_level(logging.DEBUG):
        assert t.get("k") == b"v"  # not due yet: the last keys stay in use
    assert "secret-text" not in caplog.text


def test_a_failing_source_past_due_is_access_denied(moto: MotoS3, bucket: str) -> None:
    from fuse_crypt.backend.transport import AccessDenied

    calls = {"n": 0}

    def source() -> tuple[str, str, str | None]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("gone")
        return "AKID", "secret", None

    t = S3Transport(
        bucket,
        credential_source=source,
        refresh_seconds=-30,  # due immediately
        endpoint_url=moto.url,
        allow_insecure_http=True,
        max_attempts=1,
    )
    with pytest.raises(AccessDenied) as ei:
        t.head("k")
    assert ei.value.errno == 13
