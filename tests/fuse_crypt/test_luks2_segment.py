"""aes-xts-plain64 data sectors against cryptsetup 2.6 and an independent XTS.

The oracles (luks2.md §7/§8): cryptsetup encrypts plaintext in place (offline reencrypt with
a detached header) and we decrypt it; we encrypt and cryptsetup decrypts; and an attached
header with its 16 MiB data offset, re-keyed by cryptsetup, shows the IV counts from the
segment start, not the device start.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from fuse_crypt.luks2 import segment
from fuse_crypt.luks2.segment import SegmentError, XtsSegment
from tests.fuse_crypt import luks2_helpers as lh
from tests.fuzzing import fuzz

SS = 4096


def _gf_double(t: bytes) -> bytes:
    n = int.from_bytes(t, "little") << 1
    if n >> 128:
        n = (n & ((1 << 128) - 1)) ^ 0x87
    return n.to_bytes(16, "little")


def reference_xts(key: bytes, iv_units: int, data: bytes, *, encrypt: bool) -> bytes:
    """IEEE 1619 XTS from AES-ECB alone (no ciphertext stealing: whole blocks)."""
    half = len(key) // 2
    k1 = Cipher(algorithms.AES(key[:half]), modes.ECB())
    t = (
        Cipher(algorithms.AES(key[half:]), modes.ECB())
        .encryptor()
        .update(iv_units.to_bytes(16, "little"))
    )
    ctx = k1.encryptor() if encrypt else k1.decryptor()
    out = bytearray()
    for i in range(0, len(data), 16):
        block = bytes(a ^ b for a, b in zip(data[i : i + 16], t, strict=True))
        out += bytes(a ^ b for a, b in zip(ctx.update(block), t, strict=True))
        t = _gf_double(t)
    return bytes(out)


def test_tweak_counts_512_byte_units() -> None:
    seg = XtsSegment(os.urandom(64))
    assert seg.tweak(0) == bytes(16)
    assert seg.tweak(1) == (8).to_bytes(8, "little") + bytes(8)
    assert XtsSegment(os.urandom(64), iv_tweak=3).tweak(2) == (19).to_bytes(16, "little")
    plain = XtsSegment(os.urandom(64), cipher="aes-xts-plain", iv_tweak=(1 << 32) - 8)
    assert plain.tweak(1) == bytes(16)  # the 32-bit counter wraps


@pytest.mark.parametrize("key_len", [64, 32])
def test_matches_independent_xts(key_len: int) -> None:
    key = os.urandom(key_len)
    seg = XtsSegment(key)
    data = os.urandom(3 * SS)
    ct = seg.encrypt(2 * SS, data)
    for i in range(3):
        sector = data[i * SS : (i + 1) * SS]
        want = reference_xts(key, (2 + i) * 8, sector, encrypt=True)
        assert ct[i * SS : (i + 1) * SS] == want
    assert seg.decrypt(2 * SS, ct) == data


def per_sector_xts(
    key: bytes, units: list[int], data: bytes, sector_size: int, *, encrypt: bool
) -> bytes:
    """`cryptography`'s own XTS, one context per sector (the tweak of sector i: units[i])."""
    out = bytearray()
    for i, u in enumerate(units):
        c = Cipher(algorithms.AES(key), modes.XTS(u.to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i * sector_size : (i + 1) * sector_size]) + ctx.finalize()
    return bytes(out)


