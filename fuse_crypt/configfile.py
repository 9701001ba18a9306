"""``gocryptfs.conf``: parse, validate, create, scrypt key wrap and password change.

The conf holds the master key wrapped under a password-derived key
(scrypt -> HKDF -> AES-256-GCM with a 16-byte nonce and AAD = 8 zero bytes) plus the
feature flags that fix the on-disk format.  Unknown or unsupported flags are refused
outright (ext4-style), because guessing at a format we do not understand would write
data gocryptfs cannot read, or read it wrongly.  :class:`ConfFile` is immutable: a
password change returns a new object, and writing is a separate atomic step.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import os
import re
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import safeio, strictjson
from .cryptocore import INFO_GCM, KEY_LEN, CryptoCore, hkdf_sha256
from .errors import BadInputError, ConfigError, WrongKeyError
from .nametransform import CONF_NAME, LONGNAME_MAX_MIN, NAME_MAX, NameTransform
from .safeio import FileTooLargeError, NotRegularFileError, read_small_regular_file

__all__ = [
    "BAK_NAME",
    "CONF_NAME",
    "DEFAULT_FLAGS",
    "KNOWN_FLAGS",
    "MAX_CONF_BYTES",
    "SUPPORTED_FLAGS",
    "TMP_NAME",
    "ConfFile",
    "format_master_key",
    "parse_master_key",
    "read_passfile",
]

CONF_VERSION = 2
DEFAULT_FLAGS = ("HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64")
KNOWN_FLAGS = frozenset(
    {
        "HKDF",
        "GCMIV128",
        "DirIV",
        "EMENames",
        "LongNames",
        "LongNameMax",
        "Raw64",
        "AESSIV",
        "XChaCha20Poly1305",
        "PlaintextNames",
        "FIDO2",
    }
)
SUPPORTED_FLAGS = KNOWN_FLAGS - {"XChaCha20Poly1305", "PlaintextNames", "FIDO2"}
CREATOR = "coco-csi fuse-crypt"

TMP_NAME = CONF_NAME + ".tmp"
BAK_NAME = CONF_NAME + ".bak"
#: gocryptfs confs are ~400 bytes; anything near this cap is not a conf.
MAX_CONF_BYTES = 64 * 1024
#: Longest salt accepted (gocryptfs writes 32 bytes; it only enforces a minimum).
MAX_SALT_LEN = 1024

SALT_LEN = 32
MIN_LOGN = 10
#: Highest scrypt cost we read or write.  gocryptfs allows 2^28 (256 GiB of memory); a
#: conf sits on host storage, so its N is attacker-chosen and every unlock (in the CSI
#: plugin too) would pay it.  2^18 is 256 MiB and ~0.6 s, 4x gocryptfs' default.
MAX_LOGN = 18
DEFAULT_LOGN = 16
SCRYPT_R = 8
SCRYPT_P = 1
#: scrypt needs 128 * N * r bytes; bounded explicitly, not only through N.
MAX_SCRYPT_MEMORY = 128 * (2**MAX_LOGN) * SCRYPT_R
MAX_PASSWORD_LEN = 2048
_WRAP_AAD = bytes(8)
_GCM_NONCE_HKDF = 16
_GCM_NONCE_LEGACY = 12


def _b64std_decode(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"gocryptfs.conf: {what} is not a base64 string")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise ConfigError(f"gocryptfs.conf: {what} is not valid base64") from None
    # One encoding per value: non-zero padding bits or missing padding would give a
    # second spelling of the same bytes (gocryptfs never writes them).
    if base64.b64encode(raw).decode("ascii") != value:
        raise ConfigError(f"gocryptfs.conf: {what} is not canonical base64")
    return raw


def _check_scrypt_params(n: int, r: int, p: int, key_len: int) -> None:
    """Refuse costs a hostile conf could use to burn CPU or memory, before running scrypt."""
    if n < 2**MIN_LOGN or n > 2**MAX_LOGN or n & (n - 1):
        raise ConfigError(
            f"gocryptfs.conf: scrypt N must be a power of two in 2^{MIN_LOGN}..2^{MAX_LOGN}"
        )
    if r != SCRYPT_R or p != SCRYPT_P:
        raise ConfigError(f"gocryptfs.conf: scrypt R must be {SCRYPT_R} and P {SCRYPT_P}")
    if 128 * n * r * p > MAX_SCRYPT_MEMORY:  # redundant with the above, kept as the real rule
        raise ConfigError("gocryptfs.conf: scrypt parameters need too much memory")
    if key_len != KEY_LEN:  # gocryptfs refuses < 32 and its key setup panics on > 32
        raise ConfigError("gocryptfs.conf: scrypt KeyLen must be 32")


def _int_field(obj: dict[str, object], key: str, what: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"gocryptfs.conf: {what} is missing or not an integer")
    return v


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, key_len: int) -> bytes:
    _check_scrypt_params(n, r, p, key_len)
    try:
        return Scrypt(salt=salt, length=key_len, n=n, r=r, p=p).derive(password)
    except MemoryError:
        # The conf sits on untrusted storage; huge N is refused here with a clear
        # message instead of an opaque crash.
        raise ConfigError(
            f"gocryptfs.conf: scrypt N={n} R={r} needs more memory than is available"
        ) from None


def _check_password(password: bytes) -> bytes:
    if not isinstance(password, bytes | bytearray):
        raise TypeError("password must be bytes")
    if len(password) == 0:
        raise BadInputError("password must not be empty")
    if len(password) > MAX_PASSWORD_LEN:
        raise BadInputError(f"password longer than {MAX_PASSWORD_LEN} bytes")
    return bytes(password)


def _validate_flags(flags: tuple[str, ...], long_name_max_field: int) -> None:
    """gocryptfs' validate.go rules, then what this implementation supports."""
    fs = set(flags)
    unknown = sorted(fs - KNOWN_FLAGS)
    if unknown:
        raise ConfigError(f"gocryptfs.conf: unknown feature flag(s) {', '.join(unknown)}")
    if len(fs) != len(flags):
        raise ConfigError("gocryptfs.conf: duplicate feature flag")
    if "XChaCha20Poly1305" in fs and "AESSIV" in fs:
        raise ConfigError("gocryptfs.conf: XChaCha20Poly1305 conflicts with AESSIV")
    if "AESSIV" in fs and "GCMIV128" not in fs:
        raise ConfigError("gocryptfs.conf: AESSIV requires GCMIV128")
    if "XChaCha20Poly1305" in fs and ("GCMIV128" in fs or "HKDF" not in fs):
        raise ConfigError("gocryptfs.conf: XChaCha20Poly1305 requires HKDF and excludes GCMIV128")
    if "XChaCha20Poly1305" not in fs and "AESSIV" not in fs and "GCMIV128" not in fs:
        raise ConfigError("gocryptfs.conf: GCMIV128 is required (96-bit GCM IVs unsupported)")
    name_flags = {"EMENames", "DirIV", "LongNames", "Raw64", "LongNameMax"}
    if "PlaintextNames" in fs and fs & name_flags:
        raise ConfigError("gocryptfs.conf: PlaintextNames conflicts with name-encryption flags")
    if ("LongNameMax" in fs) != (long_name_max_field != 0):
        raise ConfigError("gocryptfs.conf: LongNameMax flag and field disagree")
    if long_name_max_field and not LONGNAME_MAX_MIN <= long_name_max_field <= NAME_MAX:
        raise ConfigError("gocryptfs.conf: LongNameMax outside 62..255")
    # Known to gocryptfs but not (yet) implemented here: refuse rather than misread.
    for flag, why in (
        ("XChaCha20Poly1305", "XChaCha20-Poly1305 content encryption"),
        ("PlaintextNames", "plaintext file names"),
        ("FIDO2", "FIDO2 token unlock"),
    ):
        if flag in fs:
            raise ConfigError(f"gocryptfs.conf: feature {flag} ({why}) is not supported")
    if "PlaintextNames" not in fs and "EMENames" not in fs:
        raise ConfigError("gocryptfs.conf: pre-EME (CBC) file names are not supported")
    if "LongNameMax" in fs and "LongNames" not in fs:
        raise ConfigError("gocryptfs.conf: LongNameMax requires LongNames")


