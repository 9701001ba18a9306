"""ListMultipartUploads on both real clients (DeleteVolume's cleanup of unfinished uploads):
S3Transport against a moto server, OssTransport against the signature-checking OSS peer
(V4 and V1 signatures verified, paging by the marker pair, URL-encoded keys), and each
client's refusal of pages that name keys outside the prefix or markers that stand still."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from fuse_crypt.backend.oss import OssCredentials, OssTransport
from fuse_crypt.backend.s3 import S3Transport
from fuse_crypt.backend.transport import BadResponse, UploadInfo
from tests.peers.fault_proxy import Fault, FaultProxy
from tests.peers.moto_s3 import ACCESS_KEY, SECRET_KEY, MotoS3, moto_s3
from tests.peers.oss_server import OssServer

AK, SK = "LTAI-uploads-ak-01", "uploads-secret-Pq9w8e"
BUCKET = "coco-uploads"


@pytest.fixture(scope="module")
def oss() -> Iterator[OssServer]:
    with tempfile.TemporaryDirectory(prefix="oss") as d, OssServer(tls_dir=d) as server:
        server.add_credentials(AK, SK)
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with moto_s3() as m:
        yield m


def oss_transport(oss: OssServer, auth: str = "v4") -> OssTransport:
    return OssTransport(
        oss.endpoint,
        BUCKET,
        region="cn-hangzhou",
        credentials=OssCredentials(AK, SK),
        ca_file=oss.ca_path,
        auth_version=auth,
    )


def s3_transport(moto: MotoS3, bucket: str, endpoint: str | None = None) -> S3Transport:
    return S3Transport(
        bucket,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        endpoint_url=endpoint or moto.url,
        allow_insecure_http=True,
    )


def listed(t: OssTransport | S3Transport, prefix: str, page: int) -> list[UploadInfo]:
    out: list[UploadInfo] = []
    marker = ("", "")
    for _ in range(100):
        p = t.list_uploads(
            prefix, key_marker=marker[0], upload_id_marker=marker[1], max_uploads=page
        )
        assert len(p.uploads) <= page
        out += p.uploads
        if p.next_marker is None:
            return out
        marker = p.next_marker
    raise AssertionError("did not end")


@pytest.mark.parametrize("auth", ["v4", "v1"])
def test_oss_lists_pages_and_aborts(oss: OssServer, auth: str) -> None:
    t = oss_transport(oss, auth)
    prefix = f"vol-{auth}/"
    keys = [f"{prefix}a", f"{prefix}a", f"{prefix}b c+d%", f"{prefix}dir/é", f"{prefix}z"]
    ids = [t.create_multipart(k, metadata={}) for k in keys]
    other = t.create_multipart(f"vol-{auth}-sibling/x", metadata={})
    got = listed(t, prefix, 2)
    assert sorted((u.key, u.upload_id) for u in got) == sorted(zip(keys, ids, strict=True))
    assert len({(u.key, u.upload_id) for u in got}) == len(keys)  # no page repeats one
    for u in got:
        t.abort_multipart(u.key, u.upload_id)
        t.abort_multipart(u.key, u.upload_id)  # NoSuchUpload: already gone, fine
    assert listed(t, prefix, 1000) == []
    assert [u.upload_id for u in listed(t, f"vol-{auth}-sibling/", 10)] == [other]
    requests = [r for r in oss.state.requests if "uploads" in r["query"] and r["method"] == "GET"]
    assert requests and all(r["status"] == 200 for r in requests)


def test_oss_markers_that_stand_still_are_refused(oss: OssServer) -> None:
    t = oss_transport(oss)
    for i in range(3):
        t.create_multipart(f"stuck/{i}", metadata={})
    first = t.list_uploads("stuck/", max_uploads=1)
    assert first.next_marker is not None
    oss.state.misbehave.add("same-token")
    try:
        with pytest.raises(BadResponse, match="markers"):
            t.list_uploads(
                "stuck/",
                key_marker=first.next_marker[0],
                upload_id_marker=first.next_marker[1],
                max_uploads=1,
            )
    finally:
        oss.state.misbehave.discard("same-token")


def test_oss_refuses_an_upload_outside_the_prefix(oss: OssServer) -> None:
    t = oss_transport(oss)
    t.create_multipart("inside/a", metadata={})
    t.create_multipart("insider/b", metadata={})  # shares the string prefix "inside"
    assert [u.key for u in t.list_uploads("inside/").uploads] == ["inside/a"]
    # The peer filters by prefix; a store that does not is refused by the client:
    with pytest.raises(BadResponse, match="outside"):
        t._check_listed("insider/b", "inside/", "", is_prefix=False)


def test_s3_lists_and_aborts_on_moto(moto: MotoS3) -> None:
    bucket = moto.new_bucket("uploads")
    t = s3_transport(moto, bucket)
    ids = [t.create_multipart(f"p/v1/{k}", metadata={}) for k in ("a", "b", "c")]
    t.upload_part("p/v1/a", ids[0], 1, b"x" * 1000)
    keep = t.create_multipart("p/v10/a", metadata={})
    got = listed(t, "p/v1/", 1000)
    assert sorted(u.upload_id for u in got) == sorted(ids)
    for u in got:
        t.abort_multipart(u.key, u.upload_id)
        t.abort_multipart(u.key, u.upload_id)
    assert listed(t, "p/v1/", 1000) == []
    assert [u.upload_id for u in listed(t, "p/", 1000)] == [keep]


def test_s3_refuses_a_listed_upload_outside_the_prefix_on_the_wire(moto: MotoS3) -> None:
    """moto's real answer rewritten on the wire to name a key outside the prefix."""
    bucket = moto.new_bucket("hostileup")
    s3_transport(moto, bucket).create_multipart("p/v1/a", metadata={})
    with FaultProxy(("127.0.0.1", moto.port)) as proxy:
        proxy.always = Fault.rewrite(b"<Key>p/v1/a</Key>", b"<Key>p/v10/a</Key>")
        t = s3_transport(moto, bucket, proxy.endpoint)
        with pytest.raises(BadResponse, match="outside"):
            t.list_uploads("p/v1/")
