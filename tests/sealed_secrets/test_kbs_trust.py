"""Issue 7 finding 1: who may answer as the KBS.

The attack: a host on the network path answers as the KBS, skips attestation and returns a
key of its choosing encrypted to the guest's (public) tee-pubkey. The guest would initialise
a volume with it and the attacker reads the cipher directory offline. Before the fix the
client accepted plain http:// with a warning and https:// against the system trust store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from pathlib import Path

import pytest

from sealed_secrets.cdh_config import parse_cdh_config
from sealed_secrets.errors import ResolverError, TlsError
from sealed_secrets.evidence import AaEvidenceProvider
from sealed_secrets.kbs_client import KbsClient
from sealed_secrets.resolver import build_resolver
from tests.peers.harness import RESOURCES, kbs_and_aa, short_tmpdir
from tests.peers.kbs_server import make_tls_material

R1 = "kbs:///default/key/1"
ATTACKER_KEY = b"attacker-chosen-volume-key-0123456789"


def _cert_sha256(cert_pem_path: str) -> str:
    der = ssl.PEM_cert_to_DER_cert(Path(cert_pem_path).read_text())
    return hashlib.sha256(der).hexdigest()


# --- the attack, over plain http ------------------------------------------------------------


def test_impostor_kbs_on_plain_http_is_refused_before_any_request() -> None:
    with kbs_and_aa(impostor=ATTACKER_KEY) as (kbs, aa):
        with pytest.raises(ResolverError) as err:
            resolver = build_resolver(f"kbs:{kbs.url}?aa={aa.target}", cache_ttl=0)
            # Only reached on the unfixed code: show what the guest would have accepted.
            assert resolver.get_resource(R1) != ATTACKER_KEY
        msg = str(err.value)
        assert "refusing plain http://" in msg and "insecure-http=true" in msg
        assert kbs.state.requests == []  # not even /auth: nothing left the guest
        assert aa.calls["GetEvidence"] == 0


def test_impostor_wins_only_with_the_insecure_flag(caplog: pytest.LogCaptureFixture) -> None:
    """What insecure-http=true means, spelled out: the impostor's key is accepted."""
    caplog.set_level(logging.WARNING)
    with kbs_and_aa(impostor=ATTACKER_KEY) as (kbs, aa):
        aa.tamper = True  # evidence that binds nothing: an impostor does not care
        r = build_resolver(f"kbs:{kbs.url}?aa={aa.target}&insecure-http=true", cache_ttl=0)
        assert r.get_resource(R1) == ATTACKER_KEY
    assert "kbs INSECURE plain http" in caplog.text


def test_client_refuses_http_without_the_flag_and_flags_without_http() -> None:
    ev = AaEvidenceProvider("unix:///nonexistent.sock")
    with pytest.raises(ResolverError, match="refusing plain http://"):
        KbsClient("http://kbs:8080", evidence_provider=ev)
    with pytest.raises(ResolverError, match="only to http://"):
        KbsClient("https://kbs:8080", evidence_provider=ev, insecure_http=True)
    with pytest.raises(ResolverError, match="need an https://"):
        KbsClient("http://kbs:8080", evidence_provider=ev, insecure_http=True, cert_sha256="a" * 64)
    with pytest.raises(ResolverError, match="credentials"):
        KbsClient("https://user:pw@kbs:8080", evidence_provider=ev, cert_sha256="a" * 64)


@pytest.mark.parametrize(
    "query",
    ["insecure-http=yes", "insecure-http=1", "ca=/a&ca=/b", "aa=x&aa=y", "proxy=http://x"],
)
def test_spec_flags_are_strict(query: str) -> None:
    with pytest.raises(ResolverError):
        build_resolver(f"kbs:http://127.0.0.1:1?aa=unix:///x.sock&{query}")


# --- https: only the pinned trust anchor counts ------------------------------------------------


