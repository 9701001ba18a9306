"""`aliyun` provider: Alibaba Cloud KMS through the official OpenAPI SDK (kms20160120).

Envelope: the 32-byte data key is wrapped with KMS `Encrypt` under `key_id` and unwrapped with
`Decrypt`; `encrypted_key` holds KMS's CiphertextBlob (already standard base64).
Vault: `name` is a KMS secret name, fetched with `GetSecretValue` (`annotations.version_stage`
/ `version_id` as in CoCo).

Credentials never travel in the sealed string. `provider_settings` says *how* the guest finds
them, using CoCo's keys: `client_type` = `sts_token` with `token_path` (a file `AK:SK:STS`)
and `region_id`. CoCo's `client_key` mode talks the dedicated-KMS protocol, which the OpenAPI
SDK does not speak; it is rejected with a clear error instead of failing obscurely. Optional
`kms_instance_id` selects the instance endpoint `<id>.cryptoservice.kms.aliyuncs.com` and its CA
file `PrivateKmsCA_<id>.pem` from the in-guest credential directory; `endpoint` overrides the
host. SDK exception text is never propagated: it can contain request URLs, and the Encrypt
request carries the data key in its query string.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sealed_secrets.errors import (
    MalformedSecret,
    ProviderError,
    WrongKey,
)
from sealed_secrets.payload import EnvelopeSecret, VaultSecret

log = logging.getLogger(__name__)

NAME = "aliyun"
CREDENTIAL_DIR_ENV = "ALIYUN_IN_GUEST_KEY_PATH"
DEFAULT_CREDENTIAL_DIR = "/run/confidential-containers/cdh/kbs/kms-credential/aliyun"
DEK_LEN = 32
_SAFE_CODE = re.compile(r"[A-Za-z0-9._-]{1,80}")
_WRONG_KEY_CODES = ("InvalidCiphertext", "Forbidden.KeyNotFound", "Rejected.Unexpected")
_NOT_FOUND_CODES = ("Forbidden.ResourceNotFound", "Forbidden.SecretNotFound")


@dataclass(frozen=True, repr=False)
class Credentials:
    """AccessKey pair (+ optional STS token); repr hides everything but the key id prefix."""

    access_key_id: str
    access_key_secret: str
    security_token: str | None = None

    def __repr__(self) -> str:
        return "Credentials(<redacted>)"

    @classmethod
    def parse(cls, text: str, *, what: str) -> Credentials:
        """`AK:SK:STS` (CoCo's sts_token file) or `AK:SK`."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise ProviderError(f"{what} must contain AK:SK or AK:SK:STS")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_file(cls, path: str) -> Credentials:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(64 * 1024)
        except (OSError, UnicodeDecodeError):
            raise ProviderError(f"aliyun credential file {path} is unreadable") from None
        return cls.parse(text, what=f"aliyun credential file {path}")

    @classmethod
    def from_env(cls) -> Credentials | None:
        ak = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
        sk = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        if not ak or not sk:
            return None
        return cls(ak, sk, os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN") or None)


def _setting(settings: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
    value = settings.get(name)
    if value is None or value == "":
        if required:
            raise MalformedSecret(f"aliyun provider_settings lacks {name!r}")
        return None
    if not isinstance(value, str):
        raise MalformedSecret(f"aliyun provider_settings.{name} must be a string")
    return value


def endpoint_for(settings: Mapping[str, Any]) -> str:
    explicit = _setting(settings, "endpoint")
    if explicit:
        return explicit
    instance = _setting(settings, "kms_instance_id")
    if instance:
        return f"{instance}.cryptoservice.kms.aliyuncs.com"
    region = _setting(settings, "region_id")
    if region:
        return f"kms.{region}.aliyuncs.com"
    raise MalformedSecret("aliyun provider_settings needs endpoint, kms_instance_id or region_id")


def _guest_credentials(settings: Mapping[str, Any]) -> Credentials:
    client_type = _setting(settings, "client_type") or "sts_token"
    if client_type == "sts_token":
        path = _setting(settings, "token_path", required=True)
        assert path is not None
        return Credentials.from_file(path)
    if client_type in ("client_key", "ecs_ram_role"):
        raise ProviderError(
            f"aliyun client_type {client_type!r} is not supported by this build; use sts_token"
        )
    raise MalformedSecret("aliyun provider_settings.client_type is unknown")


def make_client(
    settings: Mapping[str, Any],
    *,
    credentials: Credentials | None = None,
    credential_dir: str | None = None,
    ca: str | None = None,
    timeout_ms: int = 10000,
) -> Any:
    """Build a kms20160120 client from public settings plus out-of-band credentials."""
    try:
        from alibabacloud_kms20160120.client import Client
        from alibabacloud_tea_openapi.utils_models import Config
    except ImportError:  # pragma: no cover - optional dependency
        raise ProviderError("aliyun provider needs alibabacloud-kms20160120 installed") from None
    creds = credentials or _guest_credentials(settings)
    if ca is None:
        instance = _setting(settings, "kms_instance_id")
        cdir = credential_dir or os.environ.get(CREDENTIAL_DIR_ENV) or DEFAULT_CREDENTIAL_DIR
        candidate = os.path.join(cdir, f"PrivateKmsCA_{instance}.pem") if instance else None
        if candidate and os.path.isfile(candidate):
            ca = candidate
    config = Config(
        access_key_id=creds.access_key_id,
        access_key_secret=creds.access_key_secret,
        security_token=creds.security_token,
        region_id=_setting(settings, "region_id"),
        endpoint=endpoint_for(settings),
        protocol="https",
        connect_timeout=timeout_ms,
        read_timeout=timeout_ms,
    )
    if ca:
        config.ca = ca
    return Client(config)


def _runtime() -> Any:
    from darabonba.runtime import RuntimeOptions

    return RuntimeOptions(autoretry=False, max_attempts=1)


def _fail(exc: Exception, action: str) -> Exception:
    """Translate an SDK exception into ours without carrying any of its text."""
    code = getattr(exc, "code", None)
    status = getattr(exc, "status_code", None)
    safe = code if isinstance(code, str) and _SAFE_CODE.fullmatch(code) else None
    detail = f"code={safe}" if safe else "no response"
    if isinstance(status, int):
        detail += f" status={status}"
    log.warning("aliyun KMS %s failed: %s", action, detail)
    if safe and any(safe.startswith(c) for c in _WRONG_KEY_CODES):
        return WrongKey(f"aliyun KMS {action} rejected the key or ciphertext ({detail})")
    if safe and safe in _NOT_FOUND_CODES:
        return ProviderError(f"aliyun KMS {action}: not found ({detail})")
    return ProviderError(f"aliyun KMS {action} failed ({detail})")


def wrap_data_key(dek: bytes, key_id: str, client: Any) -> str:
    """KMS Encrypt of the data key → CiphertextBlob (the envelope's encrypted_key)."""
    from alibabacloud_kms20160120 import models

    if len(dek) != DEK_LEN:
        raise ProviderError("data key must be 32 bytes")
    req = models.EncryptRequest(key_id=key_id, plaintext=base64.b64encode(dek).decode())
    try:
        resp = client.encrypt_with_options(req, _runtime())
    except Exception as exc:
        raise _fail(exc, "Encrypt") from None
    blob = getattr(resp.body, "ciphertext_blob", None)
    if not isinstance(blob, str) or not blob:
        raise ProviderError("aliyun KMS Encrypt returned no CiphertextBlob")
    return blob


def unwrap_data_key(
    secret: EnvelopeSecret,
    *,
    client: Any = None,
    credentials: Credentials | None = None,
    credential_dir: str | None = None,
    ca: str | None = None,
) -> bytes:
    from alibabacloud_kms20160120 import models

    secret.encrypted_key_bytes()  # strict base64 check before any network round trip
    client = client or make_client(
        secret.provider_settings, credentials=credentials, credential_dir=credential_dir, ca=ca
    )
    req = models.DecryptRequest(ciphertext_blob=secret.encrypted_key)
    try:
        resp = client.decrypt_with_options(req, _runtime())
    except Exception as exc:
        raise _fail(exc, "Decrypt") from None
    body = resp.body
    if getattr(body, "key_id", None) not in (None, "", secret.key_id):
        # KMS decrypts with whatever key the blob names; insist it is the one that was signed.
        raise WrongKey("aliyun KMS decrypted with a different key than the envelope's key_id")
    try:
        dek = base64.b64decode(body.plaintext or "", validate=True)
    except (binascii.Error, ValueError):
        raise ProviderError("aliyun KMS Decrypt returned a malformed Plaintext") from None
    if len(dek) != DEK_LEN:
        raise WrongKey("aliyun KMS Decrypt returned a data key of the wrong length")
    return dek


def get_vault_value(
    secret: VaultSecret,
    *,
    client: Any = None,
    credentials: Credentials | None = None,
    credential_dir: str | None = None,
    ca: str | None = None,
) -> bytes:
    from alibabacloud_kms20160120 import models

    ann = secret.annotations
    stage = ann.get("version_stage") or None
    version = ann.get("version_id") or None
    for name, value in (("version_stage", stage), ("version_id", version)):
        if value is not None and not isinstance(value, str):
            raise MalformedSecret(f"aliyun vault annotations.{name} must be a string")
    client = client or make_client(
        secret.provider_settings, credentials=credentials, credential_dir=credential_dir, ca=ca
    )
    req = models.GetSecretValueRequest(
        secret_name=secret.name, version_stage=stage, version_id=version
    )
    try:
        resp = client.get_secret_value_with_options(req, _runtime())
    except Exception as exc:
        raise _fail(exc, "GetSecretValue") from None
    data = resp.body.secret_data
    if not isinstance(data, str):
        raise ProviderError("aliyun KMS GetSecretValue returned no SecretData")
    if (resp.body.secret_data_type or "text") == "binary":
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ProviderError("aliyun KMS returned malformed binary SecretData") from None
    return data.encode("utf-8")
