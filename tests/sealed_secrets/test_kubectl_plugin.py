"""`kubectl create sealedsecret`: found and run by the real kubectl, valid manifests, and a
non-dry-run create against a protocol-level fake kube-apiserver that only sees sealed strings."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jwcrypto import jwk

from sealed_secrets import jws, kubectl_plugin
from sealed_secrets.providers import asym
from sealed_secrets.unseal import unseal_secret
from tests.console_scripts import console_script
from tests.peers import kube_apiserver as apiserver_peer
from tests.sealed_secrets.vectors_coco import TEST_KEY

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "kubectl-create-sealedsecret"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
SEALING = asym.generate_keypair("EC")
KEY_URI = "kbs:///default/sealing-key/asym"
LITERAL = "literal-pa55w0rd-!@#"
FILE_VALUE = b"file-value-\x00\x01binary"
ENV_VALUE = "env-value-token-xyz"


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, Any]:
    signing = jwk.JWK(**TEST_KEY)
    (tmp_path / "signing.json").write_text(signing.export_private())
    (tmp_path / "sealing-public.json").write_text(SEALING.export_public())
    (tmp_path / "vk").mkdir()
    (tmp_path / "vk" / "test-key").write_text(signing.export_public())
    (tmp_path / "cert.pem").write_bytes(FILE_VALUE)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "one.txt").write_text("dir-one")
    (d / "bad name").write_text("skipped")
    (d / "sub").mkdir()
    (tmp_path / "app.env").write_text(f"# comment\n\nAPI_TOKEN={ENV_VALUE}\n  SPACED=a=b\n")
    return {
        "dir": tmp_path,
        "seal": [
            "--signing-kid",
            "test-key",
            "--signing-jwk-path",
            str(tmp_path / "signing.json"),
            "--key-id",
            KEY_URI,
            "--public-key",
            str(tmp_path / "sealing-public.json"),
        ],
    }


def unseal_value(b64: str, env: dict[str, Any]) -> bytes:
    sealed = base64.b64decode(b64).decode("ascii")
    assert sealed.startswith("sealed.")
    broker = {KEY_URI: SEALING.export_private().encode()}
    return unseal_secret(sealed, get_resource=broker.__getitem__, key_dir=str(env["dir"] / "vk"))


def kubectl(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    if not os.path.exists(KUBECTL):
        pytest.skip("kubectl not installed")
    e = {
        "PATH": f"{Path(console_script(PLUGIN)).parent}:/usr/local/bin:/usr/bin:/bin",
        "PYTHONPATH": os.environ["PYTHONPATH"],  # the plugin imports the tree under test
        "HOME": os.environ.get("HOME", "/root"),
        "KUBECONFIG": "/nonexistent/kubeconfig",
        **(extra_env or {}),
    }
    return subprocess.run([KUBECTL, *args], capture_output=True, env=e, timeout=120, check=False)


def test_kubectl_finds_plugin_and_client_dry_run_yaml_validates(env: dict[str, Any]) -> None:
    d = env["dir"]
    r = kubectl(
        "create",
        "sealedsecret",
        "app-secret",
        f"--from-literal=password={LITERAL}",
        f"--from-file=tls.crt={d / 'cert.pem'}",
        f"--from-file={d / 'dir'}",
        f"--from-env-file={d / 'app.env'}",
        "--from-vault=db=kbs:///default/app/db",
        "-n",
        "ns1",
        "--type",
        "kubernetes.io/opaque-sealed",
        "--dry-run=client",
        "-o",
        "yaml",
        *env["seal"],
    )
    assert r.returncode == 0, r.stderr.decode()
    for plain in (LITERAL.encode(), FILE_VALUE, ENV_VALUE.encode(), b"dir-one"):
        assert plain not in r.stdout and base64.b64encode(plain) not in r.stdout
    obj = yaml.safe_load(r.stdout)
    import kubernetes_validate

    kubernetes_validate.validate(obj, "1.32", strict=True)
    assert obj["kind"] == "Secret" and obj["apiVersion"] == "v1"
    assert obj["metadata"] == {"name": "app-secret", "namespace": "ns1", "creationTimestamp": None}
    assert obj["type"] == "kubernetes.io/opaque-sealed"
    assert set(obj["data"]) == {"password", "tls.crt", "one.txt", "API_TOKEN", "SPACED", "db"}
    assert unseal_value(obj["data"]["password"], env) == LITERAL.encode()
    assert unseal_value(obj["data"]["tls.crt"], env) == FILE_VALUE
    assert unseal_value(obj["data"]["API_TOKEN"], env) == ENV_VALUE.encode()
    assert unseal_value(obj["data"]["SPACED"], env) == b"a=b"
    db = jws.parse(base64.b64decode(obj["data"]["db"]).decode())
    assert json.loads(db.payload)["name"] == "kbs:///default/app/db"


def test_manifest_shape_matches_kubectl_create_secret_generic(env: dict[str, Any]) -> None:
    ours = kubectl(
        "create",
        "sealedsecret",
        "s1",
        "--from-literal=a=b",
        "--dry-run=client",
        "-o",
        "json",
        *env["seal"],
    )
    theirs = kubectl(
        "create", "secret", "generic", "s1", "--from-literal=a=b", "--dry-run=client", "-o", "json"
    )
    assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr + theirs.stderr
    o, t = json.loads(ours.stdout), json.loads(theirs.stdout)
    assert list(o) == list(t) and o["metadata"] == t["metadata"]
    assert set(o["data"]) == set(t["data"]) and o["data"] != t["data"]
    # yaml output: same keys in the same (sorted) order as kubectl prints them
    oy = kubectl(
        "create",
        "sealedsecret",
        "s1",
        "--from-literal=a=b",
        "--dry-run=client",
        "-o",
        "yaml",
        *env["seal"],
    ).stdout
    ty = kubectl(
        "create", "secret", "generic", "s1", "--from-literal=a=b", "--dry-run=client", "-o", "yaml"
    ).stdout
    top = [ln.split(b":")[0] for ln in oy.splitlines() if not ln.startswith(b" ")]
    assert top == [ln.split(b":")[0] for ln in ty.splitlines() if not ln.startswith(b" ")]
    r = kubectl(
        "create", "sealedsecret", "s1", "--from-literal=a=b", "--dry-run=client", *env["seal"]
    )
    assert r.stdout == b"secret/s1 created (dry run)\n"
    r = kubectl(
        "create", "sealed-secret", "s1", "--from-literal=a=b", "--dry-run=client", *env["seal"]
    )
    assert r.returncode != 0  # looks up kubectl-create-sealed_secret, which does not exist


def test_plugin_list_shows_it() -> None:
    r = kubectl("plugin", "list")
    assert b"kubectl-create-sealedsecret" in r.stdout


def test_client_dry_run_errors(env: dict[str, Any]) -> None:
    r = kubectl(
        "create",
        "sealedsecret",
        "s1",
        "--from-literal=a=b",
        "--context",
        "nosuch",
        "--dry-run=client",
        *env["seal"],
    )
    assert r.returncode == 1 and b"context" in r.stderr
    r = kubectl(
        "create",
        "sealedsecret",
        "s1",
        "--from-literal=a=b",
        "--from-literal=a=c",
        "--dry-run=client",
        *env["seal"],
    )
    assert r.returncode == 1 and r.stderr.startswith(b"error: cannot add key a")
    r = kubectl(
        "create", "sealedsecret", "s1", "--from-literal=a b=c", "--dry-run=client", *env["seal"]
    )
    assert r.returncode == 1 and b"not valid key name" in r.stderr
    r = kubectl("create", "sealedsecret", "s1", f"--from-literal=a={LITERAL}", "--dry-run=client")
    assert r.returncode == 1 and b"--signing-kid" in r.stderr
    assert LITERAL.encode() not in r.stderr + r.stdout


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = kubectl_plugin.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_bare_dry_run_and_output_name(env: dict[str, Any], capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_main(
        ["s2", "--from-literal=k=v", "--dry-run", "-o", "name", *env["seal"]], capsys
    )
    assert code == 0 and out == "secret/s2\n" and "deprecated" in err
    code, out, err = run_main(["s2", "--from-literal=k=v", "--dry-run=maybe", *env["seal"]], capsys)
    assert code == 2 and "Invalid dry-run value" in err
    code, out, err = run_main(
        ["Bad_Name", "--from-literal=k=v", "--dry-run=client", *env["seal"]], capsys
    )
    assert code == 1 and "DNS subdomain" in err
    code, out, err = run_main(["s2", "--dry-run=client", *env["seal"]], capsys)
    assert code == 1 and "no values" in err
    for bad in ("--from-file=k=", "--from-file==x", "--from-file=/nonexistent/f"):
        code, out, err = run_main(["s2", bad, "--dry-run=client", *env["seal"]], capsys)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1


@pytest.fixture()
def apiserver(tmp_path: Path) -> Iterator[Any]:
    (tmp_path / "tls").mkdir()
    with apiserver_peer.FakeKubeApiserver(str(tmp_path / "tls")) as server:
        yield server


def test_create_against_fake_apiserver_sends_only_sealed_strings(
    env: dict[str, Any], apiserver: Any
) -> None:
    cfg = apiserver.write_kubeconfig(str(env["dir"] / "kubeconfig"))
    d = env["dir"]
    r = kubectl(
        "create",
        "sealedsecret",
        "app",
        f"--from-literal=password={LITERAL}",
        f"--from-file={d / 'cert.pem'}",
        f"--from-env-file={d / 'app.env'}",
        "--kubeconfig",
        cfg,
        *env["seal"],
    )
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout == b"secret/app created\n"
    [req] = apiserver.requests
    assert req["path"] == "/api/v1/namespaces/ns1/secrets"  # namespace from the context
    assert req["query"].get("fieldManager") == "kubectl-create"
    body = req["body"]
    for plain in (LITERAL.encode(), FILE_VALUE, ENV_VALUE.encode(), b"a=b"):
        assert plain not in body and base64.b64encode(plain) not in body
    sent = json.loads(body)
    assert set(sent) <= {"kind", "apiVersion", "metadata", "data"}
    assert sent["metadata"] == {"name": "app"}
    for value in sent["data"].values():
        assert base64.b64decode(value).startswith(b"sealed.")
    stored = apiserver.store[("ns1", "app")]
    assert unseal_value(stored["data"]["password"], env) == LITERAL.encode()
    assert unseal_value(stored["data"]["cert.pem"], env) == FILE_VALUE

    # the real API's answers come back as kubectl-style one-line errors
    r = kubectl(
        "create", "sealedsecret", "app", "--from-literal=x=y", "--kubeconfig", cfg, *env["seal"]
    )
    assert r.returncode == 1
    assert r.stderr == b'error: from server (AlreadyExists): secrets "app" already exists\n'
    r = kubectl("create", "sealedsecret", "viaenv", "--from-literal=x=y", "-o", "name",
                *env["seal"], extra_env={"KUBECONFIG": cfg})  # fmt: skip
    assert r.returncode == 0 and r.stdout == b"secret/viaenv\n"  # $KUBECONFIG is honoured
    assert ("ns1", "viaenv") in apiserver.store
    r = kubectl(
        "create",
        "sealedsecret",
        "app",
        "--from-literal=x=y",
        "--kubeconfig",
        cfg,
        "-n",
        "nosuch",
        *env["seal"],
    )
    assert r.returncode == 1 and b"(NotFound)" in r.stderr


def test_server_dry_run_output_and_auth(
    env: dict[str, Any], apiserver: Any, capsys: pytest.CaptureFixture
) -> None:
    cfg = apiserver.write_kubeconfig(str(env["dir"] / "kubeconfig"))
    code, out, err = run_main(
        [
            "dr",
            "--from-literal=a=b",
            "--dry-run=server",
            "-o",
            "json",
            "--kubeconfig",
            cfg,
            "-n",
            "default",
            *env["seal"],
        ],
        capsys,
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["metadata"]["uid"] and created["type"] == "Opaque"
    assert apiserver.requests[-1]["query"]["dryRun"] == "All"
    assert ("default", "dr") not in apiserver.store
    code, out, err = run_main(
        ["ctx", "--from-literal=a=b", "--kubeconfig", cfg, "--context", "other", *env["seal"]],
        capsys,
    )
    assert code == 0 and ("default", "ctx") in apiserver.store  # context without namespace
    bad = apiserver.write_kubeconfig(str(env["dir"] / "bad"), token="wrong-token-value")
    code, out, err = run_main(
        ["x", f"--from-literal=a={LITERAL}", "--kubeconfig", bad, *env["seal"]], capsys
    )
    assert code == 1 and "(Unauthorized)" in err and err.count("\n") == 1
    assert "wrong-token-value" not in err and LITERAL not in err + out
    code, out, err = run_main(
        [
            "tok",
            "--from-literal=a=b",
            "--kubeconfig",
            bad,
            "--token",
            apiserver.token,
            *env["seal"],
        ],
        capsys,
    )
    assert code == 0 and ("ns1", "tok") in apiserver.store  # --token overrides the kubeconfig
    code, out, err = run_main(
        [
            "x",
            "--from-literal=a=b",
            "--kubeconfig",
            cfg,
            "--server",
            "https://127.0.0.1:1",
            *env["seal"],
        ],
        capsys,
    )
    assert code == 1 and "cannot reach" in err
