"""gocryptfs.conf refusals and boundaries a mutation run (tools/mutation.py) showed untested.

Every refusal is matched by its whole text: a conf refused for the wrong reason (another
check firing first, a bound off by one) must not pass. scrypt is replaced by a recorder
where only its parameters matter, so that the 2^18 bound can be tested in milliseconds.
"""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fuse_crypt import configfile
from fuse_crypt.configfile import (
    MAX_CONF_BYTES,
    ConfFile,
    format_master_key,
    parse_master_key,
    read_passfile,
)
from fuse_crypt.cryptocore import INFO_GCM, hkdf_sha256
from fuse_crypt.errors import BadInputError, ConfigError, WrongKeyError

PW = b"test password"
MK = bytes(range(32))
SALT = bytes(range(32, 64))
NONCE = bytes(range(64, 80))
DEFAULT = ["HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64"]


def _exactly(text: str) -> str:
    return "^" + re.escape(text) + "$"


def _wrap(password: bytes, salt: bytes, n: int, *, hkdf: bool = True) -> bytes:
    """The key wrap gocryptfs does, written out independently of configfile."""
    kek = Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(password)
    if hkdf:
        kek = hkdf_sha256(kek, INFO_GCM)
    nonce = NONCE if hkdf else NONCE[:12]
    return nonce + AESGCM(kek).encrypt(nonce, MK, bytes(8))


_EK = _wrap(PW, SALT, 1024)


def _obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "Creator": "gocryptfs v2.3",
        "EncryptedKey": base64.b64encode(_EK).decode(),
        "ScryptObject": {
            "Salt": base64.b64encode(SALT).decode(),
            "N": 1024,
            "R": 8,
            "P": 1,
            "KeyLen": 32,
        },
        "Version": 2,
        "FeatureFlags": list(DEFAULT),
    }
    for key, value in changes.items():
        if key.startswith("S_"):
            if value is ...:
                del obj["ScryptObject"][key[2:]]
            else:
                obj["ScryptObject"][key[2:]] = value
        elif value is ...:
            del obj[key]
        else:
            obj[key] = value
    return obj


def _conf(**changes: Any) -> bytes:
    return json.dumps(_obj(**changes)).encode()


def test_the_base_conf_loads_and_unlocks() -> None:
    conf = ConfFile.loads(_conf())
    assert conf.unlock(PW) == MK
    assert conf.feature_flags == tuple(DEFAULT) and conf.creator == "gocryptfs v2.3"
    assert (conf.scrypt_n, conf.scrypt_r, conf.scrypt_p, conf.key_len) == (1024, 8, 1, 32)
    assert conf.salt == SALT and conf.encrypted_key == _EK and conf.version == 2
    assert conf.long_name_max == 255 and conf.scrypt_logn == 10


# -- loads: each refusal by its exact text ------------------------------------------------

