"""gocryptfs.conf handling: create/parse/validate, key wrap, password files, master keys."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.configfile import (
    DEFAULT_FLAGS,
    ConfFile,
    format_master_key,
    parse_master_key,
    read_passfile,
)
from fuse_crypt.errors import BadInputError, ConfigError, FuseCryptError, WrongKeyError
from fuse_crypt.nametransform import NameTransform
from tests.fuzzing import fuzz, long_fuzz

PW = b"test password"


@pytest.fixture(scope="module")
def created() -> tuple[ConfFile, bytes]:
    return ConfFile.create(PW, scrypt_logn=10)


def _mutate(conf: ConfFile, **changes: object) -> bytes:
    obj = json.loads(conf.dumps())
    for key, value in changes.items():
        if key.startswith("Scrypt_"):
            obj["ScryptObject"][key[len("Scrypt_") :]] = value
        elif value is ...:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


def test_create_dumps_loads_unlock(created: tuple[ConfFile, bytes]) -> None:
    conf, mk = created
    assert len(mk) == 32
    assert conf.feature_flags == DEFAULT_FLAGS
    assert conf.scrypt_n == 1024 and conf.scrypt_logn == 10
    assert conf.long_name_max == 255
    assert len(conf.encrypted_key) == 64 and len(conf.salt) == 32
    text = conf.dumps()
    assert text.endswith(b"}\n") and b'\n\t"Creator": ' in text and b'\n\t\t"Salt"' in text
    obj = json.loads(text)
    assert list(obj) == ["Creator", "EncryptedKey", "ScryptObject", "Version", "FeatureFlags"]
    assert list(obj["ScryptObject"]) == ["Salt", "N", "R", "P", "KeyLen"]
    assert obj["Version"] == 2 and obj["ScryptObject"]["R"] == 8 and obj["ScryptObject"]["P"] == 1
    # standard (not URL-safe) base64 with padding
    assert base64.b64decode(obj["EncryptedKey"], validate=True) == conf.encrypted_key
    again = ConfFile.loads(text)
    assert again == conf
    assert again.unlock(PW) == mk
    assert again.dumps() == text


def test_create_with_given_master_key_and_options() -> None:
    mk = os.urandom(32)
    conf, got = ConfFile.create(
        PW, scrypt_logn=10, master_key=mk, deterministic_names=True, long_name_max=100
    )
    assert got == mk
    assert conf.feature_flags == (
        "HKDF",
        "GCMIV128",
        "LongNameMax",
        "EMENames",
        "LongNames",
        "Raw64",
    )
    assert json.loads(conf.dumps())["LongNameMax"] == 100
    loaded = ConfFile.loads(conf.dumps())
    assert loaded.long_name_max == 100
    nt = loaded.name_transform(loaded.new_core(loaded.unlock(PW)))
    assert nt.deterministic and nt.longname_max == 100 and nt.raw64
    siv, _ = ConfFile.create(PW, scrypt_logn=10, aessiv=True)
    assert siv.feature_flags[-1] == "AESSIV"
    assert ConfFile.loads(siv.dumps()).new_core(siv.unlock(PW)).algorithm == "AES-SIV-512"


def test_wrong_password(created: tuple[ConfFile, bytes]) -> None:
    conf, _ = created
    with pytest.raises(WrongKeyError) as exc:
        conf.unlock(b"wrong password")
    assert "wrong password" not in str(exc.value)
    with pytest.raises(BadInputError):
        conf.unlock(b"")


def test_tampered_encrypted_key_is_wrong_key(created: tuple[ConfFile, bytes]) -> None:
    conf, _ = created
    ek = bytearray(conf.encrypted_key)
    ek[20] ^= 1
    bad = _mutate(conf, EncryptedKey=base64.b64encode(bytes(ek)).decode())
    with pytest.raises(WrongKeyError):
        ConfFile.loads(bad).unlock(PW)


def test_rewrap_keeps_master_key_and_changes_salt(created: tuple[ConfFile, bytes]) -> None:
    conf, mk = created
    new = conf.rewrap(mk, b"new password")
    assert new.salt != conf.salt and new.encrypted_key != conf.encrypted_key
    assert new.feature_flags == conf.feature_flags and new.scrypt_n == conf.scrypt_n
    assert new.unlock(b"new password") == mk
    with pytest.raises(WrongKeyError):
        new.unlock(PW)
    assert conf.unlock(PW) == mk  # the original object is untouched (immutable)
    assert conf.rewrap(mk, PW, scrypt_logn=11).scrypt_n == 2048
    with pytest.raises(BadInputError):
        conf.rewrap(mk, PW, scrypt_logn=9)


def test_legacy_non_hkdf_conf_unlocks() -> None:
    """Pre-v1.3 volumes: raw scrypt output as GCM key, 12-byte nonce, 60-byte key blob."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    mk, salt, nonce = os.urandom(32), os.urandom(32), os.urandom(12)
    kek = Scrypt(salt=salt, length=32, n=1024, r=8, p=1).derive(PW)
    ek = nonce + AESGCM(kek).encrypt(nonce, mk, bytes(8))
    obj = {
        "EncryptedKey": base64.b64encode(ek).decode(),
        "ScryptObject": {
            "Salt": base64.b64encode(salt).decode(),
            "N": 1024,
            "R": 8,
            "P": 1,
            "KeyLen": 32,
        },
        "Version": 2,
        "FeatureFlags": ["GCMIV128", "DirIV", "EMENames", "LongNames"],
    }
    conf = ConfFile.loads(json.dumps(obj).encode())
    assert not conf.use_hkdf
    assert conf.unlock(PW) == mk
    nt = conf.name_transform(conf.new_core(mk))
    assert not nt.raw64 and not nt.deterministic


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "JSON"),
        (b"{not json", "JSON"),
        (b"\xff\xfe", "JSON"),
        (b"[]", "object"),
        (b'"x"', "object"),
    ],
)
def test_bad_json(data: bytes, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ConfFile.loads(data)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"Version": 1}, "version 1"),
        ({"Version": 3}, "version 3"),
        ({"Version": ...}, "Version"),
        ({"Version": "2"}, "Version"),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "Frobnicate"]}, "unknown feature flag.*Frobnicate"),
        ({"FeatureFlags": "HKDF"}, "FeatureFlags"),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "HKDF"]}, "duplicate"),
        ({"FeatureFlags": ["HKDF", "DirIV", "EMENames", "LongNames", "Raw64"]}, "GCMIV128"),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "PlaintextNames"]}, "PlaintextNames"),
        ({"FeatureFlags": ["HKDF", "GCMIV128", "PlaintextNames"]}, "PlaintextNames.*not supp"),
        (
            {"FeatureFlags": ["HKDF", "XChaCha20Poly1305", "DirIV", "EMENames", "LongNames"]},
            "XChaCha20Poly1305.*not supported",
        ),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "XChaCha20Poly1305"]}, "XChaCha20Poly1305"),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "FIDO2"]}, "FIDO2"),
        ({"FeatureFlags": ["HKDF", "GCMIV128", "DirIV", "LongNames", "Raw64"]}, "CBC"),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "LongNameMax"]}, "LongNameMax"),
        ({"LongNameMax": 100}, "LongNameMax"),
        ({"LongNameMax": 300}, "LongNameMax"),
        ({"FeatureFlags": [*DEFAULT_FLAGS, "LongNameMax"], "LongNameMax": 20}, "62..255"),
        ({"FIDO2": {"CredentialID": "AA=="}}, "FIDO2"),
        ({"EncryptedKey": "AAAA"}, "EncryptedKey must be 64"),
        ({"EncryptedKey": "not base64!"}, "EncryptedKey"),
        ({"EncryptedKey": ...}, "EncryptedKey"),
        ({"ScryptObject": ...}, "ScryptObject"),
        ({"Scrypt_Salt": base64.b64encode(bytes(31)).decode()}, "salt must be 32"),
        ({"Scrypt_Salt": "-_-_"}, "Salt"),
        ({"Scrypt_N": 512}, "scrypt N"),
        ({"Scrypt_N": 1000}, "scrypt N"),
        ({"Scrypt_N": 2**29}, "scrypt N"),
        ({"Scrypt_N": "1024"}, "N"),
        ({"Scrypt_R": 4}, "R must be 8"),
        ({"Scrypt_P": 0}, "P 1"),
        ({"Scrypt_KeyLen": 16}, "KeyLen"),
        ({"Scrypt_KeyLen": 64}, "KeyLen"),
        ({"Creator": 5}, "Creator"),
    ],
)
def test_invalid_conf(created: tuple[ConfFile, bytes], changes: dict, needle: str) -> None:
    conf, mk = created
    with pytest.raises(ConfigError, match=needle) as exc:
        ConfFile.loads(_mutate(conf, **changes))
    text = str(exc.value)
    assert mk.hex() not in text and PW.decode() not in text


