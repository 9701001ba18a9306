"""csi_driver.keys in-process: every key source, refusal and error mapping, exactly.

A mutation run (tools/mutation.py) judges keys.py by these first: they call
``resolve_volume_key`` with a recording resolver (no KBS, no FUSE), so each rule has a test
that fails in milliseconds when the rule is wrong. The derivation is checked against an
HKDF written out here with hmac, not against the module's own call.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection
from typing import Any

import pytest

from csi_driver import errors
from csi_driver.keys import (
    DERIVED_SCRYPT_LOGN,
    PASSPHRASE_SCRYPT_LOGN,
    VolumeKey,
    check_key_uri,
    derive_volume_password,
    resolve_volume_key,
    root_key_from_resource,
)
from csi_driver.volume_key import new_volume_key_jwk, parse_volume_key
from sealed_secrets import errors as se

ROOT_JWK = new_volume_key_jwk().encode()
ROOT = parse_volume_key(ROOT_JWK)
PREFIX = "kbs:///default/coco-csi"
URI = PREFIX + "/root"
SEALED = "sealed.fake.payload.sig"


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, by hand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
        i += 1
    return out[:length]


class _Resolver:
    """Answers from dicts and records what it was asked (and with which kid allow-list)."""

    def __init__(
        self,
        sealed: dict[str, bytes] | None = None,
        resources: dict[str, bytes] | None = None,
        fail: Exception | None = None,
    ) -> None:
        self.sealed = sealed or {}
        self.resources = resources or {}
        self.fail = fail
        self.unsealed: list[tuple[str, tuple[str, ...]]] = []
        self.fetched: list[str] = []

    def unseal(self, value: str, *, allowed_kids: Collection[str] = ()) -> bytes:
        self.unsealed.append((value, tuple(allowed_kids)))
        if self.fail is not None:
            raise self.fail
        return self.sealed[value]

    def get_resource(self, uri: str) -> bytes:
        self.fetched.append(uri)
        if self.fail is not None:
            raise self.fail
        return self.resources[uri]


def _resolve(
    ctx: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
    resolver: _Resolver | None = None,
    **kwargs: Any,
) -> VolumeKey:
    kwargs.setdefault("allowed_key_resources", (PREFIX,))
    return resolve_volume_key(
        "vol-1",
        ctx or {},
        secrets or {},
        resolver,  # type: ignore[arg-type]
        **kwargs,
    )


# -- derivation ---------------------------------------------------------------------------


def test_derived_password_is_hkdf_sha256_of_the_volume_id_in_hex() -> None:
    for vid in ("vol-1", "pvc-0123", "a" * 128):
        expect = _hkdf_sha256(ROOT, b"coco-csi volume key v1", vid.encode(), 32).hex()
        assert derive_volume_password(ROOT, vid) == expect.encode("ascii")
    assert derive_volume_password(ROOT, "a") != derive_volume_password(ROOT, "b")
    assert len(derive_volume_password(bytes(64), "a")) == 64


@pytest.mark.parametrize("size", [0, 16, 31])
def test_short_root_keys_are_refused(size: int) -> None:
    text = "key resource is too short to derive volume keys (need >= 32 bytes)"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        derive_volume_password(bytes(size), "vol-1")


def test_volume_key_repr_hides_the_password() -> None:
    key = VolumeKey(b"s3cret", "sealed-passphrase", 16)
    assert repr(key) == "VolumeKey(source=sealed-passphrase, scrypt_logn=16)"
    assert "s3cret" not in repr(key) and "s3cret" not in str(key)


# -- sealed passphrases -------------------------------------------------------------------


@pytest.mark.parametrize("where", ["secrets", "volume_context"])
def test_sealed_passphrase_is_unsealed_with_the_kid_allow_list(where: str) -> None:
    r = _Resolver(sealed={SEALED: b"pass phrase\nignored second line"})
    place = {"passphrase": SEALED}
    key = _resolve(
        ctx=place if where == "volume_context" else None,
        secrets=place if where == "secrets" else None,
        resolver=r,
        allowed_kids=("kbs:///k/",),
    )
    assert key == VolumeKey(b"pass phrase", "sealed-passphrase", PASSPHRASE_SCRYPT_LOGN)
    assert PASSPHRASE_SCRYPT_LOGN == 16
    assert r.unsealed == [(SEALED, ("kbs:///k/",))] and r.fetched == []


def test_only_the_first_line_of_a_passphrase_counts() -> None:
    r = _Resolver(sealed={SEALED: b"line one\nline two\nline three"})
    assert _resolve(secrets={"passphrase": SEALED}, resolver=r).password == b"line one"


def test_block_volumes_use_the_whole_passphrase_and_keep_its_first_line_apart() -> None:
    """cryptsetup's --key-file and CDH use every byte of a LUKS2 key; gocryptfs reads one
    line. The first line stays on the key only for volumes keyed with it before."""
    r = _Resolver(sealed={SEALED: b"line one\nline two\n"})
    key = _resolve(secrets={"passphrase": SEALED}, resolver=r, whole_passphrase=True)
    assert key.password == b"line one\nline two\n" and key.first_line == b"line one"
    assert "line" not in repr(key)
    r = _Resolver(sealed={SEALED: b"one line"})
    key = _resolve(secrets={"passphrase": SEALED}, resolver=r, whole_passphrase=True)
    assert key.password == b"one line" and key.first_line is None
    r = _Resolver(sealed={SEALED: b"\nafter an empty first line"})
    key = _resolve(secrets={"passphrase": SEALED}, resolver=r, whole_passphrase=True)
    assert key.password == b"\nafter an empty first line" and key.first_line is None
    with pytest.raises(errors.InvalidArgument, match="empty"):
        _resolve(secrets={"passphrase": SEALED}, resolver=r)
    r = _Resolver(sealed={SEALED: b""})
    with pytest.raises(errors.InvalidArgument, match="empty"):
        _resolve(secrets={"passphrase": SEALED}, resolver=r, whole_passphrase=True)


def test_secrets_win_over_volume_context_and_passphrases_over_key_resources() -> None:
    r = _Resolver(sealed={SEALED: b"from secrets", "sealed.other": b"from context"})
    key = _resolve(
        ctx={"passphrase": "sealed.other", "keyResource": URI},
        secrets={"passphrase": SEALED},
        resolver=r,
    )
    assert key.password == b"from secrets"
    key = _resolve(ctx={"passphrase": "sealed.other"}, secrets={"keyResource": URI}, resolver=r)
    assert key.password == b"from context" and r.fetched == []


@pytest.mark.parametrize("where", ["secrets", "volume_context"])
@pytest.mark.parametrize("value", ["hunter2", "", " sealed.x", "SEALED.x"])
def test_plaintext_passphrase_is_refused_without_echo(where: str, value: str) -> None:
    place = {"passphrase": value}
    text = (
        f"{where}[passphrase] must be a sealed secret (sealed.*); "
        "a plaintext passphrase would be visible outside the TEE"
    )
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        _resolve(
            ctx=place if where == "volume_context" else None,
            secrets=place if where == "secrets" else None,
            resolver=_Resolver(),
        )


def test_non_string_passphrase_is_refused() -> None:
    text = r"^secrets\[passphrase\] must be a sealed secret"
    with pytest.raises(errors.InvalidArgument, match=text):
        _resolve(secrets={"passphrase": b"sealed.x"}, resolver=_Resolver())  # type: ignore[dict-item]


@pytest.mark.parametrize("plain", [b"", b"\n", b"\nsecond line"])
def test_empty_unsealed_passphrase_is_refused(plain: bytes) -> None:
    r = _Resolver(sealed={SEALED: plain})
    text = "volume_context[passphrase] unseals to an empty value"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        _resolve(ctx={"passphrase": SEALED}, resolver=r)


def test_sealed_passphrase_without_a_resolver() -> None:
    text = "secrets[passphrase] is sealed but no key resolver is configured"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        _resolve(secrets={"passphrase": SEALED}, resolver=None)


# -- error mapping ----------------------------------------------------------------------------

_MAPPED = [
    (se.KbsUnavailable("down"), errors.Unavailable),
    (se.AttestationError("no evidence"), errors.Unavailable),
    (se.Unauthorized("401"), errors.PermissionDenied),
    (se.PolicyDenied("policy"), errors.PermissionDenied),
    (se.BadSignature("sig"), errors.PermissionDenied),
    (se.UnknownKid("kid"), errors.PermissionDenied),
    (se.WrongKey("key"), errors.PermissionDenied),
    (se.ResourceNotFound("404"), errors.FailedPrecondition),
    (se.MalformedSecret("shape"), errors.InvalidArgument),
    (se.UnsupportedVersion("0.2"), errors.InvalidArgument),
    (se.UnsupportedType("t"), errors.InvalidArgument),
    (se.UnknownProvider("p"), errors.InvalidArgument),
    (se.ProviderError("other"), errors.FailedPrecondition),
    (RuntimeError("bug"), errors.FailedPrecondition),
]


@pytest.mark.parametrize(("exc", "code"), _MAPPED, ids=[type(e).__name__ for e, _ in _MAPPED])
def test_unseal_failures_map_to_csi_codes(exc: Exception, code: type[errors.CsiError]) -> None:
    text = f"cannot unseal secrets[passphrase]: {type(exc).__name__}: {exc}"
    with pytest.raises(errors.CsiError, match=_exactly(text)) as info:
        _resolve(secrets={"passphrase": SEALED}, resolver=_Resolver(fail=exc))
    assert type(info.value) is code
    assert info.value.__suppress_context__


@pytest.mark.parametrize(("exc", "code"), _MAPPED, ids=[type(e).__name__ for e, _ in _MAPPED])
def test_fetch_failures_map_to_csi_codes(exc: Exception, code: type[errors.CsiError]) -> None:
    text = f"cannot fetch key resource {URI}: {type(exc).__name__}: {exc}"
    with pytest.raises(errors.CsiError, match=_exactly(text)) as info:
        _resolve(ctx={"keyResource": URI}, resolver=_Resolver(fail=exc))
    assert type(info.value) is code


# -- key resources ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["secrets", "volume_context"])
def test_key_resource_gives_a_derived_per_volume_password(where: str) -> None:
    r = _Resolver(resources={URI: ROOT_JWK})
    place = {"keyResource": " " + URI + "\n"}  # surrounding space is not part of the URI
    key = _resolve(
        ctx=place if where == "volume_context" else None,
        secrets=place if where == "secrets" else None,
        resolver=r,
    )
    assert key == VolumeKey(derive_volume_password(ROOT, "vol-1"), "kbs-derived", 10)
    assert DERIVED_SCRYPT_LOGN == 10 and r.fetched == [URI] and r.unsealed == []


def test_secrets_key_resource_wins_over_volume_context() -> None:
    other = PREFIX + "/other"
    r = _Resolver(resources={URI: ROOT_JWK, other: new_volume_key_jwk().encode()})
    key = _resolve(ctx={"keyResource": other}, secrets={"keyResource": URI}, resolver=r)
    assert r.fetched == [URI] and key.password == derive_volume_password(ROOT, "vol-1")


def test_sealed_key_resource_reference_is_unsealed_first() -> None:
    r = _Resolver(sealed={SEALED: (URI + "\n").encode()}, resources={URI: ROOT_JWK})
    key = _resolve(ctx={"keyResource": SEALED}, resolver=r, allowed_kids=("kbs:///k",))
    assert r.unsealed == [(SEALED, ("kbs:///k",))] and r.fetched == [URI]
    assert key.source == "kbs-derived"
    bad = _Resolver(sealed={SEALED: b"kbs:///default/coco-csi/\xff"})
    text = "keyResource must be a kbs:///repo/type/tag resource URI"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        _resolve(ctx={"keyResource": SEALED}, resolver=bad)
    with pytest.raises(
        errors.FailedPrecondition,
        match=_exactly("volume_context[keyResource] is sealed but no key resolver is configured"),
    ):
        _resolve(ctx={"keyResource": SEALED}, resolver=None)


@pytest.mark.parametrize("where", ["secrets", "volume_context"])
def test_a_sealed_key_resource_failure_names_where_it_came_from(where: str) -> None:
    place = {"keyResource": SEALED}
    ctx, secrets = (None, place) if where == "secrets" else (place, None)
    text = f"{where}[keyResource] is sealed but no key resolver is configured"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        _resolve(ctx=ctx, secrets=secrets, resolver=None)
    text = f"cannot unseal {where}[keyResource]: UnknownKid: k"
    with pytest.raises(errors.PermissionDenied, match=_exactly(text)):
        _resolve(ctx=ctx, secrets=secrets, resolver=_Resolver(fail=se.UnknownKid("k")))


def test_key_resource_without_a_resolver() -> None:
    text = "volume needs a KBS key but no resolver is configured"
    with pytest.raises(errors.FailedPrecondition, match=_exactly(text)):
        _resolve(ctx={"keyResource": URI}, resolver=None)


@pytest.mark.parametrize(
    "uri",
    [
        "kbs:///a",
        "kbs:///",
        "kbs://host/a/b",
        "kbs:///a//b",
        "https:///a/b",
        "kbs:///a/b?x=1",
        "kbs:///a/b\n",
        "kbs:///a/" + "b" * 506,
    ],
)
def test_malformed_key_resource_uris_are_refused(uri: str) -> None:
    text = "keyResource must be a kbs:///repo/type/tag resource URI"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        check_key_uri(uri)


@pytest.mark.parametrize("uri", ["kbs:///a/..", "kbs:///./b", "kbs:///a/./c", "kbs:///../b/c"])
def test_dot_segments_are_refused(uri: str) -> None:
    text = "keyResource must not contain . or .. segments"
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        check_key_uri(uri)


def test_well_formed_key_resource_uris_pass() -> None:
    longest = "kbs:///a/" + "b" * 503
    assert len(longest) == 512
    for uri in ("kbs:///a/b", "kbs:///a/b/c", "kbs+plug:///r/t/x", "kbs:///a/..b", longest):
        assert check_key_uri(uri) == uri


def test_key_resource_needs_a_node_allow_list() -> None:
    text = (
        "keyResource is not accepted: this node allows no key resources "
        "(start it with --allowed-key-resource PREFIX)"
    )
    r = _Resolver(resources={URI: ROOT_JWK})
    with pytest.raises(errors.PermissionDenied, match=_exactly(text)):
        _resolve(ctx={"keyResource": URI}, resolver=r, allowed_key_resources=())
    assert r.fetched == []


@pytest.mark.parametrize(
    "uri", ["kbs:///default/coco-csix/root", "kbs:///default/other/root", "kbs:///x/y"]
)
def test_key_resource_outside_the_allow_list_is_refused(uri: str) -> None:
    text = f"keyResource {uri} is not under this node's --allowed-key-resource prefixes"
    r = _Resolver(resources={uri: ROOT_JWK})
    with pytest.raises(errors.PermissionDenied, match=_exactly(text)):
        _resolve(ctx={"keyResource": uri}, resolver=r)
    assert r.fetched == []


@pytest.mark.parametrize("data", [b"", b"{}", ROOT.hex().encode(), b'{"kty": "oct"}'])
def test_a_resource_that_is_not_a_volume_key_is_refused(data: bytes) -> None:
    r = _Resolver(resources={URI: data})
    with pytest.raises(errors.FailedPrecondition) as info:
        _resolve(ctx={"keyResource": URI}, resolver=r)
    text = str(info.value)
    assert text.startswith(f"key resource {URI} is not a coco-csi volume key (")
    assert text.endswith("); make one with `coco-csi volume-key new`")
    assert info.value.__suppress_context__
    assert root_key_from_resource(ROOT_JWK, URI) == ROOT


# -- ephemeral and nothing -------------------------------------------------------------------


def test_ephemeral_volumes_without_a_source_get_a_random_key() -> None:
    a = _resolve(ephemeral=True)
    b = _resolve(ephemeral=True)
    assert a.source == "ephemeral-random" and a.scrypt_logn == 10
    assert re.fullmatch(rb"[0-9a-f]{64}", a.password) and a.password != b.password
    # an ephemeral volume with a source uses it
    r = _Resolver(resources={URI: ROOT_JWK})
    assert _resolve(ctx={"keyResource": URI}, resolver=r, ephemeral=True).source == "kbs-derived"


def test_no_key_source_is_refused() -> None:
    text = (
        "volume has no key source: set the StorageClass parameter keyResource "
        "or a sealed passphrase"
    )
    with pytest.raises(errors.InvalidArgument, match=_exactly(text)):
        _resolve(ctx={"other": "x"}, secrets={"x": "y"}, resolver=_Resolver())
