"""`sealed-secret` CLI: the installed console script, pipes, CoCo-like flags, one-line errors."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sealed_secrets.unseal import UNSEAL_FAILED
from tests.console_scripts import console_script
from tests.sealed_secrets.vectors_coco import PUBLIC_JWK, SIGNING_KID, VECTOR_A, VECTOR_C

ROOT = Path(__file__).resolve().parents[2]
SECRET = "cli-plaintext-s3cr3t-value"


def run(
    *args: str, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = [console_script("sealed-secret")]
    return subprocess.run(
        [*cmd, *args], input=stdin, capture_output=True, cwd=cwd, timeout=60, check=False
    )


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    r = run("keygen", "--kid", "k1", "--output-dir", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    r = run("keygen", "--sealing", "ec", "--output-dir", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    (tmp_path / "vk").mkdir()
    (tmp_path / "vk" / "k1").write_bytes((tmp_path / "keys" / "k1-public.json").read_bytes())
    priv = (tmp_path / "keys" / "sealing-private.json").read_bytes()
    (tmp_path / "res.json").write_text(
        json.dumps(
            {
                "default/sealing-key/asym": base64.b64encode(priv).decode(),
                "default/signing-key/sealed-secret": base64.b64encode(PUBLIC_JWK).decode(),
                "default/sealed-secret/test": base64.b64encode(b"vector-a-value").decode(),
                "default/app/db": base64.b64encode(SECRET.encode()).decode(),
            }
        )
    )
    return tmp_path


def seal_args(work: Path) -> list[str]:
    return ["seal", "--signing-kid", "k1", "--signing-jwk-path", str(work / "keys/k1-private.json")]


def test_keygen_layout_matches_coco(work: Path) -> None:
    priv = json.loads((work / "keys/k1-private.json").read_text())
    pub = json.loads((work / "keys/k1-public.json").read_text())
    assert priv["kty"] == "EC" and priv["crv"] == "P-256" and priv["alg"] == "ES256"
    assert priv["use"] == "sig" and priv["kid"] == "k1" and "d" in priv and "d" not in pub
    assert os.stat(work / "keys/k1-private.json").st_mode & 0o777 == 0o600
    r = run("keygen", "--kid", "k1", "--output-dir", str(work / "keys"))
    assert r.returncode == 1 and b"refusing to overwrite" in r.stderr
    r = run("keygen", cwd=work)  # CoCo default kid
    assert (work / "sealed-signing-private.json").exists()


def test_envelope_pipe_roundtrip(work: Path) -> None:
    pub = str(work / "keys/sealing-public.json")
    r = run(
        *seal_args(work),
        "envelope",
        "-k",
        "kbs:///default/sealing-key/asym",
        "asym",
        "--public-key",
        pub,
        stdin=SECRET.encode(),
    )
    assert r.returncode == 0, r.stderr
    sealed = r.stdout.decode().strip()
    assert r.stdout.decode() == sealed + "\n" and sealed.startswith("sealed.")
    assert SECRET.encode() not in r.stdout + r.stderr
    r = run(
        "unseal",
        "-k",
        str(work / "vk"),
        "--resolver",
        f"offline-fs:{work / 'res.json'}",
        stdin=sealed.encode(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == SECRET.encode()  # exact bytes, nothing else on stdout
    r = run("verify", "-k", str(work / "vk"), sealed)
    info = json.loads(r.stdout)
    assert info["verified"] and info["provider"] == "coco-csi-asym" and info["kid"] == "k1"


def test_unseal_file_writes_dot_unsealed_like_coco(work: Path) -> None:
    (work / "plain").write_text(SECRET)
    r = run(
        *seal_args(work),
        "envelope",
        "-k",
        "kbs:///default/sealing-key/asym",
        "-f",
        str(work / "plain"),
        "coco-csi-asym",
        "--public-key",
        str(work / "keys/sealing-public.json"),
    )
    (work / "s").write_bytes(r.stdout)
    r = run(
        "unseal",
        "-f",
        str(work / "s"),
        "-k",
        str(work / "vk"),
        "--resolver",
        f"offline-fs:{work / 'res.json'}",
    )
    assert r.returncode == 0, r.stderr
    assert (work / "s.unsealed").read_text() == SECRET
    assert os.stat(work / "s.unsealed").st_mode & 0o777 == 0o600
    assert r.stdout == b""


def test_vault_seal_and_vector_a(work: Path) -> None:
    r = run(*seal_args(work), "vault", "-r", "kbs:///default/app/db", "-p", "kbs")
    assert r.returncode == 0 and b"provisioned to provider separately" in r.stderr
    r = run(
        "unseal",
        "-k",
        str(work / "vk"),
        "--resolver",
        f"offline-fs:{work / 'res.json'}",
        r.stdout.decode().strip(),
    )
    assert r.stdout == SECRET.encode()
    env = {**os.environ, "SEALED_SECRET_RESOLVER": f"offline-fs:{work / 'res.json'}"}
    r2 = subprocess.run(
        [console_script("sealed-secret"), "unseal", VECTOR_A],
        capture_output=True,
        env=env,
        check=False,
    )
    assert r2.returncode == 1  # a KBS kid is fetched only if --allowed-kid lists it
    assert r2.stderr == b"sealed-secret: error: UnsealFailed: " + UNSEAL_FAILED.encode() + b"\n"
    allow = ["--allowed-kid", "kbs:///default/signing-key/"]
    r2 = subprocess.run(
        [console_script("sealed-secret"), "unseal", *allow, VECTOR_A],
        capture_output=True,
        env=env,
        check=False,
    )
    assert r2.returncode == 0 and r2.stdout == b"vector-a-value"
    r = run("verify", "--resolver", f"offline-fs:{work / 'res.json'}", *allow, VECTOR_A)
    assert json.loads(r.stdout)["kid"] == SIGNING_KID
    (work / "pub.json").write_bytes(PUBLIC_JWK)
    r = run("verify", "--public-key", str(work / "pub.json"), VECTOR_A)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "kbs:///default/sealed-secret/test"


def test_legacy_and_skip_flags(work: Path) -> None:
    res = f"offline-fs:{work / 'res.json'}"
    r = run("unseal", "--resolver", res, VECTOR_C)
    assert r.returncode == 1 and b"UnsignedSecret" in r.stderr
    r = run("unseal", "--resolver", res, "--allow-unsigned", VECTOR_C)
    assert r.returncode == 0 and r.stdout == b"vector-a-value"
    forged = VECTOR_A.rsplit(".", 1)[0] + "." + "A" * 86
    assert run("unseal", "--resolver", res, forged).returncode == 1
    assert run("unseal", "--resolver", res, "-s", forged).stdout == b"vector-a-value"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["unseal", "not-sealed"], b"MalformedSecret"),
        (["unseal", "sealed.x.y.z"], b"BadBase64"),
        (["verify", "-k", "/nonexistent", VECTOR_A], b"UnknownKid"),
        (["unseal", "-f", "/nonexistent/file"], b"cannot read"),
        (["verify", "--public-key", "/etc/hostname", VECTOR_A], b"KeyFormatError"),
        (
            [
                "seal",
                "--signing-kid",
                "k",
                "--signing-jwk-path",
                "/nonexistent",
                "vault",
                "-r",
                "kbs:///a/b/c",
                "-p",
                "kbs",
            ],
            b"KeyFormatError",
        ),
    ],
)
def test_errors_are_one_line_nonzero(args: list[str], needle: bytes) -> None:
    r = run(*args)
    assert r.returncode == 1
    assert r.stdout == b""
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"sealed-secret: error: ")
    assert b"Traceback" not in r.stderr


def test_usage_errors_exit_2(work: Path) -> None:
    assert run().returncode == 2
    r = run(*seal_args(work), "vault", "-r", "kbs:///a/b/c", "-p", "kbs", "-a", "[1]")
    assert r.returncode == 2 and b"JSON object" in r.stderr
    r = run(*seal_args(work), "vault", "-r", "x", "-p", "nosuch")
    assert r.returncode == 1 and b"UnknownProvider" in r.stderr


def test_wrong_sealing_key_error_has_no_secret(work: Path) -> None:
    (work / "plain").write_text(SECRET)
    r = run(
        *seal_args(work),
        "envelope",
        "-k",
        "kbs:///default/sealing-key/asym",
        "-f",
        str(work / "plain"),
        "asym",
        "--public-key",
        str(work / "keys/sealing-public.json"),
    )
    other = work / "other"
    assert run("keygen", "--sealing", "ec", "--output-dir", str(other)).returncode == 0
    res = json.loads((work / "res.json").read_text())
    res["default/sealing-key/asym"] = base64.b64encode(
        (other / "sealing-private.json").read_bytes()
    ).decode()
    (work / "res2.json").write_text(json.dumps(res))
    r = run(
        "unseal",
        "-k",
        str(work / "vk"),
        "--resolver",
        f"offline-fs:{work / 'res2.json'}",
        r.stdout.decode().strip(),
    )
    assert r.returncode == 1 and b"WrongKey" in r.stderr
    d = json.loads((other / "sealing-private.json").read_text())["d"]
    assert SECRET.encode() not in r.stderr and d.encode() not in r.stderr


def test_seal_manifest_kubeseal_style_pipe(work: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    made = subprocess.run(
        [kubectl, "create", "secret", "generic", "web", f"--from-literal=token={SECRET}",
         "--from-literal=user=admin", "-n", "ns1", "--dry-run=client", "-o", "yaml"],
        capture_output=True, env={**os.environ, "KUBECONFIG": "/nonexistent"}, check=True,
    )  # fmt: skip
    r = run(*seal_args(work), "manifest", "-k", "kbs:///default/sealing-key/asym", "asym",
            "--public-key", str(work / "keys/sealing-public.json"), stdin=made.stdout)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert SECRET.encode() not in r.stdout and base64.b64encode(SECRET.encode()) not in r.stdout
    obj = yaml.safe_load(r.stdout)
    import kubernetes_validate

    kubernetes_validate.validate(obj, "1.32", strict=True)
    assert obj["metadata"] == {"name": "web", "namespace": "ns1", "creationTimestamp": None}
    sealed = {k: base64.b64decode(v).decode() for k, v in obj["data"].items()}
    res = f"offline-fs:{work / 'res.json'}"
    for key, want in (("token", SECRET.encode()), ("user", b"admin")):
        out = run("unseal", "-k", str(work / "vk"), "--resolver", res, sealed[key])
        assert out.stdout == want
    # re-running keeps already sealed values untouched (idempotent in a GitOps loop)
    again = run(*seal_args(work), "manifest", "-k", "kbs:///default/sealing-key/asym", "asym",
                "--public-key", str(work / "keys/sealing-public.json"), stdin=r.stdout)  # fmt: skip
    assert yaml.safe_load(again.stdout)["data"] == obj["data"]


def test_seal_manifest_strips_plaintext_carriers() -> None:
    from sealed_secrets.cli import CliError, seal_manifest_doc

    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "s",
            "uid": "u",
            "resourceVersion": "9",
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": SECRET, "a": "b"},
        },
        "data": {"x": base64.b64encode(b"old").decode()},
        "stringData": {"x": "new", "y": "why", "z": "sealed.not-really"},
        "type": "Opaque",
    }
    seen: list[bytes] = []
    out = seal_manifest_doc(doc, lambda v: seen.append(v) or "sealed.fake")
    # stringData overrides data, as on the server; "sealed."-prefixed plaintext is still sealed
    assert sorted(seen) == [b"new", b"sealed.not-really", b"why"]
    assert out["metadata"] == {"name": "s", "annotations": {"a": "b"}, "creationTimestamp": None}
    assert SECRET not in json.dumps(out) and out["type"] == "Opaque"
    for bad in ({"kind": "ConfigMap", "apiVersion": "v1"}, {**doc, "data": {"x": "!!"}}):
        with pytest.raises(CliError):
            seal_manifest_doc(bad, lambda v: "sealed.x")


def test_keygen_output_dir_is_a_usable_key_dir(work: Path) -> None:
    """A directory written by `keygen` verifies as it is: `<kid>-public.json` is found."""
    r = run(
        *seal_args(work),
        "vault",
        "-r",
        "kbs:///default/app/db",
        "-p",
        "kbs",
    )
    assert r.returncode == 0, r.stderr
    sealed = r.stdout.decode().strip()
    r = run("verify", "-k", str(work / "keys"), sealed)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verified"]
    (work / "other").mkdir()
    r = run("verify", "-k", str(work / "other"), sealed)
    assert r.returncode == 1 and b"UnsealFailed" in r.stderr