_P = "gocryptfs.conf: "


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"Version": ...}, "Version missing or not an integer"),
        ({"Version": True}, "Version missing or not an integer"),
        ({"Version": "2"}, "Version missing or not an integer"),
        ({"Version": 3}, "unsupported on-disk format version 3 (need 2)"),
        ({"Version": 1}, "unsupported on-disk format version 1 (need 2)"),
        ({"Creator": 5}, "Creator is not a string"),
        ({"Creator": None}, "Creator is not a string"),
        ({"FeatureFlags": "HKDF"}, "FeatureFlags is not a list of strings"),
        ({"FeatureFlags": [*DEFAULT, 1]}, "FeatureFlags is not a list of strings"),
        ({"FeatureFlags": None}, "GCMIV128 is required (96-bit GCM IVs unsupported)"),
        ({"FeatureFlags": ...}, "GCMIV128 is required (96-bit GCM IVs unsupported)"),
        ({"LongNameMax": True}, "LongNameMax is not a uint8"),
        ({"LongNameMax": -1}, "LongNameMax is not a uint8"),
        ({"LongNameMax": 256}, "LongNameMax is not a uint8"),
        ({"LongNameMax": "100"}, "LongNameMax is not a uint8"),
        ({"LongNameMax": 255}, "LongNameMax flag and field disagree"),
        ({"FIDO2": {}}, "FIDO2 parameters without the FIDO2 flag"),
        ({"EncryptedKey": 5}, "EncryptedKey is not a base64 string"),
        ({"EncryptedKey": ...}, "EncryptedKey is not a base64 string"),
        ({"EncryptedKey": "\u00e9AAA"}, "EncryptedKey is not valid base64"),
        ({"EncryptedKey": "AAA"}, "EncryptedKey is not valid base64"),
        ({"EncryptedKey": "AA-_"}, "EncryptedKey is not valid base64"),
        ({"EncryptedKey": "AAAA!"}, "EncryptedKey is not valid base64"),  # not skipped
        ({"EncryptedKey": "AAAA\n"}, "EncryptedKey is not valid base64"),
        ({"EncryptedKey": "AB=="}, "EncryptedKey is not canonical base64"),
        ({"EncryptedKey": "AAAA"}, "EncryptedKey must be 64 bytes"),
        (
            {"EncryptedKey": base64.b64encode(_EK + b"x").decode()},
            "EncryptedKey must be 64 bytes",
        ),
        ({"ScryptObject": ...}, "ScryptObject missing"),
        ({"ScryptObject": []}, "ScryptObject missing"),
        ({"S_Salt": ...}, "ScryptObject.Salt is not a base64 string"),
        ({"S_Salt": "AB=="}, "ScryptObject.Salt is not canonical base64"),
        ({"S_Salt": "A"}, "ScryptObject.Salt is not valid base64"),
        ({"S_Salt": base64.b64encode(bytes(31)).decode()}, "scrypt salt must be 32..1024 bytes"),
        (
            {"S_Salt": base64.b64encode(bytes(1025)).decode()},
            "scrypt salt must be 32..1024 bytes",
        ),
        ({"S_N": ...}, "ScryptObject.N is missing or not an integer"),
        ({"S_N": True}, "ScryptObject.N is missing or not an integer"),
        ({"S_N": 1024.0}, "ScryptObject.N is missing or not an integer"),
        ({"S_R": ...}, "ScryptObject.R is missing or not an integer"),
        ({"S_R": True}, "ScryptObject.R is missing or not an integer"),
        ({"S_P": ...}, "ScryptObject.P is missing or not an integer"),
        ({"S_P": False}, "ScryptObject.P is missing or not an integer"),
        ({"S_KeyLen": ...}, "ScryptObject.KeyLen is missing or not an integer"),
        ({"S_KeyLen": True}, "ScryptObject.KeyLen is missing or not an integer"),
        ({"S_N": 512}, "scrypt N must be a power of two in 2^10..2^18"),
        ({"S_N": 1023}, "scrypt N must be a power of two in 2^10..2^18"),
        ({"S_N": 1536}, "scrypt N must be a power of two in 2^10..2^18"),
        ({"S_N": 2**19}, "scrypt N must be a power of two in 2^10..2^18"),
        ({"S_N": 2**18 + 2**10}, "scrypt N must be a power of two in 2^10..2^18"),
        ({"S_R": 7}, "scrypt R must be 8 and P 1"),
        ({"S_R": 9}, "scrypt R must be 8 and P 1"),
        ({"S_P": 2}, "scrypt R must be 8 and P 1"),
        ({"S_P": 0}, "scrypt R must be 8 and P 1"),
        ({"S_KeyLen": 31}, "scrypt KeyLen must be 32"),
        ({"S_KeyLen": 33}, "scrypt KeyLen must be 32"),
    ],
)
def test_loads_refusals_are_exact(changes: dict[str, Any], text: str) -> None:
    with pytest.raises(ConfigError, match=_exactly(_P + text)):
        ConfFile.loads(_conf(**changes))


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        ([*DEFAULT, "Frob", "Aaa"], "unknown feature flag(s) Aaa, Frob"),
        ([*DEFAULT, "DirIV"], "duplicate feature flag"),
        ([*DEFAULT, "AESSIV", "XChaCha20Poly1305"], "XChaCha20Poly1305 conflicts with AESSIV"),
        (["HKDF", "DirIV", "EMENames", "AESSIV"], "AESSIV requires GCMIV128"),
        (
            ["HKDF", "GCMIV128", "XChaCha20Poly1305"],
            "XChaCha20Poly1305 requires HKDF and excludes GCMIV128",
        ),
        (
            ["XChaCha20Poly1305", "EMENames"],
            "XChaCha20Poly1305 requires HKDF and excludes GCMIV128",
        ),
        (["HKDF", "DirIV", "EMENames"], "GCMIV128 is required (96-bit GCM IVs unsupported)"),
        (
            ["HKDF", "GCMIV128", "PlaintextNames", "EMENames"],
            "PlaintextNames conflicts with name-encryption flags",
        ),
        (
            ["HKDF", "GCMIV128", "PlaintextNames", "DirIV"],
            "PlaintextNames conflicts with name-encryption flags",
        ),
        (
            ["HKDF", "GCMIV128", "PlaintextNames", "LongNames"],
            "PlaintextNames conflicts with name-encryption flags",
        ),
        (
            ["HKDF", "GCMIV128", "PlaintextNames", "Raw64"],
            "PlaintextNames conflicts with name-encryption flags",
        ),
        (
            ["HKDF", "GCMIV128", "PlaintextNames", "LongNameMax"],
            "PlaintextNames conflicts with name-encryption flags",
        ),
        ([*DEFAULT, "LongNameMax"], "LongNameMax flag and field disagree"),
        (
            ["HKDF", "XChaCha20Poly1305", "DirIV", "EMENames"],
            "feature XChaCha20Poly1305 (XChaCha20-Poly1305 content encryption) is not supported",
        ),
        (
            ["HKDF", "GCMIV128", "PlaintextNames"],
            "feature PlaintextNames (plaintext file names) is not supported",
        ),
        ([*DEFAULT, "FIDO2"], "feature FIDO2 (FIDO2 token unlock) is not supported"),
        (
            ["HKDF", "GCMIV128", "DirIV", "LongNames", "Raw64"],
            "pre-EME (CBC) file names are not supported",
        ),
    ],
)
def test_flag_refusals_are_exact(flags: list[str], text: str) -> None:
    with pytest.raises(ConfigError, match=_exactly(_P + text)):
        ConfFile.loads(_conf(FeatureFlags=flags))


