"""Name-transform boundaries a mutation run (tools/mutation.py) showed untested.

A new file so as not to collide with the fuse_crypt hardening work in test_nametransform.py.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from fuse_crypt.cryptocore import CryptoCore
from fuse_crypt.errors import CorruptDataError, InvalidNameError, NameTooLongError
from fuse_crypt.nametransform import NameTransform, check_plain_name, pad16, unpad16

CORE = CryptoCore(bytes(range(32)))
IV = bytes.fromhex("fa89634babeeacec772ad12994f0455e")


@pytest.mark.parametrize("pad", [0, 17, 31, 255])
def test_unpad16_refuses_pad_bytes_outside_1_to_16_even_when_consistent(pad: int) -> None:
    """``pad`` copies of ``pad`` at the end, inside the buffer: only 1..16 is PKCS#7."""
    size = 256 if pad == 255 else 32
    data = b"x" * (size - max(pad, 1)) + bytes((pad,)) * max(pad, 1)
    assert len(data) == size
    with pytest.raises(InvalidNameError):
        unpad16(data)


def test_unpad16_accepts_every_legal_pad() -> None:
    for n in range(1, 40):  # an empty name is never valid, padded or not
        assert unpad16(pad16(b"n" * n)) == b"n" * n


@pytest.mark.parametrize("brk", ["\n", "\r"])
def test_a_line_break_anywhere_is_refused(brk: str) -> None:
    nt = NameTransform(CORE)
    good = nt.encrypt_name("file.txt", IV)
    assert nt.decrypt_name(good, IV) == "file.txt"
    for text in (good[:4] + brk + good[4:], good + brk, brk + good):
        with pytest.raises(InvalidNameError) as info:
            nt.b64decode(text)
        assert str(info.value) == "name contains a line break"


def test_padded_base64_volumes_refuse_unpadded_names() -> None:
    padded = NameTransform(CORE, raw64=False)
    name = padded.encrypt_name("file.txt", IV)
    assert name.endswith("=") and padded.decrypt_name(name, IV) == "file.txt"
    with pytest.raises(InvalidNameError):
        padded.b64decode(name.rstrip("="))


def test_encrypted_name_length_limit_is_2048_bytes() -> None:
    """2048 ciphertext bytes pass the length check (and fail later, on the name); 2064 not."""
    nt = NameTransform(CORE)
    at_limit = nt.b64encode(CORE.eme_encrypt(IV, pad16(b"a" * 2047)))
    with pytest.raises(InvalidNameError) as info:
        nt.decrypt_name(at_limit, IV)
    assert str(info.value) != "encrypted name has invalid length"
    over = nt.b64encode(bytes(2064))
    with pytest.raises(InvalidNameError) as info:
        nt.decrypt_name(over, IV)
    assert str(info.value) == "encrypted name has invalid length"


# -- every refusal by its exact text (a refusal for the wrong reason must not pass) -----


def _raises_exactly(exc: type[Exception], text: str) -> pytest.RaisesContext[Exception]:
    return pytest.raises(exc, match="^" + re.escape(text) + "$")


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"", "padded name has invalid length"),
        (b"a" * 15, "padded name has invalid length"),
        (b"a" * 17, "padded name has invalid length"),
        (b"a" * 15 + b"\x00", "invalid name padding"),
        (b"a" * 15 + b"\x11", "invalid name padding"),
        (b"\x10" * 16, "invalid name padding"),
        (b"a" * 14 + b"\x01\x02", "invalid name padding"),
        (b"a" * 13 + b"\x02\x03\x03", "invalid name padding"),
    ],
)
def test_unpad16_refusals_are_exact(data: bytes, text: str) -> None:
    with _raises_exactly(InvalidNameError, text):
        unpad16(data)


def test_unpad16_edges() -> None:
    assert unpad16(b"a" * 15 + b"\x01") == b"a" * 15
    assert unpad16(b"a" + b"\x0f" * 15) == b"a"
    assert unpad16(b"a" * 16 + b"\x10" * 16) == b"a" * 16
    assert pad16(b"a" * 31) == b"a" * 31 + b"\x01"


