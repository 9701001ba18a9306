"""Compatibility with gocryptfs 2.3: the published test vectors, then real interop.

The interop tests use Debian's gocryptfs binary as the peer at the *pure* layer:
gocryptfs writes a volume through its own FUSE mount and we decrypt the cipher tree
with fuse_crypt's layers alone; and we write a cipher tree with our layers and let
gocryptfs mount (and fsck) it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fuse_crypt.configfile import ConfFile, format_master_key, parse_master_key
from fuse_crypt.contentenc import CIPHER_BS, HEADER_LEN, PLAIN_BS, ContentEnc
from fuse_crypt.cryptocore import INFO_EME, INFO_GCM, CryptoCore, hkdf_sha256
from fuse_crypt.errors import ConfigError
from fuse_crypt.nametransform import (
    CONF_NAME,
    DIRIV_NAME,
    NameTransform,
    pad16,
)
from tests.fuse_env import fuse_skip_reason

PASSWORD = b"correct horse battery staple"
SALT_B64 = "Dxn1708Wda+dkAed/grjjimkXbMDxG85eWgIDdCAB4M="
EKEY_B64 = (
    "V1TnNlCqS6gExP50BrCo79sJM6wU/oVgGfoRDCTiRlDDh0h2llKip3ZPHs6uKfmdj71Ela4jA3zxk1UzMi3UpQ=="
)
MASTER_KEY_HEX = "f2a477e35823f5e020f658899c23ae02a7b64d4f8484db517998f19bc6e289d6"
ROOT_DIRIV = bytes.fromhex("fa89634babeeacec772ad12994f0455e")

VECTOR_CONF = (
    "{\n"
    '\t"Creator": "gocryptfs 2.3",\n'
    f'\t"EncryptedKey": "{EKEY_B64}",\n'
    '\t"ScryptObject": {\n'
    f'\t\t"Salt": "{SALT_B64}",\n'
    '\t\t"N": 1024,\n'
    '\t\t"R": 8,\n'
    '\t\t"P": 1,\n'
    '\t\t"KeyLen": 32\n'
    "\t},\n"
    '\t"Version": 2,\n'
    '\t"FeatureFlags": [\n'
    '\t\t"HKDF",\n'
    '\t\t"GCMIV128",\n'
    '\t\t"DirIV",\n'
    '\t\t"EMENames",\n'
    '\t\t"LongNames",\n'
    '\t\t"Raw64"\n'
    "\t]\n"
    "}\n"
).encode()


# -- section 18 test vectors -------------------------------------------------------


def test_scrypt_kek_and_wrap_key() -> None:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    kek = Scrypt(salt=base64.b64decode(SALT_B64), length=32, n=1024, r=8, p=1).derive(PASSWORD)
    assert kek.hex() == "3faed4d894de35930a3daf813fb29dc8029571a73d70741022772483575c485f"
    assert (
        hkdf_sha256(kek, INFO_GCM).hex()
        == "3d3636fef25006d2aba07897bb45a2070473bd589612f62e39f8dd8b8e6a6fa8"
    )


def test_master_key_unwrap() -> None:
    conf = ConfFile.loads(VECTOR_CONF)
    assert conf.feature_flags == ("HKDF", "GCMIV128", "DirIV", "EMENames", "LongNames", "Raw64")
    assert conf.encrypted_key[:16].hex() == "5754e73650aa4ba804c4fe7406b0a8ef"
    mk = conf.unlock(PASSWORD)
    assert mk.hex() == MASTER_KEY_HEX
    assert (
        format_master_key(mk)
        == "f2a477e3-5823f5e0-20f65889-9c23ae02-a7b64d4f-8484db51-7998f19b-c6e289d6"
    )
    assert parse_master_key(format_master_key(mk)) == mk


def test_conf_dumps_is_byte_identical_to_gocryptfs() -> None:
    assert ConfFile.loads(VECTOR_CONF).dumps() == VECTOR_CONF


def test_sub_keys() -> None:
    mk = bytes.fromhex(MASTER_KEY_HEX)
    assert (
        hkdf_sha256(mk, INFO_GCM).hex()
        == "a96dbd1f4eacad1888b27360b19ca1fb1392e1578ec9b576e06ab5213eb9d905"
    )
    assert (
        hkdf_sha256(mk, INFO_EME).hex()
        == "d5d7c4027d4810446c9e2ccd70e7f995d893e10c33e6967dc94480453b10d005"
    )


def test_encrypted_name_vector() -> None:
    core = CryptoCore(bytes.fromhex(MASTER_KEY_HEX))
    nt = NameTransform(core)
    assert pad16(b"hello.txt").hex() == "68656c6c6f2e74787407070707070707"
    assert nt.encrypt_name("hello.txt", ROOT_DIRIV) == "AP1Oy10c8gB_Lc7zMynUBg"
    assert nt.decrypt_name("AP1Oy10c8gB_Lc7zMynUBg", ROOT_DIRIV) == "hello.txt"


def test_content_vector_sizes_and_aad() -> None:
    core = CryptoCore(bytes.fromhex(MASTER_KEY_HEX))
    ce = ContentEnc(core)
    assert ce.cipher_size(18) == 68
    assert ce.plain_size(68) == 18
    fid = bytes.fromhex("7a0e148fd511af404d3af4277a20f037")
    assert ce.parse_header(b"\x00\x02" + fid) == fid
    # Build block 0 with the published nonce and check AAD layout by decrypting it.
    nonce = bytes.fromhex("230fbf1f10cc45b82321cfb8427e9041")
    aad = bytes.fromhex("00000000000000007a0e148fd511af404d3af4277a20f037")
    block = nonce + core.encrypt_raw(nonce, b"Hello, gocryptfs!\n", aad)
    assert len(block) + HEADER_LEN == 68
    assert ce.decrypt_blocks(0, block, fid) == b"Hello, gocryptfs!\n"


# -- real interop with the gocryptfs binary ----------------------------------------

GOCRYPTFS = shutil.which("gocryptfs")
needs_gocryptfs = pytest.mark.skipif(
    GOCRYPTFS is None or fuse_skip_reason(None) is not None,
    reason=f"gocryptfs missing or {fuse_skip_reason(None)}",
)

LONG_NAME = "L" * 190 + "-long-name"  # 200 bytes: hashed into gocryptfs.longname.*
SIZES = (0, 1, 4095, 4096, 4097, (1 << 20) + 1)


def _payload(n: int, seed: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(b"%d:%d" % (seed, counter)).digest()
        counter += 1
    return bytes(out[:n])


def _expected_tree() -> dict[str, tuple[str, bytes]]:
    """Plain tree written on both sides: path -> (kind, content/target)."""
    tree: dict[str, tuple[str, bytes]] = {}
    tree["sub"] = ("dir", b"")
    tree["sub/deeper"] = ("dir", b"")
    for i, n in enumerate(SIZES):
        tree[f"sub/deeper/size_{n}"] = ("file", _payload(n, i))
    tree["hello.txt"] = ("file", b"Hello, gocryptfs!\n")
    tree[LONG_NAME] = ("file", b"long name content")
    tree[f"sub/{LONG_NAME}d"] = ("dir", b"")
    tree[f"sub/{LONG_NAME}d/inner"] = ("file", b"inside a long-named dir")
    tree["link"] = ("link", b"sub/deeper/size_1")
    tree["abslink"] = ("link", b"/a/b/" + b"c" * 300)
    tree["umlaut-\u00fc\u00e9"] = ("file", b"utf-8 name")
    return tree


SPARSE_OFFSET = 3 * PLAIN_BS + 5  # blocks 0-2 become holes


def _sparse_content() -> bytes:
    return bytes(SPARSE_OFFSET) + b"X" + bytes(0)


@contextlib.contextmanager
def _mounted(cipher: Path, mnt: Path, vectors_passfile: Path) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    subprocess.run(
        [GOCRYPTFS, "-q", "-passfile", str(vectors_passfile), str(cipher), str(mnt)],
        check=True,
        timeout=60,
    )
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=60)


def _read_tree(root: Path) -> dict[str, tuple[str, bytes]]:
    out: dict[str, tuple[str, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.fsencode(os.readlink(p)))
            elif p.is_dir():
                out[rel] = ("dir", b"")
            else:
                out[rel] = ("file", p.read_bytes())
    return out


class CipherTreeReader:
    """Decrypts a whole gocryptfs cipher directory with fuse_crypt's pure layers."""

    def __init__(self, cipher: Path, password: bytes) -> None:
        self.conf = ConfFile.read(str(cipher / CONF_NAME))
        self.core = self.conf.new_core(self.conf.unlock(password))
        self.nt = self.conf.name_transform(self.core)
        self.ce = ContentEnc(self.core)
        self.root = cipher

    def walk(self) -> tuple[dict[str, tuple[str, bytes]], dict[str, dict[str, bytes]]]:
        tree: dict[str, tuple[str, bytes]] = {}
        xattrs: dict[str, dict[str, bytes]] = {}
        self._walk_dir(self.root, "", tree, xattrs)
        return tree, xattrs

    def _walk_dir(self, cdir: Path, prefix: str, tree: dict, xattrs: dict) -> None:
        if self.nt.deterministic:
            dir_iv = bytes(16)  # ignored: deterministic names use a zero IV
        else:
            dir_iv = self.nt.check_dir_iv((cdir / DIRIV_NAME).read_bytes())
        for entry in sorted(os.listdir(cdir)):
            if self.nt.is_reserved(entry):
                continue
            cname = entry
            if self.nt.is_long_name_file(entry):
                content = (cdir / self.nt.long_name_companion(entry)).read_bytes()
                cname = self.nt.read_long_name(entry, content)
            plain = self.nt.decrypt_name(cname, dir_iv)
            rel = prefix + plain
            cpath = cdir / entry
            for xname in os.listxattr(cpath, follow_symlinks=False):
                if xname.startswith("user.gocryptfs."):
                    value = os.getxattr(cpath, xname, follow_symlinks=False)
                    xattrs.setdefault(rel, {})[self.nt.decrypt_xattr_name(xname)] = (
                        self.nt.decrypt_xattr_value(value)
                    )
            if cpath.is_symlink():
                tree[rel] = ("link", os.fsencode(self.nt.decrypt_symlink(os.readlink(cpath))))
            elif cpath.is_dir():
                tree[rel] = ("dir", b"")
                self._walk_dir(cpath, rel + "/", tree, xattrs)
            else:
                tree[rel] = ("file", self.decrypt_file(cpath))

    def cipher_path(self, rel: str) -> Path:
        """Cipher path of a plaintext path, found by decrypting directory listings."""
        cdir = self.root
        for part in rel.split("/"):
            dir_iv = bytes(16)
            if not self.nt.deterministic:
                dir_iv = self.nt.check_dir_iv((cdir / DIRIV_NAME).read_bytes())
            disk, _ = self.nt.disk_name(part, dir_iv)
            assert disk in os.listdir(cdir)
            cdir = cdir / disk
        return cdir

    def decrypt_file(self, cpath: Path) -> bytes:
        data = cpath.read_bytes()
        if len(data) == 0:
            return b""
        file_id = self.ce.parse_header(data[:HEADER_LEN])
        plain = self.ce.decrypt_blocks(0, data[HEADER_LEN:], file_id)
        assert len(plain) == self.ce.plain_size(len(data))
        return plain


