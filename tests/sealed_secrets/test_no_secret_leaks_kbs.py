"""No resource bytes, attestation token, session id or TEE private key in any log line,
exception text (including chained exceptions) or repr, across success and failure paths."""

from __future__ import annotations

import base64
import json
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from sealed_secrets.cdh_client import CdhClient
from sealed_secrets.errors import SealedSecretError
from sealed_secrets.evidence import AaEvidenceProvider
from sealed_secrets.kbs_client import KbsClient
from sealed_secrets.resolver import build_resolver
from tests.peers.cdh_server import CdhServer
from tests.peers.harness import kbs_and_aa, kbs_spec, short_tmpdir
from tests.peers.kbs_server import make_tls_material

SECRET = b"TOPSECRET-kbs-value-9f8e7d6c5b4a"
SECRET2 = b"\x00\xffbinary-secret-0123456789abcdef"
RES = {"default/key/1": SECRET, "default/key/2": SECRET2, "denied/key/1": SECRET}


def forms(value: bytes | str) -> set[str]:
    """Text forms a leaked value could take in a log line."""
    raw = value.encode() if isinstance(value, str) else value
    out = {
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
        repr(raw)[2:-1],
    }
    if isinstance(value, str):
        out.add(value)
    else:
        out.add(raw.decode("latin-1"))
    return {f for f in out if len(f) >= 12}


def exc_texts(exc: BaseException | None) -> list[str]:
    texts: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        texts += [str(exc), repr(exc)]
        exc = exc.__cause__ or exc.__context__
    return texts


