"""Fast in-process checks of ``luks2/segment.py`` that mutation testing runs first.

Each test pins one behaviour whose change would silently corrupt or expose a data sector:
the tweak arithmetic, the key and sector-size checks, the whole-sector rule, and the three
XTS backends against the independent reference in ``test_luks2_segment.py``, including
the C sector loop's own argument checks.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from fuse_crypt.luks2 import segment as _segment
from fuse_crypt.luks2.segment import SegmentError, XtsSegment
from tests.fuse_crypt.test_luks2_segment import reference_xts, reload_backends

BACKENDS = _segment.BACKENDS
EVP_BACKENDS = ("libcrypto-evp-batch", "libcrypto-evp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_equals_the_reference_per_sector(backend: str) -> None:
    key = bytes(range(64))
    seg = XtsSegment(key, sector_size=512, iv_tweak=5, backend=backend)
    data = os.urandom(3 * 512)
    ct = seg.encrypt(1024, data)
    want = b"".join(
        reference_xts(key, 5 + 2 + i, data[i * 512 : (i + 1) * 512], encrypt=True) for i in range(3)
    )
    assert ct == want
    assert seg.decrypt(1024, ct) == data


def test_read_only_output_is_refused_and_left_alone() -> None:
    """libcrypto writes through a raw pointer: an immutable ``bytes`` given as the output
    must be refused before OpenSSL runs (else it would rewrite a bytes object in place),
    and the input's buffer is released on that path (the error is the output's)."""
    for backend, error in (
        ("libcrypto-evp-batch", BufferError),
        ("libcrypto-evp", BufferError),
        ("cryptography", TypeError),
    ):
        seg = XtsSegment(os.urandom(64), backend=backend)
        out = bytes(2 * 4096)
        with pytest.raises(error):
            seg.encrypt_into(0, bytearray(os.urandom(2 * 4096)), out)
        with pytest.raises(error):
            seg.decrypt_into(0, bytearray(os.urandom(2 * 4096)), out)
        assert out == bytes(2 * 4096), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_wiped_segment_refuses_on_every_backend(backend: str) -> None:
    seg = XtsSegment(os.urandom(64), backend=backend)
    seg.wipe()
    for call in (seg.encrypt, seg.decrypt):
        with pytest.raises(SegmentError, match="wiped"):
            call(0, bytes(4096))


@pytest.mark.parametrize("backend", EVP_BACKENDS)
def test_adjacent_buffers_are_not_an_overlap(backend: str) -> None:
    """Output right after or right before the input (no shared byte) is fine; one shared
    byte either way is an overlap."""
    key = os.urandom(64)
    seg = XtsSegment(key, backend=backend)
    data = os.urandom(2 * 4096)
    want = XtsSegment(key, backend="cryptography").encrypt(0, data)
    for in_at, out_at in ((0, 2 * 4096), (2 * 4096, 0)):
        buf = bytearray(4 * 4096)
        buf[in_at : in_at + len(data)] = data
        view = memoryview(buf)
        seg.encrypt_into(0, view[in_at : in_at + len(data)], view[out_at : out_at + len(data)])
        assert bytes(view[out_at : out_at + len(data)]) == want
    buf = bytearray(4 * 4096 + 1)
    view = memoryview(buf)
    for in_at, out_at in ((0, 2 * 4096 - 1), (2 * 4096 - 1, 0), (1, 2 * 4096), (2 * 4096, 1)):
        if abs(in_at - out_at) >= 2 * 4096:
            continue
        with pytest.raises(ValueError, match="^input and output buffers overlap$"):
            seg.encrypt_into(0, view[in_at : in_at + 2 * 4096], view[out_at : out_at + 2 * 4096])


def test_iv_tweak_must_be_a_plain_non_negative_int() -> None:
    key = os.urandom(64)
    for bad in (True, False, 1.0, "1", -1, None):
        with pytest.raises(SegmentError, match="iv_tweak"):
            XtsSegment(key, iv_tweak=bad)  # type: ignore[arg-type]
    assert XtsSegment(key, iv_tweak=0).tweak(0) == bytes(16)
    assert XtsSegment(key, iv_tweak=1).tweak(0) == (1).to_bytes(16, "little")


def test_whole_sector_rule_on_every_side() -> None:
    seg = XtsSegment(os.urandom(64))
    for offset, length in ((-4096, 4096), (-1, 4096), (4096 + 512, 4096), (0, 4096 - 512)):
        with pytest.raises(ValueError, match="whole sectors"):
            seg.encrypt(offset, bytes(length))
    assert seg.decrypt(0, b"") == b""
    small = XtsSegment(os.urandom(64), sector_size=512)
    assert len(small.encrypt(512, bytes(1024))) == 1024


def test_libcrypto_refuses_equal_halves_itself() -> None:
    """The second line of defence: OpenSSL's own XTS key check surfaces as SegmentError
    (and the half-made contexts are freed), should the first check ever be bypassed."""
    from fuse_crypt.luks2 import segment

    evp = segment._load_evp()
    assert evp is not None
    half = os.urandom(32)
    with pytest.raises(SegmentError) as err:
        segment._EvpXts(evp, half + half)
    assert str(err.value) == "libcrypto refused the XTS key"
    good = segment._EvpXts(evp, os.urandom(64))
    good.close()
    assert good._ctx == []


@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
def test_tweak_units_per_sector(sector_size: int) -> None:
    key = os.urandom(64)
    seg = XtsSegment(key, sector_size=sector_size, iv_tweak=3)
    units = sector_size // 512
    data = os.urandom(2 * sector_size)
    got = seg.encrypt(5 * sector_size, data)
    want = b"".join(
        reference_xts(key, 3 + (5 + i) * units, data[i * sector_size : (i + 1) * sector_size],
                      encrypt=True)
        for i in range(2)
    )  # fmt: skip
    assert got == want
    assert seg.tweak(5) == (3 + 5 * units).to_bytes(16, "little")


@pytest.mark.parametrize("batch", [True, False])
def test_closed_libcrypto_contexts_refuse_by_themselves(batch: bool) -> None:
    """``_EvpXts.run`` after ``close`` (XtsSegment checks its own key first; this is the
    context's own guard, for any other caller)."""
    from fuse_crypt.luks2 import segment

    evp = segment._load_evp()
    assert evp is not None
    ctx = segment._EvpXts(evp, os.urandom(64), segment._load_loop() if batch else None)
    ctx.close()
    buf = memoryview(bytearray(4096))
    with pytest.raises(SegmentError) as err:
        ctx.run(buf, buf, 0, 8, (1 << 64) - 1, 4096, True)
    assert str(err.value) == "the segment key was wiped"
    ctx.close()  # twice is harmless


def test_a_failing_libcrypto_call_is_a_segment_error() -> None:
    """OpenSSL reporting failure (it does not here) must not leave unencrypted or stale
    bytes looking like a result: a SegmentError, and OpenSSL's error queue cleared."""
    from fuse_crypt.luks2 import segment

    evp = segment._load_evp()
    assert evp is not None
    ffi, lib = evp

    class Failing:
        cleared = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(lib, name)

        def EVP_CipherUpdate(self, *args: Any) -> int:  # noqa: N802 - OpenSSL's name
            return 0

        def ERR_clear_error(self) -> None:  # noqa: N802
            Failing.cleared += 1

    ctx = segment._EvpXts(evp, os.urandom(64))
    ctx._lib = Failing()
    buf = memoryview(bytearray(4096))
    with pytest.raises(SegmentError) as err:
        ctx.run(buf, buf, 0, 8, (1 << 64) - 1, 4096, True)
    assert str(err.value) == "libcrypto failed an XTS sector"
    assert Failing.cleared == 1
    ctx.close()


def test_a_failing_c_loop_is_a_segment_error() -> None:
    """The C loop's failure return (its own argument checks here: a zero sector size)
    raises, clears OpenSSL's error queue, and leaves the output as it was."""
    from fuse_crypt.luks2 import segment

    evp, loop = segment._load_evp(), segment._load_loop()
    assert evp is not None and loop is not None
    ffi, lib = evp

    class Clearing:
        cleared = 0

        def __getattr__(self, name: str) -> Any:
            return getattr(lib, name)

        def ERR_clear_error(self) -> None:  # noqa: N802 - OpenSSL's name
            Clearing.cleared += 1

    ctx = segment._EvpXts(evp, os.urandom(64), loop)
    ctx._lib = Clearing()
    src, out = memoryview(bytes(range(256)) * 16), memoryview(bytearray(4096))
    with pytest.raises(SegmentError) as err:
        ctx.run(src, out, 0, 8, (1 << 64) - 1, 0, False)
    assert str(err.value) == "libcrypto failed an XTS sector"
    assert Clearing.cleared == 1 and out == bytes(4096)
    ctx.close()


def test_the_c_loop_checks_its_own_arguments() -> None:
    """Called directly (a caller other than ``_EvpXts``): partial sectors, a zero or huge
    sector size and NULL pointers return 0 before any byte is written."""
    from fuse_crypt.luks2 import segment

    evp, loop = segment._load_evp(), segment._load_loop()
    assert evp is not None and loop is not None
    ffi, lib = evp
    ctx = segment._EvpXts(evp, os.urandom(64), loop)
    key_ctx = ctx._ctx[1]
    src = ffi.from_buffer(bytearray(os.urandom(8192)))
    out_buf = bytearray(8192)
    out = ffi.from_buffer(out_buf)
    m = (1 << 64) - 1
    for args in (
        (key_ctx, out, src, 8192, 3000, 0, 8, m),  # not whole sectors
        (key_ctx, out, src, 8192, 0, 0, 8, m),
        (key_ctx, out, src, 1 << 32, 1 << 32, 0, 8, m),  # ss > INT_MAX
        (ffi.NULL, out, src, 8192, 4096, 0, 8, m),
        (key_ctx, ffi.NULL, src, 8192, 4096, 0, 8, m),
        (key_ctx, out, ffi.NULL, 8192, 4096, 0, 8, m),
    ):
        assert loop.coco_xts_sectors(*args) == 0
        assert out_buf == bytes(8192)
    assert loop.coco_xts_sectors(key_ctx, out, src, 8192, 4096, 0, 8, m) == 1
    assert out_buf != bytes(8192)
    assert loop.coco_xts_sectors(key_ctx, out, src, 0, 4096, 0, 8, m) == 1  # nothing to do
    ctx.close()


def test_no_context_from_libcrypto_is_a_memory_error() -> None:
    from fuse_crypt.luks2 import segment

    evp = segment._load_evp()
    assert evp is not None
    ffi, lib = evp

    class NoMemory:
        def __getattr__(self, name: str) -> Any:
            return getattr(lib, name)

        def EVP_CIPHER_CTX_new(self) -> Any:  # noqa: N802 - OpenSSL's name
            return ffi.NULL

    with pytest.raises(MemoryError) as err:
        segment._EvpXts((ffi, NoMemory()), os.urandom(64))
    assert str(err.value) == "EVP_CIPHER_CTX_new"


def test_libcrypto_is_loaded_once_and_the_override_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fuse_crypt.luks2 import segment

    reload_backends(monkeypatch)
    first = segment._load_evp()
    assert first is not None and segment._EVP_TRIED is True
    assert segment._load_evp() is first  # cached: one FFI and one dlopen per process
    reload_backends(monkeypatch)
    monkeypatch.setenv(segment.BACKEND_ENV, "cryptography")
    with caplog.at_level("INFO", logger="fuse_crypt.luks2"):
        assert segment._load_evp() is None
    assert caplog.messages == ["XTS: FUSE_CRYPT_XTS_BACKEND=cryptography, one context per sector"]
    monkeypatch.delenv(segment.BACKEND_ENV)
    assert segment._load_evp() is None  # tried once: the override holds for the process


def test_the_c_loop_is_loaded_once_and_the_override_is_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fuse_crypt.luks2 import segment

    reload_backends(monkeypatch)
    first = segment._load_loop()
    assert first is not None and segment._LOOP_TRIED is True
    assert segment._load_loop() is first
    reload_backends(monkeypatch)
    monkeypatch.setenv(segment.BACKEND_ENV, "libcrypto-evp")
    with caplog.at_level("INFO", logger="fuse_crypt.luks2"):
        assert segment._load_loop() is None
    assert caplog.messages == [
        "XTS: FUSE_CRYPT_XTS_BACKEND=libcrypto-evp, the sector loop runs in Python"
    ]
    monkeypatch.delenv(segment.BACKEND_ENV)
    assert segment._load_loop() is None
    caplog.clear()
    monkeypatch.setattr(segment, "_LOOP_TRIED", False)
    monkeypatch.setattr(segment, "LOOP_FILE", segment.LOOP_FILE.with_name("absent.so.0"))
    with caplog.at_level("INFO", logger="fuse_crypt.luks2"):
        assert segment._load_loop() is None
    (msg,) = caplog.messages
    assert msg.startswith("XTS: no C sector loop (") and "absent.so.0" in msg
    assert msg.endswith("); it runs in Python")
    monkeypatch.setattr(segment, "_LOOP_TRIED", False)
    monkeypatch.setattr(segment, "_load_evp", lambda: None)
    assert segment._load_loop() is None and segment._LOOP_TRIED is False  # needs libcrypto


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        (("_LIBCRYPTO", "libcrypto-absent.so.99"), "libcrypto-absent.so.99"),
        (("_OPENSSL_3", 0x7FFFFFFF), "libcrypto older than OpenSSL 3"),
    ],
)
def test_why_libcrypto_is_not_used_is_logged(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    patch: tuple[str, Any],
    reason: str,
) -> None:
    from fuse_crypt.luks2 import segment

    reload_backends(monkeypatch)
    monkeypatch.setattr(segment, *patch)
    with caplog.at_level("INFO", logger="fuse_crypt.luks2"):
        assert segment._load_evp() is None
    assert len(caplog.messages) == 1
    msg = caplog.messages[0]
    assert msg.startswith("XTS: libcrypto EVP unavailable (") and reason in msg
    assert msg.endswith("); one context per sector")
    if patch[0] == "_OPENSSL_3":
        assert msg == f"XTS: libcrypto EVP unavailable ({reason}); one context per sector"


