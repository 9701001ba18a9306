"""Unsealing end to end through the kbs and coco-csi-asym providers; typed failures; no leaks."""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from jwcrypto import jwk

from sealed_secrets import jws, keys, seal
from sealed_secrets import payload as pl
from sealed_secrets.errors import (
    BadBase64,
    BadSignature,
    KeyFormatError,
    MalformedSecret,
    SealedSecretError,
    TamperedCiphertext,
    UnknownKid,
    UnknownProvider,
    UnsealFailed,
    UnsignedSecret,
    UnsupportedType,
    UnsupportedVersion,
    WrongKey,
)
from sealed_secrets.providers import asym
from sealed_secrets.unseal import unseal_secret
from tests.sealed_secrets.vectors_coco import (
    PUBLIC_JWK,
    SIGNING_KID,
    TEST_KEY,
    VECTOR_A,
    VECTOR_B,
    VECTOR_C,
)

PLAINTEXT = b"pl41nt3xt-db-password-9f8e7d"
ASYM_URI = "kbs:///default/sealing-key/asym"
SIGNING = jwk.JWK(**TEST_KEY)
EC_PAIR = asym.generate_keypair("EC")
RSA_PAIR = asym.generate_keypair("RSA")


class Broker:
    """Stand-in for the resolver: a dict of KBS resources, raising the resolver's error type."""

    def __init__(self, resources: dict[str, bytes]) -> None:
        self.resources = dict(resources)
        self.calls: list[str] = []

    def __call__(self, uri: str) -> bytes:
        from sealed_secrets.errors import ResourceNotFound

        self.calls.append(uri)
        if uri not in self.resources:
            raise ResourceNotFound(f"no resource {uri}", status=404)
        return self.resources[uri]


@pytest.fixture()
def key_dir(tmp_path: Path) -> str:
    (tmp_path / "test-key").write_text(SIGNING.export_public())
    return str(tmp_path)


def broker(pair: jwk.JWK = EC_PAIR) -> Broker:
    return Broker(
        {
            SIGNING_KID: PUBLIC_JWK,
            "kbs:///default/sealed-secret/test": PLAINTEXT,
            ASYM_URI: pair.export_private().encode(),
        }
    )


def sealed_asym(pair: jwk.JWK = EC_PAIR, data: bytes = PLAINTEXT, **kw: object) -> str:
    return seal.seal_envelope(
        data,
        provider="coco-csi-asym",
        key_id=ASYM_URI,
        signing_key=SIGNING,
        signing_kid="test-key",
        public_key=asym.load_public_key(pair.export_public().encode()),
        **kw,  # type: ignore[arg-type]
    )


def resign(sealed: str, change: Callable[[dict], None], kid: str = "test-key") -> str:
    obj = json.loads(jws.parse(sealed).payload)
    change(obj)
    return jws.sign(json.dumps(obj).encode(), SIGNING, kid)


# --- CoCo vectors through the whole unseal path ------------------------------------------


ALLOW = ("kbs:///default/signing-key/",)


def test_vector_a_unseals_via_kbs_resources() -> None:
    b = broker()
    assert unseal_secret(VECTOR_A, get_resource=b, allowed_kids=ALLOW) == PLAINTEXT
    assert b.calls == [SIGNING_KID, "kbs:///default/sealed-secret/test"]


def test_vector_b_needs_its_own_resource() -> None:
    b = broker()
    with pytest.raises(SealedSecretError) as err:
        unseal_secret(VECTOR_B, get_resource=b, allowed_kids=ALLOW)
    assert type(err.value).__name__ == "ResourceNotFound"  # the signed payload's resource
    b.resources["kbs:///default/ngc-api-key/instruct"] = b"nim"
    assert unseal_secret(VECTOR_B, get_resource=b, allowed_kids=ALLOW) == b"nim"


def test_vector_c_only_with_allow_unsigned() -> None:
    b = broker()
    with pytest.raises(UnsignedSecret):
        unseal_secret(VECTOR_C, get_resource=b)
    with pytest.raises(UnsignedSecret):
        unseal_secret(VECTOR_C, get_resource=b, verify=False)
    assert unseal_secret(VECTOR_C, get_resource=b, allow_unsigned=True) == PLAINTEXT
    assert SIGNING_KID not in b.calls  # no key lookup for an unsigned string


