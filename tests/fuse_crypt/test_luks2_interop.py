"""LUKS2 interop with the real cryptsetup 2.6 (luks2.md §7), both directions.

Reader: containers made by ``cryptsetup luksFormat`` with CDH's options (pbkdf2 and argon2id)
open in open_volume, giving the key ``luksDump --dump-volume-key`` prints. Writer: what
format_volume writes passes luksDump, ``open --test-passphrase`` (and fails with a wrong
key) and luksAddKey. Rotation: ours and cryptsetup's add/remove interleave.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuse_crypt.errors import BadInputError, WrongKeyError
from fuse_crypt.luks2 import (
    HeaderError,
    Luks2Error,
    add_passphrase,
    format_volume,
    is_luks,
    open_volume,
    remove_passphrase,
)

from .luks2_helpers import (
    TINY,
    blank_image,
    cryptsetup,
    cs_format,
    cs_json,
    cs_test_passphrase,
    cs_volume_key,
    needs_cryptsetup,
    opened_fd,
    sha256_file,
)

pytestmark = needs_cryptsetup

PW = b"correct horse"


@pytest.mark.parametrize("kdf", ["argon2id", "pbkdf2"])
def test_cryptsetup_made_volume_opens(tmp_path: Path, kdf: str) -> None:
    img = cs_format(tmp_path / "cs.img", PW, kdf)
    before = sha256_file(img)
    with opened_fd(img) as fd:
        assert is_luks(fd)
        opened = open_volume(fd, PW, require_binding=False)
    assert opened.volume_key == cs_volume_key(img, PW)
    seg = opened.segment
    assert (seg.offset, seg.size, seg.sector_size, seg.iv_tweak) == (
        16 * 1024 * 1024,
        None,
        4096,
        0,
    )
    assert (seg.cipher, seg.key_size) == ("aes-xts-plain64", 64)
    assert opened.uuid in cryptsetup("luksDump", str(img)).stdout.decode()
    assert sha256_file(img) == before  # opening writes nothing


def test_cryptsetup_volume_needs_explicit_trust(tmp_path: Path) -> None:
    """No binding token: refused by default, with a message that says why."""
    img = cs_format(tmp_path / "cs.img", PW)
    with opened_fd(img) as fd, pytest.raises(HeaderError, match="binding token"):
        open_volume(fd, PW)


def test_cdh_binary_key_via_stdin(tmp_path: Path) -> None:
    """CDH writes 4096 random key bytes to cryptsetup's stdin: every byte is the passphrase."""
    key = bytes(range(256)) * 16
    img = cs_format(tmp_path / "cdh.img", key)
    with opened_fd(img) as fd:
        assert open_volume(fd, key, require_binding=False).volume_key == cs_volume_key(img, key)


def test_wrong_passphrase_is_wrong_key_and_changes_nothing(tmp_path: Path) -> None:
    img = cs_format(tmp_path / "cs.img", PW)
    before = sha256_file(img)
    with opened_fd(img) as fd:
        with pytest.raises(WrongKeyError):
            open_volume(fd, b"not it", require_binding=False)
        with pytest.raises(BadInputError):
            open_volume(fd, b"", require_binding=False)
    assert sha256_file(img) == before


@pytest.mark.parametrize("kdf", ["argon2id", "pbkdf2"])
def test_our_volume_passes_cryptsetup(tmp_path: Path, kdf: str) -> None:
    img = blank_image(tmp_path / "ours.img")
    with opened_fd(img) as fd:
        opened = format_volume(fd, PW, kdf=kdf, kdf_cost=TINY, label="vol-1")
    dump = cryptsetup("luksDump", str(img)).stdout.decode()
    assert "Label:         \tvol-1" in dump and "coco-csi-binding-v1" in dump
    assert cs_test_passphrase(img, PW) == 0
    assert cs_test_passphrase(img, b"wrong") == 2
    assert cs_volume_key(img, PW) == opened.volume_key
    meta = cs_json(img)
    assert meta["segments"]["0"]["sector_size"] == 4096
    assert meta["keyslots"]["0"]["kdf"]["type"] == kdf
    with opened_fd(img) as fd:
        assert open_volume(fd, PW) == opened


def test_our_volume_takes_cryptsetup_luksaddkey_and_killslot(tmp_path: Path) -> None:
    """cryptsetup only edits keyslots and the digest's keyslot list: the binding stays valid."""
    img = blank_image(tmp_path / "ours.img")
    (tmp_path / "old").write_bytes(PW)
    (tmp_path / "new").write_bytes(b"second")
    with opened_fd(img) as fd:
        opened = format_volume(fd, PW, kdf_cost=TINY)
    cryptsetup("luksAddKey", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations",
               "1000", "-d", str(tmp_path / "old"), str(img), str(tmp_path / "new"))  # fmt: skip
    with opened_fd(img) as fd:
        assert open_volume(fd, b"second").volume_key == opened.volume_key
    cryptsetup("luksKillSlot", "--batch-mode", str(img), "0", "-d", str(tmp_path / "new"))
    with opened_fd(img) as fd:
        assert open_volume(fd, b"second").volume_key == opened.volume_key
        with pytest.raises(WrongKeyError):
            open_volume(fd, PW)


