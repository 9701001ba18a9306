"""Property tests: parsers and unseal never fail with anything but the typed errors."""

from __future__ import annotations

import contextlib
import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwcrypto import jwk
from vectors_coco import ENVELOPE_1, PAYLOAD_A, PUBLIC_JWK, SIGNING_KID, TEST_KEY, VECTOR_A

from sealed_secrets import jws, keys, seal
from sealed_secrets import payload as pl
from sealed_secrets.errors import SealedSecretError
from sealed_secrets.providers import asym
from sealed_secrets.unseal import unseal_secret

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


@FAST
@given(st.text(max_size=300))
def test_parse_arbitrary_text(text: str) -> None:
    for candidate in (text, "sealed." + text):
        with contextlib.suppress(SealedSecretError):
            jws.parse(candidate)


@FAST
@given(st.lists(st.text(alphabet=B64URL, max_size=120), min_size=0, max_size=5))
def test_parse_structured_sections(sections: list[str]) -> None:
    try:
        parsed = jws.parse("sealed." + ".".join(sections))
    except SealedSecretError:
        return
    with pytest.raises(SealedSecretError):  # random sections never verify
        jws.verify(parsed, jwk.JWK.from_json(PUBLIC_JWK))


@FAST
@given(st.binary(max_size=400))
def test_payload_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(SealedSecretError):
        pl.loads(data)


@FAST
@given(json_values)
def test_payload_arbitrary_json(value: object) -> None:
    with contextlib.suppress(SealedSecretError):
        pl.loads(json.dumps(value).encode())


@FAST
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


@FAST
@given(st.binary(max_size=300))
def test_jwk_parser(data: bytes) -> None:
    with contextlib.suppress(SealedSecretError):
        keys.parse_jwk(data, what="fuzz")


@FAST
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
        unseal_secret(s, get_resource=get_resource, key_dir=key_dir)


@FAST
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


@FAST
@given(st.text(max_size=200))
def test_kubectl_env_file_parser(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    from sealed_secrets.kubectl_plugin import PluginError, gather_values

    path = Path(tmp_path_factory.mktemp("env")) / "f.env"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with contextlib.suppress(PluginError, UnicodeDecodeError):
        gather_values([], [], [str(path)])


def test_payload_a_is_fixed_point() -> None:
    assert pl.dumps(pl.loads(PAYLOAD_A)) == PAYLOAD_A