def test_fido2_flag_with_its_parameters_is_refused_as_unsupported() -> None:
    text = _P + "feature FIDO2 (FIDO2 token unlock) is not supported"
    with pytest.raises(ConfigError, match=_exactly(text)):
        ConfFile.loads(_conf(FeatureFlags=[*DEFAULT, "FIDO2"], FIDO2={"x": 1}))
    # an explicit null is no parameters at all
    assert ConfFile.loads(_conf(FIDO2=None)).unlock(PW) == MK


@pytest.mark.parametrize(
    ("lnm", "text"),
    [(61, "LongNameMax outside 62..255"), (1, "LongNameMax outside 62..255")],
)
def test_long_name_max_field_bounds(lnm: int, text: str) -> None:
    flags = ["HKDF", "GCMIV128", "DirIV", "LongNameMax", "EMENames", "LongNames", "Raw64"]
    with pytest.raises(ConfigError, match=_exactly(_P + text)):
        ConfFile.loads(_conf(FeatureFlags=flags, LongNameMax=lnm))
    for ok in (62, 255):
        assert ConfFile.loads(_conf(FeatureFlags=flags, LongNameMax=ok)).long_name_max == ok
    no_longnames = ["HKDF", "GCMIV128", "DirIV", "LongNameMax", "EMENames", "Raw64"]
    with pytest.raises(ConfigError, match=_exactly(_P + "LongNameMax requires LongNames")):
        ConfFile.loads(_conf(FeatureFlags=no_longnames, LongNameMax=100))


def test_flag_combinations_that_are_accepted() -> None:
    for flags in (
        ["HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64", "AESSIV"],
        ["HKDF", "GCMIV128", "EMENames"],
        ["GCMIV128", "EMENames"],
    ):
        ek = _EK if "HKDF" in flags else _wrap(PW, SALT, 1024, hkdf=False)
        conf = ConfFile.loads(_conf(FeatureFlags=flags, EncryptedKey=base64.b64encode(ek).decode()))
        assert conf.feature_flags == tuple(flags) and conf.unlock(PW) == MK
    assert ConfFile.loads(_conf(LongNameMax=0)).long_name_max == 255
    assert ConfFile.loads(_conf(Creator=...)).creator == ""


