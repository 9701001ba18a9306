"""NameTransform: names, long names, dir IVs, symlinks and xattrs."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.errors import CorruptDataError, InvalidNameError, NameTooLongError
from fuse_crypt.nametransform import (
    DIRIV_LEN,
    DIRIV_NAME,
    LONGNAME_PREFIX,
    NameTransform,
    pad16,
    unpad16,
)

CORE = CryptoCore(bytes(range(32)))
IV = bytes.fromhex("fa89634babeeacec772ad12994f0455e")


@pytest.fixture
def nt() -> NameTransform:
    return NameTransform(CORE)


def _valid_name(s: str) -> bool:
    raw = s.encode("utf-8", "surrogateescape")
    return s not in ("", ".", "..") and "/" not in s and "\0" not in s and len(raw) <= 255


names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=120
).filter(_valid_name)


def test_pad16() -> None:
    assert pad16(b"") == b"\x10" * 16
    assert pad16(b"a" * 15) == b"a" * 15 + b"\x01"
    assert pad16(b"a" * 16) == b"a" * 16 + b"\x10" * 16
    assert unpad16(pad16(b"abc")) == b"abc"
    for bad in (b"", b"a" * 15, b"a" * 15 + b"\x00", b"a" * 15 + b"\x11", b"a" * 14 + b"\x01\x02"):
        with pytest.raises(InvalidNameError):
            unpad16(bad)
    with pytest.raises(InvalidNameError):
        unpad16(b"\x10" * 16)  # pad must be shorter than the whole block string


@settings(max_examples=100, deadline=None)
@given(name=names, iv=st.binary(min_size=16, max_size=16))
def test_name_round_trip(name: str, iv: bytes) -> None:
    nt = NameTransform(CORE)
    c = nt.encrypt_name(name, iv)
    assert "=" not in c and "/" not in c and "+" not in c and "." not in c
    assert nt.decrypt_name(c, iv) == name


def test_names_depend_on_dir_iv(nt: NameTransform) -> None:
    # A fixed other IV, not a random one: names are not authenticated, so under a random
    # wrong IV about one in 300 garbled names still passes the padding check and decrypts.
    other_iv = bytes(range(16))
    a = nt.encrypt_name("same", IV)
    b = nt.encrypt_name("same", other_iv)
    assert a != b
    with pytest.raises(InvalidNameError):
        nt.decrypt_name(a, other_iv)  # wrong IV garbles the padding


def test_non_utf8_names_round_trip(nt: NameTransform) -> None:
    name = os.fsdecode(b"caf\xe9-latin1")
    assert nt.decrypt_name(nt.encrypt_name(name, IV), IV) == name


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\0b"])
def test_invalid_plain_names(nt: NameTransform, bad: str) -> None:
    with pytest.raises(InvalidNameError):
        nt.encrypt_name(bad, IV)


def test_name_too_long(nt: NameTransform) -> None:
    nt.encrypt_name("x" * 255, IV)
    with pytest.raises(NameTooLongError):
        nt.encrypt_name("x" * 256, IV)
    with pytest.raises(NameTooLongError):
        nt.encrypt_name("\u00fc" * 128, IV)  # 256 bytes


def test_undecryptable_names(nt: NameTransform) -> None:
    good = nt.encrypt_name("hello.txt", IV)
    bad_names = [
        "",
        "a",
        good + "A",
        good[:-1],
        good + "==",
        "/" + good[1:],
        "+" + good[1:],
        good + "\n",
        "gocryptfs.diriv",
        base64.urlsafe_b64encode(bytes(15)).decode().rstrip("="),
        "\u00fc" * 22,
    ]
    # non-canonical encoding: last char with non-zero trailing bits
    last = good[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bad_names.append(good[:-1] + alphabet[alphabet.index(last) ^ 1])
    for bad in bad_names:
        with pytest.raises(InvalidNameError):
            nt.decrypt_name(bad, IV)


def test_decrypted_name_must_be_valid(nt: NameTransform) -> None:
    for plain in (b"a/b", b"..", b"x\0"):
        c = nt.b64encode(CORE.eme_encrypt(IV, pad16(plain)))
        with pytest.raises(InvalidNameError):
            nt.decrypt_name(c, IV)


def test_long_names(nt: NameTransform) -> None:
    short = "s" * 175
    long = "l" * 176
    assert len(nt.encrypt_name(short, IV)) == 235 and not nt.is_long(nt.encrypt_name(short, IV))
    cname = nt.encrypt_name(long, IV)
    assert nt.is_long(cname)
    disk, stored = nt.disk_name(long, IV)
    assert stored == cname
    digest = base64.urlsafe_b64encode(hashlib.sha256(cname.encode()).digest()).decode()
    assert disk == LONGNAME_PREFIX + digest.rstrip("=") == nt.long_name_file(cname)
    assert len(disk) == len(LONGNAME_PREFIX) + 43
    assert nt.is_long_name_file(disk)
    assert not nt.is_long_name_file(disk + ".name")
    assert nt.long_name_companion(disk) == disk + ".name"
    assert nt.read_long_name(disk, cname.encode()) == cname
    assert nt.decrypt_name(nt.read_long_name(disk, cname.encode()), IV) == long
    with pytest.raises(InvalidNameError):
        nt.read_long_name(disk, cname.encode()[:-1])
    with pytest.raises(InvalidNameError):
        nt.read_long_name(disk, b"\xff" * 10)
    assert len(nt.encrypt_name("x" * 200, IV).encode()) == 278  # the .name file size
    assert nt.disk_name("short", IV) == (nt.encrypt_name("short", IV), None)


def test_longname_max_and_disabled() -> None:
    nt100 = NameTransform(CORE, longname_max=100)
    c = nt100.encrypt_name("y" * 60, IV)  # 64 bytes -> 86 chars
    assert not nt100.is_long(c)
    assert nt100.is_long(nt100.encrypt_name("y" * 80, IV))  # 96 -> 128 chars
    off = NameTransform(CORE, longnames=False)
    assert not off.is_long(off.encrypt_name("z" * 250, IV))
    with pytest.raises(ValueError):
        NameTransform(CORE, longname_max=61)


def test_padded_base64_variant() -> None:
    nt = NameTransform(CORE, raw64=False)
    c = nt.encrypt_name("hello.txt", IV)
    assert c.endswith("==")
    assert nt.decrypt_name(c, IV) == "hello.txt"
    with pytest.raises(InvalidNameError):
        nt.decrypt_name(c.rstrip("="), IV)
    raw = NameTransform(CORE)
    assert raw.encrypt_name("hello.txt", IV) == c.rstrip("=")
    assert len(nt.long_name_file(c)) == len(LONGNAME_PREFIX) + 44


def test_deterministic_names_ignore_dir_iv() -> None:
    nt = NameTransform(CORE, deterministic=True)
    a = nt.encrypt_name("same", IV)
    assert a == nt.encrypt_name("same", os.urandom(16))
    assert a == NameTransform(CORE).encrypt_name("same", bytes(16))
    assert nt.decrypt_name(a, b"") == "same"


def test_reserved_names() -> None:
    for name in (
        "gocryptfs.conf",
        "gocryptfs.conf.tmp",
        DIRIV_NAME,
        "gocryptfs.diriv.rmdir.12345",
        LONGNAME_PREFIX + "abc.name",
    ):
        assert NameTransform.is_reserved(name), name
    for name in (LONGNAME_PREFIX + "abc", "AP1Oy10c8gB_Lc7zMynUBg"):
        assert not NameTransform.is_reserved(name), name


def test_dir_iv() -> None:
    iv = NameTransform.new_dir_iv()
    assert len(iv) == DIRIV_LEN and iv != NameTransform.new_dir_iv()
    assert NameTransform.check_dir_iv(iv) == iv
    for bad in (b"", iv[:15], iv + b"x", bytes(16)):
        with pytest.raises(CorruptDataError):
            NameTransform.check_dir_iv(bad)


@settings(max_examples=50, deadline=None)
@given(target=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=400))
def test_symlink_round_trip(target: str) -> None:
    nt = NameTransform(CORE)
    stored = nt.encrypt_symlink(target)
    if target == "":
        assert stored == ""
    else:
        assert len(nt.b64decode(stored)) == 32 + len(target.encode())
    assert nt.decrypt_symlink(stored) == target


def test_symlink_tamper(nt: NameTransform) -> None:
    stored = nt.encrypt_symlink("/some/target")
    assert nt.encrypt_symlink("/some/target") != stored
    raw = bytearray(nt.b64decode(stored))
    for pos in (0, 16, len(raw) - 1):
        bad = bytearray(raw)
        bad[pos] ^= 1
        with pytest.raises(CorruptDataError):
            nt.decrypt_symlink(nt.b64encode(bytes(bad)))
    with pytest.raises(CorruptDataError):
        nt.decrypt_symlink("not base64!")
    with pytest.raises(CorruptDataError):
        nt.decrypt_symlink(nt.b64encode(bytes(raw[:20])))


@settings(max_examples=50, deadline=None)
@given(name=st.text(min_size=1, max_size=100).filter(lambda s: "\0" not in s))
def test_xattr_name_round_trip(name: str) -> None:
    nt = NameTransform(CORE)
    stored = nt.encrypt_xattr_name(name)
    assert stored.startswith("user.gocryptfs.")
    assert nt.decrypt_xattr_name(stored) == name


def test_xattr_names(nt: NameTransform) -> None:
    stored = nt.encrypt_xattr_name("user.x")
    # fixed IV: deterministic, independent of any directory
    assert stored == nt.encrypt_xattr_name("user.x")
    assert stored == "user.gocryptfs." + nt.b64encode(
        CORE.eme_encrypt(b"xattr_name_iv_xx", pad16(b"user.x"))
    )
    for bad in ("", "a\0b"):
        with pytest.raises(InvalidNameError):
            nt.encrypt_xattr_name(bad)
    for bad in ("user.x", "user.gocryptfs.", "user.gocryptfs.!!!", "security.selinux"):
        with pytest.raises(InvalidNameError):
            nt.decrypt_xattr_name(bad)


@settings(max_examples=50, deadline=None)
@given(value=st.binary(max_size=2000))
def test_xattr_value_round_trip(value: bytes) -> None:
    nt = NameTransform(CORE)
    stored = nt.encrypt_xattr_value(value)
    assert len(stored) == (0 if not value else len(value) + 32)
    assert nt.decrypt_xattr_value(stored) == value


def test_xattr_value_tamper(nt: NameTransform) -> None:
    stored = nt.encrypt_xattr_value(b"secret xattr")
    assert len(stored) == 44
    for pos in range(len(stored)):
        bad = bytearray(stored)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptDataError):
            nt.decrypt_xattr_value(bytes(bad))
    with pytest.raises(CorruptDataError):
        nt.decrypt_xattr_value(stored[:31])


def test_repr_has_no_secrets(nt: NameTransform) -> None:
    assert "raw64=True" in repr(nt)
    assert bytes(range(32)).hex() not in repr(nt)


def test_unencodable_strings_are_typed_errors(nt: NameTransform) -> None:
    lone = "\ud800"  # not a surrogateescape byte, cannot reach the disk
    with pytest.raises(InvalidNameError):
        nt.encrypt_name(lone, IV)
    with pytest.raises(InvalidNameError):
        nt.encrypt_symlink(lone)
    with pytest.raises(InvalidNameError):
        nt.encrypt_xattr_name(lone)
    with pytest.raises(NameTooLongError):
        nt.encrypt_xattr_name("x" * 3000)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=400))
def test_garbage_names_only_raise_typed_errors(text: str) -> None:
    """Whatever the (untrusted) storage lists, decryption fails only with our errors."""
    nt = NameTransform(CORE)
    for fn in (
        lambda: nt.decrypt_name(text, IV),
        lambda: nt.decrypt_xattr_name("user.gocryptfs." + text),
        lambda: nt.read_long_name("gocryptfs.longname.x", text.encode("utf-8", "replace")),
    ):
        with contextlib.suppress(InvalidNameError):
            fn()
    with contextlib.suppress(CorruptDataError):
        nt.decrypt_symlink(text)


@settings(max_examples=100, deadline=None)
@given(raw=st.integers(1, 16).flatmap(lambda m: st.binary(min_size=16 * m, max_size=16 * m)))
def test_random_ciphertext_names_only_raise_invalid_name(raw: bytes) -> None:
    nt = NameTransform(CORE)
    try:
        name = nt.decrypt_name(nt.b64encode(raw), IV)
    except InvalidNameError:
        return
    assert nt.encrypt_name(name, IV) == nt.b64encode(raw)  # decrypts only to valid names
