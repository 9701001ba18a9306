"""Property tests: parsers and unseal never fail with anything but the typed errors.

Quick in every run; ``./run fuzz`` (``-m longfuzz``) runs each with 100,000 cases.
"""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jwcrypto import jwk

from sealed_secrets import jws, keys, seal
from sealed_secrets import payload as pl
from sealed_secrets.errors import SealedSecretError
from sealed_secrets.providers import asym
from sealed_secrets.unseal import unseal_secret
from tests.fuzzing import fuzz, long_fuzz
from tests.sealed_secrets.vectors_coco import (
    ENVELOPE_1,
    PAYLOAD_A,
    PUBLIC_JWK,
    SIGNING_KID,
    TEST_KEY,
    VECTOR_A,
)

SIGNING = jwk.JWK(**TEST_KEY)
PAIR = asym.generate_keypair("EC")
KEY_URI = "kbs:///default/sealing-key/asym"
SEALED_ENV = seal.seal_envelope(
    b"fuzz-plaintext",
    provider="coco-csi-asym",
    key_id=KEY_URI,
    signing_key=SIGNING,
    signing_kid="test-key",
    public_key=asym.load_public_key(PAIR.export_public().encode()),
)
RESOURCES = {
    SIGNING_KID: PUBLIC_JWK,
    "kbs:///default/sealed-secret/test": b"vector-a",
    KEY_URI: PAIR.export_private().encode(),
}
B64URL = string.ascii_letters + string.digits + "-_"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def get_resource(uri: str) -> bytes:
    from sealed_secrets.errors import ResourceNotFound

    if uri not in RESOURCES:
        raise ResourceNotFound("missing", status=404)
    return RESOURCES[uri]


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("vk")
    (d / "test-key").write_text(SIGNING.export_public())
    return str(d)


@long_fuzz
@fuzz(quick=300)
@given(st.text(max_size=300))
def test_parse_arbitrary_text(text: str) -> None:
    for candidate in (text, "sealed." + text):
        with contextlib.suppress(SealedSecretError):
            jws.parse(candidate)


@long_fuzz
@fuzz(quick=300)
@given(st.lists(st.text(alphabet=B64URL, max_size=120), min_size=0, max_size=5))
def test_parse_structured_sections(sections: list[str]) -> None:
    try:
        parsed = jws.parse("sealed." + ".".join(sections))
    except SealedSecretError:
        return
    with pytest.raises(SealedSecretError):  # random sections never verify
        jws.verify(parsed, jwk.JWK.from_json(PUBLIC_JWK))


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=400))
def test_payload_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(SealedSecretError):
        pl.loads(data)


@long_fuzz
@fuzz(quick=300)
@given(json_values)
def test_payload_arbitrary_json(value: object) -> None:
    with contextlib.suppress(SealedSecretError):
        pl.loads(json.dumps(value).encode())


@long_fuzz
@fuzz(quick=300)
@given(st.dictionaries(st.sampled_from(list(json.loads(ENVELOPE_1))), json_values, max_size=12))
def test_payload_field_confusion(overrides: dict) -> None:
    obj = {**json.loads(ENVELOPE_1), **overrides}
    try:
        secret = pl.loads(json.dumps(obj).encode())
    except SealedSecretError:
        return
    if isinstance(secret, pl.EnvelopeSecret):
        for decode in (secret.iv_bytes, secret.encrypted_key_bytes, secret.encrypted_data_bytes):
            with contextlib.suppress(SealedSecretError):
                decode()


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=300))
def test_jwk_parser(data: bytes) -> None:
    with contextlib.suppress(SealedSecretError):
        keys.parse_jwk(data, what="fuzz")


@long_fuzz
@fuzz(quick=300)
@given(st.data())
def test_unseal_mutated_strings(key_dir: str, data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([VECTOR_A, SEALED_ENV]))
    ops = data.draw(
        st.lists(
            st.tuples(
                st.integers(0, len(base) - 1),
                st.sampled_from(["flip", "delete", "insert"]),
                st.sampled_from(B64URL + ".="),
            ),
            min_size=1,
            max_size=3,
        )
    )
    s = base
    for pos, op, ch in ops:
        pos = min(pos, len(s) - 1)
        if op == "flip":
            s = s[:pos] + ch + s[pos + 1 :]
        elif op == "delete":
            s = s[:pos] + s[pos + 1 :]
        else:
            s = s[:pos] + ch + s[pos:]
    if s == base:
        return
    with pytest.raises(SealedSecretError):
        unseal_secret(s, get_resource=get_resource, key_dir=key_dir, allowed_kids=[SIGNING_KID])