@pytest.mark.parametrize(
    ("name", "exc", "text"),
    [
        ("", InvalidNameError, "invalid file name"),
        (".", InvalidNameError, "invalid file name"),
        ("..", InvalidNameError, "invalid file name"),
        ("a/b", InvalidNameError, "file name contains '/' or NUL"),
        ("/", InvalidNameError, "file name contains '/' or NUL"),
        ("a\0b", InvalidNameError, "file name contains '/' or NUL"),
        ("\ud800", InvalidNameError, "file name is not encodable"),
        ("x" * 256, NameTooLongError, "file name longer than 255 bytes"),
        ("\u00fc" * 128, NameTooLongError, "file name longer than 255 bytes"),
    ],
)
def test_plain_name_refusals_are_exact(name: str, exc: type[Exception], text: str) -> None:
    with _raises_exactly(exc, text):
        check_plain_name(name)
    with _raises_exactly(exc, text):
        NameTransform(CORE).encrypt_name(name, IV)


def test_plain_name_edges_are_accepted() -> None:
    assert check_plain_name("x" * 255) == b"x" * 255
    assert check_plain_name("...") == b"..."
    assert check_plain_name(".a") == b".a"
    assert check_plain_name("\udcff") == b"\xff"  # surrogateescape: a non-UTF-8 byte
    assert check_plain_name("\u00fc") == b"\xc3\xbc"


@pytest.mark.parametrize("bad", [0, 61, 256, 1000])
def test_longname_max_bounds(bad: int) -> None:
    with _raises_exactly(ValueError, "longname_max must be within 62..255"):
        NameTransform(CORE, longname_max=bad)


def test_longname_max_edges_and_repr() -> None:
    low = NameTransform(CORE, longname_max=62)
    assert low.longname_max == 62
    assert repr(low) == (
        "NameTransform(raw64=True, longnames=True, longname_max=62, deterministic=False)"
    )
    other = NameTransform(CORE, raw64=False, longnames=False, longname_max=255, deterministic=True)
    assert repr(other) == (
        "NameTransform(raw64=False, longnames=False, longname_max=255, deterministic=True)"
    )
    assert NameTransform(CORE).longname_max == 255


def test_is_long_is_strictly_above_the_threshold() -> None:
    nt = NameTransform(CORE, longname_max=62)
    assert not nt.is_long("a" * 62) and nt.is_long("a" * 63)
    assert not NameTransform(CORE, longnames=False, longname_max=62).is_long("a" * 200)
    assert not NameTransform(CORE).is_long("a" * 255) and NameTransform(CORE).is_long("a" * 256)


@pytest.mark.parametrize(
    ("raw64", "text", "message"),
    [
        (True, "\u00e9AAA", "name is not valid base64"),
        (True, "A", "name is not valid base64"),
        (True, "AAAAA", "name is not valid base64"),
        (False, "AAA", "name is not valid base64"),
        (True, "AB", "name is not canonical base64"),  # non-zero padding bits
        (True, "AA==", "name is not canonical base64"),  # padding on a raw volume
        (True, "!AAAA", "name is not canonical base64"),  # skipped junk
        (True, "A+/A", "name is not canonical base64"),  # standard, not URL-safe alphabet
        (False, "AB==", "name is not canonical base64"),
        (True, "AA\nA", "name contains a line break"),
        (False, "AA==\r", "name contains a line break"),
    ],
)
def test_b64decode_refusals_are_exact(raw64: bool, text: str, message: str) -> None:
    with _raises_exactly(InvalidNameError, message):
        NameTransform(CORE, raw64=raw64).b64decode(text)


def test_b64_both_variants_exactly() -> None:
    raw, padded = NameTransform(CORE), NameTransform(CORE, raw64=False)
    data = bytes([0xFB, 0xFF, 0x01, 0x02])
    assert raw.b64encode(data) == "-_8BAg" and padded.b64encode(data) == "-_8BAg=="
    assert raw.b64decode("-_8BAg") == data and padded.b64decode("-_8BAg==") == data
    assert raw.b64decode("") == b"" and padded.b64decode("") == b""
    assert raw.b64decode("AA") == b"\x00" and raw.b64decode("AAA") == b"\x00\x00"
    # an encoding that ends in X or = only loses its padding
    assert raw.b64encode(b"\x00\x00\x17") == "AAAX" and raw.b64encode(b"\x00\x01") == "AAE"
    assert padded.b64encode(b"\x00\x01") == "AAE="


