"""Issue 7 finding 9: a forged sealed string must not steer attested KBS requests.

The header (and its kid) is read before the signature can be checked. Before the fix, an
all-zero-signature string whose kid was ``kbs+plugin://…?query`` made the guest send
``GET /kbs/v0/<anything>?…`` with its attestation token, and the error differed by case, so
the host could probe, as the attested guest, which resources exist and what policy allows.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from jwcrypto import jwk

from sealed_secrets import jws, seal
from sealed_secrets.errors import (
    KbsUnavailable,
    ResolverError,
    SealedSecretError,
    UnsealFailed,
)
from sealed_secrets.keys import check_allowed_kids, kid_allowed
from sealed_secrets.resolver import CachingResolver, build_resolver
from sealed_secrets.unseal import UNSEAL_FAILED, unseal_secret
from tests.console_scripts import console_script
from tests.peers.aa_server import AaServer
from tests.peers.harness import kbs_and_aa, kbs_spec
from tests.peers.kbs_server import KbsServer
from tests.sealed_secrets.vectors_coco import PUBLIC_JWK, TEST_KEY, VECTOR_A

ALLOWED = ("kbs:///default/signing-key/",)
SIGNING = jwk.JWK(**TEST_KEY)
PAYLOAD = jws.parse(VECTOR_A).payload
RESOURCES = {
    "default/signing-key/sealed-secret": PUBLIC_JWK,
    "default/sealed-secret/test": b"vector-a-value",
    "default/key/1": b"some-volume-key-material-32bytes",
    "denied/signing-key/x": PUBLIC_JWK,
}

# kids the host might write into a forged header; none may cause a single request
HOSTILE_KIDS = [
    "kbs:///x/y/z?q",
    "kbs:///default/signing-key/sealed-secret?version=2",
    "kbs+plugin://host/anything?a=b",
    "kbs+plugin:///default/key/1",
    "kbs+resource:///default/signing-key/sealed-secret",
    "kbs://evil.example/default/signing-key/sealed-secret",
    "kbs:///default/key/1",  # a real resource, plain, but not a signing key the guest allows
    "kbs:///default/signing-key/../key/1",
    "kbs:///default/signing-key/sealed-secret#frag",
    "kbs:///default/signing-key",
    "kbs:///default/signing-key/a/b",
    "KBS:///default/signing-key/sealed-secret",
    "kbs:" + "/" * 5000,
]


def forged(kid: str) -> str:
    """A structurally valid sealed string with an all-zero signature."""
    header = jws.b64url_encode(json.dumps(jws.build_header(kid)).encode())
    return f"sealed.{header}.{jws.b64url_encode(PAYLOAD)}.{jws.b64url_encode(bytes(64))}"


@pytest.fixture
def kid_peers() -> Iterator[tuple[KbsServer, AaServer]]:
    with kbs_and_aa(RESOURCES) as pair:
        yield pair


def _error(fn) -> SealedSecretError:
    with pytest.raises(SealedSecretError) as err:
        fn()
    return err.value


def test_forged_kids_send_nothing_and_all_fail_alike(kid_peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = kid_peers
    r = build_resolver(kbs_spec(kbs, aa, "&retries=0"), cache_ttl=0)
    answers = set()
    for kid in HOSTILE_KIDS:
        # default: no KBS kid allowed at all; then with the signing-key prefix allowed
        answers.add(repr(_error(lambda k=kid: r.unseal(forged(k)))))
        answers.add(repr(_error(lambda k=kid: r.unseal(forged(k), allowed_kids=ALLOWED))))
    assert kbs.state.requests == []  # not one request: no /auth, no resource, no query
    assert aa.calls["GetEvidence"] == 0
    assert answers == {repr(UnsealFailed(UNSEAL_FAILED))}


def test_allowed_kid_failures_are_indistinguishable(kid_peers: tuple[KbsServer, AaServer]) -> None:
    """Missing key, key denied by policy, bad signature, unknown kid: one answer."""
    kbs, aa = kid_peers
    kbs.state.deny.append("denied/*")
    r = build_resolver(kbs_spec(kbs, aa, "&retries=0"), cache_ttl=0)
    allow = (*ALLOWED, "kbs:///denied/signing-key/", "kbs:///default/missing-key/")
    cases = {
        "bad signature": forged("kbs:///default/signing-key/sealed-secret"),
        "key missing": forged("kbs:///default/missing-key/none"),
        "policy denied": forged("kbs:///denied/signing-key/x"),
        "kid not allowed": forged("kbs:///default/other/x"),
        "not a key": forged("kbs:///default/signing-key/not-there"),
        "kid of a non-key resource": jws.sign(PAYLOAD, SIGNING, "kbs:///default/missing-key/k"),
    }
    errors = {
        name: _error(lambda s=s: r.unseal(s, allowed_kids=allow)) for name, s in cases.items()
    }
    shapes = {(type(e), str(e)) for e in errors.values()}
    assert shapes == {(UnsealFailed, UNSEAL_FAILED)}, errors
    # the genuine string still works, and the allowed key really was asked for
    assert r.unseal(VECTOR_A, allowed_kids=allow) == b"vector-a-value"
    paths = [p for _, p in kbs.state.requests if "/resource/" in p]
    assert all("?" not in p for p in paths)
    assert "/kbs/v0/resource/default/other/x" not in paths


def test_unreachable_kbs_is_the_one_distinct_answer(kid_peers: tuple[KbsServer, AaServer]) -> None:
    kbs, aa = kid_peers
    r = build_resolver(kbs_spec(kbs, aa, "&retries=0"), cache_ttl=0)
    kbs.inject("*", "status", 503, count=10)
    err = _error(lambda: r.unseal(VECTOR_A, allowed_kids=ALLOWED))
    assert isinstance(err, KbsUnavailable)
    assert "retry later" in str(err) and "signing-key" not in str(err)


def test_key_directory_kids_need_no_allow_list(tmp_path: Path) -> None:
    (tmp_path / "tenant-a").write_text(SIGNING.export_public())
    sealed = seal.seal_vault(
        "kbs:///default/sealed-secret/test", "kbs", signing_key=SIGNING, signing_kid="tenant-a"
    )
    calls: list[str] = []

    def get(uri: str) -> bytes:
        calls.append(uri)
        return b"vector-a-value"

    assert unseal_secret(sealed, get_resource=get, key_dir=str(tmp_path)) == b"vector-a-value"
    assert calls == ["kbs:///default/sealed-secret/test"]  # only the signed payload's resource
    with pytest.raises(UnsealFailed):
        unseal_secret(forged("tenant-b"), get_resource=get, key_dir=str(tmp_path))


def test_allow_list_entries_are_validated() -> None:
    assert check_allowed_kids(["kbs:///a/b/c", "kbs:///a/", "kbs:///a/b/"]) == (
        "kbs:///a/b/c",
        "kbs:///a/",
        "kbs:///a/b/",
    )
    for bad in [
        "kbs:///",
        "kbs:///a",  # a prefix must end in '/', or it would match kbs:///ab/…
        "kbs:///a/b/c/",
        "kbs://host/a/b/c",
        "kbs+p:///a/b/c",
        "kbs:///a/b/c?x",
        "kbs:///../b/c",
        "signing-key",
        "",
    ]:
        with pytest.raises(ResolverError):
            check_allowed_kids([bad])
    with pytest.raises(ResolverError):
        check_allowed_kids("kbs:///a/b/c")  # a bare string would be iterated per character
    assert kid_allowed("kbs:///a/b/c", ["kbs:///a/"])
    assert not kid_allowed("kbs:///ab/b/c", ["kbs:///a/"])
    assert not kid_allowed("kbs:///a/b/c?", ["kbs:///a/"])
    with pytest.raises(ResolverError):  # a bad configured list fails loudly, not as "forged"
        unseal_secret(VECTOR_A, get_resource=None, allowed_kids=["kbs:///oops"])


def test_cdh_resolver_applies_the_gate_before_cdh() -> None:
    class Cdh:
        calls: list[str] = []

        def get_resource(self, uri: str) -> bytes:
            raise AssertionError("not used")

        def unseal(self, sealed: str) -> bytes:
            self.calls.append(sealed)
            return b"ok"

    from sealed_secrets.resolver import CdhResolver

    cdh = Cdh()
    r = CdhResolver(cdh)
    for kid in HOSTILE_KIDS:
        with pytest.raises(UnsealFailed):
            r.unseal(forged(kid), allowed_kids=ALLOWED)
    assert cdh.calls == []
    assert r.unseal(VECTOR_A, allowed_kids=ALLOWED) == b"ok"


def test_resolve_volume_key_threads_the_allow_list() -> None:
    """csi_driver's one call site passes allowed_kids through (default: none allowed)."""
    from csi_driver import errors, keys

    r = CachingResolver(_Dict({**RESOURCES, "default/sealed-secret/test": b"pw"}))
    secrets = {"passphrase": VECTOR_A}
    with pytest.raises(errors.CsiError) as err:
        keys.resolve_volume_key("vol-1", {}, secrets, r)
    assert UNSEAL_FAILED in str(err.value)
    forged_err = pytest.raises(errors.CsiError, keys.resolve_volume_key, "vol-1", {}, {
        "passphrase": forged("kbs:///x/y/z?q")}, r, allowed_kids=ALLOWED)  # fmt: skip
    assert str(forged_err.value) == str(err.value)
    key = keys.resolve_volume_key("vol-1", {}, secrets, r, allowed_kids=ALLOWED)
    assert key.password == b"pw" and key.source == "sealed-passphrase"


