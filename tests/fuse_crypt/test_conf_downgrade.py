"""Hostile confs: downgraded and unknown flags, odd JSON, non-canonical base64 (issue 7,
"Beyond the findings"), plus fuzzing of every parser of host-controlled small files.

gocryptfs does not authenticate the conf's feature flags: only the master key is wrapped
(AES-GCM with 8 zero bytes of AAD). A host can therefore edit the flags and the password
still unlocks. What we refuse, and why, is in docs/fuse_crypt.md ("What a hostile conf can
and cannot do"); these tests pin it down. Every refusal is a ConfigError (exit 23 from the
CLI) and leaves the conf byte-for-byte unchanged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.configfile import DEFAULT_FLAGS, KNOWN_FLAGS, MAX_CONF_BYTES, ConfFile
from fuse_crypt.contentenc import HEADER_LEN, ContentEnc
from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.errors import ConfigError, FuseCryptError
from fuse_crypt.nametransform import CONF_NAME, DIRIV_NAME, LONGNAME_PREFIX, NameTransform
from tests.fuse_env import needs_fuse
from tests.fuzzing import fuzz, long_fuzz

from .cli_helpers import assert_one_line_error, fc, force_unmount, init_volume, write_passfile
from .conftest import make_volume, start_mount

PW = b"downgrade password"
_BASE = ConfFile.create(PW, scrypt_logn=10, master_key=bytes(range(32)))[0]
_BASE_JSON = _BASE.dumps().decode()


def _obj() -> dict[str, object]:
    return json.loads(_BASE_JSON)


def _without(flag: str) -> list[str]:
    return [f for f in DEFAULT_FLAGS if f != flag]


def _noncanonical(b64: str) -> str:
    """Same bytes, other spelling: set the unused low bits of the last sextet."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stripped = b64.rstrip("=")
    last = alphabet.index(stripped[-1])
    pad = len(b64) - len(stripped)
    spare_bits = {1: 2, 2: 4}[pad]
    assert last & ((1 << spare_bits) - 1) == 0
    return stripped[:-1] + alphabet[last | 1] + "=" * pad


HOSTILE: list[tuple[str, object, str]] = [
    # (description, edit, expected message fragment)
    ("no GCMIV128 (96-bit IVs)", {"FeatureFlags": _without("GCMIV128")}, "GCMIV128"),
    ("no EMENames (CBC names)", {"FeatureFlags": _without("EMENames")}, "CBC"),
    ("no HKDF, 64-byte key", {"FeatureFlags": _without("HKDF")}, "EncryptedKey must be 60"),
    ("PlaintextNames added", {"FeatureFlags": ["HKDF", "GCMIV128", "PlaintextNames"]}, "Plain"),
    ("PlaintextNames + names", {"FeatureFlags": [*DEFAULT_FLAGS, "PlaintextNames"]}, "Plain"),
    ("XChaCha20Poly1305", {"FeatureFlags": [*_without("GCMIV128"), "XChaCha20Poly1305"]}, "XCha"),
    ("FIDO2", {"FeatureFlags": [*DEFAULT_FLAGS, "FIDO2"]}, "FIDO2"),
    ("unknown flag", {"FeatureFlags": [*DEFAULT_FLAGS, "Frobnicate"]}, "unknown feature"),
    ("lower-case flag", {"FeatureFlags": [*_without("HKDF"), "hkdf"]}, "unknown feature"),
    ("duplicate flag", {"FeatureFlags": [*DEFAULT_FLAGS, "DirIV"]}, "duplicate feature"),
    ("flags not a list", {"FeatureFlags": "HKDF"}, "FeatureFlags"),
    ("flag not a string", {"FeatureFlags": [*DEFAULT_FLAGS, 1]}, "FeatureFlags"),
    ("Version 1", {"Version": 1}, "version 1"),
    ("Version 3", {"Version": 3}, "version 3"),
    ("Version 2.0", {"Version": 2.0}, "Version"),
    ("Version true", {"Version": True}, "Version"),
    ("LongNameMax negative", {"LongNameMax": -1}, "LongNameMax"),
    ("LongNameMax huge", {"LongNameMax": 2**64}, "LongNameMax"),
    ("LongNameMax without flag", {"LongNameMax": 100}, "LongNameMax"),
    (
        "LongNameMax too small",
        {"FeatureFlags": [*DEFAULT_FLAGS, "LongNameMax"], "LongNameMax": 20},
        "62",
    ),
    ("scrypt N huge", {"ScryptObject.N": 2**28}, "scrypt N"),
    ("scrypt R", {"ScryptObject.R": 9}, "R must be 8"),
    ("scrypt P", {"ScryptObject.P": 2}, "P 1"),
    ("scrypt KeyLen", {"ScryptObject.KeyLen": 64}, "KeyLen"),
    ("salt huge", {"ScryptObject.Salt": base64.b64encode(bytes(4096)).decode()}, "salt"),
    (
        "EncryptedKey non-canonical",
        {"EncryptedKey": _noncanonical(json.loads(_BASE_JSON)["EncryptedKey"])},
        "canonical",
    ),
    (
        "Salt non-canonical",
        {"ScryptObject.Salt": _noncanonical(json.loads(_BASE_JSON)["ScryptObject"]["Salt"])},
        "canonical",
    ),
    ("EncryptedKey URL-safe", {"EncryptedKey": "-_" * 43}, "base64"),
    (
        "EncryptedKey unpadded",
        {"EncryptedKey": json.loads(_BASE_JSON)["EncryptedKey"].rstrip("=")},
        "base64",
    ),
]