class Transcript:
    """Everything a caller could ever print: log lines, exception texts, reprs."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog
        self.texts: list[str] = []

    def run(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SealedSecretError as exc:
            self.texts += exc_texts(exc)
            return exc

    def all(self) -> str:
        lines = []
        for rec in self.caplog.records:
            lines.append(rec.getMessage())
            if rec.exc_info:
                lines.append(logging.Formatter().formatException(rec.exc_info))
        return "\n".join(lines + self.texts)


WINDOW = 16


def assert_clean(text: str, secrets: list[bytes | str]) -> None:
    """Fail on any leaked fragment: every 16-char window (step 4) of every form is searched,
    so a leaked substring of 19+ characters is caught, not just the whole value."""
    for secret in secrets:
        for form in forms(secret):
            for i in range(0, max(1, len(form) - WINDOW + 1), 4):
                window = form[i : i + WINDOW]
                assert window not in text, f"secret fragment leaked: {window[:4]}..."


def client_secrets(client: KbsClient) -> list[bytes | str]:
    tok = client._token
    assert tok is not None
    private = json.loads(tok.key._key.export_private())
    _, body, signature = tok.value.split(".")  # the JWT header is public boilerplate
    out: list[bytes | str] = [body, signature]
    out += [private[k] for k in ("d", "p", "q", "dp", "dq", "qi") if k in private]
    if client._session_id:
        out.append(client._session_id)
    return out


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_kbs_paths_leak_nothing(key_type: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    t = Transcript(caplog)
    leaked: list[bytes | str] = [SECRET, SECRET2]
    with kbs_and_aa(RES, tls=True) as (kbs, aa):
        client = KbsClient(
            kbs.url,
            evidence_provider=AaEvidenceProvider(aa.target),
            ca=kbs.ca_path,
            tee_key_type=key_type,
            retries=1,
            backoff=0.01,
            timeout=0.5,
        )
        assert t.run(lambda: client.get_resource("kbs:///default/key/1")) == SECRET
        assert t.run(lambda: client.get_resource("kbs:///default/key/2")) == SECRET2
        leaked += client_secrets(client)
        t.run(lambda: client.get_resource("kbs:///denied/key/1"))
        t.run(lambda: client.get_resource("kbs:///default/key/9"))
        for kind in ("tag", "ciphertext", "protected", "alg", "missing"):
            kbs.inject("resource", "bad_jwe", kind)
            t.run(lambda: client.get_resource("kbs:///default/key/1"))
        kbs.inject("resource", "not_json")
        t.run(lambda: client.get_resource("kbs:///default/key/1"))
        kbs.inject("resource", "status", 503, count=2)
        t.run(lambda: client.get_resource("kbs:///default/key/1"))
        kbs.inject("resource", "delay", 0.8)
        t.run(lambda: client.get_resource("kbs:///default/key/1"))
        kbs.inject("resource", "status", 401, count=2)
        t.run(lambda: client.get_resource("kbs:///default/key/1"))
        kbs.expire_all()
        assert t.run(lambda: client.get_resource("kbs:///default/key/1")) == SECRET
        leaked += client_secrets(client)
        aa.tamper = True
        kbs.expire_all()
        t.run(lambda: client.get_resource("kbs:///default/key/1"))
        with short_tmpdir() as other:
            wrong_ca, _, _ = make_tls_material(other)
            wrong = KbsClient(
                kbs.url, evidence_provider=AaEvidenceProvider(aa.target), ca=wrong_ca, retries=0
            )
            t.run(lambda: wrong.get_resource("kbs:///default/key/1"))
        t.run(lambda: KbsClient(kbs.url, evidence_provider=AaEvidenceProvider(aa.target)))
        t.texts += [repr(client), repr(client._token), repr(aa), repr(wrong)]
        r = build_resolver(f"kbs:{kbs.url}?aa={aa.target}&ca={kbs.ca_path}")
        aa.tamper = False
        assert t.run(lambda: r.get_resource("kbs:///default/key/2")) == SECRET2
        t.texts += [repr(r), repr(r.cache)]  # type: ignore[attr-defined]
        leaked += client_secrets(r.source)  # type: ignore[attr-defined]
    text = t.all()
    assert "kbs resource ok" in text and "KBS policy denied" in text  # the transcript is real
    assert_clean(text, leaked)


@pytest.mark.parametrize("transport", ["grpc", "ttrpc"])
def test_offline_fs_and_cdh_paths_leak_nothing(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    caplog.set_level(logging.DEBUG)
    t = Transcript(caplog)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in RES.items()}))
    bad = tmp_path / "bad.json"
    bad.write_text('{"a/b/c": "' + base64.b64encode(SECRET).decode()[:-1] + '"}')
    r = build_resolver(f"offline-fs:{good}")
    assert t.run(lambda: r.get_resource("kbs:///default/key/1")) == SECRET
    t.run(lambda: r.get_resource("kbs:///default/key/404"))
    t.run(lambda: build_resolver(f"offline-fs:{good},{bad}"))
    t.texts.append(repr(r))
    with short_tmpdir() as d, CdhServer(f"{d}/cdh.sock", RES, transport=transport) as cdh:
        c = CdhClient(cdh.target, timeout=1)
        assert t.run(lambda: c.get_resource("kbs:///default/key/2")) == SECRET2
        t.run(lambda: c.get_resource("kbs:///default/key/404"))
        cdh.inject("GetResource", grpc.StatusCode.UNAVAILABLE)
        t.run(lambda: c.get_resource("kbs:///default/key/2"))
        t.run(lambda: c.unseal("sealed.x.y.z"))
        if transport == "ttrpc":  # the reply itself broken: closed mid-way, oversized, garbage
            for fault in ("close-mid-reply", "oversized", "garbage", "no-reply"):
                cdh.inject("GetResource", fault)
                t.run(lambda: c.get_resource("kbs:///default/key/2"))
        t.texts.append(repr(c))
    text = t.all()
    assert "offline-fs" in text and "cdh" in text
    assert_clean(text, [SECRET, SECRET2])


@pytest.mark.parametrize("transport", ["grpc", "ttrpc"])
def test_aa_token_mode_leaks_nothing(caplog: pytest.LogCaptureFixture, transport: str) -> None:
    caplog.set_level(logging.DEBUG)
    t = Transcript(caplog)
    with kbs_and_aa(RES, aa_transport=transport) as (kbs, aa):
        aa.kbs_url = kbs.url
        r = build_resolver(kbs_spec(kbs, aa, "&attest=token&retries=0"))
        assert t.run(lambda: r.get_resource("kbs:///default/key/1")) == SECRET
        client = r.source  # type: ignore[attr-defined]
        leaked: list[bytes | str] = [SECRET, SECRET2, *client_secrets(client)]
        t.run(lambda: r.get_resource("kbs:///denied/key/1"))
        kbs.inject("resource", "bad_jwe", "tag")
        t.run(lambda: r.get_resource("kbs:///default/key/2"))
        aa.bad_token_reply = True
        kbs.expire_all()
        t.run(lambda: r.get_resource("kbs:///default/key/2"))
        t.texts += [repr(r), repr(client._token)]
    text = t.all()
    assert "kbs token from provider" in text and "tee_keypair" in text
    assert_clean(text, leaked)
