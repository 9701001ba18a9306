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


# --- found by mutation testing (tools/mutation.py): each test kills mutants that survived ----

_VAULT_FIELDS = ["name", "provider", "provider_settings", "annotations"]
_ENVELOPE_FIELDS = [
    "wrap_type",
    "provider",
    "key_id",
    "encrypted_key",
    "encrypted_data",
    "iv",
    "provider_settings",
    "annotations",
]
_OBJECT_FIELDS = {"provider_settings", "annotations"}


@pytest.mark.parametrize(
    ("base", "kind", "name"),
    [(VAULT_2, "vault", f) for f in _VAULT_FIELDS]
    + [(ENVELOPE_1, "envelope", f) for f in _ENVELOPE_FIELDS],
)
def test_missing_or_mistyped_field_errors_name_the_kind_and_field(
    base: bytes, kind: str, name: str
) -> None:
    raw = json.loads(base)
    del raw[name]
    with pytest.raises(MalformedSecret) as missing:
        pl.loads(json.dumps(raw).encode())
    assert str(missing.value) == f"{kind} payload lacks required field {name!r}"
    raw[name] = 7
    with pytest.raises(MalformedSecret) as mistyped:
        pl.loads(json.dumps(raw).encode())
    want = "a JSON object" if name in _OBJECT_FIELDS else "a string"
    assert str(mistyped.value) == f"{kind} payload field {name!r} must be {want}"


@pytest.mark.parametrize(
    ("raw", "exc", "message"),
    [
        (_obj(version=1), MalformedSecret, "payload lacks a string 'version'"),
        (
            _obj(version="0.2.0"),
            UnsupportedVersion,
            "unsupported sealed secret version (want 0.1.0)",
        ),
        (_obj(type=None), MalformedSecret, "payload lacks a string 'type'"),
        (
            _obj(type="plain"),
            UnsupportedType,
            "unsupported sealed secret type (want 'vault' or 'envelope')",
        ),
        (
            _obj(wrap_type="A128GCM"),
            MalformedSecret,
            "envelope wrap_type must be A256GCM or A256CTR",
        ),
        (b"[]", MalformedSecret, "payload is not a JSON object"),
    ],
)
def test_payload_errors_say_what_is_wrong(raw: bytes, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        pl.loads(raw)
    assert type(info.value) is exc and str(info.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("_-==", "x is not standard base64"),
        ("AA==\n", "x is not standard base64"),
        ("AA!=", "x is not standard base64"),
        ("é===", "x is not standard base64"),
        ("AB==", "x is not canonical standard base64"),
    ],
)
def test_standard_base64_errors_say_which_rule(text: str, message: str) -> None:
    with pytest.raises(BadBase64) as info:
        pl.b64std_decode(text, what="x")
    assert str(info.value) == message


def test_envelope_fields_decode_and_name_themselves_in_errors() -> None:
    iv = pl.b64std_encode(b"i" * 12)
    good = pl.EnvelopeSecret("aliyun", "k", "a2V5", "ZGF0YQ==", "A256GCM", iv)
    assert (good.encrypted_key_bytes(), good.encrypted_data_bytes()) == (b"key", b"data")
    assert good.iv_bytes() == b"i" * 12
    bad = pl.EnvelopeSecret("aliyun", "k", "k!", "d!", "A256GCM", "i!")
    for call, what in (
        (bad.encrypted_key_bytes, "envelope encrypted_key"),
        (bad.encrypted_data_bytes, "envelope encrypted_data"),
        (bad.iv_bytes, "envelope iv"),
    ):
        with pytest.raises(BadBase64) as info:
            call()
        assert str(info.value) == f"{what} is not standard base64"
    short = pl.EnvelopeSecret("aliyun", "k", "a2V5", "ZGF0YQ==", "A256GCM", "AAAA")
    with pytest.raises(MalformedSecret) as info:
        short.iv_bytes()
    assert str(info.value) == "envelope iv must be 12 bytes for A256GCM"


def test_dumps_writes_utf8_not_ascii_escapes_like_coco() -> None:
    secret = pl.VaultSecret(name="kbs:///default/clé/x", provider="kbs")
    out = pl.dumps(secret)
    assert "clé".encode() in out and b"\\u00e9" not in out
    assert pl.loads(out).name == secret.name
