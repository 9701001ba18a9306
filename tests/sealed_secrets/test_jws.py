"""The sealed-string envelope: CoCo vectors, strict parsing, every-position tamper detection."""

from __future__ import annotations

import base64
import json

import pytest
from jwcrypto import jwk

from sealed_secrets import jws
from sealed_secrets.errors import (
    BadBase64,
    BadSignature,
    KeyFormatError,
    MalformedSecret,
    SealedSecretError,
    UnsignedSecret,
)
from tests.sealed_secrets.vectors_coco import (
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
    # The untouched vector verifies: otherwise every rejection below proves nothing.
    jws.verify(jws.parse(vector), PUB)
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


def _signed_of_length(length: int) -> str:
    """A genuinely signed string of exactly ``length`` characters (payload padded with spaces,
    which JSON ignores), so only the length limit can refuse it."""
    key = jwk.JWK(**TEST_KEY)
    overhead = len(jws.sign(PAYLOAD_A, key, SIGNING_KID)) - len(jws.b64url_encode(PAYLOAD_A))
    b64_len = length - overhead
    full, rest = divmod(b64_len, 4)
    assert rest != 1, "unpadded base64url never has length 4k+1"
    payload_len = 3 * full + {0: 0, 2: 1, 3: 2}[rest]
    sealed = jws.sign(PAYLOAD_A + b" " * (payload_len - len(PAYLOAD_A)), key, SIGNING_KID)
    assert len(sealed) == length
    return sealed


def _possible(length: int) -> bool:
    key = jwk.JWK(**TEST_KEY)
    overhead = len(jws.sign(PAYLOAD_A, key, SIGNING_KID)) - len(jws.b64url_encode(PAYLOAD_A))
    return (length - overhead) % 4 != 1


def test_oversized_input_rejected_cheaply() -> None:
    with pytest.raises(MalformedSecret, match="too long"):
        jws.parse("sealed." + "A" * (jws.MAX_SEALED_LEN + 1))


def test_length_limit_is_what_refuses_a_long_valid_string() -> None:
    """Delete the limit and this goes red: the over-long string is otherwise perfectly valid."""
    lengths = [n for n in range(jws.MAX_SEALED_LEN - 3, jws.MAX_SEALED_LEN + 4)]
    under = max(n for n in lengths if n <= jws.MAX_SEALED_LEN and _possible(n))
    over = min(n for n in lengths if n > jws.MAX_SEALED_LEN and _possible(n))
    key = jwk.JWK(**TEST_KEY)
    jws.verify(jws.parse(_signed_of_length(under)), jwk.JWK(**key.export_public(as_dict=True)))
    over = _signed_of_length(over)
    with pytest.raises(MalformedSecret, match="too long"):
        jws.parse(over)


def test_es256_twin_signature_verifies_and_changes_nothing() -> None:
    """(r, n - s) verifies too (ECDSA malleability): accepted, because CoCo's signers may emit
    high-S; harmless, because header and payload, all that is used, are the same bytes."""
    parsed = jws.parse(VECTOR_A)
    assert parsed.signature is not None
    r = parsed.signature[:32]
    s = int.from_bytes(parsed.signature[32:], "big")
    twin_sig = r + (jws.P256_ORDER - s).to_bytes(32, "big")
    twin = VECTOR_A.rsplit(".", 1)[0] + "." + jws.b64url_encode(twin_sig)
    assert twin != VECTOR_A
    twin_parsed = jws.parse(twin)
    jws.verify(parsed, PUB)
    jws.verify(twin_parsed, PUB)  # both verify ...
    assert (twin_parsed.header, twin_parsed.payload) == (parsed.header, parsed.payload)
    # ... and what we sign is always the low-S member of the pair
    key = jwk.JWK(**TEST_KEY)
    for _ in range(32):
        sig = jws.parse(jws.sign(PAYLOAD_A, key, SIGNING_KID)).signature
        assert sig is not None and int.from_bytes(sig[32:], "big") <= jws.P256_ORDER // 2


def test_twin_signatures_share_the_cache(tmp_path: object) -> None:
    """Nothing is keyed by signature bytes: both twins unseal through one cached fetch."""
    from sealed_secrets.resolver import CachingResolver

    calls: list[str] = []

    class Source:
        def get_resource(self, uri: str) -> bytes:
            calls.append(uri)
            return {
                SIGNING_KID: PUBLIC_JWK,
                "kbs:///default/sealed-secret/test": b"value",
            }[uri]

    parsed = jws.parse(VECTOR_A)
    assert parsed.signature is not None
    s = int.from_bytes(parsed.signature[32:], "big")
    twin_sig = parsed.signature[:32] + (jws.P256_ORDER - s).to_bytes(32, "big")
    twin = VECTOR_A.rsplit(".", 1)[0] + "." + jws.b64url_encode(twin_sig)
    r = CachingResolver(Source(), cache_ttl=60)
    allow = [SIGNING_KID]
    assert r.unseal(VECTOR_A, allowed_kids=allow) == r.unseal(twin, allowed_kids=allow)
    assert calls == [SIGNING_KID, "kbs:///default/sealed-secret/test"]


# --- found by mutation testing (tools/mutation.py): each test kills mutants that survived ----

_P = jws.b64url_encode(PAYLOAD_A)
_S = jws.b64url_encode(bytes(64))


def _h(raw: bytes) -> str:
    return jws.b64url_encode(raw)


def _with_raw_header(raw: bytes) -> str:
    return f"sealed.{_h(raw)}.{_P}.{_S}"


_NOT_B64 = "is not unpadded base64url"
_NOT_CANON = "is not canonical base64url (non-zero trailing bits)"
_SECTIONS = "sealed secret must have 4 '.'-separated sections, found"
_CUT = VECTOR_A.rsplit(".", 1)[0]


@pytest.mark.parametrize(
    ("text", "exc", "message"),
    [
        (b"sealed.x", MalformedSecret, "sealed secret must be a string"),
        ("sealed." + "A" * jws.MAX_SEALED_LEN, MalformedSecret, "sealed secret is too long"),
        ("Sealed." + VECTOR_A[7:], MalformedSecret, "sealed secret must start with 'sealed.'"),
        ("sealed.a.b", MalformedSecret, f"{_SECTIONS} 3"),
        (VECTOR_A + ".x", MalformedSecret, f"{_SECTIONS} 5"),
        ("sealed.h..s", MalformedSecret, "sealed secret payload section is empty"),
        ("sealed.h.a+b=.s", BadBase64, f"payload section {_NOT_B64}"),
        ("sealed.h.AAAAA.s", BadBase64, f"payload section {_NOT_B64}"),
        (f"sealed.{_P[:-1]}R.{_P}.{_S}", BadBase64, f"header section {_NOT_CANON}"),
        (
            f"sealed.fakejwsheader.{_P}.sig",
            MalformedSecret,
            "legacy sealed secret must end with '.fakesignature'",
        ),
        (f"sealed.a+b=.{_P}.{_S}", BadBase64, f"header section {_NOT_B64}"),
        (_with_raw_header(b"not json"), MalformedSecret, "JWS header is not valid UTF-8 JSON"),
        (_with_raw_header(b"[1]"), MalformedSecret, "JWS header is not a JSON object"),
        (
            _with_raw_header(b'{"kid":"a","kid":"b"}'),
            MalformedSecret,
            "JWS header has a duplicate member",
        ),
        (
            _with_raw_header(b'{"alg":"HS256","kid":"k"}'),
            BadSignature,
            "JWS algorithm must be ES256",
        ),
        (
            _with_raw_header(b'{"alg":"ES256"}'),
            MalformedSecret,
            "JWS header must carry a non-empty string 'kid'",
        ),
        (
            _with_raw_header(b'{"alg":"ES256","kid":"k","b64":false}'),
            MalformedSecret,
            "JWS header 'b64' must be true (unencoded payloads unsupported)",
        ),
        (
            _with_raw_header(b'{"alg":"ES256","kid":"k","crit":[]}'),
            MalformedSecret,
            "JWS header 'crit' is not supported",
        ),
        (_CUT + ".", BadSignature, "JWS signature is missing"),
        (_CUT + ".a+b=", BadBase64, f"signature section {_NOT_B64}"),
        (VECTOR_A[:-1] + "R", BadBase64, f"signature section {_NOT_CANON}"),
        (_CUT + ".AAAA", BadSignature, "ES256 signature must be 64 bytes"),
    ],
)
def test_parse_errors_say_what_is_wrong_and_where(
    text: str, exc: type[Exception], message: str
) -> None:
    """The error text is the CLI's one line (and the CSI status detail): it names the section
    and the rule, never the data."""
    with pytest.raises(exc) as info:
        jws.parse(text)
    assert type(info.value) is exc and str(info.value) == message


def test_a_string_of_exactly_the_length_limit_is_not_too_long() -> None:
    text = "sealed." + "A" * (jws.MAX_SEALED_LEN - len("sealed."))
    assert len(text) == jws.MAX_SEALED_LEN
    with pytest.raises(MalformedSecret) as info:
        jws.parse(text)
    assert "too long" not in str(info.value)


def test_parse_keeps_every_section_as_written() -> None:
    for vector in (VECTOR_A, VECTOR_C):
        parsed = jws.parse(vector)
        _, header_b64, payload_b64, sig_b64 = vector.split(".")
        assert (parsed.header_b64, parsed.payload_b64, parsed.signature_b64) == (
            header_b64,
            payload_b64,
            sig_b64,
        )


def test_b64url_encode_strips_only_padding() -> None:
    assert jws.b64url_encode(b"\x00\x00\x17") == "AAAX"  # a trailing X is data, not padding
    assert jws.b64url_encode(b"\x00") == "AA"
    assert jws.b64url_decode("AAAX", what="x") == b"\x00\x00\x17"


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ({"kty": "EC", "crv": "P-384"}, "verification key must be an EC P-256 JWK"),
        ({"kty": "RSA"}, "verification key must be an EC P-256 JWK"),
    ],
)
def test_verify_refuses_keys_of_another_curve_or_type(key: dict[str, str], message: str) -> None:
    other = (
        jwk.JWK.generate(**key) if key["kty"] == "EC" else jwk.JWK.generate(kty="RSA", size=2048)
    )
    with pytest.raises(KeyFormatError) as info:
        jws.verify(jws.parse(VECTOR_A), jwk.JWK(**other.export_public(as_dict=True)))
    assert str(info.value) == message


