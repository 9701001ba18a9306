"""Fast in-process checks of ``luks2/volume.py`` that mutation testing runs first.

Volumes are image files formatted with cheap PBKDF2 costs; each test asserts what a change
to the volume code would break: which passphrase opens which slot, what a re-key writes and
where, that a header changed under us is never overwritten, and the bounds on both sides.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from fuse_crypt.errors import BadInputError, WrongKeyError
from fuse_crypt.luks2 import header as hdr
from fuse_crypt.luks2 import keyslot, profile, volume
from fuse_crypt.luks2.errors import HeaderError, Luks2Error
from tests.fuse_crypt.luks2_helpers import TINY, forge, opened_fd, read_copies

PW = b"first passphrase"
SIZE = profile.DATA_OFFSET + 4 * 4096
AREA = volume._area_size(64)


def _fmt(tmp_path: Path, name: str = "v.img", **kw: Any) -> Path:
    path = tmp_path / name
    with path.open("wb") as f:
        f.truncate(SIZE)
    with opened_fd(path) as fd:
        volume.format_volume(fd, PW, kdf="pbkdf2", kdf_cost=TINY, **kw)
    return path


def _open(path: Path, pw: bytes = PW, **kw: Any) -> volume.Opened:
    with opened_fd(path) as fd:
        return volume.open_volume(fd, pw, **kw)


def _add(path: Path, pw: bytes, new: bytes, **kw: Any) -> None:
    with opened_fd(path) as fd:
        volume.add_passphrase(fd, pw, new, kdf="pbkdf2", kdf_cost=TINY, **kw)


def _remove(path: Path, pw: bytes, **kw: Any) -> None:
    with opened_fd(path) as fd:
        volume.remove_passphrase(fd, pw, **kw)


def _meta(path: Path) -> dict[str, Any]:
    first, _ = read_copies(path)
    return hdr.decode_json(first[hdr.BIN_SIZE :])


def _seqid(path: Path) -> tuple[int, int]:
    first, second = read_copies(path)
    return int.from_bytes(first[0x10:0x18], "big"), int.from_bytes(second[0x10:0x18], "big")


def test_opened_describes_the_segment_and_keeps_the_validated_copy(tmp_path: Path) -> None:
    path = _fmt(tmp_path, sector_size=1024, label="lbl")
    o = _open(path)
    assert o.segment == volume.DataSegment(
        offset=profile.DATA_OFFSET, size=None, sector_size=1024, iv_tweak=0,
        cipher="aes-xts-plain64", key_size=64, integrity=None,
    )  # fmt: skip
    assert len(o.volume_key) == 64 and o.volume_key[:32] != o.volume_key[32:]
    first, second = read_copies(path)
    assert o.header == first + second
    assert o.uuid == _meta_uuid(path)
    assert o.volume_key.hex() not in repr(o)
    again = _open(path)
    assert again.volume_key == o.volume_key and again.uuid == o.uuid


def _meta_uuid(path: Path) -> str:
    first, _ = read_copies(path)
    return first[0xA8 : 0xA8 + 40].rstrip(b"\0").decode()


def test_format_returns_what_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
    vk = os.urandom(64)
    with opened_fd(path) as fd:
        o = volume.format_volume(fd, PW, kdf="pbkdf2", kdf_cost=TINY, volume_key=vk)
    assert o.volume_key == vk
    first, second = read_copies(path)
    assert o.header == first + second
    assert _open(path).volume_key == vk
    assert _seqid(path) == (1, 1)


def test_passphrase_checks_on_both_sides(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    for bad in (b"", "text", bytearray(b"x"), b"x" * (volume.MAX_PASSPHRASE + 1)):
        with pytest.raises(BadInputError):
            _open(path, bad)  # type: ignore[arg-type]
        with pytest.raises(BadInputError):
            _add(path, PW, bad)  # type: ignore[arg-type]
    with pytest.raises(WrongKeyError):
        _open(path, b"x" * volume.MAX_PASSPHRASE)  # the longest accepted: only wrong
    with pytest.raises(WrongKeyError):
        _open(path, b"x")


def test_is_luks_finds_every_magic_cryptsetup_probes(tmp_path: Path) -> None:
    path = tmp_path / "d"
    with path.open("wb") as f:
        f.truncate(8 << 20)
    with opened_fd(path) as fd:
        assert not volume.is_luks(fd)
        os.pwrite(fd, hdr.MAGIC_PRIMARY, 0)
        assert volume.is_luks(fd)
        os.pwrite(fd, bytes(6), 0)
        assert not volume.is_luks(fd)
        for off in [0x4000 << i for i in range(9)]:
            os.pwrite(fd, hdr.MAGIC_SECONDARY, off)
            assert volume.is_luks(fd), off
            os.pwrite(fd, bytes(6), off)
        os.pwrite(fd, hdr.MAGIC_SECONDARY, 0x4000 * 3)  # not where cryptsetup looks
        os.pwrite(fd, hdr.MAGIC_SECONDARY, 0)  # a secondary magic at 0 is not a primary
        assert not volume.is_luks(fd)
    empty = tmp_path / "e"
    empty.write_bytes(b"LUKS")
    with opened_fd(empty) as fd:
        assert not volume.is_luks(fd)


def test_slot_order_is_cryptsetups() -> None:
    class S:
        def __init__(self, id: str, priority: int) -> None:
            self.id, self.priority = id, priority

    class M:
        keyslots = [S("10", 1), S("2", 1), S("9", 2), S("3", 0), S("1", 2), S("0", 1)]

    order = [s.id for s in volume._slot_order(M())]  # type: ignore[arg-type]
    assert order == ["1", "9", "0", "2", "10"]


def test_add_then_remove_rotates_and_rebinds(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    vk = _open(path).volume_key
    _add(path, PW, b"second")
    meta = _meta(path)
    assert sorted(meta["keyslots"]) == ["0", "1"]
    assert meta["digests"]["0"]["keyslots"] == ["0", "1"]
    assert meta["keyslots"]["1"]["area"]["offset"] == str(profile.KEYSLOTS_OFFSET + AREA)
    assert _seqid(path) == (2, 2)
    assert _open(path, b"second").volume_key == vk  # binding refreshed: still required
    assert _open(path, PW).volume_key == vk
    material = keyslot.material_length(64)
    with path.open("rb") as f:
        f.seek(profile.KEYSLOTS_OFFSET)
        slot0 = f.read(material)
    _remove(path, PW)
    meta = _meta(path)
    assert sorted(meta["keyslots"]) == ["1"] and meta["digests"]["0"]["keyslots"] == ["1"]
    assert _seqid(path) == (3, 3)
    with path.open("rb") as f:
        f.seek(profile.KEYSLOTS_OFFSET)
        assert f.read(material) != slot0  # the old area was overwritten
        f.seek(profile.KEYSLOTS_OFFSET)
        assert f.read(AREA) != bytes(AREA)  # with random bytes, not zeros
    with pytest.raises(WrongKeyError):
        _open(path, PW)
    assert _open(path, b"second").volume_key == vk
    _add(path, b"second", b"third")  # the freed id and area are reused first
    meta = _meta(path)
    assert sorted(meta["keyslots"]) == ["0", "1"]
    assert meta["keyslots"]["0"]["area"]["offset"] == str(profile.KEYSLOTS_OFFSET)
    assert _open(path, b"third").volume_key == vk


def test_the_last_keyslot_is_never_removed(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    before = path.read_bytes()
    with pytest.raises(Luks2Error) as err:
        _remove(path, PW)
    assert str(err.value) == "refusing to remove the last keyslot: the volume would be lost"
    assert path.read_bytes() == before
    _add(path, PW, b"two")
    _remove(path, b"two")  # two slots: one may go
    assert sorted(_meta(path)["keyslots"]) == ["0"]


def test_eight_keyslots_at_most(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    for i in range(1, profile.MAX_KEYSLOTS):
        _add(path, PW, b"p%d" % i)
    assert sorted(_meta(path)["keyslots"], key=int) == [str(i) for i in range(8)]
    before = path.read_bytes()
    with pytest.raises(Luks2Error, match="already has 8 keyslots"):
        _add(path, PW, b"ninth")
    assert path.read_bytes() == before
    assert _open(path, b"p7").volume_key == _open(path, PW).volume_key


def test_free_area_first_fit_and_the_end_of_the_area() -> None:
    class S:
        def __init__(self, off: int, size: int = AREA) -> None:
            self.area_offset, self.area_size = off, size

    class Seg:
        key_size = 64

    def meta(*slots: S) -> Any:
        class M:
            keyslots = list(slots)
            segment = Seg()

        return M()

    k0 = profile.KEYSLOTS_OFFSET
    assert volume._free_area(meta()) == k0
    assert volume._free_area(meta(S(k0))) == k0 + AREA
    assert volume._free_area(meta(S(k0 + AREA))) == k0  # a gap of exactly one area first
    assert volume._free_area(meta(S(k0 + AREA - 4096))) == k0 + 2 * AREA - 4096
    assert volume._free_area(meta(S(k0 + 2 * AREA), S(k0))) == k0 + AREA  # unsorted input
    end = k0 + profile.KEYSLOTS_SIZE
    assert volume._free_area(meta(S(k0, end - AREA - k0))) == end - AREA  # exactly fits
    with pytest.raises(Luks2Error) as err:
        volume._free_area(meta(S(k0, end - AREA - k0 + 4096)))
    assert str(err.value) == "no room left in the keyslots area"


def test_a_header_changed_under_a_rekey_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host swaps the header after we validated it: add and remove refuse before their
    first write and the device keeps the swapped header and every keyslot byte."""
    for op in ("add", "remove"):
        path = _fmt(tmp_path, f"{op}.img")
        _add(path, PW, b"two")
        real = volume._unlock

        def swap(fd: int, *a: Any, real: Any = real, path: Path = path, **kw: Any) -> Any:
            out = real(fd, *a, **kw)
            forge(path, lambda m: m["config"].update(flags=["allow-discards"]))
            return out

        monkeypatch.setattr(volume, "_unlock", swap)
        swapped_later = path.read_bytes()
        with pytest.raises(HeaderError, match="changed on the device"):
            _add(path, PW, b"three") if op == "add" else _remove(path, PW)
        monkeypatch.setattr(volume, "_unlock", real)
        now = path.read_bytes()
        assert now[hdr.BOTH_COPIES :] == swapped_later[hdr.BOTH_COPIES :], op
        assert now[: hdr.BOTH_COPIES] != swapped_later[: hdr.BOTH_COPIES]  # the forgery


