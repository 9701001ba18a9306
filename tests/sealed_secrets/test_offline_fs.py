"""offline-fs KBC files: CoCo's JSON format, several files, strict parsing, no value leaks."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sealed_secrets.errors import ResolverError, ResourceNotFound
from sealed_secrets.offline_fs import EXTRA_FILES_ENV, OfflineFsKbc
from sealed_secrets.resource_uri import parse_resource_uri

SECRET = b"\x00offline-fs-secret-value\xff"


def write(path: pathlib.Path, doc: object) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_reads_coco_format(tmp_path: pathlib.Path) -> None:
    f = write(tmp_path / "r.json", {"default/key/1": b64(SECRET), "default/key/2": b64(b"")})
    kbc = OfflineFsKbc([f])
    assert kbc.get_resource("kbs:///default/key/1") == SECRET
    assert kbc.get_resource("kbs:///default/key/2") == b""
    # the host part of a resource URI is ignored, as CDH does
    assert kbc.get_resource("kbs://kbs.example:8080/default/key/1") == SECRET
    assert kbc.keys() == ["default/key/1", "default/key/2"]


def test_multiple_files_later_overrides(tmp_path: pathlib.Path) -> None:
    a = write(tmp_path / "a.json", {"r/t/a": b64(b"A"), "r/t/both": b64(b"from-a")})
    b = write(tmp_path / "b.json", {"r/t/b": b64(b"B"), "r/t/both": b64(b"from-b")})
    kbc = OfflineFsKbc([a, b])
    assert kbc.get_resource("kbs:///r/t/a") == b"A"
    assert kbc.get_resource("kbs:///r/t/b") == b"B"
    assert kbc.get_resource("kbs:///r/t/both") == b"from-b"


def test_missing_resource_is_not_found(tmp_path: pathlib.Path) -> None:
    kbc = OfflineFsKbc([write(tmp_path / "a.json", {"r/t/a": b64(b"A")})])
    with pytest.raises(ResourceNotFound) as info:
        kbc.get_resource("kbs:///r/t/zzz")
    assert info.value.status == 404
    assert "r/t/zzz" in str(info.value)


def test_missing_file_only_warns(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    good = write(tmp_path / "a.json", {"r/t/a": b64(b"A")})
    caplog.set_level(logging.INFO)
    kbc = OfflineFsKbc([str(tmp_path / "absent.json"), good])
    assert kbc.get_resource("kbs:///r/t/a") == b"A"
    assert any("offline-fs file missing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"r/t/a": 5}', "not a string"),
        ('{"r/t/a": "c2VjcmV0-_"}', "not standard base64"),
        ('{"r/t/a": "c2VjcmV0cw"}', "not standard base64"),  # missing padding
    ],
)
def test_corrupt_file_is_clear_error_without_values(
    tmp_path: pathlib.Path, content: str, fragment: str
) -> None:
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(ResolverError) as info:
        OfflineFsKbc([str(p)])
    msg = str(info.value)
    assert fragment in msg and str(p) in msg
    assert "c2VjcmV0" not in msg


def test_file_changes_are_picked_up(tmp_path: pathlib.Path) -> None:
    p = tmp_path / "a.json"
    write(p, {"r/t/a": b64(b"old")})
    kbc = OfflineFsKbc([str(p)])
    assert kbc.get_resource("kbs:///r/t/a") == b"old"
    write(p, {"r/t/a": b64(b"new-value")})
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert kbc.get_resource("kbs:///r/t/a") == b"new-value"
    p.unlink()
    with pytest.raises(ResourceNotFound):
        kbc.get_resource("kbs:///r/t/a")


def test_from_environment_uses_extra_paths(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = write(tmp_path / "a.json", {"r/t/a": b64(b"A")})
    b = write(tmp_path / "b.json", {"r/t/b": b64(b"B")})
    monkeypatch.setenv(EXTRA_FILES_ENV, f"{a},{b}")
    kbc = OfflineFsKbc.from_environment()
    assert kbc.paths[:2] == (
        "/etc/aa-offline_fs_kbc-keys.json",
        "/etc/aa-offline_fs_kbc-resources.json",
    )
    assert kbc.get_resource("kbs:///r/t/b") == b"B"


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "http:///a/b/c",
        "kbs:///a/b",
        "kbs:///a/b/c/d",
        "kbs:///a/../c",
        "kbs:///a//c",
        "kbs:///a/b/c#frag",
        "kbs:///a/b/c%2F",
        "kbs+Bad!:///a/b",
        "kbs:///a/b/c d",
    ],
)
def test_invalid_uris_rejected(uri: str) -> None:
    with pytest.raises(ResolverError):
        parse_resource_uri(uri)


def test_uri_forms() -> None:
    u = parse_resource_uri("kbs://host:1/default/key/1")
    assert (u.plugin, u.path, u.host) == ("resource", "default/key/1", "host:1")
    assert u.kbs_path() == "/kbs/v0/resource/default/key/1"
    assert str(u) == "kbs:///default/key/1"
    p = parse_resource_uri("kbs+pkcs11:///a/b?x=1")
    assert p.kbs_path() == "/kbs/v0/pkcs11/a/b" and p.query == "x=1"
    assert str(p) == "kbs+pkcs11:///a/b?x=1"


def test_plugin_uri_rejected_by_offline_fs(tmp_path: pathlib.Path) -> None:
    kbc = OfflineFsKbc([write(tmp_path / "a.json", {"a/b/c": b64(b"A")})])
    with pytest.raises(ResolverError):
        kbc.get_resource("kbs+plugin:///a/b/c")


SEG = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_uri_parser_only_raises_resolver_error(text: str) -> None:
    for candidate in (text, "kbs:///" + text, "kbs+p://h/" + text):
        with contextlib.suppress(ResolverError):
            parse_resource_uri(candidate)


@settings(max_examples=200, deadline=None)
@given(st.tuples(SEG, SEG, SEG), st.sampled_from(["", "host", "h:8080"]))
def test_uri_canonical_form_roundtrips(segs: tuple[str, str, str], host: str) -> None:
    u = parse_resource_uri(f"kbs://{host}/{'/'.join(segs)}")
    assert u.segments == segs
    again = parse_resource_uri(str(u))
    assert (again.plugin, again.segments, again.query) == (u.plugin, u.segments, u.query)
