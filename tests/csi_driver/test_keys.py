"""csi_driver/keys.py: where a volume's key comes from, checked against the real resolver.

The resolver is the real offline-fs one over the resources of the ``keys`` fixture (a
coco-csi volume key JWK, a signing key, a sealed passphrase's resource, and resources that
must never become volume keys). What the control plane writes (``keyResource``, a
passphrase) is hostile: it may not choose a key the node does not allow, a plaintext
passphrase is refused, and no error message carries a secret.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from csi_driver import errors
from csi_driver.keys import (
    DERIVED_SCRYPT_LOGN,
    HKDF_SALT,
    PASSPHRASE_SCRYPT_LOGN,
    VolumeKey,
    resolve_volume_key,
)
from sealed_secrets import errors as se
from sealed_secrets.resolver import Resolver, build_resolver

from .conftest import KEY_PREFIX, KEY_RESOURCE, PASSPHRASE, SIGNING_PREFIX, Keys


def _resolve(
    keys: Keys,
    context: dict[str, str] | None = None,
    secrets: dict[str, str] | None = None,
    *,
    volume_id: str = "vol-1",
    resolver: Resolver | None | str = "real",
    **kw: object,
) -> VolumeKey:
    opts: dict[str, object] = {
        "allowed_key_resources": [KEY_PREFIX],
        "allowed_kids": [SIGNING_PREFIX],
    }
    opts.update(kw)
    return resolve_volume_key(
        volume_id,
        context or {},
        secrets or {},
        build_resolver(keys.spec) if resolver == "real" else resolver,  # type: ignore[arg-type]
        **opts,  # type: ignore[arg-type]
    )


def _code(fn: object) -> errors.CsiError:
    with pytest.raises(errors.CsiError) as info:
        fn()  # type: ignore[operator]
    return info.value


def test_kbs_key_is_hkdf_of_the_root_key_per_volume(keys: Keys) -> None:
    a = _resolve(keys, {"keyResource": KEY_RESOURCE}, volume_id="vol-a")
    b = _resolve(keys, {"keyResource": KEY_RESOURCE}, volume_id="vol-b")
    again = _resolve(keys, {"keyResource": KEY_RESOURCE}, volume_id="vol-a")
    assert a.password == again.password != b.password
    expect = HKDF(algorithm=hashes.SHA256(), length=32, salt=HKDF_SALT, info=b"vol-a")
    assert a.password == expect.derive(keys.root_key).hex().encode()
    assert (a.source, a.scrypt_logn) == ("kbs-derived", DERIVED_SCRYPT_LOGN)
    assert a.password.decode() not in repr(a)


def test_key_resource_may_come_from_secrets_too(keys: Keys) -> None:
    ctx = _resolve(keys, {"keyResource": KEY_RESOURCE})
    sec = _resolve(keys, secrets={"keyResource": KEY_RESOURCE})
    assert ctx.password == sec.password


@pytest.mark.parametrize(
    ("uri", "code"),
    [
        ("kbs:///default/other-repo/volume-root", errors.Code.PERMISSION_DENIED),
        ("kbs:///default/coco-csi/../coco-csi/volume-root", errors.Code.INVALID_ARGUMENT),
        ("kbs://kbs.evil/default/coco-csi/volume-root", errors.Code.INVALID_ARGUMENT),
        ("kbs:///one-segment", errors.Code.INVALID_ARGUMENT),
        ("/etc/shadow", errors.Code.INVALID_ARGUMENT),
        ("kbs:///default/coco-csi/" + "x" * 600, errors.Code.INVALID_ARGUMENT),
    ],
)
def test_control_plane_cannot_pick_a_key_the_node_does_not_allow(
    keys: Keys, uri: str, code: errors.Code
) -> None:
    assert _code(lambda: _resolve(keys, {"keyResource": uri})).code == code


def test_a_node_without_allowed_prefixes_takes_no_key_resource(keys: Keys) -> None:
    exc = _code(lambda: _resolve(keys, {"keyResource": KEY_RESOURCE}, allowed_key_resources=[]))
    assert exc.code == errors.Code.PERMISSION_DENIED
    assert "--allowed-key-resource" in str(exc)


@pytest.mark.parametrize("name", ["raw-bytes", "signing-jwk", "short"])
def test_only_a_volume_key_jwk_becomes_volume_keys(keys: Keys, name: str) -> None:
    exc = _code(lambda: _resolve(keys, {"keyResource": KEY_PREFIX + name}))
    assert exc.code == errors.Code.FAILED_PRECONDITION
    assert "volume-key new" in str(exc)


def test_missing_resource_is_failed_precondition(keys: Keys) -> None:
    exc = _code(lambda: _resolve(keys, {"keyResource": KEY_PREFIX + "absent"}))
    assert exc.code == errors.Code.FAILED_PRECONDITION


def test_plaintext_passphrase_is_refused_without_echoing_it(keys: Keys) -> None:
    for where in ("secrets", "context"):
        args = {where: {"passphrase": "hunter2-plaintext"}}
        exc = _code(lambda args=args: _resolve(keys, args.get("context"), args.get("secrets")))
        assert exc.code == errors.Code.INVALID_ARGUMENT
        assert "hunter2" not in str(exc)


def test_sealed_passphrase_is_unsealed_in_the_guest(keys: Keys) -> None:
    key = _resolve(keys, secrets={"passphrase": keys.seal_passphrase()})
    assert key.password == PASSPHRASE
    assert (key.source, key.scrypt_logn) == ("sealed-passphrase", PASSPHRASE_SCRYPT_LOGN)
    # A passphrase wins over a keyResource given alongside it.
    both = _resolve(
        keys, {"keyResource": KEY_RESOURCE}, secrets={"passphrase": keys.seal_passphrase()}
    )
    assert both.password == PASSPHRASE


def test_sealed_value_signed_by_a_kid_the_node_does_not_allow(keys: Keys) -> None:
    exc = _code(
        lambda: _resolve(
            keys, secrets={"passphrase": keys.seal_passphrase()}, allowed_kids=["kbs:///x/"]
        )
    )
    assert exc.code == errors.Code.PERMISSION_DENIED


def test_sealed_value_without_a_resolver_is_failed_precondition(keys: Keys) -> None:
    exc = _code(
        lambda: _resolve(keys, secrets={"passphrase": keys.seal_passphrase()}, resolver=None)
    )
    assert exc.code == errors.Code.FAILED_PRECONDITION
    exc = _code(lambda: _resolve(keys, {"keyResource": KEY_RESOURCE}, resolver=None))
    assert exc.code == errors.Code.FAILED_PRECONDITION


def test_ephemeral_volumes_without_a_source_get_fresh_random_keys(keys: Keys) -> None:
    one = _resolve(keys, ephemeral=True)
    two = _resolve(keys, ephemeral=True)
    assert one.password != two.password and len(one.password) == 64
    assert one.source == "ephemeral-random"
    exc = _code(lambda: _resolve(keys))
    assert exc.code == errors.Code.INVALID_ARGUMENT


class _Failing:
    """A resolver whose every call raises one sealed_secrets error."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def get_resource(self, uri: str) -> bytes:
        raise self.exc

    def unseal(self, sealed: str, *, allowed_kids: object = ()) -> bytes:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (se.KbsUnavailable("down"), errors.Code.UNAVAILABLE),
        (se.AttestationError("no evidence"), errors.Code.UNAVAILABLE),
        (se.Unauthorized("401"), errors.Code.PERMISSION_DENIED),
        (se.PolicyDenied("policy"), errors.Code.PERMISSION_DENIED),
        (se.BadSignature("sig"), errors.Code.PERMISSION_DENIED),
        (se.UnsignedSecret("unsigned"), errors.Code.PERMISSION_DENIED),
        (se.UnknownKid("kid"), errors.Code.PERMISSION_DENIED),
        (se.WrongKey("key"), errors.Code.PERMISSION_DENIED),
        (se.ResourceNotFound("404"), errors.Code.FAILED_PRECONDITION),
        (se.MalformedSecret("junk"), errors.Code.INVALID_ARGUMENT),
        (se.BadBase64("b64"), errors.Code.INVALID_ARGUMENT),
        (se.UnsupportedVersion("v9"), errors.Code.INVALID_ARGUMENT),
        (se.UnsupportedType("t"), errors.Code.INVALID_ARGUMENT),
        (se.UnknownProvider("p"), errors.Code.INVALID_ARGUMENT),
        (se.TamperedCiphertext("tag"), errors.Code.FAILED_PRECONDITION),
        (se.BadResponse("html"), errors.Code.FAILED_PRECONDITION),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.name,
)
def test_resolver_errors_map_by_class(keys: Keys, exc: Exception, code: errors.Code) -> None:
    resolver = _Failing(exc)
    by_resource = _code(lambda: _resolve(keys, {"keyResource": KEY_RESOURCE}, resolver=resolver))
    by_unseal = _code(
        lambda: _resolve(keys, secrets={"passphrase": "sealed.x.y.z"}, resolver=resolver)
    )
    assert by_resource.code == by_unseal.code == code
    assert type(exc).__name__ in str(by_resource)


def test_first_line_of_an_unsealed_passphrase_only(keys: Keys) -> None:
    class _Lines(_Failing):
        def unseal(self, sealed: str, *, allowed_kids: object = ()) -> bytes:
            return b"line-one\nline-two"

    key = _resolve(keys, secrets={"passphrase": "sealed.x.y.z"}, resolver=_Lines(Exception()))
    assert key.password == b"line-one"
    empty = _Lines(Exception())
    empty.unseal = lambda sealed, allowed_kids=(): b"\nrest"  # type: ignore[method-assign]
    exc = _code(lambda: _resolve(keys, secrets={"passphrase": "sealed.x.y.z"}, resolver=empty))
    assert exc.code == errors.Code.INVALID_ARGUMENT


def test_volume_key_repr_hides_the_secret() -> None:
    key = VolumeKey(os.urandom(16).hex().encode(), "kbs-derived", 10)
    assert key.password.decode() not in repr(key) and key.password.decode() not in str(key)