def _edited(edit: dict[str, object]) -> bytes:
    obj = _obj()
    for key, value in edit.items():
        if key.startswith("ScryptObject."):
            obj["ScryptObject"][key.split(".", 1)[1]] = value  # type: ignore[index]
        else:
            obj[key] = value
    return json.dumps(obj).encode()


RAW_HOSTILE: list[tuple[str, bytes, str]] = [
    (
        "duplicate JSON key",
        _BASE_JSON.replace('"Version": 2', '"Version": 2, "Version": 2').encode(),
        "duplicate JSON key",
    ),
    (
        "duplicate flags key",
        _BASE_JSON.replace('"Version": 2', '"FeatureFlags": ["HKDF"], "Version": 2').encode(),
        "duplicate JSON key",
    ),
    ("deep nesting", b'{"Creator": ' + b"[" * 30000 + b"]" * 30000 + b"}", "JSON"),
    ("huge JSON", b'{"Creator": "' + b"x" * MAX_CONF_BYTES + b'"}', "larger than"),
    ("huge number", b'{"Version": ' + b"9" * 20000 + b"}", "JSON"),
    ("NaN", _BASE_JSON.replace('"Version": 2', '"Version": NaN').encode(), "not valid JSON"),
    ("not UTF-8", b'{"Creator": "\xff"}', "JSON"),
    ("BOM", b"\xef\xbb\xbf" + _BASE_JSON.encode(), "JSON"),
]