def test_verify_errors_say_what_is_wrong() -> None:
    with pytest.raises(UnsignedSecret) as unsigned:
        jws.verify(jws.parse(VECTOR_C), PUB)
    assert str(unsigned.value) == "sealed secret is unsigned (legacy 'fakejwsheader' form)"
    other = jwk.JWK.generate(kty="EC", crv="P-256")
    with pytest.raises(BadSignature) as bad:
        jws.verify(jws.parse(VECTOR_A), jwk.JWK(**other.export_public(as_dict=True)))
    assert str(bad.value) == f"signature does not verify with key for kid {SIGNING_KID!r}"
    # a hand-built non-legacy string without a signature is refused as unsigned, not a crash
    p = jws.parse(VECTOR_A)
    bare = jws.SealedString(p.header_b64, p.payload_b64, "", p.header, p.payload, None)
    with pytest.raises(UnsignedSecret):
        jws.verify(bare, PUB)


def test_sign_errors_say_what_is_wrong() -> None:
    key = jwk.JWK(**TEST_KEY)
    with pytest.raises(MalformedSecret) as nokid:
        jws.sign(PAYLOAD_A, key, "")
    assert str(nokid.value) == "signing kid must not be empty"
    for bad in (
        jwk.JWK(**key.export_public(as_dict=True)),
        jwk.JWK.generate(kty="EC", crv="P-384"),
        jwk.JWK.generate(kty="oct", size=256),
    ):
        with pytest.raises(KeyFormatError) as info:
            jws.sign(PAYLOAD_A, bad, SIGNING_KID)
        assert str(info.value) == "signing key must be a private EC P-256 JWK"