def test_vector_a_through_offline_fs_resolver(tmp_path: Path) -> None:
    from sealed_secrets.resolver import build_resolver

    res = tmp_path / "resources.json"
    res.write_text(
        json.dumps(
            {
                "default/signing-key/sealed-secret": base64.b64encode(PUBLIC_JWK).decode(),
                "default/sealed-secret/test": base64.b64encode(PLAINTEXT).decode(),
            }
        )
    )
    resolver = build_resolver(f"offline-fs:{res}")
    assert resolver.unseal(VECTOR_A, allowed_kids=ALLOW) == PLAINTEXT


def test_verify_false_skips_signature_but_not_structure() -> None:
    forged = VECTOR_A.rsplit(".", 1)[0] + "." + jws.b64url_encode(bytes(64))
    with pytest.raises(BadSignature):
        unseal_secret(forged, get_resource=broker())
    assert unseal_secret(forged, get_resource=broker(), verify=False) == PLAINTEXT


# --- coco-csi-asym ---------------------------------------------------------------------


@pytest.mark.parametrize("pair", [EC_PAIR, RSA_PAIR], ids=["ECDH-ES", "RSA-OAEP"])
@pytest.mark.parametrize("wrap", ["A256GCM", "A256CTR"])
def test_asym_roundtrip(pair: jwk.JWK, wrap: str, key_dir: str) -> None:
    sealed = sealed_asym(pair, wrap_type=wrap)
    secret = pl.loads(jws.parse(sealed).payload)
    assert isinstance(secret, pl.EnvelopeSecret)
    assert secret.provider == "coco-csi-asym" and secret.key_id == ASYM_URI
    assert secret.provider_settings["kid"] == pair.thumbprint()
    assert ("epk" in secret.annotations) == (pair.get("kty") == "EC")
    assert len(secret.iv_bytes()) == (12 if wrap == "A256GCM" else 16)
    got = unseal_secret(sealed, get_resource=broker(pair), key_dir=key_dir)
    assert got == PLAINTEXT


def test_asym_sealing_is_randomised(key_dir: str) -> None:
    assert sealed_asym() != sealed_asym()
    assert unseal_secret(sealed_asym(data=b""), get_resource=broker(), key_dir=key_dir) == b""


def test_asym_wrong_private_key(key_dir: str) -> None:
    other = asym.generate_keypair("EC")
    with pytest.raises(WrongKey):
        unseal_secret(sealed_asym(), get_resource=broker(other), key_dir=key_dir)
    # without the thumbprint hint the key-wrap integrity check still catches it
    hintless = resign(sealed_asym(), lambda o: o["provider_settings"].pop("kid"))
    with pytest.raises(WrongKey):
        unseal_secret(hintless, get_resource=broker(other), key_dir=key_dir)
    with pytest.raises(WrongKey):
        unseal_secret(sealed_asym(RSA_PAIR), get_resource=broker(EC_PAIR), key_dir=key_dir)


def _flip_signature(sealed: str) -> str:
    """Flip one bit of the decoded signature.

    Why not overwrite the last characters with fixed ones: an ECDSA signature is random,
    and about one in 256 already ends in the characters written over it (a CI run hit that).
    """
    head, sig = sealed.rsplit(".", 1)
    raw = bytearray(jws.b64url_decode(sig, what="signature"))
    raw[0] ^= 0x01
    return head + "." + jws.b64url_encode(bytes(raw))


def _flip_b64(value: str) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[len(raw) // 2] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    ("field", "exc"),
    [
        ("encrypted_data", TamperedCiphertext),
        ("iv", TamperedCiphertext),
        ("encrypted_key", WrongKey),
    ],
)
def test_asym_tampered_fields(field: str, exc: type[Exception], key_dir: str) -> None:
    tampered = resign(sealed_asym(), lambda o: o.__setitem__(field, _flip_b64(o[field])))
    with pytest.raises(exc):
        unseal_secret(tampered, get_resource=broker(), key_dir=key_dir)


def test_asym_tampered_epk(key_dir: str) -> None:
    fresh = json.loads(asym.generate_keypair("EC").export_public())
    epk = {k: fresh[k] for k in ("kty", "crv", "x", "y")}
    tampered = resign(sealed_asym(), lambda o: o["annotations"].__setitem__("epk", epk))
    with pytest.raises(WrongKey):
        unseal_secret(tampered, get_resource=broker(), key_dir=key_dir)
    broken = resign(sealed_asym(), lambda o: o["annotations"].__setitem__("epk", {"kty": "EC"}))
    with pytest.raises(MalformedSecret):
        unseal_secret(broken, get_resource=broker(), key_dir=key_dir)