def test_https_impostor_with_a_certificate_from_another_ca_is_refused() -> None:
    with short_tmpdir() as real_dir, kbs_and_aa(impostor=ATTACKER_KEY, tls=True) as (kbs, aa):
        real_ca, _, _ = make_tls_material(real_dir)  # the tenant's KBS CA, pinned in the guest
        r = build_resolver(f"kbs:{kbs.url}?aa={aa.target}&ca={real_ca}&retries=0", cache_ttl=0)
        with pytest.raises(TlsError, match="TLS verification failed"):
            r.get_resource(R1)
        assert kbs.state.requests == []  # the handshake failed: no HTTP request was read
        assert aa.calls["GetEvidence"] == 0  # and no evidence was produced for it


def test_https_without_a_pinned_anchor_is_refused_and_says_why() -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        with pytest.raises(ResolverError, match="system trust store is never used"):
            build_resolver(f"kbs:{kbs.url}?aa={aa.target}")
        assert kbs.state.requests == []


def test_certificate_fingerprint_pin() -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        good = _cert_sha256(os.path.join(kbs.tls_dir or "", "server.pem"))
        spec = f"kbs:{kbs.url}?aa={aa.target}&retries=0"
        # the pin alone: chain and host name are not consulted, the exact certificate is
        r = build_resolver(f"{spec}&cert-sha256={good}", cache_ttl=0)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        colons = ":".join(good[i : i + 2] for i in range(0, 64, 2)).upper()
        r = build_resolver(f"{spec}&cert-sha256={colons}&ca={kbs.ca_path}", cache_ttl=0)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        before = len(kbs.state.requests)
        bad = build_resolver(f"{spec}&cert-sha256={'0' * 64}&ca={kbs.ca_path}", cache_ttl=0)
        with pytest.raises(TlsError):
            bad.get_resource(R1)
        assert len(kbs.state.requests) == before
        with pytest.raises(ResolverError, match="64 hex digits"):
            build_resolver(f"{spec}&cert-sha256=abcd")


def test_kbs_certificate_itself_as_the_pinned_anchor() -> None:
    """CDH's kbs_cert is often the KBS certificate itself, not a CA: that works as ca= too
    (urllib3 sets OpenSSL's partial-chain flag, so a pinned leaf is a trust anchor)."""
    with kbs_and_aa(tls=True) as (kbs, aa):
        leaf = os.path.join(kbs.tls_dir or "", "server.pem")
        r = build_resolver(f"kbs:{kbs.url}?aa={aa.target}&ca={leaf}&retries=0", cache_ttl=0)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "no usable PEM"),
        (b"\xff\xfe", "not PEM text"),
    ],
)
def test_bad_ca_files_fail_clearly(tmp_path: Path, content: bytes, needle: str) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    with pytest.raises(ResolverError, match=needle):
        build_resolver(f"kbs:https://127.0.0.1:1?aa=unix:///x.sock&ca={ca}")


def test_ca_file_is_not_followed_through_a_symlink_nor_read_from_a_fifo(tmp_path: Path) -> None:
    with short_tmpdir() as d:
        real_ca, _, _ = make_tls_material(d)
        link = tmp_path / "ca.pem"
        link.symlink_to(real_ca)
        with pytest.raises(ResolverError, match="symlink"):
            build_resolver(f"kbs:https://127.0.0.1:1?aa=unix:///x.sock&ca={link}")
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    with pytest.raises(ResolverError, match="not a regular file"):
        build_resolver(f"kbs:https://127.0.0.1:1?aa=unix:///x.sock&ca={fifo}")
    big = tmp_path / "big.pem"
    with open(big, "wb") as f:
        f.truncate(3 * 1024 * 1024 * 1024)  # sparse: cheap to make, must not be read
    with pytest.raises(ResolverError, match="larger than"):
        build_resolver(f"kbs:https://127.0.0.1:1?aa=unix:///x.sock&ca={big}")


# --- CoCo's measured configuration as the source: kbs:cdh-config -------------------------------


def _cdh_toml(url: str, cert_pem: str | None, name: str = "cc_kbc") -> str:
    cert = f'kbs_cert = """\n{cert_pem}"""\n' if cert_pem is not None else ""
    return (
        'socket = "unix:///run/confidential-containers/cdh.sock"\n'
        "[aa]\n"
        'aa_socket = "unix:///run/confidential-containers/attestation-agent/'
        'attestation-agent.sock"\n'
        f'[kbc]\nname = "{name}"\nurl = "{url}"\n{cert}'
        "[image]\nmax_concurrent_layer_downloads_per_image = 3\n"
    )