def expected_units(cipher: str, iv_tweak: int, first: int, n: int, sector_size: int) -> list[int]:
    """The IV of each sector, spelled out from luks2.md §4.1 (not from XtsSegment.tweak)."""
    mask = (1 << 64) - 1 if cipher == "aes-xts-plain64" else (1 << 32) - 1
    return [(iv_tweak + (first + i) * (sector_size // 512)) & mask for i in range(n)]


BACKENDS = ["libcrypto-evp-batch", "libcrypto-evp", "cryptography", "cryptography-public"]


def use_backend(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Make ``name`` the one that segments made without ``backend=`` pick."""
    if name == "libcrypto-evp":
        monkeypatch.setattr(segment, "_load_loop", lambda: None)
    elif name != "libcrypto-evp-batch":
        monkeypatch.setattr(segment, "_load_evp", lambda: None)


def reload_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget what was loaded, so the next segment loads libcrypto and the C loop again
    (under the test's patches; monkeypatch restores the process's state afterwards)."""
    for name, value in (("_EVP_TRIED", False), ("_EVP", None), ("_LOOP_TRIED", False)):
        monkeypatch.setattr(segment, name, value)
    monkeypatch.setattr(segment, "_LOOP", None)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each implementation in turn: segments made inside the test use it."""
    name: str = request.param
    use_backend(monkeypatch, name.removesuffix("-public"))
    if name == "cryptography-public":
        monkeypatch.setattr(segment, "_ENC_CTX", None)
        monkeypatch.setattr(segment, "_DEC_CTX", None)
    yield name


def test_libcrypto_backend_is_used_here() -> None:
    """The fast path must really run where the tests run (and in the image, which ships
    libssl3 and the loop setup.py built): without libcrypto.so.3 or xts_sectors.so.0 this
    fails rather than quietly testing a fallback."""
    assert segment.LOOP_FILE.is_file(), "setup.py did not build the C sector loop"
    assert XtsSegment(os.urandom(64)).backend == "libcrypto-evp-batch"


def test_falls_back_to_the_python_loop_without_the_c_loop(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(segment, "LOOP_FILE", tmp_path / "absent.so.0")
    reload_backends(monkeypatch)
    key, data = os.urandom(64), os.urandom(3 * SS)
    seg = XtsSegment(key)
    assert seg.backend == "libcrypto-evp"
    assert seg.encrypt(SS, data) == per_sector_xts(key, [8, 16, 24], data, SS, encrypt=True)
    with pytest.raises(SegmentError, match="the libcrypto-evp-batch XTS backend is unavailable"):
        XtsSegment(key, backend="libcrypto-evp-batch")


def test_a_library_without_the_loop_symbol_is_not_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale or foreign file at LOOP_FILE (here: libcrypto itself) is refused."""
    import ctypes.util

    monkeypatch.setattr(segment, "LOOP_FILE", Path(ctypes.util.find_library("crypto") or "x"))
    reload_backends(monkeypatch)
    assert XtsSegment(os.urandom(64)).backend == "libcrypto-evp"


def test_falls_back_without_libcrypto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment, "_LIBCRYPTO", "libcrypto-absent.so.99")
    reload_backends(monkeypatch)
    key, data = os.urandom(64), os.urandom(3 * SS)
    seg = XtsSegment(key)
    assert seg.backend == "cryptography"
    assert seg.encrypt(SS, data) == per_sector_xts(key, [8, 16, 24], data, SS, encrypt=True)


@pytest.mark.parametrize("forced", ["libcrypto-evp", "cryptography"])
def test_environment_forces_an_older_backend(monkeypatch: pytest.MonkeyPatch, forced: str) -> None:
    monkeypatch.setenv(segment.BACKEND_ENV, forced)
    reload_backends(monkeypatch)
    key, data = os.urandom(64), os.urandom(2 * SS)
    seg = XtsSegment(key)
    assert seg.backend == forced
    assert seg.decrypt(0, data) == per_sector_xts(key, [0, 8], data, SS, encrypt=False)


def test_backend_can_be_named() -> None:
    key, data = os.urandom(64), os.urandom(2 * SS)
    segs = [XtsSegment(key, backend=b) for b in segment.BACKENDS]
    assert [s.backend for s in segs] == list(segment.BACKENDS)
    assert len({s.encrypt(SS, data) for s in segs}) == 1
    with pytest.raises(SegmentError, match="unknown XTS backend"):
        XtsSegment(key, backend="numpy")


def test_named_backend_unavailable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment, "_load_evp", lambda: None)
    for name in ("libcrypto-evp", "libcrypto-evp-batch"):
        with pytest.raises(SegmentError, match=f"the {name} XTS backend is unavailable"):
            XtsSegment(os.urandom(64), backend=name)


# (cipher, iv_tweak, first sector): the 32-bit counter of aes-xts-plain wrapping, sector
# numbers above 2**32, and plain64's 64-bit IV wrapping (iv_tweak near 2**64).
IV_CASES = [
    ("aes-xts-plain64", 0, 0),
    ("aes-xts-plain64", 0, (1 << 32) + 5),
    ("aes-xts-plain64", 7, (1 << 40) - 2),
    ("aes-xts-plain64", (1 << 64) - 24, 1),
    ("aes-xts-plain", (1 << 32) - 16, 1),
    ("aes-xts-plain", 0, (1 << 32) - 1),
]


@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
@pytest.mark.parametrize("key_len", [32, 64])
@pytest.mark.parametrize(("cipher", "iv_tweak", "first"), IV_CASES)
def test_backends_match_per_sector_xts(
    backend: str, sector_size: int, key_len: int, cipher: str, iv_tweak: int, first: int
) -> None:
    """Every implementation against `cryptography`'s XTS one sector at a time and the
    ECB-built reference, both directions, copying and in place."""
    key, n = os.urandom(key_len), 5
    data = os.urandom(n * sector_size)
    seg = XtsSegment(key, sector_size=sector_size, iv_tweak=iv_tweak, cipher=cipher)
    assert seg.backend == backend.removesuffix("-public")
    units = expected_units(cipher, iv_tweak, first, n, sector_size)
    want = per_sector_xts(key, units, data, sector_size, encrypt=True)
    off = first * sector_size
    assert seg.encrypt(off, data) == want
    assert seg.decrypt(off, want) == data
    assert per_sector_xts(key, units, want, sector_size, encrypt=False) == data
    last = (n - 1) * sector_size
    assert want[last:] == reference_xts(key, units[-1], data[last:], encrypt=True)
    buf = bytearray(data)
    seg.encrypt_into(off, buf, buf)
    assert buf == want
    seg.decrypt_into(off, memoryview(buf), memoryview(buf))
    assert buf == data


@fuzz(quick=50)
@given(
    sectors=st.integers(min_value=1, max_value=40),
    first=st.integers(min_value=0, max_value=(1 << 61) - 64),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    iv_tweak=st.integers(min_value=0, max_value=(1 << 64) - 1),
    cipher=st.sampled_from(["aes-xts-plain64", "aes-xts-plain"]),
    key_len=st.sampled_from([32, 64]),
    encrypt=st.booleans(),
)
def test_batch_equals_per_sector_reference(
    sectors: int, first: int, sector_size: int, iv_tweak: int, cipher: str, key_len: int,
    encrypt: bool,
) -> None:  # fmt: skip
    """One call over many sectors (the default backend) == one XTS context per sector."""
    key = os.urandom(key_len)
    if key[: key_len // 2] == key[key_len // 2 :]:
        return
    seg = XtsSegment(key, sector_size=sector_size, iv_tweak=iv_tweak, cipher=cipher)
    data = os.urandom(sectors * sector_size)
    units = expected_units(cipher, iv_tweak, first, sectors, sector_size)
    got = (seg.encrypt if encrypt else seg.decrypt)(first * sector_size, data)
    assert got == per_sector_xts(key, units, data, sector_size, encrypt=encrypt)


def test_shifted_overlap_is_refused() -> None:
    """In place is allowed; an output that overlaps the input at another offset would read
    sectors it already overwrote, so libcrypto's path refuses it."""
    seg = XtsSegment(os.urandom(64))
    buf = bytearray(3 * SS)
    with pytest.raises(ValueError, match="overlap"):
        seg.encrypt_into(0, memoryview(buf)[: 2 * SS], memoryview(buf)[SS:])
    with pytest.raises(ValueError, match="overlap"):
        seg.decrypt_into(0, memoryview(buf)[SS:], memoryview(buf)[: 2 * SS])


def test_threads_share_one_segment(backend: str) -> None:
    """Four threads on one segment (the FUSE workers without the device's lock): each gets
    its own sectors' IVs, never another thread's (one OpenSSL context is shared). The GIL
    is handed over every microsecond so that the threads interleave between sectors."""
    key, ss, n = os.urandom(64), 512, 64
    seg = XtsSegment(key, sector_size=ss)
    jobs = []
    for t in range(4):
        data = os.urandom(n * ss)
        first = 1000 * t
        want = per_sector_xts(key, [first + i for i in range(n)], data, ss, encrypt=True)
        jobs.append((first * ss, data, want))
    errors: list[str] = []

    def work(off: int, data: bytes, want: bytes) -> None:
        for _ in range(30):
            if seg.encrypt(off, data) != want or seg.decrypt(off, want) != data:
                errors.append(f"wrong result at {off}")
                return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=job) for job in jobs]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []


def test_wipe_frees_the_libcrypto_contexts() -> None:
    seg = XtsSegment(os.urandom(64))
    evp = seg._evp
    assert evp is not None
    seg.wipe()
    assert evp._ctx == []
    with pytest.raises(SegmentError, match="wiped"):
        seg.decrypt(0, bytes(SS))
    seg.wipe()  # twice is fine


def test_in_place_and_into() -> None:
    seg = XtsSegment(os.urandom(64))
    data = os.urandom(2 * SS)
    buf = bytearray(data)
    seg.encrypt_into(SS, buf, buf)
    assert bytes(buf) == seg.encrypt(SS, data)
    seg.decrypt_into(SS, buf, buf)
    assert bytes(buf) == data


def test_refusals() -> None:
    key = os.urandom(64)
    with pytest.raises(SegmentError, match="unsupported segment cipher"):
        XtsSegment(key, cipher="cipher_null-ecb")
    with pytest.raises(SegmentError, match="key of"):
        XtsSegment(key[:48])
    with pytest.raises(SegmentError, match="halves are equal"):
        XtsSegment(key[:32] * 2)
    with pytest.raises(SegmentError, match="sector size"):
        XtsSegment(key, sector_size=8192)
    with pytest.raises(SegmentError, match="iv_tweak"):
        XtsSegment(key, iv_tweak=-1)
    seg = XtsSegment(key)
    with pytest.raises(ValueError, match="whole sectors"):
        seg.encrypt(1, bytes(SS))
    with pytest.raises(ValueError, match="whole sectors"):
        seg.decrypt(0, bytes(100))
    with pytest.raises(ValueError, match="too small"):
        seg.encrypt_into(0, bytes(SS), bytearray(10))
    seg.wipe()
    with pytest.raises(SegmentError, match="wiped"):
        seg.encrypt(0, bytes(SS))
    assert "key" not in repr(seg).lower() or key.hex() not in repr(seg)


@fuzz(quick=50)
@given(
    sectors=st.integers(min_value=0, max_value=4),
    first=st.integers(min_value=0, max_value=1 << 40),
    sector_size=st.sampled_from([512, 1024, 2048, 4096]),
    iv_tweak=st.integers(min_value=0, max_value=1 << 62),
    cipher=st.sampled_from(["aes-xts-plain64", "aes-xts-plain"]),
)
def test_round_trip(sectors: int, first: int, sector_size: int, iv_tweak: int, cipher: str) -> None:
    seg = XtsSegment(os.urandom(64), sector_size=sector_size, iv_tweak=iv_tweak, cipher=cipher)
    data = os.urandom(sectors * sector_size)
    off = first * sector_size
    ct = seg.encrypt(off, data)
    assert len(ct) == len(data)
    assert seg.decrypt(off, ct) == data


# -- cryptsetup oracles --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("impl", "sector_size", "key_bits"),
    [
        ("libcrypto-evp-batch", 4096, 512),
        ("libcrypto-evp-batch", 512, 256),
        ("libcrypto-evp", 4096, 512),
        ("libcrypto-evp", 512, 256),
        ("cryptography", 4096, 512),
    ],
)
def test_reads_what_cryptsetup_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str, sector_size: int, key_bits: int
) -> None:
    lh.skip_without_cryptsetup()
    use_backend(monkeypatch, impl)
    plain = os.urandom(64 * 4096)
    data = tmp_path / "data.img"
    data.write_bytes(plain)
    header = tmp_path / "h.img"
    header.write_bytes(bytes(16 << 20))
    fmt = ["--type", "luks2", "--cipher", "aes-xts-plain64", "--sector-size", str(sector_size),
           "--key-size", str(key_bits)]  # fmt: skip
    lh.cryptsetup(
        "--batch-mode", "reencrypt", "--encrypt", "--force-offline-reencrypt", *fmt,
        *lh.FAST_KDF, "--header", str(header), str(data), "--key-file", "-", stdin=b"pw",
    )  # fmt: skip
    seg_json = lh.cs_json(header)["segments"]["0"]
    assert seg_json["offset"] == "0" and seg_json["sector_size"] == sector_size
    ct = data.read_bytes()
    assert ct != plain
    seg = XtsSegment(lh.cs_volume_key(header), sector_size=sector_size)
    assert seg.backend == impl and len(lh.cs_volume_key(header)) == key_bits // 8
    assert seg.decrypt(0, ct) == plain
    # and from the middle, in place, as the block device reads
    buf = bytearray(ct[5 * sector_size : 37 * sector_size])
    seg.decrypt_into(5 * sector_size, buf, buf)
    assert buf == plain[5 * sector_size : 37 * sector_size]


