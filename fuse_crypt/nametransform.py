"""File names, long names, dir IVs, symlink targets and xattrs, gocryptfs style.

Names are EME-encrypted under the directory's IV (so equal names in different
directories differ), PKCS#7-padded to 16 bytes and base64url-encoded.  Encoded names
longer than the long-name threshold are stored as ``gocryptfs.longname.<hash>`` with
the full encrypted name in a ``.name`` side file, keeping on-disk names within the
255-byte limit of the backing filesystem.

Plaintext names are ``str`` as produced by ``os.fsdecode`` (UTF-8 with
``surrogateescape``), so names that are not valid UTF-8 still round-trip exactly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from .cryptocore import CryptoCore
from .errors import CorruptDataError, InvalidNameError, NameTooLongError

DIRIV_NAME = "gocryptfs.diriv"
DIRIV_LEN = 16
LONGNAME_PREFIX = "gocryptfs.longname."
LONGNAME_SUFFIX = ".name"
CONF_NAME = "gocryptfs.conf"
RESERVED_PREFIX = "gocryptfs."
XATTR_NAME_IV = b"xattr_name_iv_xx"
XATTR_STORE_PREFIX = "user.gocryptfs."
NAME_MAX = 255
LONGNAME_MAX_MIN = 62
# Zero AAD (uint64_BE(0)) used for symlink targets and xattr values.
_AAD_ZERO = bytes(8)
_ZERO_IV = bytes(DIRIV_LEN)
_ENC = "utf-8"
_ERRS = "surrogateescape"


def pad16(data: bytes) -> bytes:
    """PKCS#7 padding to 16 bytes; always adds 1..16 bytes."""
    pad = 16 - len(data) % 16
    return data + bytes((pad,)) * pad


def unpad16(data: bytes) -> bytes:
    """Strict PKCS#7 removal; raises InvalidNameError (never says which check failed
    in a way that leaks plaintext)."""
    n = len(data)
    if n == 0 or n % 16:
        raise InvalidNameError("padded name has invalid length")
    pad = data[-1]
    if pad < 1 or pad > 16 or pad >= n:
        raise InvalidNameError("invalid name padding")
    if data[-pad:] != bytes((pad,)) * pad:
        raise InvalidNameError("invalid name padding")
    return data[:-pad]


def _fs_bytes(name: str) -> bytes:
    return name.encode(_ENC, _ERRS)


def _fs_str(raw: bytes) -> str:
    return raw.decode(_ENC, _ERRS)


def check_plain_name(name: str) -> bytes:
    """Validate a plaintext name and return its on-disk bytes."""
    if name in ("", ".", ".."):
        raise InvalidNameError("invalid file name")
    if "/" in name or "\0" in name:
        raise InvalidNameError("file name contains '/' or NUL")
    try:
        raw = _fs_bytes(name)
    except UnicodeEncodeError:
        raise InvalidNameError("file name is not encodable") from None
    if len(raw) > NAME_MAX:
        raise NameTooLongError("file name longer than 255 bytes")
    return raw