def test_truncated_gcm_data_is_tampered(key_dir: str) -> None:
    short = resign(sealed_asym(), lambda o: o.__setitem__("encrypted_data", "AAAA"))
    with pytest.raises(TamperedCiphertext):
        unseal_secret(short, get_resource=broker(), key_dir=key_dir)


# --- typed failures for each category --------------------------------------------------


def test_every_failure_category_has_its_own_type(key_dir: str) -> None:
    good = sealed_asym()
    b = broker()
    cases: list[tuple[str, type[Exception]]] = [
        ("not sealed", MalformedSecret),
        ("sealed.a.b.c.d", MalformedSecret),
        (good.replace(".", ".=", 1), BadBase64),
        (resign(good, lambda o: o.__setitem__("version", "9")), UnsupportedVersion),
        (resign(good, lambda o: o.__setitem__("type", "box")), UnsupportedType),
        (resign(good, lambda o: o.__setitem__("provider", "nosuch")), UnknownProvider),
        (resign(good, lambda o: o.__setitem__("provider", "aws")), UnknownProvider),
        (good.rsplit(".", 1)[0] + ".", BadSignature),
        # Every way the signature stage fails is one class (UnsealFailed, a BadSignature),
        # so the caller cannot tell them apart (see test_kid_gate.py).
        (good[:-2] + ("AA" if not good.endswith("AA") else "BA"), UnsealFailed),
        (resign(good, lambda o: None, kid="no-such-kid"), UnsealFailed),
        (resign(good, lambda o: None, kid="kbs:///default/keys/missing"), UnsealFailed),
        (resign(good, lambda o: None, kid="../test-key"), UnsealFailed),
        (sealed_asym(asym.generate_keypair("EC")), WrongKey),
        (
            resign(good, lambda o: o.__setitem__("encrypted_data", _flip_b64(o["encrypted_data"]))),
            TamperedCiphertext,
        ),
    ]
    for sealed, exc in cases:
        with pytest.raises(exc):
            unseal_secret(sealed, get_resource=b, key_dir=key_dir)


def test_vault_type_mismatch_and_kbs_name_rules(key_dir: str) -> None:
    b = broker()
    envelope_kbs = resign(sealed_asym(), lambda o: o.__setitem__("provider", "kbs"))
    with pytest.raises(UnsupportedType):
        unseal_secret(envelope_kbs, get_resource=b, key_dir=key_dir)
    vault = seal.seal_vault(
        "kbs:///default/sealed-secret/test", "KBS", signing_key=SIGNING, signing_kid="test-key"
    )
    assert unseal_secret(vault, get_resource=b, key_dir=key_dir) == PLAINTEXT  # case-insensitive
    bad_name = resign(vault, lambda o: o.__setitem__("name", "/etc/shadow"))
    with pytest.raises(MalformedSecret):
        unseal_secret(bad_name, get_resource=b, key_dir=key_dir)
    with pytest.raises(SealedSecretError):
        seal.seal_vault("kbs:///a/../b", "kbs", signing_key=SIGNING, signing_kid="test-key")
    with pytest.raises(UnsupportedType):
        seal.seal_vault("x", "coco-csi-asym", signing_key=SIGNING, signing_kid="test-key")


def test_verification_key_rules(tmp_path: Path) -> None:
    (tmp_path / "rsa").write_text(jwk.JWK.generate(kty="RSA", size=2048).export_public())
    (tmp_path / "junk").write_text("{not json")
    (tmp_path / "priv").write_text(SIGNING.export_private())
    with pytest.raises(KeyFormatError):
        keys.load_verification_key("rsa", key_dir=str(tmp_path))
    with pytest.raises(KeyFormatError):
        keys.load_verification_key("junk", key_dir=str(tmp_path))
    pub = keys.load_verification_key("priv", key_dir=str(tmp_path))
    assert not pub.has_private  # only the public half is kept
    for kid in ("..", ".", "a/b", "", "x\x00"):
        with pytest.raises(UnknownKid):
            keys.load_verification_key(kid, key_dir=str(tmp_path))
    with pytest.raises(UnknownKid):
        keys.load_verification_key("kbs:///a/b/c", allowed_kids=["kbs:///a/"])  # no resolver


