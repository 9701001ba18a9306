"""Issue 7 findings 10 and 11: what the `sealed-secret` CLI writes, and what it seals.

10: `unseal -o` kept an existing file's 0644/0666 mode and followed symlinks; `keygen` wrote
    the public key through a symlink. Outputs are now created fresh (0600 for private data),
    never through a link; `--force` replaces atomically without touching a link's target.
11: `seal manifest` sealed YAML's coercions (`0123` → "83", `yes` → "True", null → "None")
    and crashed on a list under `data:`. It now refuses what the API server would refuse.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from tests.sealed_secrets.test_cli import SECRET, run, seal_args, work  # noqa: F401

PLANTED = b"precious file the attacker wants overwritten\n"


def _sealed_file(work: Path) -> Path:  # noqa: F811
    (work / "plain").write_text(SECRET)
    r = run(*seal_args(work), "envelope", "-k", "kbs:///default/sealing-key/asym",
            "-f", str(work / "plain"), "asym", "--public-key",
            str(work / "keys/sealing-public.json"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (work / "s").write_bytes(r.stdout)
    return work / "s"


def _unseal(work: Path, *args: str) -> object:  # noqa: F811
    return run("unseal", "-k", str(work / "vk"), "--resolver",
               f"offline-fs:{work / 'res.json'}", *args)  # fmt: skip


def _one_line_error(r: object) -> str:
    assert r.returncode == 1, r.stderr  # type: ignore[attr-defined]
    err = r.stderr.decode()  # type: ignore[attr-defined]
    assert err.count("\n") == 1 and err.startswith("sealed-secret: error: "), err
    assert "Traceback" not in err
    return err


def test_unseal_output_symlink_is_refused_and_target_untouched(work: Path) -> None:  # noqa: F811
    sealed = _sealed_file(work)
    target = work / "victim"
    target.write_bytes(PLANTED)
    os.chmod(target, 0o644)
    out = work / "out"
    out.symlink_to(target)
    err = _one_line_error(_unseal(work, "-f", str(sealed), "-o", str(out)))
    assert "already exists" in err and SECRET not in err
    assert target.read_bytes() == PLANTED and out.is_symlink()
    # a dangling link is refused too (O_EXCL): nothing is created at its target
    dangling = work / "dangling"
    dangling.symlink_to(work / "created-through-link")
    _one_line_error(_unseal(work, "-f", str(sealed), "-o", str(dangling)))
    assert not (work / "created-through-link").exists()


def test_unseal_default_output_refuses_existing_file(work: Path) -> None:  # noqa: F811
    sealed = _sealed_file(work)
    existing = work / "s.unsealed"
    existing.write_bytes(PLANTED)
    os.chmod(existing, 0o666)
    _one_line_error(_unseal(work, "-f", str(sealed)))
    assert existing.read_bytes() == PLANTED
    assert stat.S_IMODE(existing.stat().st_mode) == 0o666  # not ours to change either


def test_unseal_output_is_0600_whatever_the_umask(work: Path) -> None:  # noqa: F811
    sealed = _sealed_file(work)
    old = os.umask(0)
    try:
        r = _unseal(work, "-f", str(sealed), "-o", str(work / "fresh"))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((work / "fresh").stat().st_mode) == 0o600
    assert (work / "fresh").read_text() == SECRET


def test_force_replaces_atomically_without_following_the_link(work: Path) -> None:  # noqa: F811
    sealed = _sealed_file(work)
    target = work / "victim"
    target.write_bytes(PLANTED)
    out = work / "out"
    out.symlink_to(target)
    r = _unseal(work, "-f", str(sealed), "-o", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert target.read_bytes() == PLANTED  # the link was replaced, its target untouched
    assert not out.is_symlink() and out.read_text() == SECRET
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".out.")) == []
    os.chmod(out, 0o644)
    r = _unseal(work, "-f", str(sealed), "-o", str(out), "--force")  # replaces a plain file
    assert r.returncode == 0 and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_existing_output_is_refused_before_any_unsealing(work: Path) -> None:  # noqa: F811
    (work / "taken").write_bytes(PLANTED)
    # a resolver that cannot work: the refusal must come first, without contacting anything
    r = run("unseal", "--resolver", "kbs:https://127.0.0.1:1?aa=unix:///no.sock&cert-sha256="
            + "0" * 64, "-o", str(work / "taken"), "sealed.a.b.c")  # fmt: skip
    assert "already exists" in _one_line_error(r)


def test_keygen_refuses_a_planted_public_key_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(PLANTED)
    (tmp_path / "k-public.json").symlink_to(target)
    err = _one_line_error(run("keygen", "--kid", "k", "--output-dir", str(tmp_path)))
    assert "refusing to overwrite" in err
    assert target.read_bytes() == PLANTED
    assert not (tmp_path / "k-private.json").exists()  # no half pair left behind
    (tmp_path / "k-public.json").unlink()
    (tmp_path / "k-private.json").symlink_to(target)
    _one_line_error(run("keygen", "--kid", "k", "--output-dir", str(tmp_path)))
    assert target.read_bytes() == PLANTED and not (tmp_path / "k-public.json").exists()


def test_keygen_modes_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        r = run("keygen", "--kid", "k", "--output-dir", str(tmp_path))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "k-private.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k-public.json").stat().st_mode) == 0o644


# --- seal manifest: exactly the strings Kubernetes would store --------------------------------


def _manifest(body: str) -> bytes:
    return f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n{body}".encode()


def _seal_manifest(work: Path, text: bytes) -> object:  # noqa: F811
    return run(*seal_args(work), "manifest", "-k", "kbs:///default/sealing-key/asym", "asym",
               "--public-key", str(work / "keys/sealing-public.json"), stdin=text)  # fmt: skip


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("stringData:\n  pin: 0754321\n", "stringData[pin] is a number"),
        ("stringData:\n  enabled: YES\n", "stringData[enabled] is a boolean"),
        ("stringData:\n  flag: Off\n", "stringData[flag] is a boolean"),
        ("stringData:\n  short: Y\n", "stringData[short] is a boolean"),
        ("stringData:\n  empty:\n", "stringData[empty] is null"),
        ("stringData:\n  ratio: 1.50\n", "stringData[ratio] is a number"),
        ("stringData:\n  big: 7e9\n", "stringData[big] is a number"),
        ("stringData:\n  day: 2024-01-01\n", "stringData[day] is a timestamp"),
        ("stringData:\n  nested:\n    a: b\n", "stringData[nested] is a map"),
        ("stringData:\n  bin: !!binary aGk=\n", "stringData[bin] is binary"),
        ("data:\n  - a\n  - b\n", "data must be a map of key: string, not a list"),
        ("data: hello\n", "data must be a map"),
        ("data:\n  num: 5\n", "data[num] is a number"),
        ("stringData:\n  'bad key': x\n", "is not a valid Secret key"),
        ("stringData:\n  1: x\n", "key a number"),
        ("stringData:\n  a: x\n  a: y\n", "duplicate key"),
        ("metadata: [1]\n", "metadata must be a map"),
        ("stringData: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    ],
)
def test_manifest_refuses_what_the_api_server_would(
    work: Path,  # noqa: F811
    body: str,
    needle: str,
) -> None:
    text = _manifest(body)
    if body.startswith("metadata"):
        text = f"apiVersion: v1\nkind: Secret\n{body}".encode()
    err = _one_line_error(_seal_manifest(work, text))
    assert needle in err, err
    for value in ("0754321", "YES", "Off", "1.50", "7e9", "2024-01-01", "aGk="):  # never echoed
        if value in body:
            assert value not in err


def test_manifest_seals_quoted_values_exactly(work: Path) -> None:  # noqa: F811
    import yaml

    body = (
        "stringData:\n  pin: '0123'\n  enabled: \"yes\"\n  empty: ''\n  ratio: '1.50'\n"
        "  word: yesterday\n  e: e3\n"
        "data:\n  raw: " + base64.b64encode(b"\x00\xff bin").decode() + "\n"
    )
    r = _seal_manifest(work, _manifest(body))
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(r.stdout)
    want = {
        "pin": b"0123",
        "enabled": b"yes",
        "empty": b"",
        "ratio": b"1.50",
        "word": b"yesterday",
        "e": b"e3",
        "raw": b"\x00\xff bin",
    }
    assert set(out["data"]) == set(want)
    for key, plain in want.items():
        sealed = base64.b64decode(out["data"][key]).decode()
        got = _unseal(work, sealed)
        assert got.returncode == 0 and got.stdout == plain, (key, got.stderr)  # type: ignore[attr-defined]


def test_manifest_json_input_numbers_are_refused_too(work: Path) -> None:  # noqa: F811
    doc = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"n": 7}}
    err = _one_line_error(_seal_manifest(work, json.dumps(doc).encode()))
    assert "stringData[n] is a number" in err
