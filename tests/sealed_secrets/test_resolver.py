"""The Resolver front door: spec parsing, bounded cache, unseal delegation."""

from __future__ import annotations

import base64
import json
import pathlib

import pytest

from sealed_secrets.errors import ResolverError, ResourceNotFound
from sealed_secrets.resolver import (
    CachingResolver,
    Resolver,
    ResourceCache,
    build_resolver,
    is_sealed,
)

SECRET = b"resolver-secret-bytes-0123456789"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingSource:
    """A real ResourceSource with a call counter, so cache behaviour is observable."""

    def __init__(self, resources: dict[str, bytes]) -> None:
        self.resources = resources
        self.calls: list[str] = []

    def get_resource(self, uri: str) -> bytes:
        self.calls.append(uri)
        key = uri.removeprefix("kbs:///")
        if key not in self.resources:
            raise ResourceNotFound(f"no {uri}", status=404)
        return self.resources[key]


def offline_file(tmp_path: pathlib.Path, doc: dict[str, bytes], name: str = "r.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in doc.items()}))
    return str(p)


def test_offline_fs_spec_roundtrip(tmp_path: pathlib.Path) -> None:
    a = offline_file(tmp_path, {"default/key/1": SECRET}, "a.json")
    b = offline_file(tmp_path, {"default/key/2": b"two"}, "b.json")
    r = build_resolver(f"offline-fs:{a},{b}")
    assert isinstance(r, Resolver)
    assert r.get_resource("kbs:///default/key/1") == SECRET
    assert r.get_resource("kbs:///default/key/2") == b"two"
    with pytest.raises(ResourceNotFound):
        r.get_resource("kbs:///default/key/3")


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "nothing",
        "vault:/x",
        "kbs:ftp://h",
        "kbs:https://h:1",
        "kbs:https://h?zz=1",
        "cdh:x.sock",
    ],
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ResolverError):
        build_resolver(spec)


def test_unknown_option_rejected(tmp_path: pathlib.Path) -> None:
    a = offline_file(tmp_path, {"a/b/c": b"x"})
    with pytest.raises(ResolverError, match="unknown resolver options"):
        build_resolver(f"offline-fs:{a}", cache_tll=3)


def test_cache_hits_within_ttl_and_refetches_after() -> None:
    clock = FakeClock()
    src = CountingSource({"a/b/c": SECRET})
    r = CachingResolver(src, cache_ttl=10, clock=clock)
    assert r.get_resource("kbs:///a/b/c") == SECRET
    assert r.get_resource("kbs://otherhost/a/b/c") == SECRET  # same canonical key
    assert len(src.calls) == 1
    clock.now += 9.9
    r.get_resource("kbs:///a/b/c")
    assert len(src.calls) == 1
    clock.now += 0.2
    src.resources["a/b/c"] = b"rotated"
    assert r.get_resource("kbs:///a/b/c") == b"rotated"
    assert len(src.calls) == 2


def test_cache_disabled_with_zero_ttl() -> None:
    src = CountingSource({"a/b/c": SECRET})
    r = CachingResolver(src, cache_ttl=0)
    for _ in range(3):
        r.get_resource("kbs:///a/b/c")
    assert len(src.calls) == 3
    assert len(r.cache) == 0


def test_errors_are_not_cached() -> None:
    src = CountingSource({})
    r = CachingResolver(src, cache_ttl=60)
    for _ in range(2):
        with pytest.raises(ResourceNotFound):
            r.get_resource("kbs:///a/b/c")
    assert len(src.calls) == 2


def test_cache_bounded_by_entries_lru() -> None:
    clock = FakeClock()
    cache = ResourceCache(60, max_entries=3, clock=clock)
    for i in range(3):
        cache.put(f"k{i}", b"v")
    assert cache.get("k0") == b"v"  # k0 now most recently used
    cache.put("k3", b"v")
    assert len(cache) == 3
    assert cache.get("k1") is None  # least recently used evicted
    assert cache.get("k0") == b"v" and cache.get("k3") == b"v"


def test_cache_bounded_by_bytes() -> None:
    cache = ResourceCache(60, max_entries=100, max_bytes=10)
    cache.put("a", b"12345")
    cache.put("b", b"12345")
    assert cache.total_bytes == 10
    cache.put("c", b"1")
    assert cache.get("a") is None and cache.get("c") == b"1"
    assert cache.total_bytes == 6
    cache.put("huge", b"x" * 11)  # larger than the whole cache: never stored
    assert cache.get("huge") is None
    assert cache.total_bytes <= 10


