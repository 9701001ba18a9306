"""The OSS peer is as strict as OSS: each check here fails on a lenient peer.

A request signed by oss2 and then altered in any signed part (a header, the key, a
sub-resource) is refused; parts OSS does not sign may change; the documented quirks (legacy
range behaviour, required Content-MD5, part order and size) are answered as OSS answers them.
"""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import oss2
import pytest
import requests

from tests.peers.oss_server import MIN_PART, OssServer

AK, SK, BUCKET = "LTAI-peer", "peer-secret", "peer-bucket"


@pytest.fixture(scope="module")
def peer() -> Iterator[OssServer]:
    with tempfile.TemporaryDirectory() as d, OssServer(tls_dir=d) as server:
        server.add_credentials(AK, SK)
        server.create_bucket(BUCKET)
        yield server


class TamperingSession(oss2.Session):  # type: ignore[misc]
    """Changes the request after oss2 signed it (what an attacker in the path would do)."""

    def __init__(self, ca: str, tamper: Callable[[Any], None]) -> None:
        super().__init__()
        self.session.trust_env = False
        self.session.verify = ca
        self.tamper = tamper

    def do_request(self, req: Any, timeout: Any) -> Any:
        self.tamper(req)
        return super().do_request(req, timeout)


def bucket(peer: OssServer, version: str, tamper: Callable[[Any], None] = lambda r: None) -> Any:
    auth = oss2.AuthV4(AK, SK) if version == "v4" else oss2.Auth(AK, SK)
    assert peer.ca_path is not None
    session = TamperingSession(peer.ca_path, tamper)
    return oss2.Bucket(auth, peer.endpoint, BUCKET, session=session, region="cn-hangzhou")


def _set_header(name: str, value: str) -> Callable[[Any], None]:
    def tamper(req: Any) -> None:
        if name in req.headers:
            req.headers[name] = value

    return tamper


def _rekey(req: Any) -> None:
    req.url = req.url.replace("obj", "obk")


def _renumber(req: Any) -> None:
    if "partNumber" in req.params:
        req.params["partNumber"] = "2"


@pytest.mark.parametrize("version", ["v4", "v1"])
@pytest.mark.parametrize(
    "tamper,call",
    [
        (
            _set_header("x-oss-meta-mode", "0"),
            lambda b: b.put_object("obj", b"x", {"x-oss-meta-mode": "1"}),
        ),
        (
            _set_header("Content-Type", "text/evil"),
            lambda b: b.put_object("obj", b"x", {"Content-Type": "a/b"}),
        ),
        (_rekey, lambda b: b.put_object("obj", b"x")),
        (
            _renumber,
            lambda b: b.upload_part("obj", b.init_multipart_upload("obj").upload_id, 1, b"x"),
        ),
    ],
    ids=["meta", "content-type", "key", "part-number"],
)
def test_altered_signed_parts_are_refused(
    peer: OssServer, version: str, tamper: Callable[[Any], None], call: Callable[[Any], Any]
) -> None:
    call(bucket(peer, version))  # unaltered: accepted
    with pytest.raises(oss2.exceptions.ServerError) as e:
        call(bucket(peer, version, tamper))
    assert (e.value.status, e.value.code) == (403, "SignatureDoesNotMatch")


def test_v1_does_not_sign_listing_parameters(peer: OssServer) -> None:
    """V1 signs only sub-resources: changing max-keys must not break it (nor V4's query)."""

    def more_keys(req: Any) -> None:
        if "max-keys" in req.params:
            req.params["max-keys"] = "7"

    bucket(peer, "v1", more_keys).list_objects_v2(max_keys=3)
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket(peer, "v4", more_keys).list_objects_v2(max_keys=3)
    assert e.value.code == "SignatureDoesNotMatch"


def test_v4_needs_the_content_sha256_header(peer: OssServer) -> None:
    def drop(req: Any) -> None:
        req.headers["x-oss-content-sha256"] = "not-a-hash"

    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket(peer, "v4", drop).put_object("obj", b"x")
    assert e.value.status in (400, 403)


def test_unsigned_request_is_access_denied(peer: OssServer) -> None:
    r = requests.get(f"{peer.endpoint}/{BUCKET}/obj", verify=peer.ca_path, timeout=5)
    assert r.status_code == 403
    assert b"<Code>AccessDenied</Code>" in r.content
    assert len(r.headers["x-oss-request-id"]) == 24


def test_head_error_is_in_x_oss_err(peer: OssServer) -> None:
    b = bucket(peer, "v4")
    with pytest.raises(oss2.exceptions.NotFound) as e:
        b.head_object("missing")
    assert e.value.code == "NoSuchKey"
    raw = e.value.headers["x-oss-err"]
    assert b"<Code>NoSuchKey</Code>" in base64.b64decode(raw)


def test_legacy_and_standard_range_behaviour(peer: OssServer) -> None:
    b = bucket(peer, "v4")
    b.put_object("rng", b"0123456789")
    legacy = b.get_object("rng", byte_range=(20, 30))
    assert legacy.status == 200 and legacy.read() == b"0123456789"  # ignored, as OSS does
    with pytest.raises(oss2.exceptions.ServerError) as e:
        b.get_object("rng", byte_range=(20, 30), headers={"x-oss-range-behavior": "standard"})
    assert (e.value.status, e.value.code) == (416, "InvalidRange")
    clipped = b.get_object("rng", byte_range=(5, 30), headers={"x-oss-range-behavior": "standard"})
    assert clipped.status == 206 and clipped.read() == b"56789"
    assert clipped.headers["Content-Range"] == "bytes 5-9/10"


def test_forbid_overwrite_values(peer: OssServer) -> None:
    b = bucket(peer, "v4")
    b.put_object("fo", b"1")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        b.put_object("fo", b"2", headers={"x-oss-forbid-overwrite": "true"})
    assert (e.value.status, e.value.code) == (409, "FileAlreadyExists")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        b.put_object("fo", b"2", headers={"x-oss-forbid-overwrite": "yes"})
    assert e.value.status == 400
    b.put_object("fo", b"3", headers={"x-oss-forbid-overwrite": "false"})


def test_batch_delete_needs_content_md5(peer: OssServer) -> None:
    def drop_md5(req: Any) -> None:
        req.headers.pop("Content-MD5", None)

    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket(peer, "v1", drop_md5).batch_delete_objects(["a"])
    # V1 signs Content-MD5, so the peer may refuse the signature first; either way: refused.
    assert e.value.status in (400, 403)


def test_multipart_rules(peer: OssServer) -> None:
    b = bucket(peer, "v4")
    uid = b.init_multipart_upload("mp").upload_id
    small = b.upload_part("mp", uid, 1, b"x" * 10)
    last = b.upload_part("mp", uid, 2, b"y")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        b.complete_multipart_upload(
            "mp", uid, [oss2.models.PartInfo(1, small.etag), oss2.models.PartInfo(2, last.etag)]
        )
    assert e.value.code == "EntityTooSmall"
    big = b.upload_part("mp", uid, 1, b"x" * MIN_PART)
    with pytest.raises(oss2.exceptions.ServerError) as e:
        b.complete_multipart_upload("mp", uid, [oss2.models.PartInfo(1, "0" * 32)])
    assert e.value.code == "InvalidPart"
    done = b.complete_multipart_upload(
        "mp", uid, [oss2.models.PartInfo(1, big.etag), oss2.models.PartInfo(2, last.etag)]
    )
    assert done.etag.endswith("-2")
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        b.abort_multipart_upload("mp", uid)