def test_unknown_json_fields_are_ignored_like_go(created: tuple[ConfFile, bytes]) -> None:
    conf, mk = created
    assert ConfFile.loads(_mutate(conf, Comment="x")).unlock(PW) == mk
    assert ConfFile.loads(_mutate(conf, Creator=...)).creator == ""


def test_aessiv_requires_gcmiv128(created: tuple[ConfFile, bytes]) -> None:
    conf, _ = created
    flags = ["HKDF", "DirIV", "EMENames", "LongNames", "Raw64", "AESSIV"]
    with pytest.raises(ConfigError, match="AESSIV requires GCMIV128"):
        ConfFile.loads(_mutate(conf, FeatureFlags=flags))


def test_name_transform_from_flags(created: tuple[ConfFile, bytes]) -> None:
    conf, mk = created
    nt = conf.name_transform(conf.new_core(mk))
    assert isinstance(nt, NameTransform)
    assert nt.raw64 and nt.longnames and not nt.deterministic and nt.longname_max == 255


def test_write_and_read(tmp_path: Path, created: tuple[ConfFile, bytes]) -> None:
    conf, mk = created
    path = tmp_path / "gocryptfs.conf"
    conf.write(str(path))
    st_ = os.stat(path)
    assert stat.S_IMODE(st_.st_mode) == 0o400
    assert path.read_bytes() == conf.dumps()
    assert not (tmp_path / "gocryptfs.conf.tmp").exists()
    assert ConfFile.read(str(path)).unlock(PW) == mk
    # rename replaces an existing (read-only) conf atomically
    new = conf.rewrap(mk, b"other")
    new.write(str(path))
    assert ConfFile.read(str(path)).unlock(b"other") == mk
    # a leftover tmp file (concurrent writer) makes the write fail, not interleave
    (tmp_path / "gocryptfs.conf.tmp").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        conf.write(str(path))
    assert ConfFile.read(str(path)).unlock(b"other") == mk
    # ...and that writer's temp file is left alone: it is theirs to rename or remove
    assert (tmp_path / "gocryptfs.conf.tmp").read_bytes() == b"x"
    with pytest.raises(FileNotFoundError):
        ConfFile.read(str(tmp_path / "missing.conf"))