class CipherTreeWriter:
    """Writes plaintext into a cipher directory with fuse_crypt's pure layers, the way
    the FUSE frontend would (diriv per dir, .name files, sealed symlinks, xattrs)."""

    def __init__(self, cipher: Path, conf: ConfFile, master_key: bytes) -> None:
        self.core = conf.new_core(master_key)
        self.nt = conf.name_transform(self.core)
        self.ce = ContentEnc(self.core)
        self.root = cipher
        self.dir_ivs: dict[str, bytes] = {}
        self._make_diriv(cipher, "")

    def _make_diriv(self, cdir: Path, rel: str) -> None:
        if self.nt.deterministic:
            self.dir_ivs[rel] = bytes(16)  # no diriv files; names use a zero IV
            return
        iv = self.nt.new_dir_iv()
        (cdir / DIRIV_NAME).write_bytes(iv)
        os.chmod(cdir / DIRIV_NAME, 0o444)
        self.dir_ivs[rel] = iv

    def _cpath(self, rel: str) -> Path:
        parts = rel.split("/")
        cdir = self.root
        parent_rel = ""
        for i, part in enumerate(parts):
            disk, long_cname = self.nt.disk_name(part, self.dir_ivs[parent_rel])
            if long_cname is not None:
                companion = cdir / self.nt.long_name_companion(disk)
                if not companion.exists():
                    companion.write_bytes(long_cname.encode("ascii"))
                    os.chmod(companion, 0o444)
            cdir = cdir / disk
            parent_rel = "/".join(parts[: i + 1])
        return cdir

    def mkdir(self, rel: str) -> None:
        cpath = self._cpath(rel)
        cpath.mkdir()
        self._make_diriv(cpath, rel)

    def write_file(self, rel: str, data: bytes) -> None:
        cpath = self._cpath(rel)
        if not data:
            cpath.write_bytes(b"")
            return
        header, fid = self.ce.new_header()
        cpath.write_bytes(header + self.ce.encrypt_blocks(0, data, fid))

    def write_sparse(self, rel: str, offset: int, data: bytes) -> None:
        """Holes for every block before ``offset``'s block, then real data."""
        cpath = self._cpath(rel)
        header, fid = self.ce.new_header()
        first = offset // PLAIN_BS
        block_data = bytes(offset - first * PLAIN_BS) + data
        with open(cpath, "wb") as f:
            f.write(header)
            f.truncate(ContentEnc.cipher_offset(first))
            f.seek(ContentEnc.cipher_offset(first))
            f.write(self.ce.encrypt_blocks(first, block_data, fid))

    def symlink(self, rel: str, target: bytes) -> None:
        os.symlink(self.nt.encrypt_symlink(os.fsdecode(target)), self._cpath(rel))

    def setxattr(self, rel: str, name: str, value: bytes) -> None:
        os.setxattr(
            self._cpath(rel),
            self.nt.encrypt_xattr_name(name),
            self.nt.encrypt_xattr_value(value),
            follow_symlinks=False,
        )