@pytest.mark.parametrize(("what", "edit", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_conf_is_refused(what: str, edit: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ConfFile.loads(_edited(edit))


@pytest.mark.parametrize(("what", "data", "needle"), RAW_HOSTILE, ids=[h[0] for h in RAW_HOSTILE])
def test_hostile_conf_bytes_are_refused(what: str, data: bytes, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ConfFile.loads(data)


def test_supported_variants_still_load() -> None:
    """Downgrade refusal must not cost compatibility with what gocryptfs writes."""
    for kwargs in ({}, {"aessiv": True}, {"deterministic_names": True}, {"long_name_max": 62}):
        conf, mk = ConfFile.create(PW, scrypt_logn=10, **kwargs)
        assert ConfFile.loads(conf.dumps()).unlock(PW) == mk
    # pre-v1.3 volumes (no HKDF, 60-byte EncryptedKey) load; see test_gocryptfs_vectors
    obj = _obj()
    obj["FeatureFlags"] = _without("HKDF")
    obj["EncryptedKey"] = base64.b64encode(bytes(60)).decode()
    assert not ConfFile.loads(json.dumps(obj).encode()).use_hkdf


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("command", ["info", "mount", "passwd"])
@pytest.mark.parametrize(
    "case",
    [
        h
        for h in HOSTILE
        if h[0] in {"no GCMIV128 (96-bit IVs)", "PlaintextNames added", "unknown flag", "scrypt R"}
    ]
    + [RAW_HOSTILE[0]],
    ids=lambda h: h[0],
)
def test_cli_refuses_and_never_rewrites(tmp_path: Path, command: str, case: tuple) -> None:
    passfile = write_passfile(tmp_path / "pw", "cli downgrade password")
    cipher = init_volume(tmp_path / "c", passfile)
    conf = cipher / CONF_NAME
    obj = json.loads(conf.read_bytes())
    what, edit, _ = case
    if isinstance(edit, bytes):  # the raw case: a duplicate key in this volume's conf
        data = json.dumps(obj).replace('"Version": 2', '"Version": 2, "Version": 2').encode()
    else:
        for key, value in edit.items():
            if key.startswith("ScryptObject."):
                obj["ScryptObject"][key.split(".", 1)[1]] = value
            else:
                obj[key] = value
        data = json.dumps(obj).encode()
    os.chmod(conf, 0o600)
    conf.write_bytes(data)
    before = hashlib.sha256(conf.read_bytes()).hexdigest()
    mnt = tmp_path / "m"
    mnt.mkdir()
    args = {
        "info": ["info", cipher],
        "mount": ["mount", "--passfile", passfile, cipher, mnt],
        "passwd": ["passwd", "--passfile", passfile, "--new-passfile", passfile, cipher],
    }[command]
    assert_one_line_error(fc(*args), 23)
    assert hashlib.sha256(conf.read_bytes()).hexdigest() == before
    assert sorted(os.listdir(cipher)) == [CONF_NAME, DIRIV_NAME]


@needs_fuse
def test_dropping_diriv_flag_is_detected(tmp_path: Path) -> None:
    """The one flag downgrade the password does not catch and that weakens what we write:
    without DirIV every new name would be encrypted deterministically. A DirIV volume
    always has a root gocryptfs.diriv; a conf without the flag over such a directory is
    refused (mount and CLI), and the conf is left as the host edited it."""
    vol = make_volume(tmp_path / "c")
    conf = vol.cipherdir / CONF_NAME
    obj = json.loads(conf.read_bytes())
    obj["FeatureFlags"] = _without("DirIV")
    os.chmod(conf, 0o600)
    conf.write_text(json.dumps(obj))
    assert ConfFile.read(str(conf)).unlock(vol.password) == vol.master_key  # still unlocks
    before = conf.read_bytes()
    with pytest.raises(RuntimeError, match="downgraded"):
        start_mount(vol, tmp_path / "m").unmount()  # (unmount only if it wrongly mounted)
    passfile = write_passfile(tmp_path / "pw", vol.password.decode())
    (tmp_path / "m2").mkdir()
    try:
        line = assert_one_line_error(
            fc("mount", "--passfile", passfile, vol.cipherdir, tmp_path / "m2"), 23
        )
    finally:
        force_unmount(tmp_path / "m2")
    assert "downgraded" in line
    assert conf.read_bytes() == before


# --------------------------------------------------------------------------- fuzzing

_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
)
_json = st.recursive(
    _json_leaf,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)
_flag = st.sampled_from(sorted(KNOWN_FLAGS)) | st.text(max_size=12)
_ZERO_CORE = CryptoCore(bytes(range(32)))


def _check_loaded(conf: ConfFile) -> None:
    """What the mount path does with an accepted conf must not crash either."""
    core = conf.new_core(bytes(range(32)))
    try:
        nt = conf.name_transform(core)
        nt.encrypt_name("x", bytes(range(1, 17)))
        assert conf.scrypt_n <= 2**18 and conf.scrypt_r == 8 and conf.scrypt_p == 1
        ConfFile.loads(conf.dumps())  # what we would write back, we read back
    finally:
        core.wipe()


@long_fuzz
@fuzz(quick=200)
@given(
    flags=st.lists(_flag, max_size=9),
    edits=st.dictionaries(
        st.sampled_from(
            ["Creator", "EncryptedKey", "Version", "LongNameMax", "FIDO2", "ScryptObject.N"]
            + ["ScryptObject.R", "ScryptObject.P", "ScryptObject.KeyLen", "ScryptObject.Salt"]
        ),
        _json,
        max_size=3,
    ),
    lnm=st.integers(-5, 300) | st.none(),
)
def test_fuzz_conf_fields(flags: list[str], edits: dict[str, object], lnm: int | None) -> None:
    obj = _obj()
    obj["FeatureFlags"] = flags
    if lnm is not None:
        obj["LongNameMax"] = lnm
    for key, value in edits.items():
        if key.startswith("ScryptObject."):
            obj["ScryptObject"][key.split(".", 1)[1]] = value  # type: ignore[index]
        else:
            obj[key] = value
    try:
        conf = ConfFile.loads(json.dumps(obj).encode())
    except ConfigError:
        return
    _check_loaded(conf)


@long_fuzz
@fuzz(quick=200)
@given(data=st.binary(max_size=600), cut=st.integers(0, len(_BASE_JSON)))
def test_fuzz_conf_bytes(data: bytes, cut: int) -> None:
    """Random bytes, and the real conf with random bytes spliced in."""
    for blob in (data, _BASE_JSON.encode()[:cut] + data + _BASE_JSON.encode()[cut:]):
        try:
            conf = ConfFile.loads(blob)
        except ConfigError:
            continue
        _check_loaded(conf)


_NT_VARIANTS = [
    NameTransform(_ZERO_CORE),
    NameTransform(_ZERO_CORE, raw64=False),
    NameTransform(_ZERO_CORE, longname_max=62),
    NameTransform(_ZERO_CORE, deterministic=True),
]


@long_fuzz
@fuzz(quick=200)
@given(
    variant=st.integers(0, len(_NT_VARIANTS) - 1),
    disk=st.text(max_size=80) | st.just(LONGNAME_PREFIX).map(lambda p: p + "A" * 43),
    content=st.binary(max_size=600),
    iv=st.binary(min_size=16, max_size=16),
)
def test_fuzz_long_name_and_name_readers(
    variant: int, disk: str, content: bytes, iv: bytes
) -> None:
    """What list_dir does with a ``.name`` file and an entry: typed errors only."""
    nt = _NT_VARIANTS[variant]
    for cname_source in ("file", "entry"):
        try:
            cname = nt.read_long_name(disk, content) if cname_source == "file" else disk
            nt.decrypt_name(cname, iv)
        except FuseCryptError:
            pass
    # a content that *matches* its hash goes on to name decryption
    try:
        text = content.decode("ascii")
    except UnicodeDecodeError:
        return
    with contextlib.suppress(FuseCryptError):
        nt.decrypt_name(nt.read_long_name(nt.long_name_file(text), content), iv)


@long_fuzz
@fuzz(quick=200)
@given(data=st.binary(max_size=80))
def test_fuzz_diriv_reader(data: bytes) -> None:
    try:
        iv = NameTransform.check_dir_iv(data)
    except FuseCryptError:
        return
    assert len(iv) == 16 and any(iv)


@long_fuzz
@fuzz(quick=200)
@given(data=st.binary(max_size=2 * HEADER_LEN))
def test_fuzz_content_header(data: bytes) -> None:
    enc = ContentEnc(_ZERO_CORE)
    try:
        fid = enc.parse_header(data)
    except FuseCryptError:
        return
    assert len(data) == HEADER_LEN and data[:2] == b"\x00\x02" and fid == data[2:] and any(fid)


@needs_fuse
def test_dropping_hkdf_is_caught_by_password_and_by_data(tmp_path: Path) -> None:
    """Removing HKDF needs a 60-byte EncryptedKey the host cannot forge: the password
    fails (12). With --masterkey (no wrap check) a volume holding data fails the
    master-key check (12), because the content keys differ."""
    from fuse_crypt.configfile import format_master_key

    passfile = write_passfile(tmp_path / "pw", "hkdf password")
    cipher = init_volume(tmp_path / "c", passfile)
    mk = ConfFile.read(str(cipher / CONF_NAME)).unlock(b"hkdf password")
    mnt = tmp_path / "m"
    mnt.mkdir()
    assert fc("mount", "--passfile", passfile, cipher, mnt).returncode == 0
    try:
        (mnt / "data").write_bytes(b"some data" * 100)
    finally:
        assert fc("unmount", mnt).returncode == 0
    conf = cipher / CONF_NAME
    obj = json.loads(conf.read_bytes())
    obj["FeatureFlags"] = _without("HKDF")
    obj["EncryptedKey"] = base64.b64encode(os.urandom(60)).decode()
    os.chmod(conf, 0o600)
    conf.write_text(json.dumps(obj))
    try:
        assert_one_line_error(fc("mount", "--passfile", passfile, cipher, mnt), 12)
        hexkey = format_master_key(mk)
        line = assert_one_line_error(fc("mount", "--masterkey", hexkey, cipher, mnt), 12)
        assert "does not decrypt" in line
    finally:
        force_unmount(mnt)