@long_fuzz
@fuzz(quick=300)
@given(json_values, st.sampled_from(["version", "type", "provider", "key_id", "encrypted_key",
                                     "encrypted_data", "wrap_type", "iv", "provider_settings",
                                     "annotations"]))  # fmt: skip
def test_unseal_signed_but_hostile_payloads(key_dir: str, value: object, field: str) -> None:
    """A validly signed payload with any field replaced: typed error or (rarely) success."""
    obj = json.loads(jws.parse(SEALED_ENV).payload)
    obj[field] = value
    sealed = jws.sign(json.dumps(obj).encode(), SIGNING, "test-key")
    with contextlib.suppress(SealedSecretError):
        unseal_secret(sealed, get_resource=get_resource, key_dir=key_dir)


@fuzz(quick=300)
@given(st.text(max_size=200))
def test_kubectl_env_file_parser(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    from sealed_secrets.kubectl_plugin import CliError, gather_values

    path = Path(tmp_path_factory.mktemp("env")) / "f.env"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(CliError, UnicodeDecodeError):
        gather_values([], [], [str(path)])


def test_payload_a_is_fixed_point() -> None:
    assert pl.dumps(pl.loads(PAYLOAD_A)) == PAYLOAD_A


# --- KBS side: JWE responses, HTTP problem bodies, tokens, the CDH config, resolver specs ------

TEE_KEYS = {"ec": None, "rsa": None}


def _tee_key(kind: str):
    from sealed_secrets.jwe import TeeKeyPair

    if TEE_KEYS[kind] is None:
        TEE_KEYS[kind] = TeeKeyPair(kind)
    return TEE_KEYS[kind]


def _real_jwe(kind: str) -> dict:
    from tests.peers.kbs_server import jwe_encrypt

    return jwe_encrypt(b"resource-plaintext", _tee_key(kind).public_jwk())


JWE_EC = _real_jwe("ec")


@long_fuzz
@fuzz(quick=300)
@given(json_values)
def test_jwe_arbitrary_json(value: object) -> None:
    with contextlib.suppress(SealedSecretError):
        _tee_key("ec").decrypt(value)


@long_fuzz
@fuzz(quick=300)
@given(
    st.dictionaries(
        st.sampled_from(["protected", "encrypted_key", "iv", "ciphertext", "tag", "aad", "x"]),
        st.text(alphabet=B64URL + "=+/.", max_size=80) | json_values,
        max_size=7,
    )
)
def test_jwe_member_confusion(overrides: dict) -> None:
    response = {**JWE_EC, **overrides}
    try:
        plain = _tee_key("ec").decrypt(response)
    except SealedSecretError:
        return
    assert plain == b"resource-plaintext"  # only if nothing that matters changed


@long_fuzz
@fuzz(quick=300)
@given(st.data())
def test_jwe_mutated_members_never_decrypt_to_something_else(data: st.DataObject) -> None:
    member = data.draw(st.sampled_from(["protected", "encrypted_key", "iv", "ciphertext", "tag"]))
    text = JWE_EC[member]
    pos = data.draw(st.integers(0, max(0, len(text) - 1)))
    ch = data.draw(st.sampled_from(B64URL + "="))
    mutated = text[:pos] + ch + text[pos + 1 :]
    response = {**JWE_EC, member: mutated}
    if mutated == text:
        assert _tee_key("ec").decrypt(response) == b"resource-plaintext"
        return
    with pytest.raises(SealedSecretError):
        _tee_key("ec").decrypt(response)


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=300), st.text(max_size=200))
def test_kbs_problem_and_token_parsers(body: bytes, token: str) -> None:
    from sealed_secrets.kbs_client import _problem, _Reply, _token_expiry

    ptype, detail = _problem(_Reply(400, body, {}))
    assert ptype is None or isinstance(ptype, str)
    assert all(c.isprintable() for c in detail)
    assert _token_expiry(token) is None or isinstance(_token_expiry(token), float)