def test_legacy_key_blob_length_is_60() -> None:
    flags = ["GCMIV128", "DirIV", "EMENames", "LongNames"]
    with pytest.raises(ConfigError, match=_exactly(_P + "EncryptedKey must be 60 bytes")):
        ConfFile.loads(_conf(FeatureFlags=flags))


def test_salt_and_cost_edges_are_accepted() -> None:
    for size in (32, 1024):
        salt = bytes(size)
        conf = ConfFile.loads(_conf(S_Salt=base64.b64encode(salt).decode()))
        assert conf.salt == salt
    assert ConfFile.loads(_conf(S_N=2**18)).scrypt_n == 2**18


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"1" * 5000, "not valid JSON"),
        (b'{"Version": 2, "Version": 2}', "duplicate JSON key"),
        (b"[]", "top level is not a JSON object"),
        (b"null", "top level is not a JSON object"),
    ],
)
def test_json_refusals_are_exact(data: bytes, text: str) -> None:
    if len(data) > MAX_CONF_BYTES:
        data = data[:MAX_CONF_BYTES]
    with pytest.raises(ConfigError, match=_exactly(_P + text)):
        ConfFile.loads(data)


def test_size_cap_is_exact() -> None:
    at_cap = _conf(Creator="")
    at_cap = at_cap[:-1] + b" " * (MAX_CONF_BYTES - len(at_cap)) + b"}"
    assert len(at_cap) == MAX_CONF_BYTES
    assert ConfFile.loads(at_cap).unlock(PW) == MK
    with pytest.raises(ConfigError, match=_exactly(_P + "larger than 65536 bytes")):
        ConfFile.loads(at_cap + b" ")
    assert ConfFile.loads(bytearray(_conf())).salt == SALT  # any bytes-like


# -- derived properties and serialisation ---------------------------------------------------


def test_properties_follow_the_flags() -> None:
    gcm = ConfFile.loads(_conf())
    assert gcm.content_algorithm == "AES-GCM-256" and not gcm.aessiv and gcm.use_hkdf
    siv = ConfFile.loads(_conf(FeatureFlags=[*DEFAULT, "AESSIV"]))
    assert siv.content_algorithm == "AES-SIV-512" and siv.aessiv
    assert siv.new_core(MK).algorithm == "AES-SIV-512"
    assert gcm.new_core(MK).algorithm == "AES-GCM-256"
    nt = gcm.name_transform(gcm.new_core(MK))
    assert (nt.raw64, nt.longnames, nt.longname_max, nt.deterministic) == (True, True, 255, False)
    bare = ConfFile.loads(_conf(FeatureFlags=["HKDF", "GCMIV128", "EMENames"]))
    nt = bare.name_transform(bare.new_core(MK))
    assert (nt.raw64, nt.longnames, nt.deterministic) == (False, False, True)
    assert repr(gcm) == (
        "ConfFile(flags=HKDF GCMIV128 DirIV EMENames LongNames Raw64, scrypt_n=1024, "
        "long_name_max=255, creator='gocryptfs v2.3')"
    )


def test_dumps_is_byte_exact() -> None:
    flags = ["HKDF", "GCMIV128", "DirIV", "LongNameMax", "EMENames", "LongNames", "Raw64"]
    conf = ConfFile.loads(_conf(FeatureFlags=flags, LongNameMax=100, Creator="a<>&\u2029"))
    salt = base64.b64encode(SALT).decode()
    ek = base64.b64encode(_EK).decode()
    assert conf.dumps().decode() == (
        "{\n"
        '\t"Creator": "a\\u003c\\u003e\\u0026\\u2029",\n'
        f'\t"EncryptedKey": "{ek}",\n'
        '\t"ScryptObject": {\n'
        f'\t\t"Salt": "{salt}",\n'
        '\t\t"N": 1024,\n'
        '\t\t"R": 8,\n'
        '\t\t"P": 1,\n'
        '\t\t"KeyLen": 32\n'
        "\t},\n"
        '\t"Version": 2,\n'
        '\t"FeatureFlags": [\n' + ",\n".join(f'\t\t"{f}"' for f in flags) + "\n\t],\n"
        '\t"LongNameMax": 100\n'
        "}\n"
    )
    assert b"LongNameMax" not in ConfFile.loads(_conf()).dumps()
    assert "\u00fc".encode() in ConfFile.loads(_conf(Creator="\u00fc")).dumps()