def test_cache_expired_entries_are_dropped_on_put() -> None:
    clock = FakeClock()
    cache = ResourceCache(5, clock=clock)
    cache.put("a", b"1234")
    clock.now += 6
    cache.put("b", b"1")
    assert cache.total_bytes == 1
    assert len(cache) == 1


def test_is_sealed() -> None:
    assert is_sealed("sealed.a.b.c")
    assert is_sealed(b"sealed.fakejwsheader.x.fakesignature")
    assert is_sealed("sealed.")  # prefix only: malformed strings must fail in unseal
    assert not is_sealed("Sealed.a.b.c")
    assert not is_sealed("plain-value")
    assert not is_sealed(None)  # type: ignore[arg-type]


def test_repr_has_no_resource_bytes(tmp_path: pathlib.Path) -> None:
    a = offline_file(tmp_path, {"a/b/c": SECRET})
    r = build_resolver(f"offline-fs:{a}")
    r.get_resource("kbs:///a/b/c")
    assert SECRET.decode() not in repr(r)


def test_unseal_vector_c_legacy_through_offline_fs(tmp_path: pathlib.Path) -> None:
    """Vector C (coco-interfaces.md 2.3) opens with verification skipped, via our cache."""
    vector_c = (
        "sealed.fakejwsheader.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2"
        "RlZmF1bHQvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6"
        "e30sImFubm90YXRpb25zIjp7fX0.fakesignature"
    )
    a = offline_file(tmp_path, {"default/sealed-secret/test": SECRET})
    r = build_resolver(f"offline-fs:{a}", verify=False, allow_unsigned=True)
    assert r.unseal(vector_c) == SECRET
    strict = build_resolver(f"offline-fs:{a}")
    from sealed_secrets.errors import SealedSecretError

    with pytest.raises(SealedSecretError):
        strict.unseal(vector_c)


def test_unseal_vector_a_signed_through_offline_fs(tmp_path: pathlib.Path) -> None:
    """Vector A verifies with the kata JWK fetched from kbs:///default/signing-key/..."""
    vector_a = (
        "sealed.eyJiNjQiOnRydWUsImFsZyI6IkVTMjU2Iiwia2lkIjoia2JzOi8vL2RlZmF1bHQvc2lnbmluZy1rZXkv"
        "c2VhbGVkLXNlY3JldCJ9.eyJ2ZXJzaW9uIjoiMC4xLjAiLCJ0eXBlIjoidmF1bHQiLCJuYW1lIjoia2JzOi8vL2R"
        "lZmF1bHQvc2VhbGVkLXNlY3JldC90ZXN0IiwicHJvdmlkZXIiOiJrYnMiLCJwcm92aWRlcl9zZXR0aW5ncyI6e30s"
        "ImFubm90YXRpb25zIjp7fX0.ZI2fTv5ramHqHQa9DKBFD5hlJ_Mjf6cEIcpsNGshpyhEiKklML0abfH600TD7LAFHf"
        "53oDIJmEcVsDtJ20UafQ"
    )
    jwk = (
        '{"alg":"ES256","crv":"P-256","kid":"sealed-secret-test-key","kty":"EC","use":"sig",'
        '"x":"4jH376AuwTUCIx65AJ_56D7SZzWf7sGcEA7_Csq21UM",'
        '"y":"rjdceysnSa5ZfzWOPGCURMUuHndxBAGUu4ISTIVN0yA"}'
    )
    a = offline_file(
        tmp_path,
        {"default/sealed-secret/test": SECRET, "default/signing-key/sealed-secret": jwk.encode()},
    )
    r = build_resolver(f"offline-fs:{a}")
    allow = ["kbs:///default/signing-key/sealed-secret"]
    assert r.unseal(vector_a, allowed_kids=allow) == SECRET
    assert (
        r.unseal(vector_a, allowed_kids=allow) == SECRET
    )  # second time the key and value come from cache


def test_offline_fs_default_files_from_environment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = offline_file(tmp_path, {"default/key/9": b"from-env"})
    monkeypatch.setenv("OFFLINE_FS_KBC_EXTRA_FILE_PATH", extra)
    r = build_resolver("offline-fs:")
    assert r.get_resource("kbs:///default/key/9") == b"from-env"


@pytest.mark.parametrize(
    "query",
    ["attest=bogus", "timeout=abc", "retries=x"],
)
def test_bad_kbs_spec_parameters(query: str) -> None:
    with pytest.raises(ResolverError):
        build_resolver(f"kbs:https://127.0.0.1:1?aa=unix:///x.sock&{query}")


def test_kbs_spec_missing_ca_file() -> None:
    with pytest.raises(ResolverError, match="CA file /nonexistent/ca.pem unreadable"):
        build_resolver("kbs:https://127.0.0.1:1?aa=unix:///x.sock&ca=/nonexistent/ca.pem")