def test_commit_checks_again_right_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap after the keyslot area was written (between the two checks): still refused,
    and no header copy of ours is written over the host's."""
    path = _fmt(tmp_path)
    real = volume._fsync
    calls = []

    def fsync_then_swap(fd: int) -> None:
        real(fd)
        calls.append(fd)
        if len(calls) == 1:
            forge(path, lambda m: m["config"].update(flags=["allow-discards"]))

    monkeypatch.setattr(volume, "_fsync", fsync_then_swap)
    with pytest.raises(HeaderError, match="changed on the device"):
        _add(path, PW, b"two")
    assert len(calls) == 1
    assert _meta(path)["config"].get("flags") == ["allow-discards"]
    assert list(_meta(path)["keyslots"]) == ["0"]


def test_binding_required_and_checked(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    forge(path, lambda m: m.update(tokens={}))
    with pytest.raises(HeaderError, match="no coco-csi binding token"):
        _open(path)
    vk = _open(path, require_binding=False).volume_key
    other = _fmt(tmp_path, "other.img")
    mac = _meta(other)["tokens"]["0"]
    forge(path, lambda m: m.update(tokens={"0": mac}))
    for rb in (True, False):  # a present token always counts
        with pytest.raises(HeaderError, match="binding MAC does not verify"):
            _open(path, require_binding=rb)
    assert vk


def test_bind_volume_binds_once(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    forge(path, lambda m: m.update(tokens={}))
    seq = _seqid(path)
    with opened_fd(path) as fd:
        o = volume.bind_volume(fd, PW)
    first, second = read_copies(path)
    assert o.header == first + second
    assert _seqid(path) == (seq[0] + 1, seq[1] + 1)
    assert _open(path).volume_key == o.volume_key  # the binding is required now, and holds
    assert o.uuid == _meta_uuid(path) and o.segment == _open(path).segment
    before = path.read_bytes()
    with opened_fd(path) as fd:
        again = volume.bind_volume(fd, PW)
    assert path.read_bytes() == before  # already bound: nothing written
    assert again.header == first + second and again.volume_key == o.volume_key
    assert again.uuid == o.uuid and again.segment == o.segment
    with opened_fd(path) as fd, pytest.raises(WrongKeyError):
        volume.bind_volume(fd, b"wrong")
    assert path.read_bytes() == before


def test_keyslot_area_beyond_the_device(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    with path.open("r+b") as f:
        f.truncate(profile.KEYSLOTS_OFFSET + keyslot.material_length(64))
    assert _open(path).volume_key  # exactly the material is enough to unlock
    with path.open("r+b") as f:
        f.truncate(profile.KEYSLOTS_OFFSET + keyslot.material_length(64) - 1)
    with pytest.raises(HeaderError, match="beyond the end"):
        _open(path)


def test_io_errors_are_luks2_errors(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    with opened_fd(path, os.O_RDONLY) as fd:
        with pytest.raises(Luks2Error, match="cannot write the device") as exc:
            volume.add_passphrase(fd, PW, b"two", kdf="pbkdf2", kdf_cost=TINY)
        assert exc.value.__cause__ is None
        assert "Bad file descriptor" in str(exc.value)
    wr = os.open(path, os.O_WRONLY)
    try:
        with pytest.raises(Luks2Error, match="cannot read the device"):
            volume.open_volume(wr, PW)
    finally:
        os.close(wr)
    assert errno.EBADF


def test_short_reads_and_writes_are_completed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _fmt(tmp_path)
    real_pread, real_pwrite = os.pread, os.pwrite
    calls = [0]

    def counted(real: Any, fd: int, arg: Any, off: int) -> Any:
        """A loop that never completes fails here in a moment, not at a timeout."""
        calls[0] += 1
        assert calls[0] < 20_000, "a short read or write is retried without progress"
        return real(fd, arg, off)

    monkeypatch.setattr(os, "pread", lambda fd, n, off: counted(real_pread, fd, min(n, 1000), off))
    monkeypatch.setattr(
        os, "pwrite", lambda fd, data, off: counted(real_pwrite, fd, bytes(data)[:1000], off)
    )
    vk = _open(path).volume_key
    _add(path, PW, b"two")
    monkeypatch.undo()
    assert calls[0] > 600  # 1000 bytes at a time: both were really cut short
    assert _open(path, b"two").volume_key == vk
    with opened_fd(path) as fd:
        assert volume._pread(fd, 100, SIZE - 10) == real_pread(fd, 10, SIZE - 10)


def test_every_entry_point_requires_the_binding_by_default(tmp_path: Path) -> None:
    """A header without our token (stripped by the host) opens, re-keys and loses a slot
    only when the caller says so; by default each refuses and writes nothing."""
    path = _fmt(tmp_path)
    _add(path, PW, b"two")
    forge(path, lambda m: m.update(tokens={}))
    before = path.read_bytes()
    with opened_fd(path) as fd:
        for call in (
            lambda: volume.open_volume(fd, PW),
            lambda: volume.add_passphrase(fd, PW, b"three", kdf="pbkdf2", kdf_cost=TINY),
            lambda: volume.remove_passphrase(fd, b"two"),
        ):
            with pytest.raises(HeaderError, match="no coco-csi binding token"):
                call()
    assert path.read_bytes() == before
    _add(path, PW, b"three", require_binding=False)
    assert _meta(path)["tokens"] == {}  # an unbound volume is not bound behind our back
    _remove(path, b"three", require_binding=False)
    _remove(path, b"two", require_binding=False)
    assert sorted(_meta(path)["keyslots"]) == ["0"]
    assert "tokens" in _meta(path) and _meta(path)["tokens"] == {}  # not bound behind our back


def test_each_refusal_says_exactly_what_happened(tmp_path: Path) -> None:
    """The operator's only clue is the text: a wrong key must read as a wrong key, not as a
    hostile header (and the other way round), with nothing else in it."""
    path = _fmt(tmp_path)
    with pytest.raises(WrongKeyError) as wrong:
        _open(path, b"wrong")
    assert str(wrong.value) == "no LUKS2 keyslot opens with this passphrase"
    texts = {
        b"": "the LUKS2 passphrase is empty",
        "text": "the LUKS2 passphrase must be bytes",
        b"x" * (volume.MAX_PASSPHRASE + 1): "the LUKS2 passphrase is longer than 8 MiB",
    }
    for bad, text in texts.items():
        with pytest.raises(BadInputError) as exc:
            _open(path, bad)  # type: ignore[arg-type]
        assert str(exc.value) == text
    forge(path, lambda m: m.update(tokens={}))
    with pytest.raises(HeaderError) as unbound:
        _open(path)
    assert str(unbound.value) == (
        "LUKS2 header refused: no coco-csi binding token (not made by coco-csi, or "
        "stripped); open with require_binding=False only for trusted CDH-made disks"
    )
    mac = _meta(_fmt(tmp_path, "other.img"))["tokens"]["0"]
    forge(path, lambda m: m.update(tokens={"0": mac}))
    with pytest.raises(HeaderError) as foreign:
        _open(path)
    assert str(foreign.value) == (
        "LUKS2 header refused: the binding MAC does not verify (header parameters were "
        "changed, or the header belongs to another volume key)"
    )


def test_a_swapped_header_is_named_as_such(tmp_path: Path) -> None:
    path = _fmt(tmp_path)
    with opened_fd(path) as fd:
        loaded = volume._load(fd)
        volume._still_validated(fd, loaded)  # unchanged: no error
        forge(path, lambda m: m["config"].update(flags=["allow-discards"]))
        with pytest.raises(HeaderError) as exc:
            volume._still_validated(fd, loaded)
    assert str(exc.value) == "LUKS2 header changed on the device during the update; not committed"