# -- key wrap -------------------------------------------------------------------------------


class _FastScrypt:
    """Stands in for cryptography's Scrypt: records the parameters, derives cheaply."""

    calls: list[tuple[int, int, int, int]] = []

    def __init__(self, *, salt: bytes, length: int, n: int, r: int, p: int) -> None:
        self.salt, self.length = salt, length
        _FastScrypt.calls.append((n, r, p, length))

    def derive(self, password: bytes) -> bytes:
        return hkdf_sha256(password + self.salt, b"fast scrypt")[: self.length]


@pytest.fixture
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    _FastScrypt.calls = []
    monkeypatch.setattr(configfile, "Scrypt", _FastScrypt)
    return _FastScrypt.calls


def test_create_defaults_and_flag_order(fast_scrypt: list[tuple[int, int, int, int]]) -> None:
    conf, mk = ConfFile.create(PW)
    assert len(mk) == 32 and conf.scrypt_n == 2**16 and conf.creator == "coco-csi fuse-crypt"
    assert fast_scrypt == [(2**16, 8, 1, 32)]
    assert conf.feature_flags == tuple(DEFAULT) and conf.long_name_max == 255
    assert len(conf.salt) == 32 and len(conf.encrypted_key) == 64
    assert conf.unlock(PW) == mk
    full, _ = ConfFile.create(
        PW, scrypt_logn=18, deterministic_names=True, aessiv=True, long_name_max=62
    )
    assert full.feature_flags == (
        "HKDF",
        "GCMIV128",
        "LongNameMax",
        "EMENames",
        "LongNames",
        "Raw64",
        "AESSIV",
    )
    assert full.scrypt_n == 2**18 and full.long_name_max == 62
    assert ConfFile.create(PW, scrypt_logn=10, long_name_max=255)[0].feature_flags == tuple(DEFAULT)
    assert ConfFile.create(PW, master_key=bytearray(MK))[1] == MK  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"master_key": bytes(31)}, "master key must be 32 bytes"),
        ({"master_key": bytes(33)}, "master key must be 32 bytes"),
        ({"long_name_max": 61}, "long_name_max must be within 62..255"),
        ({"long_name_max": 256}, "long_name_max must be within 62..255"),
        ({"scrypt_logn": 9}, "scrypt logN must be within 10..18"),
        ({"scrypt_logn": 19}, "scrypt logN must be within 10..18"),
    ],
)
def test_create_refusals_are_exact(
    fast_scrypt: list[tuple[int, int, int, int]], kwargs: dict[str, Any], text: str
) -> None:
    with pytest.raises(BadInputError, match=_exactly(text)):
        ConfFile.create(PW, **kwargs)
    assert fast_scrypt == []


@pytest.mark.parametrize(
    ("password", "exc", "text"),
    [
        (b"", BadInputError, "password must not be empty"),
        (b"x" * 2049, BadInputError, "password longer than 2048 bytes"),
        ("text", TypeError, "password must be bytes"),
    ],
)
def test_password_refusals_are_exact(
    fast_scrypt: list[tuple[int, int, int, int]],
    password: Any,
    exc: type[Exception],
    text: str,
) -> None:
    conf = ConfFile.loads(_conf())
    with pytest.raises(exc, match=_exactly(text)):
        conf.unlock(password)
    with pytest.raises(exc, match=_exactly(text)):
        conf.rewrap(MK, password)
    assert fast_scrypt == []


def test_password_edges(fast_scrypt: list[tuple[int, int, int, int]]) -> None:
    conf, mk = ConfFile.create(b"x" * 2048, scrypt_logn=10)
    assert conf.unlock(bytearray(b"x" * 2048)) == mk  # type: ignore[arg-type]
    assert conf.rewrap(mk, b"y").unlock(b"y") == mk


