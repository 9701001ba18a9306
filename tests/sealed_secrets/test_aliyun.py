"""aliyun provider through the official kms20160120 SDK against a signature-checking fake KMS."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import logging
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alibabacloud_kms20160120  # noqa: E402, F401  (a test extra: missing is a failure)
import pytest
from jwcrypto import jwk

from sealed_secrets import jws, seal  # noqa: E402
from sealed_secrets.errors import (  # noqa: E402
    MalformedSecret,
    ProviderError,
    SealedSecretError,
    TamperedCiphertext,
    WrongKey,
)
from sealed_secrets.providers import aliyun  # noqa: E402
from sealed_secrets.unseal import unseal_secret  # noqa: E402
from tests.peers import aliyun_kms as kms_peer
from tests.sealed_secrets.vectors_coco import TEST_KEY

SIGNING = jwk.JWK(**TEST_KEY)
KEY_ID = "key-cmk-0001"
AK, SK, STS = "LTAI-sealer-ak", "sealer-sk-Zq8w7e6r5t", "sts-token-Xy9"
GUEST_AK, GUEST_SK = "LTAI-guest-ak", "guest-sk-Mn4b3v2c1x"
PLAINTEXT = b"aliyun-plaintext-p@ss-4711"


@pytest.fixture()
def kms(tmp_path: Path) -> Iterator[Any]:
    with kms_peer.FakeKms(str(tmp_path)) as server:
        server.state.credentials = {AK: (SK, STS), GUEST_AK: (GUEST_SK, None)}
        server.state.add_key(KEY_ID)
        server.state.secrets["db-password"] = (PLAINTEXT.decode(), "text")
        server.state.secrets["tls-key"] = (base64.b64encode(b"\x00\x01bin").decode(), "binary")
        yield server


@pytest.fixture()
def guest(tmp_path: Path, kms: Any, key_dir: str) -> dict[str, Any]:
    """In-guest view: STS token file + credential dir holding the instance CA."""
    token = tmp_path / "guest-token"
    token.write_text(f"{GUEST_AK}:{GUEST_SK}\n")
    cred_dir = Path(kms.ca_path).parent
    settings = {
        "client_type": "sts_token",
        "token_path": str(token),
        "region_id": "cn-hangzhou",
        "kms_instance_id": "kst-test",
        "endpoint": kms.endpoint,
    }
    return {
        "settings": settings,
        "options": {"aliyun": {"credential_dir": str(cred_dir)}},
        "key_dir": key_dir,
    }


@pytest.fixture()
def key_dir(tmp_path: Path) -> str:
    d = tmp_path / "verify"
    d.mkdir()
    (d / "test-key").write_text(SIGNING.export_public())
    return str(d)


def sealer_client(kms: Any, settings: dict[str, Any]) -> Any:
    return aliyun.make_client(settings, credentials=aliyun.Credentials(AK, SK, STS), ca=kms.ca_path)


def sealed_envelope(kms: Any, guest: dict[str, Any], data: bytes = PLAINTEXT) -> str:
    return seal.seal_envelope(
        data,
        provider="aliyun",
        key_id=KEY_ID,
        signing_key=SIGNING,
        signing_kid="test-key",
        kms_client=sealer_client(kms, guest["settings"]),
        provider_settings=guest["settings"],
    )


def unseal(sealed: str, guest: dict[str, Any]) -> bytes:
    return unseal_secret(
        sealed, get_resource=None, key_dir=guest["key_dir"], provider_options=guest["options"]
    )


def test_envelope_roundtrip_via_signed_sdk_requests(kms: Any, guest: dict[str, Any]) -> None:
    sealed = sealed_envelope(kms, guest)
    obj = json.loads(jws.parse(sealed).payload)
    assert obj["provider"] == "aliyun" and obj["key_id"] == KEY_ID
    assert obj["provider_settings"]["client_type"] == "sts_token"
    assert unseal(sealed, guest) == PLAINTEXT
    actions = [r["action"] for r in kms.state.requests]
    assert actions == ["Encrypt", "Decrypt"]
    assert kms.state.requests[0]["query"]["KeyId"] == KEY_ID
    # the KMS saw only the data key, never the secret itself
    assert not any(PLAINTEXT in raw for raw in kms.state.raw_requests)


def test_vault_text_and_binary(kms: Any, guest: dict[str, Any]) -> None:
    for name, want in (("db-password", PLAINTEXT), ("tls-key", b"\x00\x01bin")):
        sealed = seal.seal_vault(
            name,
            "aliyun",
            signing_key=SIGNING,
            signing_kid="test-key",
            provider_settings=guest["settings"],
            annotations={"version_stage": "ACSCurrent", "version_id": ""},
        )
        assert unseal(sealed, guest) == want
    assert kms.state.requests[-1]["query"]["SecretName"] == "tls-key"
    assert kms.state.requests[-1]["query"]["VersionStage"] == "ACSCurrent"


def _resign(sealed: str, **changes: Any) -> str:
    obj = json.loads(jws.parse(sealed).payload)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(obj.get(k), dict):
            obj[k] = {**obj[k], **v}
        else:
            obj[k] = v
    return jws.sign(json.dumps(obj).encode(), SIGNING, "test-key")


def test_failures_are_typed(kms: Any, guest: dict[str, Any], tmp_path: Path) -> None:
    sealed = sealed_envelope(kms, guest)
    obj = json.loads(jws.parse(sealed).payload)
    blob = bytearray(base64.b64decode(obj["encrypted_key"]))
    blob[-3] ^= 1
    with pytest.raises(WrongKey):  # KMS refuses the modified blob
        unseal(_resign(sealed, encrypted_key=base64.b64encode(bytes(blob)).decode()), guest)
    kms.state.add_key("key-other")
    other = seal.seal_envelope(
        PLAINTEXT,
        provider="aliyun",
        key_id="key-other",
        signing_key=SIGNING,
        signing_kid="test-key",
        kms_client=sealer_client(kms, guest["settings"]),
        provider_settings=guest["settings"],
    )
    swapped = _resign(sealed, encrypted_key=json.loads(jws.parse(other).payload)["encrypted_key"])
    with pytest.raises(WrongKey):  # decrypts, but under a key other than the signed key_id
        unseal(swapped, guest)
    data = bytearray(base64.b64decode(obj["encrypted_data"]))
    data[0] ^= 1
    with pytest.raises(TamperedCiphertext):
        unseal(_resign(sealed, encrypted_data=base64.b64encode(bytes(data)).decode()), guest)
    bad_token = tmp_path / "bad-token"
    bad_token.write_text(f"{GUEST_AK}:wrong-secret")
    with pytest.raises(ProviderError, match="SignatureDoesNotMatch"):
        unseal(_resign(sealed, provider_settings={"token_path": str(bad_token)}), guest)
    with pytest.raises(ProviderError, match="not supported"):
        unseal(_resign(sealed, provider_settings={"client_type": "client_key"}), guest)
    with pytest.raises(ProviderError, match="unreadable"):
        unseal(_resign(sealed, provider_settings={"token_path": str(tmp_path / "none")}), guest)
    with pytest.raises(MalformedSecret):
        unseal(_resign(sealed, provider_settings={"token_path": None}), guest)
    vault = seal.seal_vault(
        "missing",
        "aliyun",
        signing_key=SIGNING,
        signing_kid="test-key",
        provider_settings=guest["settings"],
    )
    with pytest.raises(ProviderError, match="not found"):
        unseal(vault, guest)


def test_untrusted_tls_and_unreachable_endpoint(
    kms: Any, guest: dict[str, Any], tmp_path: Path
) -> None:
    sealed = sealed_envelope(kms, guest)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    # Same account, but a server certificate from a CA the guest does not trust. A fresh
    # port matters: the SDK pools TLS sessions (and their CA) per host:port across clients.
    with kms_peer.FakeKms(str(other_dir)) as impostor:
        impostor._httpd.state = kms.state
        moved = _resign(sealed, provider_settings={"endpoint": impostor.endpoint})
        with pytest.raises(ProviderError, match="no response"):
            unseal(moved, guest)
        trusting = {"aliyun": {"credential_dir": str(other_dir)}}
        with pytest.raises(ProviderError, match="no response"):  # CA file name is per instance
            unseal_secret(
                moved, get_resource=None, key_dir=guest["key_dir"], provider_options=trusting
            )
    dead = _resign(sealed, provider_settings={"endpoint": "127.0.0.1:1"})
    with pytest.raises(ProviderError):
        unseal(dead, guest)


def test_endpoint_selection() -> None:
    assert aliyun.endpoint_for({"kms_instance_id": "kst-abc"}) == (
        "kst-abc.cryptoservice.kms.aliyuncs.com"
    )
    assert aliyun.endpoint_for({"region_id": "cn-beijing"}) == "kms.cn-beijing.aliyuncs.com"
    with pytest.raises(MalformedSecret):
        aliyun.endpoint_for({})


def test_no_credentials_or_plaintext_in_errors_or_logs(
    kms: Any, guest: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sealed = sealed_envelope(kms, guest)
    dek_b64 = kms.state.requests[0]["query"]["Plaintext"]  # the data key as sent to KMS
    bad_token = tmp_path / "bad"
    bad_token.write_text(f"{GUEST_AK}:{GUEST_SK}-x:{STS}")
    obj = json.loads(jws.parse(sealed).payload)
    data = bytearray(base64.b64decode(obj["encrypted_data"]))
    data[0] ^= 1
    attempts = [
        _resign(sealed, provider_settings={"token_path": str(bad_token)}),
        _resign(sealed, provider_settings={"endpoint": "127.0.0.1:1"}),
        _resign(sealed, encrypted_key=base64.b64encode(b"x" * 60).decode()),
        _resign(sealed, encrypted_data=base64.b64encode(bytes(data)).decode()),
    ]
    texts = []
    for s in attempts:
        with pytest.raises(SealedSecretError) as err:
            unseal(s, guest)
        texts += [str(err.value), repr(err.value), str(err.value.__cause__)]
    with pytest.raises(SealedSecretError) as err:  # sealing with bad credentials
        seal.seal_envelope(
            PLAINTEXT,
            provider="aliyun",
            key_id=KEY_ID,
            signing_key=SIGNING,
            signing_kid="test-key",
            provider_settings=guest["settings"],
            kms_client=aliyun.make_client(
                guest["settings"], credentials=aliyun.Credentials(AK, SK + "x", STS), ca=kms.ca_path
            ),
        )
    texts.append(str(err.value))
    texts.append(repr(aliyun.Credentials(AK, SK, STS)))
    texts += [r.getMessage() for r in caplog.records]
    blob = "\n".join(texts)
    for secret in (SK, GUEST_SK, STS, PLAINTEXT.decode(), dek_b64):
        assert secret not in blob


def test_cli_and_kubectl_plugin_seal_with_aliyun(
    kms: Any, guest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from sealed_secrets import cli, kubectl_plugin

    (tmp_path / "signing.json").write_text(SIGNING.export_private())
    (tmp_path / "sealer-creds").write_text(f"{AK}:{SK}:{STS}")
    (tmp_path / "plain").write_bytes(PLAINTEXT)
    s = guest["settings"]
    cli.main([
        "seal", "--signing-kid", "test-key", "--signing-jwk-path", str(tmp_path / "signing.json"),
        "envelope", "-k", KEY_ID, "-f", str(tmp_path / "plain"), "ali",
        "--region-id", s["region_id"], "--kms-instance-id", s["kms_instance_id"],
        "--endpoint", s["endpoint"], "--guest-token-path", s["token_path"],
        "--credential-file", str(tmp_path / "sealer-creds"), "--ca", kms.ca_path,
    ])  # fmt: skip
    sealed = capsys.readouterr().out.strip()
    assert unseal(sealed, guest) == PLAINTEXT
    cli.main([
        "unseal", "-k", guest["key_dir"], "--aliyun-credential-dir",
        guest["options"]["aliyun"]["credential_dir"], sealed,
    ])  # fmt: skip
    assert capsys.readouterr().out.encode() == PLAINTEXT

    kubectl_plugin.main([
        "db", f"--from-literal=password={PLAINTEXT.decode()}", "--dry-run=client", "-o", "json",
        "--signing-kid", "test-key", "--signing-jwk-path", str(tmp_path / "signing.json"),
        "--provider", "aliyun", "--key-id", KEY_ID, "--region-id", s["region_id"],
        "--kms-instance-id", s["kms_instance_id"], "--kms-endpoint", s["endpoint"],
        "--guest-token-path", s["token_path"],
        "--kms-credential-file", str(tmp_path / "sealer-creds"), "--kms-ca", kms.ca_path,
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert PLAINTEXT.decode() not in out
    value = base64.b64decode(json.loads(out)["data"]["password"]).decode()
    assert unseal(value, guest) == PLAINTEXT


# --- the KMS peer is as strict as the real service about dates and nonces ----------------


def _raw_post(kms: Any, path: str, headers: dict[str, str], body: bytes = b"") -> dict[str, Any]:
    """POST to the fake KMS over its TLS, byte for byte what the caller says."""
    host, port = kms.endpoint.split(":")
    ctx = ssl.create_default_context(cafile=kms.ca_path)
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return {"status": resp.status, **json.loads(resp.read())}
    finally:
        conn.close()


def _signed_headers(
    kms: Any, query: str, *, date: datetime.datetime, nonce: str | None
) -> dict[str, str]:
    """An ACS3-HMAC-SHA256 (V3) request for Encrypt, signed independently of the SDK."""
    body_hash = hashlib.sha256(b"").hexdigest()
    headers = {
        "host": kms.endpoint,
        "x-acs-action": "Encrypt",
        "x-acs-version": "2016-01-20",
        "x-acs-date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "x-acs-content-sha256": body_hash,
    }
    if nonce is not None:
        headers["x-acs-signature-nonce"] = nonce
    names = sorted(headers)
    canonical = "\n".join(
        ["POST", "/", query, "".join(f"{n}:{headers[n]}\n" for n in names), ";".join(names)]
        + [body_hash]
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    sig = hmac.new(GUEST_SK.encode(), f"ACS3-HMAC-SHA256\n{digest}".encode(), "sha256")
    headers["Authorization"] = (
        f"ACS3-HMAC-SHA256 Credential={GUEST_AK},SignedHeaders={';'.join(names)},"
        f"Signature={sig.hexdigest()}"
    )
    return headers


def _encrypt_with(kms: Any, *, skew: float = 0.0, nonce: str | None = "") -> dict[str, Any]:
    query = f"KeyId={KEY_ID}&Plaintext=aGk%3D"
    date = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=skew)
    headers = _signed_headers(
        kms, query, date=date, nonce=uuid.uuid4().hex if nonce == "" else nonce
    )
    return _raw_post(kms, "/?" + query, headers)


def test_kms_peer_accepts_a_fresh_independently_signed_request(kms: Any) -> None:
    """Control for the two tests below: our own V3 signer is right, so their refusals are
    about the date and the nonce, not about the signature."""
    for skew in (0, -14 * 60, 14 * 60):
        reply = _encrypt_with(kms, skew=skew)
        assert reply["status"] == 200 and reply["KeyId"] == KEY_ID, reply


@pytest.mark.parametrize("skew", [-16 * 60, 16 * 60, -86400])
def test_kms_peer_refuses_stale_and_future_dates(kms: Any, skew: float) -> None:
    reply = _encrypt_with(kms, skew=skew)
    assert (reply["status"], reply["Code"]) == (400, "InvalidTimeStamp.Expired"), reply


def test_kms_peer_refuses_a_reused_or_missing_nonce(kms: Any) -> None:
    assert _encrypt_with(kms, nonce="nonce-once")["status"] == 200
    reply = _encrypt_with(kms, nonce="nonce-once")  # fresh date, fresh signature, same nonce
    assert (reply["status"], reply["Code"]) == (400, "SignatureNonceUsed"), reply
    assert _encrypt_with(kms, nonce=None)["Code"] == "IncompleteSignature"


def test_kms_peer_refuses_a_replayed_sdk_request(kms: Any, guest: dict[str, Any]) -> None:
    """The exact bytes the official SDK sent, sent again: refused, as the real KMS would."""
    sealed_envelope(kms, guest)
    raw = kms.state.raw_requests[0]
    path, _, rest = raw.partition(b"\n")
    head, _, body = rest.replace(b"\r\n", b"\n").partition(b"\n\n")
    unfolded = head.decode().replace("\n ", " ").replace("\n\t", " ")  # recorded folded
    headers = {k: v.strip() for k, _, v in (ln.partition(":") for ln in unfolded.split("\n"))}
    assert "x-acs-signature-nonce" in {k.lower() for k in headers}
    reply = _raw_post(kms, path.decode(), headers, body)
    assert (reply["status"], reply["Code"]) == (400, "SignatureNonceUsed"), reply
