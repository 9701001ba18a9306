"""Payload model: CoCo fixtures, field names and order, strict typed validation."""

from __future__ import annotations

import json

import pytest

from sealed_secrets import payload as pl
from sealed_secrets.errors import (
    BadBase64,
    MalformedSecret,
    UnsupportedType,
    UnsupportedVersion,
)
from tests.sealed_secrets.vectors_coco import ENVELOPE_1, PAYLOAD_A, PAYLOAD_B, VAULT_2


@pytest.mark.parametrize("raw", [PAYLOAD_A, PAYLOAD_B, VAULT_2])
def test_vault_fixtures_roundtrip_byte_exact(raw: bytes) -> None:
    secret = pl.loads(raw)
    assert isinstance(secret, pl.VaultSecret)
    assert secret.provider == "kbs" and secret.name.startswith("kbs:///")
    assert pl.dumps(secret) == raw


def test_envelope_fixture_parses_and_reserialises_in_coco_order() -> None:
    secret = pl.loads(ENVELOPE_1)
    assert isinstance(secret, pl.EnvelopeSecret)
    assert (secret.key_id, secret.encrypted_key, secret.encrypted_data, secret.iv) == (
        "xxx",
        "yyy",
        "zzz",
        "www",
    )
    assert secret.wrap_type == "A256GCM" and secret.provider == "aliyun"
    out = pl.dumps(secret)
    assert list(json.loads(out)) == [
        "version",
        "type",
        "key_id",
        "encrypted_key",
        "encrypted_data",
        "wrap_type",
        "iv",
        "provider",
        "provider_settings",
        "annotations",
    ]
    assert json.loads(out) == json.loads(ENVELOPE_1)
    # placeholder values are kept as strings and only fail when actually decoded
    with pytest.raises(BadBase64):
        secret.encrypted_key_bytes()


def _obj(**changes: object) -> bytes:
    base = json.loads(ENVELOPE_1)
    base.update(changes)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        (_obj(version="0.2.0"), UnsupportedVersion),
        (_obj(version="0.1.0 "), UnsupportedVersion),
        (_obj(version=1), MalformedSecret),
        (_obj(version=...), MalformedSecret),
        (_obj(type="Envelope"), UnsupportedType),
        (_obj(type="plain"), UnsupportedType),
        (_obj(type=None), MalformedSecret),
        (_obj(type=...), MalformedSecret),
        (_obj(key_id=...), MalformedSecret),
        (_obj(key_id=5), MalformedSecret),
        (_obj(annotations=...), MalformedSecret),
        (_obj(annotations=[]), MalformedSecret),
        (_obj(provider_settings="x"), MalformedSecret),
        (_obj(wrap_type="A128GCM"), MalformedSecret),
        (b"[]", MalformedSecret),
        (b"\xff\xfe", MalformedSecret),
        (b'{"version":"0.1.0","version":"0.1.0","type":"vault"}', MalformedSecret),
        (b"{" * 100000, MalformedSecret),
    ],
)
def test_invalid_payloads_raise_typed_errors(raw: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        pl.loads(raw)


def test_vault_requires_annotations_like_coco() -> None:
    raw = json.loads(VAULT_2)
    del raw["annotations"]
    with pytest.raises(MalformedSecret):
        pl.loads(json.dumps(raw).encode())


def test_unknown_members_are_ignored_like_serde() -> None:
    raw = json.loads(VAULT_2)
    raw["future"] = 1
    assert pl.loads(json.dumps(raw).encode()).name == "kbs:///one/2/trois"


def test_iv_length_enforced_per_wrap_type() -> None:
    gcm = pl.EnvelopeSecret("aliyun", "k", "AA==", "AA==", "A256GCM", pl.b64std_encode(b"1" * 16))
    with pytest.raises(MalformedSecret):
        gcm.iv_bytes()
    ctr = pl.EnvelopeSecret("aliyun", "k", "AA==", "AA==", "A256CTR", pl.b64std_encode(b"1" * 16))
    assert ctr.iv_bytes() == b"1" * 16


@pytest.mark.parametrize("bad", ["AA=", "A===", "AB==", "AA==\n", "_-==", "AA== "])
def test_standard_base64_is_strict(bad: str) -> None:
    with pytest.raises(BadBase64):
        pl.b64std_decode(bad, what="x")


def test_reprs_do_not_show_ciphertext() -> None:
    secret = pl.loads(ENVELOPE_1)
    assert "yyy" not in repr(secret) and "zzz" not in repr(secret)