@dataclass(frozen=True, repr=False)
class ConfFile:
    """Immutable, validated view of a ``gocryptfs.conf``."""

    feature_flags: tuple[str, ...]
    scrypt_n: int
    long_name_max: int  # effective threshold (255 unless the LongNameMax flag is set)
    creator: str
    encrypted_key: bytes = field(default=b"")
    salt: bytes = field(default=b"")
    scrypt_r: int = SCRYPT_R
    scrypt_p: int = SCRYPT_P
    key_len: int = KEY_LEN
    version: int = CONF_VERSION

    def __repr__(self) -> str:
        # The wrapped key and salt are not secret, but keep reprs short and boring.
        return (
            f"ConfFile(flags={' '.join(self.feature_flags)}, scrypt_n={self.scrypt_n}, "
            f"long_name_max={self.long_name_max}, creator={self.creator!r})"
        )

    # -- derived properties ---------------------------------------------------

    def has(self, flag: str) -> bool:
        return flag in self.feature_flags

    @property
    def use_hkdf(self) -> bool:
        return self.has("HKDF")

    @property
    def aessiv(self) -> bool:
        return self.has("AESSIV")

    @property
    def content_algorithm(self) -> str:
        return "AES-SIV-512" if self.aessiv else "AES-GCM-256"

    @property
    def scrypt_logn(self) -> int:
        return self.scrypt_n.bit_length() - 1

    def new_core(self, master_key: bytes) -> CryptoCore:
        """The CryptoCore this volume's flags call for."""
        return CryptoCore(master_key, use_hkdf=self.use_hkdf, aessiv=self.aessiv)

    def name_transform(self, core: CryptoCore) -> NameTransform:
        return NameTransform(
            core,
            raw64=self.has("Raw64"),
            longnames=self.has("LongNames"),
            longname_max=self.long_name_max,
            deterministic=not self.has("DirIV"),
        )

    # -- parse / serialise ----------------------------------------------------

    @classmethod
    def loads(cls, data: bytes) -> ConfFile:
        if len(data) > MAX_CONF_BYTES:
            raise ConfigError(f"gocryptfs.conf: larger than {MAX_CONF_BYTES} bytes")
        try:
            obj = strictjson.loads(bytes(data))
        except strictjson.DuplicateKeyError:  # which one would gocryptfs use?
            raise ConfigError("gocryptfs.conf: duplicate JSON key") from None
        except (UnicodeDecodeError, RecursionError, ValueError):
            # ValueError also covers JSONDecodeError and Python's int-digit limit.
            raise ConfigError("gocryptfs.conf: not valid JSON") from None
        if not isinstance(obj, dict):
            raise ConfigError("gocryptfs.conf: top level is not a JSON object")
        version = obj.get("Version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError("gocryptfs.conf: Version missing or not an integer")
        if version != CONF_VERSION:
            raise ConfigError(
                f"gocryptfs.conf: unsupported on-disk format version {version} (need 2)"
            )
        creator = obj.get("Creator", "")
        if not isinstance(creator, str):
            raise ConfigError("gocryptfs.conf: Creator is not a string")
        flags_raw = obj.get("FeatureFlags")
        if flags_raw is None:
            flags_raw = []
        if not isinstance(flags_raw, list) or not all(isinstance(f, str) for f in flags_raw):
            raise ConfigError("gocryptfs.conf: FeatureFlags is not a list of strings")
        flags = tuple(flags_raw)
        lnm = obj.get("LongNameMax", 0)
        if not isinstance(lnm, int) or isinstance(lnm, bool) or not 0 <= lnm <= 255:
            raise ConfigError("gocryptfs.conf: LongNameMax is not a uint8")
        if obj.get("FIDO2") is not None and "FIDO2" not in flags:
            raise ConfigError("gocryptfs.conf: FIDO2 parameters without the FIDO2 flag")
        _validate_flags(flags, lnm)

        ekey = _b64std_decode(obj.get("EncryptedKey"), "EncryptedKey")
        use_hkdf = "HKDF" in flags
        want = (_GCM_NONCE_HKDF if use_hkdf else _GCM_NONCE_LEGACY) + KEY_LEN + 16
        if len(ekey) != want:
            raise ConfigError(f"gocryptfs.conf: EncryptedKey must be {want} bytes")
        sobj = obj.get("ScryptObject")
        if not isinstance(sobj, dict):
            raise ConfigError("gocryptfs.conf: ScryptObject missing")
        salt = _b64std_decode(sobj.get("Salt"), "ScryptObject.Salt")
        if not SALT_LEN <= len(salt) <= MAX_SALT_LEN:
            raise ConfigError(
                f"gocryptfs.conf: scrypt salt must be {SALT_LEN}..{MAX_SALT_LEN} bytes"
            )
        n = _int_field(sobj, "N", "ScryptObject.N")
        r = _int_field(sobj, "R", "ScryptObject.R")
        p = _int_field(sobj, "P", "ScryptObject.P")
        key_len = _int_field(sobj, "KeyLen", "ScryptObject.KeyLen")
        _check_scrypt_params(n, r, p, key_len)
        return cls(
            feature_flags=flags,
            scrypt_n=n,
            long_name_max=lnm or NAME_MAX,
            creator=creator,
            encrypted_key=ekey,
            salt=salt,
            scrypt_r=r,
            scrypt_p=p,
            key_len=key_len,
            version=version,
        )

    def dumps(self) -> bytes:
        """Serialise like Go's ``json.MarshalIndent(cf, "", "\\t")`` plus a newline,
        in gocryptfs' field order, so files diff cleanly against gocryptfs'."""
        obj: dict[str, object] = {
            "Creator": self.creator,
            "EncryptedKey": base64.b64encode(self.encrypted_key).decode("ascii"),
            "ScryptObject": {
                "Salt": base64.b64encode(self.salt).decode("ascii"),
                "N": self.scrypt_n,
                "R": self.scrypt_r,
                "P": self.scrypt_p,
                "KeyLen": self.key_len,
            },
            "Version": self.version,
            "FeatureFlags": list(self.feature_flags),
        }
        if self.has("LongNameMax"):
            obj["LongNameMax"] = self.long_name_max
        text = json.dumps(obj, indent="\t", ensure_ascii=False)
        # Go escapes <, >, & and U+2028/2029 in strings; only Creator could hold them.
        for ch, esc in (
            ("<", "\\u003c"),
            (">", "\\u003e"),
            ("&", "\\u0026"),
            ("\u2028", "\\u2028"),
            ("\u2029", "\\u2029"),
        ):
            text = text.replace(ch, esc)
        return text.encode("utf-8") + b"\n"

    # -- key wrap -------------------------------------------------------------

    @classmethod
    def create(
        cls,
        password: bytes,
        *,
        scrypt_logn: int = DEFAULT_LOGN,
        master_key: bytes | None = None,
        deterministic_names: bool = False,
        aessiv: bool = False,
        long_name_max: int = NAME_MAX,
        creator: str = CREATOR,
    ) -> tuple[ConfFile, bytes]:
        """New conf (gocryptfs 2.x ``-init`` flag order) wrapping a new or given key."""
        if master_key is None:
            master_key = os.urandom(KEY_LEN)
        elif len(master_key) != KEY_LEN:
            raise BadInputError("master key must be 32 bytes")
        if not LONGNAME_MAX_MIN <= long_name_max <= NAME_MAX:
            raise BadInputError("long_name_max must be within 62..255")
        flags = ["HKDF", "GCMIV128"]
        if not deterministic_names:
            flags.append("DirIV")
        if long_name_max != NAME_MAX:
            flags.append("LongNameMax")
        flags += ["EMENames", "LongNames", "Raw64"]
        if aessiv:
            flags.append("AESSIV")
        blank = cls(
            feature_flags=tuple(flags),
            scrypt_n=2**MIN_LOGN,
            long_name_max=long_name_max,
            creator=creator,
        )
        return blank.rewrap(bytes(master_key), password, scrypt_logn=scrypt_logn), bytes(master_key)

    def _kek_aead(self, password: bytes, salt: bytes, n: int, r: int, p: int) -> AESGCM:
        kek = _scrypt(_check_password(password), salt, n, r, p, self.key_len)
        if self.use_hkdf:
            return AESGCM(hkdf_sha256(kek, INFO_GCM))
        return AESGCM(kek)

    def unlock(self, password: bytes) -> bytes:
        """Master key; WrongKeyError when the password does not verify."""
        aead = self._kek_aead(password, self.salt, self.scrypt_n, self.scrypt_r, self.scrypt_p)
        nl = _GCM_NONCE_HKDF if self.use_hkdf else _GCM_NONCE_LEGACY
        ek = self.encrypted_key
        try:
            key = aead.decrypt(ek[:nl], ek[nl:], _WRAP_AAD)
        except InvalidTag:
            raise WrongKeyError("password incorrect") from None
        if len(key) != KEY_LEN:
            raise ConfigError("gocryptfs.conf: wrapped master key has wrong length")
        return key

    def rewrap(
        self, master_key: bytes, new_password: bytes, *, scrypt_logn: int | None = None
    ) -> ConfFile:
        """Same flags and master key under a new password, with a fresh salt."""
        if len(master_key) != KEY_LEN:
            raise BadInputError("master key must be 32 bytes")
        logn = self.scrypt_logn if scrypt_logn is None else scrypt_logn
        if not MIN_LOGN <= logn <= MAX_LOGN:
            raise BadInputError(f"scrypt logN must be within {MIN_LOGN}..{MAX_LOGN}")
        salt = os.urandom(SALT_LEN)
        n = 2**logn
        aead = self._kek_aead(new_password, salt, n, SCRYPT_R, SCRYPT_P)
        nl = _GCM_NONCE_HKDF if self.use_hkdf else _GCM_NONCE_LEGACY
        nonce = os.urandom(nl)
        ek = nonce + aead.encrypt(nonce, bytes(master_key), _WRAP_AAD)
        return ConfFile(
            feature_flags=self.feature_flags,
            scrypt_n=n,
            long_name_max=self.long_name_max,
            creator=self.creator,
            encrypted_key=ek,
            salt=salt,
            scrypt_r=SCRYPT_R,
            scrypt_p=SCRYPT_P,
            key_len=self.key_len,
            version=self.version,
        )

    # -- files ----------------------------------------------------------------

    @staticmethod
    def read_bytes(path: str, *, dir_fd: int | None = None) -> bytes:
        """Raw bytes of the conf at ``path``, read the safe way (see :mod:`.safeio`).

        The one reader of host-controlled confs: never blocks on a FIFO, never follows a
        symlink in the last component, refuses non-regular files and anything above
        :data:`MAX_CONF_BYTES` without reading it.  A missing file raises
        ``FileNotFoundError`` (callers decide whether that means "new volume"); every
        other problem is a :class:`ConfigError` naming the file, never its content.
        """
        try:
            return read_small_regular_file(path, MAX_CONF_BYTES, dir_fd=dir_fd)
        except FileNotFoundError:
            raise
        except NotRegularFileError as e:
            raise ConfigError(f"config file {path} is not a regular file ({e.kind})") from None
        except FileTooLargeError as e:
            raise ConfigError(
                f"config file {path} is too large ({e.size} bytes, limit {MAX_CONF_BYTES})"
            ) from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(f"config file {path} is a symbolic link") from None
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None

    @classmethod
    def read(cls, path: str, *, dir_fd: int | None = None) -> ConfFile:
        """Read and validate the conf at ``path``: THE reader of host-controlled confs.

        ``FileNotFoundError`` if missing, :class:`ConfigError` for everything else."""
        return cls.loads(cls.read_bytes(path, dir_fd=dir_fd))

    def write(self, path: str) -> None:
        """Atomically replace ``path``: ``<path>.tmp`` created O_EXCL with mode 0400,
        fsync'ed, renamed over ``path``, directory fsync'ed.  O_EXCL makes two
        concurrent writers fail instead of interleaving."""
        tmp = path + ".tmp"
        try:
            safeio.write_new_file(tmp, self.dumps(), 0o400)
        except FileExistsError:
            raise  # the other writer's temp file: never ours to remove
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        try:
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        safeio.fsync_dir(os.path.dirname(os.path.abspath(path)))


# -- passwords and master keys -------------------------------------------------


def read_passfile(path: str) -> bytes:
    """Password from a file, gocryptfs rules: the first line without its ``\\n``,
    byte-for-byte (no trimming or normalisation), 1..2048 bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PASSWORD_LEN + 2)
    except OSError as e:
        raise BadInputError(f"cannot read password file {path}: {e.strerror}") from None
    line = data.split(b"\n", 1)[0]
    if len(line) == 0:
        raise BadInputError(f"password file {path}: first line is empty")
    if len(line) > MAX_PASSWORD_LEN:
        raise BadInputError(f"password file {path}: password longer than 2048 bytes")
    return line


_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def parse_master_key(text: str) -> bytes:
    """64 hex digits; '-' separators and surrounding whitespace ignored.  The error
    message never echoes the input, which may be a (mistyped) key."""
    s = text.strip().replace("-", "")
    if not _HEX_KEY.fullmatch(s):
        raise BadInputError("master key must be 64 hex digits (dashes allowed)")
    return bytes.fromhex(s)


def format_master_key(key: bytes) -> str:
    if len(key) != KEY_LEN:
        raise BadInputError("master key must be 32 bytes")
    h = key.hex()
    return "-".join(h[i : i + 8] for i in range(0, 64, 8))
