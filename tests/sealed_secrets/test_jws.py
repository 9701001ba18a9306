"""The sealed-string envelope: CoCo vectors, strict parsing, every-position tamper detection."""

from __future__ import annotations

import base64
import json

import pytest
from jwcrypto import jwk
from vectors_coco import (
    HEADER_AB,
    PAYLOAD_A,
    PAYLOAD_B,
    PUBLIC_JWK,
    SIGNING_KID,
    TEST_KEY,
    VECTOR_A,
    VECTOR_B,
    VECTOR_C,
)

from sealed_secrets import jws
from sealed_secrets.errors import (
    BadBase64,
    BadSignature,
    KeyFormatError,
    MalformedSecret,
    SealedSecretError,
    UnsignedSecret,
)

PUB = jwk.JWK.from_json(PUBLIC_JWK)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.mark.parametrize(
    ("vector", "payload"), [(VECTOR_A, PAYLOAD_A), (VECTOR_B, PAYLOAD_B)], ids=["A", "B"]
)
def test_coco_vectors_parse_and_verify(vector: str, payload: bytes) -> None:
    parsed = jws.parse(vector)
    assert parsed.header == json.loads(HEADER_AB)
    assert parsed.kid == SIGNING_KID
    assert parsed.payload == payload
    assert len(parsed.signature or b"") == 64
    jws.verify(parsed, PUB)  # raises on failure


def test_vector_c_is_legacy_and_never_verifies() -> None:
    parsed = jws.parse(VECTOR_C)
    assert parsed.legacy and parsed.kid is None
    assert parsed.payload == PAYLOAD_A
    with pytest.raises(UnsignedSecret):
        jws.verify(parsed, PUB)


def test_vector_signature_does_not_verify_with_other_key() -> None:
    other = jwk.JWK(**TEST_KEY)
    with pytest.raises(BadSignature):
        jws.verify(jws.parse(VECTOR_A), other)


def _mutations(s: str, i: int) -> list[str]:
    """All single-character substitutions at position i from a small alphabet (+ the dot)."""
    pool = {B64URL[(B64URL.find(s[i]) + k) % 64] for k in (1, 2, 17, 33)} | {".", "=", "A"}
    return [s[:i] + c + s[i + 1 :] for c in sorted(pool) if c != s[i]]


@pytest.mark.parametrize("vector", [VECTOR_A, VECTOR_B], ids=["A", "B"])
def test_any_one_character_change_is_rejected(vector: str) -> None:
    checked = 0
    for i in range(len(vector)):
        for mutated in _mutations(vector, i):
            with pytest.raises(SealedSecretError):
                jws.verify(jws.parse(mutated), PUB)
            checked += 1
        # deletion and insertion at every position as well
        with pytest.raises(SealedSecretError):
            jws.verify(jws.parse(vector[:i] + vector[i + 1 :]), PUB)
        with pytest.raises(SealedSecretError):
            jws.verify(jws.parse(vector[:i] + "A" + vector[i:]), PUB)
    assert checked > 5 * len(vector)


def test_vector_c_one_character_change_never_yields_same_payload_silently() -> None:
    # Unsigned strings cannot be tamper-proof; the guarantee is that they never verify.
    for i in range(len(VECTOR_C)):
        for mutated in _mutations(VECTOR_C, i):
            try:
                parsed = jws.parse(mutated)
            except SealedSecretError:
                continue
            assert parsed.legacy
            with pytest.raises(UnsignedSecret):
                jws.verify(parsed, PUB)


def test_last_char_spare_bits_are_rejected_as_noncanonical() -> None:
    # 64-byte signature = 86 chars with 4 spare bits: 'Q' -> 'R' decodes to the same bytes.
    assert VECTOR_A.endswith("Q")
    twin = VECTOR_A[:-1] + "R"
    assert base64.urlsafe_b64decode(twin.split(".")[3] + "==") == jws.parse(VECTOR_A).signature
    with pytest.raises(BadBase64):
        jws.parse(twin)