def test_keygen_files(tmp_path: Path) -> None:
    key = keys.generate_signing_key("mykid")
    priv, pub = keys.write_keypair(key, str(tmp_path), "mykid")
    assert priv.name == "mykid-private.json" and pub.name == "mykid-public.json"
    assert os.stat(priv).st_mode & 0o777 == 0o600
    pub_obj = json.loads(pub.read_text())
    assert "d" not in pub_obj and pub_obj["alg"] == "ES256" and pub_obj["use"] == "sig"
    loaded = keys.load_signing_key(str(priv))
    sealed = seal.seal_vault("kbs:///a/b/c", "kbs", signing_key=loaded, signing_kid="mykid")
    got = unseal_secret(
        sealed, get_resource={"kbs:///a/b/c": b"v"}.__getitem__, key_dir=_kid_dir(tmp_path, pub)
    )
    assert got == b"v"
    with pytest.raises(KeyFormatError):
        keys.write_keypair(key, str(tmp_path), "mykid")  # never overwrite a private key
    with pytest.raises(KeyFormatError):
        keys.load_signing_key(str(pub))  # public key cannot sign


def _kid_dir(tmp_path: Path, pub: Path) -> str:
    d = tmp_path / "verify"
    d.mkdir()
    (d / "mykid").write_text(pub.read_text())
    return str(d)


# --- nothing secret in exceptions or logs ------------------------------------------------


def test_no_secret_material_in_errors_or_logs(
    caplog: pytest.LogCaptureFixture, key_dir: str
) -> None:
    caplog.set_level(logging.DEBUG)
    good = sealed_asym()
    priv = json.loads(EC_PAIR.export_private())
    secrets = [PLAINTEXT.decode(), priv["d"], TEST_KEY["d"]]
    other = asym.generate_keypair("EC")
    failing = [
        (good.replace(".", ".=", 1), broker()),
        (resign(good, lambda o: o.__setitem__("version", "9")), broker()),
        (resign(good, lambda o: o.__setitem__("provider", "x")), broker()),
        (_flip_signature(good), broker()),
        (resign(good, lambda o: None, kid="nokid"), broker()),
        (good, broker(other)),
        (
            resign(good, lambda o: o.__setitem__("encrypted_data", _flip_b64(o["encrypted_data"]))),
            broker(),
        ),
        (resign(good, lambda o: o.__setitem__("iv", "AAAA")), broker()),
        (VECTOR_C, broker()),
        (VECTOR_B, broker()),
    ]
    texts: list[str] = []
    for sealed, b in failing:
        with pytest.raises(SealedSecretError) as err:
            unseal_secret(sealed, get_resource=b, key_dir=key_dir)
        texts += [str(err.value), repr(err.value)]
        texts += [str(c) for c in (err.value.__cause__, err.value.__context__) if c]
    # a KBS key resource that is garbage must not be echoed either
    junk = Broker({ASYM_URI: b"my-private-junk-" + PLAINTEXT})
    with pytest.raises(SealedSecretError) as err:
        unseal_secret(good, get_resource=junk, key_dir=key_dir)
    texts.append(str(err.value))
    assert unseal_secret(good, get_resource=broker(), key_dir=key_dir) == PLAINTEXT
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    assert len(texts) > 20
    for s in secrets:
        assert s not in blob
    assert "my-private-junk" not in blob


# --- through the real KBS protocol (attestation via the AA peer) ------------------------


def test_unseal_through_attested_kbs_resolver(key_dir: str) -> None:
    """Signing key, sealing private key and vault value all come from KBS after attestation."""
    from sealed_secrets.errors import PolicyDenied
    from sealed_secrets.resolver import build_resolver
    from tests.peers import harness

    resources = {
        "default/signing-key/sealed-secret": PUBLIC_JWK,
        "default/sealed-secret/test": PLAINTEXT,
        "default/sealing-key/asym": EC_PAIR.export_private().encode(),
        "denied/sealing-key/asym": EC_PAIR.export_private().encode(),
    }
    with harness.kbs_and_aa(resources) as (kbs, aa):
        spec = harness.kbs_spec(kbs, aa, "&retries=0")
        resolver = build_resolver(spec, key_dir=key_dir)
        assert resolver.unseal(VECTOR_A, allowed_kids=ALLOW) == PLAINTEXT
        assert resolver.unseal(sealed_asym(EC_PAIR)) == PLAINTEXT
        denied = resign(
            sealed_asym(), lambda o: o.__setitem__("key_id", "kbs:///denied/sealing-key/asym")
        )
        with pytest.raises(PolicyDenied):
            resolver.unseal(denied)
