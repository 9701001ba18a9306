"""The TEE key pair and KBS resource-response decryption (sealed_secrets/jwe.py), unit level.

The responses are built by the KBS peer's independent JWE code (tests/peers/kbs_server.py),
so a pass means the product opens what a KBS sends; every refusal is checked for its exact
type and text (the text reaches logs and CSI status details, and must never carry data).
Written to kill the mutants tools/mutation.py found surviving in jwe.py.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sealed_secrets.errors import BadResponse, ResolverError
from sealed_secrets.jwe import EC_ALG, ENC, MAX_PROTECTED, RSA_ALG, TeeKeyPair
from sealed_secrets.jws import b64url_encode
from tests.peers.kbs_server import jwe_encrypt

SECRET = b"resource-plaintext \x00\xff"
EC_PAIR = TeeKeyPair("ec")
RSA_PAIR = TeeKeyPair("rsa")


def _refused(pair: TeeKeyPair, response: Any) -> str:
    with pytest.raises(BadResponse) as info:
        pair.decrypt(response)
    assert type(info.value) is BadResponse
    return str(info.value)


@pytest.mark.parametrize("pair", [EC_PAIR, RSA_PAIR], ids=["ec", "rsa"])
def test_decrypts_what_the_kbs_sends(pair: TeeKeyPair) -> None:
    assert pair.decrypt(jwe_encrypt(SECRET, pair.public_jwk())) == SECRET


def test_key_types_algorithms_and_public_jwk() -> None:
    assert (EC_PAIR.key_type, EC_PAIR.alg) == ("ec", EC_ALG)
    assert (RSA_PAIR.key_type, RSA_PAIR.alg) == ("rsa", RSA_ALG)
    assert TeeKeyPair("EC").alg == EC_ALG  # the type is case-insensitive
    assert (TeeKeyPair().key_type, TeeKeyPair().alg) == ("ec", EC_ALG)  # the default
    pub = EC_PAIR.public_jwk()
    assert pub["alg"] == EC_ALG and pub["kty"] == "EC" and pub["crv"] == "P-256"
    assert "d" not in pub and "kid" not in pub
    rsa_pub = TeeKeyPair("rsa").public_jwk()  # made here: module-level pairs predate mutants
    assert rsa_pub["alg"] == RSA_ALG and "d" not in rsa_pub and "kid" not in rsa_pub
    assert int.from_bytes(base64.urlsafe_b64decode(rsa_pub["n"] + "=="), "big").bit_length() == 2048
    assert repr(EC_PAIR) == "TeeKeyPair(key_type='ec', alg='ECDH-ES+A256KW')"
    with pytest.raises(ResolverError) as info:
        TeeKeyPair("dsa")
    assert str(info.value) == "tee key type must be 'ec' or 'rsa', not 'dsa'"


def _pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    ("key", "key_type", "alg"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "ec", EC_ALG),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "rsa", RSA_ALG),
    ],
    ids=["ec", "rsa"],
)
def test_from_pem_adopts_the_aa_key_pair(key: Any, key_type: str, alg: str) -> None:
    for pem in (_pem(key), _pem(key).decode("ascii")):
        pair = TeeKeyPair.from_pem(pem)
        assert (pair.key_type, pair.alg) == (key_type, alg)
        pub = pair.public_jwk()  # jwcrypto gives a PEM key a thumbprint kid: not sent
        assert "kid" not in pub and "d" not in pub and pub["alg"] == alg
        assert pair.decrypt(jwe_encrypt(SECRET, pair.public_jwk())) == SECRET


def test_from_pem_refusals_say_why() -> None:
    cases = [
        (b"not a pem", "TEE key pair is not a PEM private key"),
        (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "TEE key pair PEM holds no private key",
        ),
        (_pem(ed25519.Ed25519PrivateKey.generate()), "TEE key pair has unsupported type OKP"),
    ]
    for pem, message in cases:
        with pytest.raises(BadResponse) as info:
            TeeKeyPair.from_pem(pem)
        assert str(info.value) == message


def _good() -> dict[str, str]:
    return jwe_encrypt(SECRET, EC_PAIR.public_jwk())


def _with_header(**changes: Any) -> dict[str, str]:
    response = _good()
    header = json.loads(base64.urlsafe_b64decode(response["protected"] + "=="))
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not ...}
    response["protected"] = b64url_encode(json.dumps(header).encode())
    return response


@pytest.mark.parametrize("member", ["protected", "encrypted_key", "iv", "ciphertext", "tag"])
def test_every_member_is_required_and_strict_base64url(member: str) -> None:
    missing = _good()
    del missing[member]
    assert _refused(EC_PAIR, missing) == f"KBS resource response lacks JWE member {member!r}"
    wrong_type = _good() | {member: 7}
    assert _refused(EC_PAIR, wrong_type) == f"KBS resource response lacks JWE member {member!r}"
    padded = _good()
    padded[member] += "="
    assert _refused(EC_PAIR, padded) == (
        f"KBS resource response: JWE member {member} is not unpadded base64url"
    )


def test_response_shape_refusals_say_why() -> None:
    assert _refused(EC_PAIR, [1]) == "KBS resource response is not a JSON object"
    assert _refused(EC_PAIR, _good() | {"aad": "AA"}) == (
        "KBS resource response must not carry JWE aad"
    )
    assert _refused(EC_PAIR, _with_header(zip="DEF")) == (
        "KBS resource response must not be compressed"
    )
    for bad in (b"not json", b"[1]"):
        response = _good() | {"protected": b64url_encode(bad)}
        assert _refused(EC_PAIR, response) == (
            "KBS resource response has an unreadable protected header"
        )


def test_protected_header_size_limit_is_exact() -> None:
    """MAX_PROTECTED characters pass the size check (and fail later, on the tag); one more is
    refused as oversized before any parsing."""

    def of_length(n: int) -> dict[str, str]:
        response = _good()
        header = json.loads(base64.urlsafe_b64decode(response["protected"] + "=="))
        base = len(b64url_encode(json.dumps(header | {"p": ""}).encode()))
        pad = (n - base) * 3 // 4
        for extra in range(pad - 3, pad + 4):
            text = b64url_encode(json.dumps(header | {"p": "x" * extra}).encode())
            if len(text) == n:
                return response | {"protected": text}
        raise AssertionError(f"no header of length {n}")

    at_limit = of_length(MAX_PROTECTED)
    assert "oversized" not in _refused(EC_PAIR, at_limit)
    over = (
        of_length(MAX_PROTECTED + 1)
        if (MAX_PROTECTED + 1) % 4 != 1
        else of_length(MAX_PROTECTED + 2)
    )
    assert _refused(EC_PAIR, over) == "KBS resource response has an oversized protected header"


@pytest.mark.parametrize(
    ("changes", "alg", "enc"),
    [
        ({"alg": RSA_ALG}, RSA_ALG, ENC),
        ({"enc": "A128GCM"}, EC_ALG, "A128GCM"),
        ({"alg": ...}, None, ENC),
        ({"enc": ...}, EC_ALG, None),
    ],
)
def test_wrong_algorithm_is_refused_and_named(changes: dict[str, Any], alg: Any, enc: Any) -> None:
    message = _refused(EC_PAIR, _with_header(**changes))
    assert message == (
        f"KBS resource response uses alg={str(alg)[:40]!r} enc={str(enc)[:40]!r}, "
        f"expected alg={EC_ALG!r} enc={ENC!r}"
    )


def test_algorithm_names_in_errors_are_cut_to_40_characters() -> None:
    message = _refused(EC_PAIR, _with_header(alg="A" * 100, enc="E" * 100))
    assert f"alg={'A' * 40!r} enc={'E' * 40!r}," in message


def test_tampering_is_refused_without_detail() -> None:
    response = _good()
    tag = bytearray(base64.urlsafe_b64decode(response["tag"] + "=="))
    tag[0] ^= 1
    response["tag"] = b64url_encode(bytes(tag))
    assert _refused(EC_PAIR, response) == (
        "KBS resource response failed to decrypt (InvalidJWEData)"
    )
    # a response for another key pair does not open either
    other = jwe_encrypt(SECRET, TeeKeyPair("ec").public_jwk())
    assert _refused(EC_PAIR, other).startswith("KBS resource response failed to decrypt (")