@pytest.mark.parametrize("impl", list(segment.BACKENDS))
def test_cryptsetup_reads_what_we_encrypted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    lh.skip_without_cryptsetup()
    use_backend(monkeypatch, impl)
    vk = os.urandom(64)
    plain = os.urandom(16 * SS)
    data = tmp_path / "data.img"
    data.write_bytes(bytes(len(plain)))
    header = tmp_path / "h.img"
    lh.cs_luks_format(data, header=header, volume_key=vk)
    seg = XtsSegment(vk)
    assert seg.backend == impl
    data.write_bytes(seg.encrypt(0, plain))
    lh.cryptsetup(
        "--batch-mode", "reencrypt", "--decrypt", "--force-offline-reencrypt",
        "--header", str(header), str(data), "--key-file", "-", stdin=b"pw",
    )  # fmt: skip
    assert data.read_bytes() == plain


def test_attached_header_iv_counts_from_segment_start(tmp_path: Path) -> None:
    """Our ciphertext at the 16 MiB data offset, re-keyed by cryptsetup (which must
    decrypt it first), decrypts back to the plaintext under the new volume key."""
    lh.skip_without_cryptsetup()
    vk = os.urandom(64)
    img = tmp_path / "x.img"
    with img.open("wb") as f:
        f.truncate((16 << 20) + 8 * SS)
    lh.cs_luks_format(img, volume_key=vk)
    offset = int(lh.cs_json(img)["segments"]["0"]["offset"])
    assert offset == 16 << 20
    plain = os.urandom(8 * SS)
    with img.open("r+b") as f:
        f.seek(offset)
        f.write(XtsSegment(vk).encrypt(0, plain))
    lh.cryptsetup("--batch-mode", "reencrypt", "--force-offline-reencrypt", *lh.FAST_KDF,
                  str(img), "--key-file", "-", stdin=b"pw")  # fmt: skip
    new_vk = lh.cs_volume_key(img)
    assert new_vk != vk
    with img.open("rb") as f:
        f.seek(offset)
        ct = f.read(8 * SS)
    assert XtsSegment(new_vk).decrypt(0, ct) == plain