CDH_OK = b"""socket = "unix:///run/confidential-containers/cdh.sock"
[kbc]
name = "cc_kbc"
url = "https://kbs.example:8443"
kbs_cert = \"\"\"
-----BEGIN CERTIFICATE-----
MIIB
-----END CERTIFICATE-----
\"\"\"
[image]
max_concurrent_layer_downloads_per_image = 3
"""


@long_fuzz
@fuzz(quick=300)
@given(st.binary(max_size=400))
def test_cdh_config_arbitrary_bytes(data: bytes) -> None:
    from sealed_secrets.cdh_config import parse_cdh_config

    with contextlib.suppress(SealedSecretError):
        parse_cdh_config(data, source="fuzz")


@long_fuzz
@fuzz(quick=300)
@given(st.data())
def test_cdh_config_mutations(data: st.DataObject) -> None:
    from sealed_secrets.cdh_config import parse_cdh_config

    raw = bytearray(CDH_OK)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.sampled_from(b'"[]=\n\\#\x00{}.ab1'))
    try:
        conf = parse_cdh_config(bytes(raw), source="fuzz")
    except SealedSecretError:
        return
    assert isinstance(conf.url, str) and conf.url


@long_fuzz
@fuzz(quick=300)
@given(st.text(max_size=200))
def test_kbs_spec_and_kid_lists(text: str) -> None:
    from sealed_secrets.keys import check_allowed_kids, kid_allowed
    from sealed_secrets.resolver_spec import _kbs_target

    with contextlib.suppress(SealedSecretError):
        _kbs_target(text)
    with contextlib.suppress(SealedSecretError):
        check_allowed_kids([text])
    assert kid_allowed(text, ["kbs:///"]) is False  # a malformed entry never matches


# --- huge and deeply nested input is refused fast, with a typed error --------------------------


DEEP = 200_000


@pytest.mark.parametrize(
    "builder",
    [
        lambda: "sealed." + jws.b64url_encode(b"[" * DEEP) + ".e30.AAAA",
        lambda: (
            "sealed."
            + jws.b64url_encode(b'{"alg":"ES256","kid":"k","x":' + b"[" * DEEP)
            + "."
            + jws.b64url_encode(b"{}")
            + "."
            + jws.b64url_encode(bytes(64))
        ),
    ],
    ids=["deep-header", "deep-header-member"],
)
def test_deep_json_in_sealed_strings(builder) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(SealedSecretError):
        jws.parse(builder())
    assert time.monotonic() - started < 2


def test_deep_and_huge_json_payload_and_jwe() -> None:
    import time

    from sealed_secrets.errors import BadResponse
    from sealed_secrets.kbs_client import KbsClient, _Reply

    started = time.monotonic()
    with pytest.raises(SealedSecretError):
        pl.loads(b"[" * DEEP)
    with pytest.raises(SealedSecretError):
        pl.loads(b'{"a":' * DEEP)
    deep_header = jws.b64url_encode(b"[" * 3000)
    with pytest.raises(BadResponse):
        _tee_key("ec").decrypt({**JWE_EC, "protected": deep_header})
    with pytest.raises(BadResponse, match="oversized"):
        _tee_key("ec").decrypt({**JWE_EC, "protected": jws.b64url_encode(b" " * 8000)})
    with pytest.raises(BadResponse, match="not JSON"):
        KbsClient._json(_Reply(200, b"[" * DEEP, {}), "resource")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("member", ["protected", "encrypted_key", "iv", "ciphertext", "tag"])
def test_jwe_non_canonical_base64_is_refused(member: str) -> None:
    from sealed_secrets.errors import BadResponse

    text = JWE_EC[member]
    raw = jws.b64url_decode(text, what="x")
    if len(raw) % 3 == 0:  # no spare bits to play with: try padding instead
        variants = [text + "="]
    else:
        last = B64URL.index(text[-1])
        variants = [text[:-1] + B64URL[last | 1], text + "="]
    for variant in [v for v in variants if v != text]:
        with pytest.raises(BadResponse, match="base64url"):
            _tee_key("ec").decrypt({**JWE_EC, member: variant})