def test_dir_iv_argument() -> None:
    nt = NameTransform(CORE)
    for bad in (b"", IV[:15], IV + b"x"):
        with _raises_exactly(ValueError, "dir IV must be 16 bytes"):
            nt.encrypt_name("a", bad)
    same = nt.encrypt_name("a", bytearray(IV))  # type: ignore[arg-type]
    assert same == nt.encrypt_name("a", IV)
    det = NameTransform(CORE, deterministic=True)
    assert (
        det.encrypt_name("a", b"") == det.encrypt_name("a", IV) == nt.encrypt_name("a", bytes(16))
    )
    assert det.decrypt_name(det.encrypt_name("a", b""), b"junk") == "a"


def test_decrypt_name_refusals_are_exact() -> None:
    nt = NameTransform(CORE)
    for data in (b"", bytes(15), bytes(17), bytes(2064)):
        with _raises_exactly(InvalidNameError, "encrypted name has invalid length"):
            nt.decrypt_name(nt.b64encode(data), IV)
    bad_name = nt.b64encode(CORE.eme_encrypt(IV, pad16(b"a/b")))
    with _raises_exactly(InvalidNameError, "encrypted name decrypts to an invalid name"):
        nt.decrypt_name(bad_name, IV)
    dotdot = nt.b64encode(CORE.eme_encrypt(IV, pad16(b"..")))
    with _raises_exactly(InvalidNameError, "encrypted name decrypts to an invalid name"):
        nt.decrypt_name(dotdot, IV)
    unpadded = nt.b64encode(CORE.eme_encrypt(IV, b"a" * 16))
    with _raises_exactly(InvalidNameError, "invalid name padding"):
        nt.decrypt_name(unpadded, IV)
    # the longest legal name decrypts
    longest = nt.encrypt_name("y" * 255, IV)
    assert nt.decrypt_name(longest, IV) == "y" * 255
    # surrogateescape both ways
    assert nt.decrypt_name(nt.encrypt_name("\udcff", IV), IV) == "\udcff"


def test_long_name_file_and_companion() -> None:
    nt = NameTransform(CORE)
    cname = "A" * 300
    digest = hashlib.sha256(cname.encode()).digest()
    expect = "gocryptfs.longname." + base64.urlsafe_b64encode(digest).decode().rstrip("=")
    assert nt.long_name_file(cname) == expect
    padded = NameTransform(CORE, raw64=False).long_name_file(cname)
    assert padded == "gocryptfs.longname." + base64.urlsafe_b64encode(digest).decode()
    assert NameTransform.long_name_companion(expect) == expect + ".name"
    assert NameTransform.is_long_name_file(expect)
    assert not NameTransform.is_long_name_file(expect + ".name")
    assert not NameTransform.is_long_name_file("gocryptfs.conf")
    assert nt.read_long_name(expect, cname.encode()) == cname
    assert nt.read_long_name(expect, bytearray(cname.encode())) == cname
    with _raises_exactly(InvalidNameError, "long-name file is not ASCII"):
        nt.read_long_name(expect, b"\xff" * 10)
    with _raises_exactly(InvalidNameError, "long-name file does not match its hash"):
        nt.read_long_name(expect, b"B" * 300)


def test_disk_name_short_and_long() -> None:
    nt = NameTransform(CORE, longname_max=62)
    short = nt.encrypt_name("a", IV)
    assert nt.disk_name("a", IV) == (short, None)
    cname = nt.encrypt_name("b" * 60, IV)
    assert len(cname) > 62
    assert nt.disk_name("b" * 60, IV) == (nt.long_name_file(cname), cname)