def test_repr_is_short_and_keyless(created: tuple[ConfFile, bytes]) -> None:
    conf, mk = created
    r = repr(conf)
    assert "HKDF" in r
    assert base64.b64encode(conf.encrypted_key).decode() not in r
    assert mk.hex() not in r


def test_create_rejects_bad_input() -> None:
    with pytest.raises(BadInputError):
        ConfFile.create(b"", scrypt_logn=10)
    with pytest.raises(BadInputError):
        ConfFile.create(b"x" * 2049, scrypt_logn=10)
    with pytest.raises(BadInputError):
        ConfFile.create(PW, scrypt_logn=10, master_key=bytes(16))
    with pytest.raises(BadInputError):
        ConfFile.create(PW, scrypt_logn=29)
    with pytest.raises(BadInputError):
        ConfFile.create(PW, scrypt_logn=10, long_name_max=61)


# -- password files and master keys -----------------------------------------------


def test_read_passfile(tmp_path: Path) -> None:
    pf = tmp_path / "pf"
    pf.write_bytes(b"secret\n")
    assert read_passfile(str(pf)) == b"secret"
    pf.write_bytes(b"secret")
    assert read_passfile(str(pf)) == b"secret"
    pf.write_bytes(b" spaced \xc3\xbc \nsecond line\n")
    assert read_passfile(str(pf)) == b" spaced \xc3\xbc "  # byte-for-byte, first line only
    pf.write_bytes(b"x" * 2048 + b"\n")
    assert read_passfile(str(pf)) == b"x" * 2048
    for bad in (b"", b"\n", b"\nsecond", b"x" * 2049):
        pf.write_bytes(bad)
        with pytest.raises(BadInputError) as exc:
            read_passfile(str(pf))
        assert "x" * 20 not in str(exc.value)
    with pytest.raises(BadInputError):
        read_passfile(str(tmp_path / "missing"))