def test_rewrap_keeps_everything_but_the_wrap(fast_scrypt: list[tuple[int, int, int, int]]) -> None:
    conf = ConfFile.loads(_conf(FeatureFlags=[*DEFAULT, "AESSIV"], Creator="me"))
    new = conf.rewrap(MK, b"new")
    assert fast_scrypt == [(1024, 8, 1, 32)]
    assert (new.feature_flags, new.creator, new.long_name_max) == (
        conf.feature_flags,
        "me",
        255,
    )
    assert (new.scrypt_n, new.scrypt_r, new.scrypt_p, new.key_len, new.version) == (
        1024,
        8,
        1,
        32,
        2,
    )
    assert len(new.salt) == 32 and new.salt != conf.salt and len(new.encrypted_key) == 64
    assert new.unlock(b"new") == MK
    assert conf.rewrap(MK, b"new", scrypt_logn=18).scrypt_n == 2**18
    assert conf.rewrap(MK, b"new", scrypt_logn=10).scrypt_n == 2**10
    for bad in (bytes(31), bytes(33)):
        with pytest.raises(BadInputError, match=_exactly("master key must be 32 bytes")):
            conf.rewrap(bad, b"new")


def test_rewrap_of_a_legacy_conf_keeps_the_12_byte_nonce(
    fast_scrypt: list[tuple[int, int, int, int]],
) -> None:
    flags = ["GCMIV128", "DirIV", "EMENames", "LongNames"]
    legacy = ConfFile(feature_flags=tuple(flags), scrypt_n=1024, long_name_max=255, creator="")
    new = legacy.rewrap(MK, PW)
    assert len(new.encrypted_key) == 60 and new.unlock(PW) == MK
    assert ConfFile.loads(new.dumps()).unlock(PW) == MK


def test_unlock_refusals_are_exact() -> None:
    conf = ConfFile.loads(_conf())
    with pytest.raises(WrongKeyError, match=_exactly("password incorrect")):
        conf.unlock(b"wrong")
    kek = hkdf_sha256(Scrypt(salt=SALT, length=32, n=1024, r=8, p=1).derive(PW), INFO_GCM)
    short = NONCE + AESGCM(kek).encrypt(NONCE, bytes(16), bytes(8))
    odd = ConfFile(
        feature_flags=tuple(DEFAULT),
        scrypt_n=1024,
        long_name_max=255,
        creator="",
        encrypted_key=short,
        salt=SALT,
    )
    with pytest.raises(ConfigError, match=_exactly(_P + "wrapped master key has wrong length")):
        odd.unlock(PW)


def test_scrypt_out_of_memory_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class _NoMemory(_FastScrypt):
        def derive(self, password: bytes) -> bytes:
            raise MemoryError

    monkeypatch.setattr(configfile, "Scrypt", _NoMemory)
    text = _P + "scrypt N=1024 R=8 needs more memory than is available"
    with pytest.raises(ConfigError, match=_exactly(text)):
        ConfFile.loads(_conf()).unlock(PW)


def test_scrypt_params_are_checked_before_scrypt_runs(
    fast_scrypt: list[tuple[int, int, int, int]],
) -> None:
    conf = ConfFile(feature_flags=tuple(DEFAULT), scrypt_n=2**20, long_name_max=255, creator="")
    with pytest.raises(
        ConfigError, match=_exactly(_P + "scrypt N must be a power of two in 2^10..2^18")
    ):
        conf.unlock(PW)
    odd = ConfFile(
        feature_flags=tuple(DEFAULT), scrypt_n=1024, long_name_max=255, creator="", key_len=64
    )
    with pytest.raises(ConfigError, match=_exactly(_P + "scrypt KeyLen must be 32")):
        odd.unlock(PW)
    assert fast_scrypt == []


# -- files ----------------------------------------------------------------------------------