def test_cdh_config_supplies_url_and_certificate(tmp_path: Path) -> None:
    with kbs_and_aa(tls=True) as (kbs, aa):
        conf = tmp_path / "cdh.toml"
        conf.write_text(_cdh_toml(kbs.url, Path(kbs.ca_path or "").read_text()))
        r = build_resolver(f"kbs:cdh-config:{conf}?aa={aa.target}", cache_ttl=0)
        assert r.get_resource(R1) == RESOURCES["default/key/1"]
        # one source of trust: a second anchor on the command line is refused
        with pytest.raises(ResolverError, match="one source"):
            build_resolver(f"kbs:cdh-config:{conf}?aa={aa.target}&ca={kbs.ca_path}")
        # no kbs_cert in the config: the command line may pin one, else refused
        bare = tmp_path / "bare.toml"
        bare.write_text(_cdh_toml(kbs.url, None))
        with pytest.raises(ResolverError, match="pinned trust anchor"):
            build_resolver(f"kbs:cdh-config:{bare}?aa={aa.target}")
        r = build_resolver(f"kbs:cdh-config:{bare}?aa={aa.target}&ca={kbs.ca_path}")
        assert r.get_resource(R1) == RESOURCES["default/key/1"]


def test_cdh_config_with_http_url_needs_the_insecure_flag(tmp_path: Path) -> None:
    conf = tmp_path / "cdh.toml"
    conf.write_text(_cdh_toml("http://kbs.example:8080", None))
    with pytest.raises(ResolverError, match="refusing plain http://"):
        build_resolver(f"kbs:cdh-config:{conf}?aa=unix:///x.sock")
    r = build_resolver(f"kbs:cdh-config:{conf}?aa=unix:///x.sock&insecure-http=true")
    assert r.source.base_url == "http://kbs.example:8080"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (_cdh_toml("https://kbs", None, name="offline_fs_kbc"), "only cc_kbc"),
        ('[kbc]\nname = "cc_kbc"\n', "url is missing"),
        ('[kbc]\nname = "cc_kbc"\nurl = "https://k"\nkbs_cert = 5\n', "kbs_cert is not"),
        ("socket = 'x'\n", r"no \[kbc\] table"),
        ("kbc = [", "not valid TOML"),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML"),
    ],
)
def test_cdh_config_errors_are_clear(text: str, needle: str) -> None:
    with pytest.raises(ResolverError, match=needle):
        parse_cdh_config(text.encode(), source="/etc/cdh.toml")


def test_cdh_config_file_is_opened_safely(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(_cdh_toml("https://kbs:8080", None))
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    with pytest.raises(ResolverError, match="symlink"):
        build_resolver(f"kbs:cdh-config:{link}?aa=unix:///x.sock")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ResolverError, match="not a regular file"):  # and does not hang
        build_resolver(f"kbs:cdh-config:{fifo}?aa=unix:///x.sock")
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(ResolverError, match="larger than"):
        build_resolver(f"kbs:cdh-config:{big}?aa=unix:///x.sock")
    with pytest.raises(ResolverError, match="absolute path"):
        build_resolver("kbs:cdh-config:relative.toml?aa=unix:///x.sock")
    with pytest.raises(ResolverError, match="unreadable"):
        build_resolver(f"kbs:cdh-config:{tmp_path}/missing.toml?aa=unix:///x.sock")


def test_cdh_config_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sealed_secrets.cdh_config as cc

    conf = tmp_path / "default.toml"
    conf.write_text(_cdh_toml("https://kbs.example:8443", None))
    monkeypatch.setattr(cc, "DEFAULT_CDH_CONFIG", str(conf))
    with pytest.raises(ResolverError, match=r"kbs\.example:8443 needs a pinned trust anchor"):
        build_resolver("kbs:cdh-config?aa=unix:///x.sock")
    assert cc.load_cdh_config(str(conf)).url == "https://kbs.example:8443"
    assert "kbs_cert=False" in repr(cc.load_cdh_config(str(conf)))