def test_master_key_text() -> None:
    mk = bytes.fromhex("f2a477e35823f5e020f658899c23ae02a7b64d4f8484db517998f19bc6e289d6")
    text = format_master_key(mk)
    assert text == "f2a477e3-5823f5e0-20f65889-9c23ae02-a7b64d4f-8484db51-7998f19b-c6e289d6"
    assert parse_master_key(text) == mk
    assert parse_master_key(mk.hex().upper()) == mk
    assert parse_master_key("  " + text + "\n") == mk
    assert parse_master_key("f2a4-77e3" + mk.hex()[8:]) == mk
    for bad in ("", "zz" * 32, mk.hex()[:-2], mk.hex() + "00", text.replace("-", " ")):
        with pytest.raises(BadInputError) as exc:
            parse_master_key(bad)
        assert mk.hex()[:16] not in str(exc.value)
    with pytest.raises(BadInputError):
        format_master_key(bytes(16))


def test_all_errors_share_base() -> None:
    for cls in (ConfigError, WrongKeyError, BadInputError):
        assert issubclass(cls, FuseCryptError)


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
_BASE_CONF = ConfFile.create(PW, scrypt_logn=10, master_key=bytes(32))[0].dumps()
_FIELDS = ["Creator", "EncryptedKey", "ScryptObject", "Version", "FeatureFlags", "LongNameMax"]


@long_fuzz
@fuzz(quick=150)
@given(
    base_idx=st.integers(0, len(_FIELDS) - 1),
    value=_json,
    sub=st.sampled_from(["Salt", "N", "R", "P", "KeyLen", None]),
)
def test_mutated_conf_only_raises_config_error(
    base_idx: int, value: object, sub: str | None
) -> None:
    obj = json.loads(_BASE_CONF)
    if sub is not None:
        obj["ScryptObject"][sub] = value
    else:
        obj[_FIELDS[base_idx]] = value
    with contextlib.suppress(ConfigError):
        ConfFile.loads(json.dumps(obj).encode())


@long_fuzz
@fuzz(quick=100)
@given(data=st.binary(max_size=300))
def test_random_bytes_conf_only_raises_config_error(data: bytes) -> None:
    with pytest.raises(ConfigError):
        ConfFile.loads(data)


def test_dumps_escapes_like_go() -> None:
    conf, _ = ConfFile.create(PW, scrypt_logn=10, creator="a<b>&c\u2028\u00fc")
    text = conf.dumps()
    assert b'"Creator": "a\\u003cb\\u003e\\u0026c\\u2028\xc3\xbc"' in text
    assert ConfFile.loads(text) == conf