def test_read_bytes_refusals_are_exact(tmp_path: Path) -> None:
    conf = tmp_path / "gocryptfs.conf"
    os.mkfifo(conf)
    with pytest.raises(
        ConfigError, match=_exactly(f"config file {conf} is not a regular file (FIFO)")
    ):
        ConfFile.read(str(conf))
    conf.unlink()
    conf.mkdir()
    with pytest.raises(
        ConfigError, match=_exactly(f"config file {conf} is not a regular file (directory)")
    ):
        ConfFile.read(str(conf))
    conf.rmdir()
    conf.write_bytes(b" " * (MAX_CONF_BYTES + 1))
    with pytest.raises(
        ConfigError,
        match=_exactly(f"config file {conf} is too large (65537 bytes, limit 65536)"),
    ):
        ConfFile.read(str(conf))
    conf.unlink()
    conf.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match=_exactly(f"config file {conf} is a symbolic link")):
        ConfFile.read(str(conf))
    conf.unlink()
    conf.write_bytes(_conf())
    below = conf / "x"
    with pytest.raises(
        ConfigError, match=_exactly(f"cannot read config file {below}: Not a directory")
    ):
        ConfFile.read(str(below))
    with pytest.raises(FileNotFoundError):
        ConfFile.read(str(tmp_path / "missing"))
    assert ConfFile.read(str(conf)).unlock(PW) == MK
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert ConfFile.read("gocryptfs.conf", dir_fd=fd).salt == SALT
        assert ConfFile.read_bytes("gocryptfs.conf", dir_fd=fd) == _conf()
    finally:
        os.close(fd)


def test_write_replaces_atomically_and_cleans_up(tmp_path: Path) -> None:
    conf = ConfFile.loads(_conf())
    path = tmp_path / "gocryptfs.conf"
    conf.write(str(path))
    assert path.read_bytes() == conf.dumps()
    assert sorted(os.listdir(tmp_path)) == ["gocryptfs.conf"]
    # a failing rename leaves no temporary file behind
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_bytes(b"")
    with pytest.raises(OSError):
        conf.write(str(tmp_path / "dir"))
    assert sorted(os.listdir(tmp_path)) == ["dir", "gocryptfs.conf"]
    # a write that fails before its temporary file exists raises that failure
    with pytest.raises(FileNotFoundError):
        conf.write(str(tmp_path / "missing" / "gocryptfs.conf"))


# -- passfiles and master-key text ----------------------------------------------------------


def test_read_passfile_refusals_are_exact(tmp_path: Path) -> None:
    pf = tmp_path / "pf"
    with pytest.raises(
        BadInputError,
        match=_exactly(f"cannot read password file {pf}: No such file or directory"),
    ):
        read_passfile(str(pf))
    for data in (b"", b"\n", b"\nsecond"):
        pf.write_bytes(data)
        with pytest.raises(
            BadInputError, match=_exactly(f"password file {pf}: first line is empty")
        ):
            read_passfile(str(pf))
    for data in (b"x" * 2049, b"x" * 2049 + b"\n", b"x" * 5000):
        pf.write_bytes(data)
        with pytest.raises(
            BadInputError,
            match=_exactly(f"password file {pf}: password longer than 2048 bytes"),
        ):
            read_passfile(str(pf))
    pf.write_bytes(b"x" * 2048 + b"\n" + b"y" * 5000)
    assert read_passfile(str(pf)) == b"x" * 2048
    pf.write_bytes(b"a\r\nb")
    assert read_passfile(str(pf)) == b"a\r"


def test_read_passfile_reads_a_bounded_amount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge (or endless) password file is never read whole."""
    pf = tmp_path / "pf"
    pf.write_bytes(b"x" * 10_000)
    sizes: list[object] = []
    real_open = open

    class _Recorder:
        def __init__(self, path: str, mode: str) -> None:
            self.f = real_open(path, mode)

        def __enter__(self) -> _Recorder:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, size: int | None = None) -> bytes:
            sizes.append(size)
            return self.f.read(size)

    monkeypatch.setattr(configfile, "open", _Recorder, raising=False)
    with pytest.raises(BadInputError):
        read_passfile(str(pf))
    assert len(sizes) == 1 and isinstance(sizes[0], int) and 2049 <= sizes[0] <= 4096


def test_master_key_text_refusals_are_exact() -> None:
    for bad in ("", "g" * 64, "0" * 63, "0" * 65, "0" * 32 + " " + "0" * 32):
        with pytest.raises(
            BadInputError, match=_exactly("master key must be 64 hex digits (dashes allowed)")
        ):
            parse_master_key(bad)
    for bad_key in (bytes(31), bytes(33)):
        with pytest.raises(BadInputError, match=_exactly("master key must be 32 bytes")):
            format_master_key(bad_key)
    assert parse_master_key("-" + "ab" * 32 + "-\t") == bytes([0xAB]) * 32
    assert format_master_key(MK) == "-".join(MK.hex()[i : i + 8] for i in range(0, 64, 8))