@pytest.mark.parametrize("bound", [True, False])
def test_rotation_add_then_remove(tmp_path: Path, bound: bool) -> None:
    """Rotation on our volume and on a cryptsetup one, checked by cryptsetup each step."""
    if bound:
        img = blank_image(tmp_path / "v.img")
        with opened_fd(img) as fd:
            vk = format_volume(fd, PW, kdf_cost=TINY).volume_key
    else:
        img = cs_format(tmp_path / "v.img", PW)
        vk = cs_volume_key(img, PW)
    rb = bound
    with opened_fd(img) as fd:
        add_passphrase(fd, PW, b"next", kdf="pbkdf2", kdf_cost=TINY, require_binding=rb)
    assert cs_test_passphrase(img, PW) == 0 and cs_test_passphrase(img, b"next") == 0
    slots = cs_json(img)["keyslots"]
    assert sorted(slots) == ["0", "1"] and slots["1"]["area"]["offset"] == "290816"
    with opened_fd(img) as fd:
        remove_passphrase(fd, PW, require_binding=rb)
    assert cs_test_passphrase(img, PW) == 2 and cs_test_passphrase(img, b"next") == 0
    assert sorted(cs_json(img)["keyslots"]) == ["1"]
    assert cs_volume_key(img, b"next") == vk
    with opened_fd(img) as fd:
        assert open_volume(fd, b"next", require_binding=rb).volume_key == vk
        with pytest.raises(Luks2Error, match="last keyslot"):
            remove_passphrase(fd, b"next", require_binding=rb)
        add_passphrase(fd, b"next", PW, kdf_cost=TINY, require_binding=rb)  # fills slot 0 again
    assert sorted(cs_json(img)["keyslots"]) == ["0", "1"]
    assert cs_test_passphrase(img, PW) == 0


def test_format_refuses_bad_requests(tmp_path: Path) -> None:
    small = blank_image(tmp_path / "small.img", 16 * 1024 * 1024)
    odd = blank_image(tmp_path / "odd.img", 17 * 1024 * 1024 + 512)
    with opened_fd(small) as fd, pytest.raises(Luks2Error, match="too small"):
        format_volume(fd, PW, kdf_cost=TINY)
    with opened_fd(odd) as fd, pytest.raises(Luks2Error, match="multiple"):
        format_volume(fd, PW, kdf_cost=TINY)
    img = blank_image(tmp_path / "x.img")
    with opened_fd(img) as fd:
        for kwargs, match in [
            ({"integrity": "hmac-sha256"}, "integrity"),
            ({"sector_size": 8192}, "sector_size"),
            ({"kdf": "argon2i"}, "kdf"),
            ({"volume_key": bytes(64)}, "volume_key"),
            ({"volume_key": b"k" * 32}, "volume_key"),
            ({"kdf_cost": TINY.__class__(memory_kib=1 << 30)}, "memory"),
        ]:
            with pytest.raises(Luks2Error, match=match):
                format_volume(fd, PW, **kwargs)  # type: ignore[arg-type]
        with pytest.raises(BadInputError):
            format_volume(fd, b"", kdf_cost=TINY)
    assert sha256_file(img) == sha256_file(blank_image(tmp_path / "y.img"))


def test_given_volume_key_and_sector_size(tmp_path: Path) -> None:
    img = blank_image(tmp_path / "v.img")
    vk = bytes(range(64))
    with opened_fd(img) as fd:
        opened = format_volume(fd, PW, volume_key=vk, sector_size=512, kdf_cost=TINY)
        assert opened.volume_key == vk and opened.segment.sector_size == 512
        assert open_volume(fd, PW) == opened
    assert cs_volume_key(img, PW) == vk
    assert cs_json(img)["segments"]["0"]["sector_size"] == 512
    assert "volume_key" not in repr(opened) and vk.hex() not in repr(opened)


def test_is_luks(tmp_path: Path) -> None:
    img = blank_image(tmp_path / "v.img")
    with opened_fd(img) as fd:
        assert not is_luks(fd)
        format_volume(fd, PW, kdf_cost=TINY)
        assert is_luks(fd)
    data = bytearray(img.read_bytes())
    data[:6] = bytes(6)  # primary wiped: the secondary still marks it
    img.write_bytes(bytes(data))
    with opened_fd(img) as fd:
        assert is_luks(fd)