def test_each_refusal_by_its_exact_text(monkeypatch: pytest.MonkeyPatch) -> None:
    from fuse_crypt.luks2 import segment

    key = os.urandom(64)

    def text(call: Any, error: type[Exception] = SegmentError) -> str:
        with pytest.raises(error) as err:
            call()
        return str(err.value)

    assert text(lambda: XtsSegment(key[:32] * 2)) == "the volume key's two XTS halves are equal"
    assert text(lambda: XtsSegment(key, iv_tweak=-1)) == "iv_tweak must be a non-negative integer"
    assert text(lambda: XtsSegment(key, backend="x")) == "unknown XTS backend 'x'"
    assert text(lambda: XtsSegment(key, cipher="aes-cbc")) == "unsupported segment cipher 'aes-cbc'"
    assert text(lambda: XtsSegment(key[:48])) == "aes-xts-plain64 needs a key of [32, 64] bytes"
    assert text(lambda: XtsSegment(key, sector_size=256)) == "unsupported sector size 256"
    seg = XtsSegment(key, cipher="aes-xts-plain", sector_size=512)
    assert (seg.cipher, seg.sector_size, seg.iv_tweak) == ("aes-xts-plain", 512, 0)
    assert (
        text(lambda: seg.encrypt(1, bytes(512)), ValueError) == "segment I/O must be whole sectors"
    )
    assert (
        text(lambda: seg.encrypt_into(0, bytes(1024), bytearray(512)), ValueError)
        == "output buffer is too small"
    )
    seg.wipe()
    assert text(lambda: seg.decrypt(0, bytes(512))) == "the segment key was wiped"
    monkeypatch.setattr(segment, "_load_loop", lambda: None)
    assert XtsSegment(key, backend="libcrypto-evp").backend == "libcrypto-evp"
    assert (
        text(lambda: XtsSegment(key, backend="libcrypto-evp-batch"))
        == "the libcrypto-evp-batch XTS backend is unavailable here"
    )
    monkeypatch.setattr(segment, "_load_evp", lambda: None)
    assert (
        text(lambda: XtsSegment(key, backend="libcrypto-evp"))
        == "the libcrypto-evp XTS backend is unavailable here"
    )