@pytest.mark.parametrize(
    ("name", "reserved"),
    [
        ("gocryptfs.conf", True),
        ("gocryptfs.diriv", True),
        ("gocryptfs.longname.abc.name", True),
        ("gocryptfs.conf.tmp", True),
        ("gocryptfs.longname.abc", False),
        ("gocryptfs", False),
        ("xgocryptfs.conf", False),
        ("abc", False),
    ],
)
def test_reserved_names_exactly(name: str, reserved: bool) -> None:
    assert NameTransform.is_reserved(name) is reserved


def test_dir_iv_checks_are_exact() -> None:
    for bad in (b"", bytes(15), bytes(17)):
        with _raises_exactly(CorruptDataError, "dir IV has wrong length"):
            NameTransform.check_dir_iv(bad)
    with _raises_exactly(CorruptDataError, "dir IV is all zero"):
        NameTransform.check_dir_iv(bytes(16))
    got = NameTransform.check_dir_iv(bytearray(IV))
    assert got == IV and type(got) is bytes
    assert NameTransform.check_dir_iv(bytes(15) + b"\x01") == bytes(15) + b"\x01"
    a, b = NameTransform.new_dir_iv(), NameTransform.new_dir_iv()
    assert len(a) == 16 and a != b


def test_symlink_refusals_and_edges() -> None:
    nt = NameTransform(CORE)
    assert nt.encrypt_symlink("") == "" and nt.decrypt_symlink("") == ""
    with _raises_exactly(InvalidNameError, "symlink target is not encodable"):
        nt.encrypt_symlink("\ud800")
    with _raises_exactly(CorruptDataError, "symlink target is not valid base64"):
        nt.decrypt_symlink("!!")
    stored = nt.encrypt_symlink("../t\udcff")
    assert "=" not in stored and nt.decrypt_symlink(stored) == "../t\udcff"
    # sealed with an all-zero 8-byte AAD, like gocryptfs
    assert CORE.open(nt.b64decode(stored), bytes(8)) == b"../t\xff"


def test_xattr_name_refusals_and_edges() -> None:
    nt = NameTransform(CORE)
    for bad in ("", "a\0b"):
        with _raises_exactly(InvalidNameError, "invalid xattr name"):
            nt.encrypt_xattr_name(bad)
    with _raises_exactly(InvalidNameError, "xattr name is not encodable"):
        nt.encrypt_xattr_name("\ud800")
    with _raises_exactly(NameTooLongError, "xattr name too long"):
        nt.encrypt_xattr_name("x" * 2048)
    for name in ("XXXX", "XX", "user.XX"):
        assert nt.decrypt_xattr_name(nt.encrypt_xattr_name(name)) == name
    stored = nt.encrypt_xattr_name("x" * 2047)
    assert nt.decrypt_xattr_name(stored) == "x" * 2047
    assert stored == "user.gocryptfs." + nt.b64encode(
        CORE.eme_encrypt(b"xattr_name_iv_xx", pad16(b"x" * 2047))
    )
    with _raises_exactly(InvalidNameError, "not an encrypted xattr name"):
        nt.decrypt_xattr_name("user.other")
    for data in (b"", bytes(15), bytes(2064)):
        with _raises_exactly(InvalidNameError, "encrypted xattr name has invalid length"):
            nt.decrypt_xattr_name("user.gocryptfs." + nt.b64encode(data))
    nul = "user.gocryptfs." + nt.b64encode(CORE.eme_encrypt(b"xattr_name_iv_xx", pad16(b"a\0")))
    with _raises_exactly(InvalidNameError, "encrypted xattr name decrypts to an invalid name"):
        nt.decrypt_xattr_name(nul)


def test_xattr_values_edges() -> None:
    nt = NameTransform(CORE)
    assert nt.encrypt_xattr_value(b"") == b"" and nt.decrypt_xattr_value(b"") == b""
    sealed = nt.encrypt_xattr_value(bytearray(b"v"))  # type: ignore[arg-type]
    assert CORE.open(sealed, bytes(8)) == b"v"
    assert nt.decrypt_xattr_value(sealed) == b"v"
