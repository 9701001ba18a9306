"""The typed volume key format (issue 7, finding 3): only a coco-csi volume key JWK passes."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csi_driver.volume_key import (
    ALG,
    VolumeKeyFormatError,
    new_volume_key_jwk,
    parse_volume_key,
)
from tests.fuzzing import fuzz, long_fuzz

EXE = [sys.executable, "-m", "csi_driver.cli"]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_new_key_round_trips_and_is_random() -> None:
    a, b = new_volume_key_jwk(), new_volume_key_jwk(kid="team-a")
    assert len(parse_volume_key(a.encode())) == 32
    assert parse_volume_key(a.encode()) != parse_volume_key(b.encode())
    assert json.loads(b)["kid"] == "team-a"


@pytest.mark.parametrize(
    "doc",
    [
        {"kty": "oct", "alg": ALG, "k": _b64(os.urandom(16))},  # too short
        {"kty": "oct", "alg": ALG, "k": _b64(os.urandom(64))},  # too long
        {"kty": "oct", "k": _b64(os.urandom(32))},  # untyped symmetric JWK
        {"kty": "oct", "alg": "A256GCM", "k": _b64(os.urandom(32))},
        {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "alg": ALG},  # a public key
        {"kty": "oct", "alg": ALG, "k": _b64(os.urandom(32)) + "="},  # padded
        {"kty": "oct", "alg": ALG, "k": base64.b64encode(os.urandom(32)).decode()},  # std b64
        {"kty": "oct", "alg": ALG, "k": _b64(os.urandom(32)), "use": "sig"},
        {"kty": "oct", "alg": ALG, "k": _b64(os.urandom(32)), "kid": 7},
        [1, 2],
        "string",
    ],
)
def test_anything_else_is_refused(doc: object) -> None:
    with pytest.raises(VolumeKeyFormatError):
        parse_volume_key(json.dumps(doc).encode())


def test_raw_bytes_duplicates_and_non_canonical_are_refused() -> None:
    k = _b64(os.urandom(32))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The last character carries 2 spare bits: setting one decodes to the same key bytes.
    twin = k[:-1] + alphabet[alphabet.index(k[-1]) ^ 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(k + "=")
    dup = '{"kty":"oct","alg":"%s","k":"%s","k":"%s"}' % (ALG, k, k)  # noqa: UP031
    for data in (
        os.urandom(32),
        b"",
        b"\xff" * 40,
        dup.encode(),
        json.dumps({"kty": "oct", "alg": ALG, "k": twin}).encode(),
        b"[" * 100000,
    ):
        with pytest.raises(VolumeKeyFormatError):
            parse_volume_key(data)


@long_fuzz
@fuzz(quick=300)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(["kty", "alg", "k", "kid", "use", "x"]),
            st.one_of(st.text(max_size=50), st.integers(), st.none(), st.just(ALG)),
        ).map(lambda d: json.dumps(d).encode()),
    )
)
def test_parse_volume_key_only_raises_its_typed_error(data: bytes) -> None:
    try:
        key = parse_volume_key(data)
    except VolumeKeyFormatError:
        return
    assert len(key) == 32


def test_cli_volume_key_new(tmp_path: pathlib.Path) -> None:
    out = subprocess.run([*EXE, "volume-key", "new"], capture_output=True, text=True, check=True)
    assert len(parse_volume_key(out.stdout.encode())) == 32
    path = tmp_path / "key.jwk"
    subprocess.run([*EXE, "volume-key", "new", "-o", str(path)], check=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(parse_volume_key(path.read_bytes())) == 32
    # Never overwrite, never follow a link.
    again = subprocess.run(
        [*EXE, "volume-key", "new", "-o", str(path)], capture_output=True, text=True
    )
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "target")
    res = subprocess.run([*EXE, "volume-key", "new", "-o", str(link)], capture_output=True)
    assert res.returncode != 0 and not (tmp_path / "target").exists()