class _Dict:
    """A ResourceSource over a dict keyed by repo/type/tag (records what was asked)."""

    def __init__(self, items: dict[str, bytes]) -> None:
        self.items = items
        self.calls: list[str] = []

    def get_resource(self, uri: str) -> bytes:
        from sealed_secrets.errors import ResourceNotFound

        self.calls.append(uri)
        try:
            return self.items[uri.removeprefix("kbs:///")]
        except KeyError:
            raise ResourceNotFound("missing") from None


def test_cli_allowed_kid_option(tmp_path: Path) -> None:
    import base64

    res = tmp_path / "r.json"
    res.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in RESOURCES.items()}))

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [console_script("sealed-secret"), "unseal", "--resolver", f"offline-fs:{res}", *args],
            capture_output=True,
            check=False,
            timeout=60,
        )

    refused = [run(forged(k)) for k in HOSTILE_KIDS[:4]] + [run(VECTOR_A)]
    assert {(p.returncode, p.stderr) for p in refused} == {
        (1, f"sealed-secret: error: UnsealFailed: {UNSEAL_FAILED}\n".encode())
    }
    ok = run("--allowed-kid", "kbs:///default/signing-key/sealed-secret", VECTOR_A)
    assert ok.returncode == 0 and ok.stdout == b"vector-a-value"
    bad = run("--allowed-kid", "kbs:///default", VECTOR_A)
    assert bad.returncode == 1 and b"ResolverError" in bad.stderr and bad.stderr[-1:] == b"\n"