@pytest.mark.parametrize(
    ("text", "exc"),
    [
        ("", MalformedSecret),
        ("sealed", MalformedSecret),
        ("Sealed." + VECTOR_A[7:], MalformedSecret),
        ("sealed.a.b", MalformedSecret),
        (VECTOR_A + ".x", MalformedSecret),
        ("sealed.." + VECTOR_A.split(".", 2)[2], MalformedSecret),
        (VECTOR_A.replace(".ZI2f", ".ZI2f="), BadBase64),
        (VECTOR_A.replace(".eyJ2", ".eyJ+"), BadBase64),
        (VECTOR_A.rsplit(".", 1)[0] + ".", BadSignature),
        (VECTOR_A.rsplit(".", 1)[0] + ".AAAA", BadSignature),
        ("sealed.fakejwsheader.." + "fakesignature", MalformedSecret),
        ("sealed.fakejwsheader." + VECTOR_C.split(".")[2] + ".sig", MalformedSecret),
    ],
)
def test_malformed_strings_raise_typed_errors(text: str, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        jws.parse(text)


def _with_header(header: object) -> str:
    h = jws.b64url_encode(json.dumps(header).encode())
    return f"sealed.{h}.{jws.b64url_encode(PAYLOAD_A)}.{jws.b64url_encode(bytes(64))}"


@pytest.mark.parametrize(
    ("header", "exc"),
    [
        ({"alg": "none", "kid": "k"}, BadSignature),
        ({"alg": "HS256", "kid": "k"}, BadSignature),
        ({"alg": "ES384", "kid": "k"}, BadSignature),
        ({"kid": "k"}, BadSignature),
        ({"alg": "ES256"}, MalformedSecret),
        ({"alg": "ES256", "kid": ""}, MalformedSecret),
        ({"alg": "ES256", "kid": 7}, MalformedSecret),
        ({"alg": "ES256", "kid": "k", "b64": False}, MalformedSecret),
        ({"alg": "ES256", "kid": "k", "crit": ["b64"]}, MalformedSecret),
        (["alg", "ES256"], MalformedSecret),
    ],
)
def test_header_rules(header: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        jws.parse(_with_header(header))


def test_duplicate_header_members_rejected() -> None:
    h = jws.b64url_encode(b'{"alg":"ES256","kid":"a","kid":"b"}')
    with pytest.raises(MalformedSecret):
        jws.parse(f"sealed.{h}.{jws.b64url_encode(PAYLOAD_A)}.{jws.b64url_encode(bytes(64))}")


def test_sign_roundtrip_with_coco_test_key_and_header_layout() -> None:
    key = jwk.JWK(**TEST_KEY)
    sealed = jws.sign(PAYLOAD_A, key, "test-key")
    parsed = jws.parse(sealed)
    assert jws.b64url_decode(parsed.header_b64, what="h") == (
        b'{"b64":true,"alg":"ES256","kid":"test-key"}'
    )
    assert parsed.payload == PAYLOAD_A
    jws.verify(parsed, jwk.JWK(**key.export_public(as_dict=True)))
    with pytest.raises(BadSignature):
        jws.verify(parsed, PUB)


def test_sign_refuses_public_or_wrong_curve_keys() -> None:
    with pytest.raises(KeyFormatError):
        jws.sign(PAYLOAD_A, PUB, "k")
    with pytest.raises(KeyFormatError):
        jws.sign(PAYLOAD_A, jwk.JWK.generate(kty="EC", crv="P-384"), "k")
    rsa = jwk.JWK.generate(kty="RSA", size=2048)
    with pytest.raises(KeyFormatError):
        jws.verify(jws.parse(VECTOR_A), jwk.JWK(**rsa.export_public(as_dict=True)))


def test_legacy_builder_matches_vector_c() -> None:
    assert jws.legacy_unsigned(PAYLOAD_A) == VECTOR_C


def test_repr_hides_payload() -> None:
    assert "sealed-secret/test" not in repr(jws.parse(VECTOR_A))
    assert jws.is_sealed(VECTOR_A) and not jws.is_sealed("plain")


def test_oversized_input_rejected_cheaply() -> None:
    with pytest.raises(MalformedSecret):
        jws.parse("sealed." + "A" * (jws.MAX_SEALED_LEN + 1))