class NameTransform:
    """Name encryption for one volume (key, encoding and long-name settings)."""

    def __init__(
        self,
        core: CryptoCore,
        *,
        raw64: bool = True,
        longnames: bool = True,
        longname_max: int = NAME_MAX,
        deterministic: bool = False,
    ) -> None:
        if not LONGNAME_MAX_MIN <= longname_max <= NAME_MAX:
            raise ValueError("longname_max must be within 62..255")
        self._core = core
        self.raw64 = raw64
        self.longnames = longnames
        self.longname_max = longname_max
        self.deterministic = deterministic

    def __repr__(self) -> str:
        return (
            f"NameTransform(raw64={self.raw64}, longnames={self.longnames}, "
            f"longname_max={self.longname_max}, deterministic={self.deterministic})"
        )

    # -- base64 ---------------------------------------------------------------

    def b64encode(self, data: bytes) -> str:
        s = base64.urlsafe_b64encode(data).decode("ascii")
        return s.rstrip("=") if self.raw64 else s

    def b64decode(self, text: str) -> bytes:
        """Strict decode (like Go's ``.Strict()``): only the canonical encoding of
        some byte string is accepted, so one ciphertext has exactly one name."""
        if "\r" in text or "\n" in text:
            raise InvalidNameError("name contains a line break")
        try:
            raw = text.encode("ascii")
            padded = raw + b"=" * (-len(raw) % 4) if self.raw64 else raw
            data = base64.urlsafe_b64decode(padded)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise InvalidNameError("name is not valid base64") from None
        if self.b64encode(data) != text:
            raise InvalidNameError("name is not canonical base64")
        return data

    # -- names ----------------------------------------------------------------

    def _iv(self, dir_iv: bytes) -> bytes:
        if self.deterministic:
            return _ZERO_IV
        if len(dir_iv) != DIRIV_LEN:
            raise ValueError("dir IV must be 16 bytes")
        return bytes(dir_iv)

    def encrypt_name(self, plain: str, dir_iv: bytes) -> str:
        """Full encrypted name; check :meth:`is_long` before using it on disk."""
        raw = check_plain_name(plain)
        return self.b64encode(self._core.eme_encrypt(self._iv(dir_iv), pad16(raw)))

    def decrypt_name(self, cname: str, dir_iv: bytes) -> str:
        """Inverse of :meth:`encrypt_name` for a full (not hashed) encrypted name."""
        data = self.b64decode(cname)
        if len(data) == 0 or len(data) % 16 or len(data) > 2048:
            raise InvalidNameError("encrypted name has invalid length")
        raw = unpad16(self._core.eme_decrypt(self._iv(dir_iv), data))
        name = _fs_str(raw)
        try:
            check_plain_name(name)
        except InvalidNameError:
            raise InvalidNameError("encrypted name decrypts to an invalid name") from None
        return name

    def is_long(self, cname: str) -> bool:
        return self.longnames and len(cname) > self.longname_max

    def long_name_file(self, cname: str) -> str:
        """On-disk name for a long encrypted name (hash over the ASCII cName)."""
        digest = hashlib.sha256(cname.encode("ascii")).digest()
        return LONGNAME_PREFIX + self.b64encode(digest)

    def disk_name(self, plain: str, dir_iv: bytes) -> tuple[str, str | None]:
        """(on-disk name, full cName to store in ``<disk>.name`` or None)."""
        cname = self.encrypt_name(plain, dir_iv)
        if self.is_long(cname):
            return self.long_name_file(cname), cname
        return cname, None

    def read_long_name(self, disk_name: str, content: bytes) -> str:
        """Validate a ``.name`` file's content against its hashed file name."""
        try:
            cname = bytes(content).decode("ascii")
        except UnicodeDecodeError:
            raise InvalidNameError("long-name file is not ASCII") from None
        if self.long_name_file(cname) != disk_name:
            raise InvalidNameError("long-name file does not match its hash")
        return cname

    @staticmethod
    def long_name_companion(disk_name: str) -> str:
        """Name of the ``.name`` side file for a ``gocryptfs.longname.*`` entry."""
        return disk_name + LONGNAME_SUFFIX

    @staticmethod
    def is_long_name_file(disk_name: str) -> bool:
        return disk_name.startswith(LONGNAME_PREFIX) and not disk_name.endswith(LONGNAME_SUFFIX)

    @staticmethod
    def is_reserved(disk_name: str) -> bool:
        """Entries hidden from listings: the conf, dir IVs, ``.name`` files and the
        temporary files of conf writes and rmdir.  Every gocryptfs special file starts
        with ``gocryptfs.``; of those only long-name entries are real files, and a '.'
        never occurs in an encrypted name, so nothing here can hide user data."""
        return disk_name.startswith(RESERVED_PREFIX) and not NameTransform.is_long_name_file(
            disk_name
        )

    # -- dir IVs --------------------------------------------------------------

    @staticmethod
    def new_dir_iv() -> bytes:
        return os.urandom(DIRIV_LEN)

    @staticmethod
    def check_dir_iv(data: bytes) -> bytes:
        """Validate ``gocryptfs.diriv`` content: 16 bytes and not all zero."""
        if len(data) != DIRIV_LEN:
            raise CorruptDataError("dir IV has wrong length")
        data = bytes(data)
        if data == _ZERO_IV:
            raise CorruptDataError("dir IV is all zero")
        return data

    # -- symlinks -------------------------------------------------------------

    def encrypt_symlink(self, target: str) -> str:
        if target == "":
            return ""
        try:
            raw = _fs_bytes(target)
        except UnicodeEncodeError:
            raise InvalidNameError("symlink target is not encodable") from None
        return self.b64encode(self._core.seal(raw, _AAD_ZERO))

    def decrypt_symlink(self, stored: str) -> str:
        """Raises CorruptDataError: a bad link target is tampered data (EIO)."""
        if stored == "":
            return ""
        try:
            sealed = self.b64decode(stored)
        except InvalidNameError:
            raise CorruptDataError("symlink target is not valid base64") from None
        return _fs_str(self._core.open(sealed, _AAD_ZERO))

    # -- xattrs ---------------------------------------------------------------

    def encrypt_xattr_name(self, name: str) -> str:
        if name == "" or "\0" in name:
            raise InvalidNameError("invalid xattr name")
        try:
            raw = _fs_bytes(name)
        except UnicodeEncodeError:
            raise InvalidNameError("xattr name is not encodable") from None
        if len(raw) > 2047:  # EME limit; Linux caps xattr names at 255 bytes anyway
            raise NameTooLongError("xattr name too long")
        enc = self._core.eme_encrypt(XATTR_NAME_IV, pad16(raw))
        return XATTR_STORE_PREFIX + self.b64encode(enc)

    def decrypt_xattr_name(self, stored: str) -> str:
        if not stored.startswith(XATTR_STORE_PREFIX):
            raise InvalidNameError("not an encrypted xattr name")
        data = self.b64decode(stored[len(XATTR_STORE_PREFIX) :])
        if len(data) == 0 or len(data) % 16 or len(data) > 2048:
            raise InvalidNameError("encrypted xattr name has invalid length")
        name = _fs_str(unpad16(self._core.eme_decrypt(XATTR_NAME_IV, data)))
        if name == "" or "\0" in name:
            raise InvalidNameError("encrypted xattr name decrypts to an invalid name")
        return name

    def encrypt_xattr_value(self, v: bytes) -> bytes:
        if len(v) == 0:
            return b""
        return self._core.seal(bytes(v), _AAD_ZERO)

    def decrypt_xattr_value(self, s: bytes) -> bytes:
        if len(s) == 0:
            return b""
        return self._core.open(s, _AAD_ZERO)
