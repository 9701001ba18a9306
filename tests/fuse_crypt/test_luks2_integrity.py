"""CDH's dataIntegrity profile (``luksFormat --integrity hmac-sha256``, luks2.md §4.2).

Only the kernel engine serves dm-integrity, so the library accepts such a header only when
its caller says so (``allow_integrity``). Without that it is refused before any KDF runs,
whatever the host did to make it look plain; the userspace engine never passes the flag.

cryptsetup 2.6 cannot format integrity here (the dm-integrity superblock is written
through a temporary mapping), so the oracles are: the header JSON ``luksFormat
--debug-json`` prints before it fails, and cryptsetup's own handling of a header built to
that shape (luksDump, ``open --test-passphrase``, ``--dump-volume-key``, and the keyslot
``luksAddKey`` writes for a 96-byte key).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.errors import WrongKeyError
from fuse_crypt.luks2 import (
    HeaderError,
    add_passphrase,
    bind_volume,
    open_volume,
    profile,
    remove_passphrase,
)
from tests.fuse_crypt.luks2_helpers import (
    CDH_FORMAT,
    FAST_KDF,
    TINY,
    blank_image,
    cryptsetup,
    cs_json,
    cs_opens,
    cs_volume_key,
    forge,
    integrity_image,
    needs_cryptsetup,
    opened_fd,
    read_copies,
    sha256_file,
)

PW = b"integrity pw"
HMAC = {"type": "hmac(sha256)", "journal_encryption": "none", "journal_integrity": "none"}


@needs_cryptsetup
def test_profile_is_what_cryptsetup_writes(tmp_path: Path) -> None:
    """The real ``luksFormat --integrity hmac-sha256 --integrity-no-wipe`` (CDH's options)
    prints its header JSON before it needs device-mapper: the segment is exactly our
    accepted one. Then cryptsetup takes a header built to that shape as its own."""
    img = blank_image(tmp_path / "cs.img", 64 << 20)
    res = cryptsetup(
        "luksFormat", "--batch-mode", *CDH_FORMAT, "--integrity", "hmac-sha256",
        "--integrity-no-wipe", *FAST_KDF, "--debug-json", "--key-file", "-", str(img),
        stdin=PW, check=False,
    )  # fmt: skip
    log = res.stdout.decode(errors="replace")
    if res.returncode == 0:  # a machine with device-mapper: the real header
        segment = cs_json(img)["segments"]["0"]
    else:
        text = log.split("# Header JSON:# ", 1)[1]
        text = re.sub(r"^# .*$", "", text, flags=re.M)  # debug lines after the JSON
        segment = json.JSONDecoder().raw_decode(text)[0]["segments"]["0"]
        assert "device-mapper" in res.stderr.decode()
    assert segment == {
        "type": "crypt", "offset": "16777216", "size": "dynamic", "iv_tweak": "0",
        "encryption": "aes-xts-plain64", "sector_size": 4096, "integrity": HMAC,
    }  # fmt: skip

    ours = tmp_path / "ours.img"
    vk = integrity_image(ours, PW)
    assert cs_opens(ours, PW) and not cs_opens(ours, b"wrong")
    assert cs_volume_key(ours, PW) == vk and len(vk) == 96
    assert cs_json(ours)["segments"]["0"] == segment


@needs_cryptsetup
def test_keyslot_shape_is_cryptsetups(tmp_path: Path) -> None:
    """cryptsetup's luksAddKey on an integrity header writes the 96-byte keyslot our
    profile expects (area 385024 bytes, 64-byte aes-xts-plain64 KEK), and we open it."""
    img = tmp_path / "i.img"
    vk = integrity_image(img, PW)
    new = tmp_path / "new.key"
    new.write_bytes(b"cryptsetup slot")
    cryptsetup("luksAddKey", "--batch-mode", *FAST_KDF, "--key-file", "-", str(img), str(new),
               stdin=PW)  # fmt: skip
    slot = cs_json(img)["keyslots"]["1"]
    assert slot["key_size"] == 96 and slot["area"]["size"] == "385024"
    assert slot["area"]["key_size"] == 64 and slot["area"]["encryption"] == "aes-xts-plain64"
    with opened_fd(img) as fd:
        opened = open_volume(fd, b"cryptsetup slot", require_binding=False, allow_integrity=True)
    assert opened.volume_key == vk and opened.segment.key_size == 96
    assert opened.segment.integrity == "hmac(sha256)"


@pytest.mark.parametrize("bound", [False, True])
def test_userspace_never_opens_integrity_as_plain(tmp_path: Path, bound: bool) -> None:
    """Without allow_integrity (the userspace engine, block-serve) an integrity header is
    refused before any KDF, with a message that says why; the image is unchanged."""
    img = tmp_path / "i.img"
    integrity_image(img, PW, bound=bound)
    before = sha256_file(img)
    for binding in (True, False):
        with opened_fd(img) as fd, pytest.raises(HeaderError, match="dm-integrity"):
            open_volume(fd, PW, require_binding=binding)
    with opened_fd(img) as fd, pytest.raises(HeaderError, match="dm-integrity"):
        add_passphrase(fd, PW, b"other", require_binding=False)
    with opened_fd(img) as fd, pytest.raises(HeaderError, match="dm-integrity"):
        remove_passphrase(fd, PW, require_binding=False)
    with opened_fd(img) as fd, pytest.raises(HeaderError, match="dm-integrity"):
        bind_volume(fd, PW)
    assert sha256_file(img) == before
    with opened_fd(img) as fd:
        opened = open_volume(fd, PW, require_binding=bound, allow_integrity=True)
    assert opened.segment.integrity == "hmac(sha256)" and len(opened.volume_key) == 96


Edit = Callable[[dict[str, Any]], None]


def _strip_integrity(md: dict[str, Any]) -> None:
    del md["segments"]["0"]["integrity"]


def _integrity(**changes: Any) -> Edit:
    def edit(md: dict[str, Any]) -> None:
        md["segments"]["0"]["integrity"] = {**HMAC, **changes}

    return edit


def _sector(size: int) -> Edit:
    def edit(md: dict[str, Any]) -> None:
        md["segments"]["0"]["sector_size"] = size

    return edit


def _key_size(size: int) -> Edit:
    def edit(md: dict[str, Any]) -> None:
        md["keyslots"]["0"]["key_size"] = size

    return edit


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # The host strips the integrity object so the volume would be served as plain XTS:
        # its keyslots still hold a 96-byte key, which the plain profile refuses.
        (_strip_integrity, "key_size is not 64"),
        (_integrity(type="hmac(sha512)"), "integrity type"),
        (_integrity(type="aead"), "integrity type"),
        (_integrity(journal_encryption="aes"), "journal_encryption"),
        (_integrity(journal_integrity="crc32c"), "journal_integrity"),
        (_integrity(key_size=32), "unknown member"),  # cryptsetup >= 2.8 may write it: refused
        (_sector(512), "4096-byte sectors"),
        (_key_size(64), "key_size is not 96"),  # an integrity segment over a 64-byte key
    ],
)
def test_planted_integrity_headers_are_refused(tmp_path: Path, edit: Edit, match: str) -> None:
    img = tmp_path / "i.img"
    integrity_image(img, PW)
    forge(img, edit)
    before = sha256_file(img)
    for allow in (False, True):
        with opened_fd(img) as fd, pytest.raises(HeaderError, match=match if allow else None):
            open_volume(fd, PW, require_binding=False, allow_integrity=allow)
    assert sha256_file(img) == before


def test_plain_header_with_integrity_allowed_reports_none(tmp_path: Path) -> None:
    """allow_integrity accepts the plain profile too; the caller learns which it is."""
    from fuse_crypt.luks2 import format_volume

    img = blank_image(tmp_path / "p.img")
    with opened_fd(img) as fd:
        format_volume(fd, PW, kdf="pbkdf2", kdf_cost=TINY)
        opened = open_volume(fd, PW, allow_integrity=True)
    assert opened.segment.integrity is None and opened.segment.key_size == 64


@needs_cryptsetup
def test_bind_volume_adds_our_token_once(tmp_path: Path) -> None:
    """What the kernel engine does after its cryptsetup luksFormat --integrity: the
    unbound header gets our binding token; the copy returned is the one written; binding
    again changes nothing; a wrong key changes nothing; cryptsetup still opens it."""
    img = tmp_path / "i.img"
    vk = integrity_image(img, PW)
    with opened_fd(img) as fd, pytest.raises(HeaderError, match="binding token"):
        open_volume(fd, PW, allow_integrity=True)  # unbound: refused where binding is required
    before = sha256_file(img)
    with opened_fd(img) as fd, pytest.raises(WrongKeyError):
        bind_volume(fd, b"wrong", allow_integrity=True)
    assert sha256_file(img) == before
    with opened_fd(img) as fd:
        opened = bind_volume(fd, PW, allow_integrity=True)
    first, second = read_copies(img)
    assert opened.header == first + second and opened.volume_key == vk
    assert opened.segment.integrity == "hmac(sha256)"
    tokens = cs_json(img)["tokens"]
    assert [t["type"] for t in tokens.values()] == [profile.BINDING_TOKEN_TYPE]
    assert cs_opens(img, PW)
    bound = sha256_file(img)
    with opened_fd(img) as fd:
        again = bind_volume(fd, PW, allow_integrity=True)
        assert open_volume(fd, PW, allow_integrity=True).volume_key == vk
    assert sha256_file(img) == bound and again.header == opened.header


@needs_cryptsetup
def test_rotation_keeps_the_96_byte_key(tmp_path: Path) -> None:
    img = tmp_path / "i.img"
    vk = integrity_image(img, PW, bound=True)
    with opened_fd(img) as fd:
        add_passphrase(fd, PW, b"next", allow_integrity=True, kdf="pbkdf2")
        remove_passphrase(fd, PW, allow_integrity=True)
        assert open_volume(fd, b"next", allow_integrity=True).volume_key == vk
    assert cs_opens(img, b"next") and not cs_opens(img, PW)
    assert cs_volume_key(img, b"next") == vk


def test_inspect_header_validates_a_kept_copy(tmp_path: Path) -> None:
    """What the kernel engine asks of its own header copy: validated again, no key."""
    from fuse_crypt.luks2 import format_volume, inspect_header

    img = tmp_path / "i.img"
    integrity_image(img, PW)
    raw = b"".join(read_copies(img))
    assert inspect_header(raw, allow_integrity=True).integrity == "hmac(sha256)"
    assert inspect_header(raw, allow_integrity=True).key_size == 96
    with pytest.raises(HeaderError, match="dm-integrity"):
        inspect_header(raw)
    with pytest.raises(HeaderError, match="short"):
        inspect_header(raw[:1000], allow_integrity=True)
    plain = blank_image(tmp_path / "p.img")
    with opened_fd(plain) as fd:
        opened = format_volume(fd, PW, kdf="pbkdf2", kdf_cost=TINY)
    assert inspect_header(opened.header, allow_integrity=True).integrity is None