def _write_plain_tree(root: Path, tree: dict[str, tuple[str, bytes]]) -> None:
    for rel, (kind, content) in tree.items():
        p = root / rel
        if kind == "dir":
            p.mkdir()
        elif kind == "link":
            os.symlink(os.fsdecode(content), p)
        else:
            p.write_bytes(content)


def _gocryptfs_init(
    cipher: Path, passfile: Path, *init_args: str
) -> subprocess.CompletedProcess[str]:
    """``gocryptfs -init`` (logN 10, the caller's extra flags) of a new directory ``cipher``."""
    cipher.mkdir()
    argv = [GOCRYPTFS or "gocryptfs", "-q", "-init", "-scryptn", "10", *init_args]
    return subprocess.run(
        [*argv, "-passfile", str(passfile), str(cipher)],
        timeout=60,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def vectors_passfile(tmp_path: Path) -> Path:
    pf = tmp_path / "passfile"
    pf.write_bytes(PASSWORD + b"\n")
    return pf


@needs_gocryptfs
def test_decrypt_volume_written_by_gocryptfs(tmp_path: Path, vectors_passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    _gocryptfs_init(cipher, vectors_passfile).check_returncode()
    expected = _expected_tree()
    with _mounted(cipher, tmp_path / "mnt", vectors_passfile) as mnt:
        _write_plain_tree(mnt, expected)
        with open(mnt / "sparse", "wb") as f:
            f.seek(SPARSE_OFFSET)
            f.write(b"X")
        with open(mnt / "grown", "wb") as f:
            f.write(b"head")
            f.truncate(5 * PLAIN_BS)  # new blocks are holes in the cipher file
        os.setxattr(mnt / "hello.txt", "user.x", b"secret xattr")
    expected["sparse"] = ("file", _sparse_content())
    expected["grown"] = ("file", b"head" + bytes(5 * PLAIN_BS - 4))

    reader = CipherTreeReader(cipher, PASSWORD)
    tree, xattrs = reader.walk()
    assert tree == expected
    assert xattrs == {"hello.txt": {"user.x": b"secret xattr"}}

    # The long name really went through the long-name path on disk.
    assert any(n.startswith("gocryptfs.longname.") for n in os.listdir(cipher))
    # gocryptfs left holes: blocks 0-2 of "sparse" are all-zero cipher blocks.
    sparse_c = reader.cipher_path("sparse")
    raw = sparse_c.read_bytes()
    assert raw[HEADER_LEN : HEADER_LEN + 3 * CIPHER_BS] == bytes(3 * CIPHER_BS)


def _variant_conf(variant: str) -> tuple[ConfFile, bytes]:
    """Confs for every variant we can write; the non-Raw64 and non-HKDF ones are built
    by editing flags (gocryptfs 2.3 -init can no longer create them, but mounts them)."""
    if variant == "aessiv":
        return ConfFile.create(PASSWORD, scrypt_logn=10, aessiv=True)
    if variant == "deterministic":
        return ConfFile.create(PASSWORD, scrypt_logn=10, deterministic_names=True)
    if variant == "longnamemax":
        return ConfFile.create(PASSWORD, scrypt_logn=10, long_name_max=100)
    conf, mk = ConfFile.create(PASSWORD, scrypt_logn=10)
    if variant == "no-raw64":
        flags = tuple(f for f in conf.feature_flags if f != "Raw64")
        conf = dataclasses.replace(conf, feature_flags=flags)
    elif variant == "no-hkdf":
        flags = tuple(f for f in conf.feature_flags if f not in ("HKDF", "Raw64"))
        conf = dataclasses.replace(conf, feature_flags=flags).rewrap(mk, PASSWORD)
        assert len(conf.encrypted_key) == 60
    return ConfFile.loads(conf.dumps()), mk


@needs_gocryptfs
@pytest.mark.parametrize(
    "variant", ["default", "aessiv", "deterministic", "longnamemax", "no-raw64", "no-hkdf"]
)
def test_gocryptfs_mounts_volume_written_by_us(
    tmp_path: Path, vectors_passfile: Path, variant: str
) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    conf, mk = _variant_conf(variant)
    conf.write(str(cipher / CONF_NAME))
    assert (os.stat(cipher / CONF_NAME).st_mode & 0o777) == 0o400

    w = CipherTreeWriter(cipher, conf, mk)
    expected = _expected_tree()
    for rel, (kind, content) in expected.items():
        if kind == "dir":
            w.mkdir(rel)
        elif kind == "link":
            w.symlink(rel, content)
        else:
            w.write_file(rel, content)
    w.write_sparse("sparse", SPARSE_OFFSET, b"X")
    expected["sparse"] = ("file", _sparse_content())
    w.setxattr("hello.txt", "user.x", b"secret xattr")

    fsck = subprocess.run(
        [GOCRYPTFS, "-fsck", "-passfile", str(vectors_passfile), str(cipher)],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    with _mounted(cipher, tmp_path / "mnt", vectors_passfile) as mnt:
        assert _read_tree(mnt) == expected
        assert os.getxattr(mnt / "hello.txt", "user.x") == b"secret xattr"
        assert os.stat(mnt / "sparse").st_size == SPARSE_OFFSET + 1
        # and gocryptfs can write into our volume, which we then read back
        (mnt / "sub" / "from-gocryptfs").write_bytes(b"written by gocryptfs")

    reader = CipherTreeReader(cipher, PASSWORD)
    tree, _ = reader.walk()
    assert tree["sub/from-gocryptfs"] == ("file", b"written by gocryptfs")
    long_disk = reader.cipher_path(LONG_NAME).name
    assert reader.nt.is_long_name_file(long_disk)
    if variant == "no-raw64":
        assert long_disk.endswith("=")


@needs_gocryptfs
def test_gocryptfs_accepts_our_password_change(tmp_path: Path, vectors_passfile: Path) -> None:
    cipher = tmp_path / "cipher"
    _gocryptfs_init(cipher, vectors_passfile).check_returncode()
    conf = ConfFile.read(str(cipher / CONF_NAME))
    mk = conf.unlock(PASSWORD)
    new = conf.rewrap(mk, b"new password")
    os.unlink(cipher / CONF_NAME)
    new.write(str(cipher / CONF_NAME))
    newpf = tmp_path / "newpass"
    newpf.write_bytes(b"new password\n")
    with _mounted(cipher, tmp_path / "mnt", newpf) as mnt:
        (mnt / "f").write_bytes(b"ok")
    assert ConfFile.read(str(cipher / CONF_NAME)).unlock(b"new password") == mk


@needs_gocryptfs
@pytest.mark.parametrize(
    "init_args",
    [["-deterministic-names"], ["-aessiv"], ["-longnamemax", "100"]],
    ids=["deterministic", "aessiv", "longnamemax"],
)
def test_decrypt_gocryptfs_variants(
    tmp_path: Path, vectors_passfile: Path, init_args: list[str]
) -> None:
    cipher = tmp_path / "cipher"
    init = _gocryptfs_init(cipher, vectors_passfile, *init_args)
    if init.returncode != 0:
        pytest.skip(f"gocryptfs refused {init_args}: {init.stderr.strip()}")
    tree = {
        "dir": ("dir", b""),
        "dir/" + "n" * 120: ("file", _payload(5000, 7)),
        "link": ("link", b"dir"),
        "empty": ("file", b""),
    }
    with _mounted(cipher, tmp_path / "mnt", vectors_passfile) as mnt:
        _write_plain_tree(mnt, tree)
    reader = CipherTreeReader(cipher, PASSWORD)
    got, _ = reader.walk()
    assert got == tree
    if "-deterministic-names" in init_args:
        assert not (cipher / DIRIV_NAME).exists()
        assert reader.nt.encrypt_name("dir", b"") in os.listdir(cipher)
    if "-longnamemax" in init_args:
        assert reader.nt.longname_max == 100
        assert reader.nt.is_long_name_file(reader.cipher_path("dir/" + "n" * 120).name)


@needs_gocryptfs
@pytest.mark.parametrize(
    ("init_args", "needle"),
    [(["-xchacha"], "XChaCha20Poly1305"), (["-plaintextnames"], "PlaintextNames")],
)
def test_unsupported_gocryptfs_variants_are_refused_clearly(
    tmp_path: Path, vectors_passfile: Path, init_args: list[str], needle: str
) -> None:
    cipher = tmp_path / "cipher"
    init = _gocryptfs_init(cipher, vectors_passfile, *init_args)
    if init.returncode != 0:
        pytest.skip(f"gocryptfs refused {init_args}: {init.stderr.strip()}")
    with pytest.raises(ConfigError, match=f"{needle}.*not supported"):
        ConfFile.read(str(cipher / CONF_NAME))
