"""The LUKS2 data segment cipher: aes-xts-plain64 (and the older aes-xts-plain) per sector.

Pure: bytes in, bytes out, no I/O (like ``contentenc``). The block frontend and the tests
read and write the device; this module only maps plaintext sectors to ciphertext sectors.

The IV is cryptsetup's, not the obvious one (``/work/shared/reference/luks2.md`` §4.1,
verified against cryptsetup 2.6.1): with 4096-byte encryption sectors the XTS tweak still
counts **512-byte** units from the start of the segment, so sector ``n`` of a 4 KiB segment
uses tweak ``LE64(8*n) || 0^8``. ``aes-xts-plain`` is the same with the counter cut to 32
bits (identical below 2 TiB); a 32-byte key means AES-128-XTS, 64 bytes AES-256-XTS.

Only whole sectors are accepted: a partial-sector read-modify-write is the caller's job
(it needs a lock and the device), and doing it here would hide a misaligned caller.

XTS gives confidentiality only: no integrity, no freshness. A flipped ciphertext sector
decrypts to 4096 bytes of garbage that nobody notices here (see docs/block.md).

Speed: XTS needs a fresh IV per sector, and `cryptography` can only give a new IV with a
new cipher context (OpenSSL's context set-up and AES key schedule, plus a Python object, per
4 KiB sector: that, not AES, was most of the time). Where the system's OpenSSL 3
(``libcrypto.so.3``) can be loaded (always in the image: libssl3 is a dependency of python3),
``XtsSegment`` keys one ``EVP_CIPHER_CTX`` per direction once and then only resets its IV per
sector, through ``cffi`` (already a dependency of `cryptography`). Otherwise it falls back to
one `cryptography` context per sector.

Even so, two calls from Python into libcrypto per sector (~2 µs of glue, and the GIL dropped
and re-taken around each) held a 1 MiB decrypt to ~1.8 GB/s on one core, where libcrypto's
own XTS runs at ~5.8 GB/s with 4 KiB units (`openssl speed -evp aes-256-xts -bytes 4096`,
this 2-vCPU VM). So the sector loop itself is in C (``xts_sectors.c``, built by setup.py
next to this file): one call per request, which measured 4.2 GB/s for 1 MiB decrypts and
halved the block daemon's user CPU per GiB read (docs/block.md, "The sector loop in C").
The context, the key and every check stay here. ``XtsSegment.backend`` says which of the
three runs; all are pinned to an independent XTS and to cryptsetup by the tests.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import Luks2Error

log = logging.getLogger("fuse_crypt.luks2")

try:
    # What Cipher(...).encryptor()/decryptor() call after their argument checks. Those
    # checks (isinstance through abc, key-size validation) cost twice the AES itself
    # for a 4 KiB sector, and XTS needs one context per sector; ``XtsSegment`` runs
    # them once, in __init__, and then goes here directly. Falls back to the public
    # API if a cryptography release moves it.
    from cryptography.hazmat.bindings._rust import openssl as _rust_openssl

    _ENC_CTX: Callable[[Any, Any], Any] | None = _rust_openssl.ciphers.create_encryption_ctx
    _DEC_CTX: Callable[[Any, Any], Any] | None = _rust_openssl.ciphers.create_decryption_ctx
except (ImportError, AttributeError):  # pragma: no cover - depends on the release
    _ENC_CTX = _DEC_CTX = None

Buffer = bytes | bytearray | memoryview

#: The tweak counts these units whatever the sector size (cryptsetup never sets
#: dm-crypt's iv_large_sectors for LUKS2).
IV_UNIT = 512
#: cipher spec -> accepted volume key sizes in bytes
CIPHERS: dict[str, frozenset[int]] = {
    "aes-xts-plain64": frozenset({32, 64}),
    "aes-xts-plain": frozenset({32, 64}),
}
SECTOR_SIZES = frozenset({512, 1024, 2048, 4096})


class SegmentError(Luks2Error):
    """An unusable segment definition or key (never says anything about the key bytes)."""


# -- libcrypto's EVP interface, for one keyed context whose IV alone changes per sector ------

#: Only what ``_EvpXts`` calls. Pointer parameters are ``char *``: the same ABI as OpenSSL's
#: ``unsigned char *``, and cffi then takes Python ``bytes`` (the IVs) without a copy.
_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
unsigned long OpenSSL_version_num(void);
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *EVP_aes_128_xts(void);
const EVP_CIPHER *EVP_aes_256_xts(void);
int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                      const char *key, const char *iv, int enc);
int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, char *out, int *outl, const char *in, int inl);
void ERR_clear_error(void);
int coco_xts_sectors(EVP_CIPHER_CTX *ctx, char *out, const char *in, size_t n, size_t ss,
                     uint64_t iv, uint64_t units, uint64_t mask);
"""
#: OpenSSL 3's ABI (the only one the declarations above are checked against).
_LIBCRYPTO = "libcrypto.so.3"
_OPENSSL_3 = 0x30000000
_EVP_LOCK = threading.Lock()
#: (ffi, lib) once loaded; None if libcrypto cannot be used (then the slow path runs)
_EVP: tuple[Any, Any] | None = None
_EVP_TRIED = False
#: The C sector loop (``coco_xts_sectors`` in xts_sectors.c), compiled here by setup.py; its
#: name is not an importable module's, so nothing but ``_load_loop`` ever loads it.
LOOP_FILE = Path(__file__).with_name("xts_sectors.so.0")
_LOOP: Any = None
_LOOP_TRIED = False
_U64 = (1 << 64) - 1


#: ``FUSE_CRYPT_XTS_BACKEND=cryptography`` in a daemon's environment forces the slowest
#: path, ``=libcrypto-evp`` the per-sector loop in Python: escape hatches should the system
#: libcrypto or the C loop misbehave, and the "before" of benchmarks.
BACKEND_ENV = "FUSE_CRYPT_XTS_BACKEND"
#: the implementations, fastest first (``XtsSegment.backend``)
BACKENDS = ("libcrypto-evp-batch", "libcrypto-evp", "cryptography")


def _load_evp() -> tuple[Any, Any] | None:
    """libcrypto through cffi's ABI mode, once per process; None if unavailable."""
    global _EVP, _EVP_TRIED
    with _EVP_LOCK:
        if not _EVP_TRIED:
            _EVP_TRIED = True
            if os.environ.get(BACKEND_ENV) == "cryptography":
                log.info("XTS: %s=cryptography, one context per sector", BACKEND_ENV)
                return None
            try:
                from cffi import FFI

                ffi = FFI()
                ffi.cdef(_CDEF)
                lib = ffi.dlopen(_LIBCRYPTO)
                if lib.OpenSSL_version_num() < _OPENSSL_3:
                    raise OSError("libcrypto older than OpenSSL 3")
                _EVP = (ffi, lib)
            except Exception as exc:  # no cffi, no libcrypto.so.3, a symbol missing
                log.info("XTS: libcrypto EVP unavailable (%s); one context per sector", exc)
                _EVP = None
        return _EVP


def _load_loop() -> Any:
    """The C sector loop, once per process (after libcrypto, whose ffi declares it); None
    if libcrypto is not used, the override asks for the Python loop, or it was not built."""
    global _LOOP, _LOOP_TRIED
    evp = _load_evp()
    with _EVP_LOCK:
        if not _LOOP_TRIED and evp is not None:
            _LOOP_TRIED = True
            if os.environ.get(BACKEND_ENV) == "libcrypto-evp":
                log.info("XTS: %s=libcrypto-evp, the sector loop runs in Python", BACKEND_ENV)
                return None
            try:
                loop = evp[0].dlopen(str(LOOP_FILE))
                _ = loop.coco_xts_sectors  # resolve now: a file without it is refused
                _LOOP = loop
            except (OSError, AttributeError) as exc:
                log.info("XTS: no C sector loop (%s); it runs in Python", exc)
                _LOOP = None
        return _LOOP


class _EvpXts:
    """Two keyed OpenSSL XTS contexts (encrypt, decrypt); per sector only the IV is reset.

    ``EVP_CipherInit_ex`` with a NULL cipher and key keeps the key schedule and sets the IV:
    that is the whole per-sector cost besides AES itself. A context is not thread-safe, so
    one lock covers each call (the block device serialises its crypto anyway). The
    contexts are freed by ``close`` (OpenSSL cleanses the key schedule on free) or, failing
    that, when garbage-collected.
    """

    __slots__ = ("_ctx", "_ffi", "_lib", "_lock", "_loop", "_outl")

    def __init__(self, evp: tuple[Any, Any], key: bytes, loop: Any = None) -> None:
        """``loop``: the C sector loop (one call per ``run``), or None for the Python one."""
        self._ffi, self._lib = evp
        self._loop = loop
        ffi, lib = evp
        cipher = lib.EVP_aes_256_xts() if len(key) == 64 else lib.EVP_aes_128_xts()
        self._lock = threading.Lock()
        self._outl = ffi.new("int *")
        self._ctx: list[Any] = []
        for enc in (0, 1):
            ctx = lib.EVP_CIPHER_CTX_new()
            if ctx == ffi.NULL:
                raise MemoryError("EVP_CIPHER_CTX_new")
            ctx = ffi.gc(ctx, lib.EVP_CIPHER_CTX_free)
            self._ctx.append(ctx)
            if lib.EVP_CipherInit_ex(ctx, cipher, ffi.NULL, key, bytes(16), enc) != 1:
                lib.ERR_clear_error()
                self.close()
                raise SegmentError("libcrypto refused the XTS key")

    def run(
        self, src: memoryview, out: memoryview, first_iv: int, units: int, mask: int, ss: int,
        encrypt: bool,
    ) -> None:  # fmt: skip
        ffi, lib = self._ffi, self._lib
        n = len(src)
        inp = ffi.from_buffer(src)
        try:
            outp = ffi.from_buffer(out, require_writable=True)
        except BaseException:
            ffi.release(inp)
            raise
        try:
            a_in = int(ffi.cast("uintptr_t", inp))
            a_out = int(ffi.cast("uintptr_t", outp))
            if a_in != a_out and a_in < a_out + n and a_out < a_in + n:
                # In place is fine; a shifted overlap would read sectors already written.
                raise ValueError("input and output buffers overlap")
            init, update = lib.EVP_CipherInit_ex, lib.EVP_CipherUpdate
            null, outl = ffi.NULL, self._outl
            with self._lock:
                if not self._ctx:
                    raise SegmentError("the segment key was wiped")
                ctx = self._ctx[1 if encrypt else 0]
                if self._loop is not None:
                    # n and ss were checked by XtsSegment; the C side checks them again
                    if self._loop.coco_xts_sectors(
                        ctx, outp, inp, n, ss, first_iv & _U64, units, mask
                    ) != 1:  # fmt: skip
                        lib.ERR_clear_error()
                        raise SegmentError("libcrypto failed an XTS sector")
                    return
                iv = first_iv
                for pos in range(0, n, ss):
                    if (
                        init(ctx, null, null, null, (iv & mask).to_bytes(16, "little"), -1) != 1
                        or update(ctx, outp + pos, outl, inp + pos, ss) != 1
                    ):
                        lib.ERR_clear_error()
                        raise SegmentError("libcrypto failed an XTS sector")
                    iv += units
        finally:
            ffi.release(outp)
            ffi.release(inp)

    def addresses(self) -> tuple[int, int] | None:
        """The (decrypt, encrypt) contexts' addresses, or None once wiped."""
        with self._lock:
            if not self._ctx:
                return None
            cast = self._ffi.cast
            return int(cast("uintptr_t", self._ctx[0])), int(cast("uintptr_t", self._ctx[1]))

    def close(self) -> None:
        with self._lock:
            ctxs, self._ctx = self._ctx, []
        for ctx in ctxs:
            self._ffi.release(ctx)  # EVP_CIPHER_CTX_free now (and not again at gc)


class XtsSegment:
    """Encrypt and decrypt whole sectors of one data segment.

    ``offset`` arguments are byte offsets *inside the segment* (0 = the segment's first
    byte, whatever its offset on the device), multiples of ``sector_size``.
    """

    __slots__ = (
        "_aes",
        "_evp",
        "_mask",
        "_units_per_sector",
        "cipher",
        "iv_tweak",
        "sector_size",
    )

    def __init__(
        self,
        volume_key: bytes,
        *,
        sector_size: int = 4096,
        iv_tweak: int = 0,
        cipher: str = "aes-xts-plain64",
        backend: str | None = None,
    ) -> None:
        """``backend``: None picks the fastest of ``BACKENDS`` that loads here; naming one
        forces it (one that is unavailable is a SegmentError)."""
        if backend is not None and backend not in BACKENDS:
            raise SegmentError(f"unknown XTS backend {backend!r}")
        sizes = CIPHERS.get(cipher)
        if sizes is None:
            raise SegmentError(f"unsupported segment cipher {cipher!r}")
        if len(volume_key) not in sizes:
            raise SegmentError(f"{cipher} needs a key of {sorted(sizes)} bytes")
        if volume_key[: len(volume_key) // 2] == volume_key[len(volume_key) // 2 :]:
            # OpenSSL refuses equal XTS halves; a volume key like that is not random.
            raise SegmentError("the volume key's two XTS halves are equal")
        if sector_size not in SECTOR_SIZES:
            raise SegmentError(f"unsupported sector size {sector_size}")
        if isinstance(iv_tweak, bool) or not isinstance(iv_tweak, int) or iv_tweak < 0:
            raise SegmentError("iv_tweak must be a non-negative integer")
        self.cipher = cipher
        self.sector_size = sector_size
        self.iv_tweak = iv_tweak
        self._units_per_sector = sector_size // IV_UNIT
        self._mask = (1 << 64) - 1 if cipher.endswith("plain64") else (1 << 32) - 1
        self._aes: algorithms.AES | None = algorithms.AES(bytes(volume_key))
        # The public API's checks, once (the hot path skips them, see _ENC_CTX).
        Cipher(self._aes, modes.XTS(bytes(16))).decryptor()
        evp = None if backend == "cryptography" else _load_evp()
        loop = _load_loop() if evp is not None and backend != "libcrypto-evp" else None
        if (
            backend is not None
            and backend != "cryptography"
            and (evp is None or (loop is None and backend == "libcrypto-evp-batch"))
        ):
            raise SegmentError(f"the {backend} XTS backend is unavailable here")
        self._evp: _EvpXts | None = _EvpXts(evp, bytes(volume_key), loop) if evp else None

    @property
    def backend(self) -> str:
        """Which implementation runs: ``libcrypto-evp-batch`` (one keyed context, the sector
        loop in C), ``libcrypto-evp`` (the same, the loop in Python) or ``cryptography`` (one
        context per sector); for logs and benchmarks."""
        if self._evp is None:
            return "cryptography"
        return "libcrypto-evp" if self._evp._loop is None else "libcrypto-evp-batch"

    def native_xts(self) -> tuple[int, int, int, int, int] | None:
        """For the block daemon's C request loop only (fuse_crypt/blockfront/native.py):
        the keyed decrypt and encrypt contexts' addresses, the tweak of sector 0, the tweak
        step per sector and the IV mask; None unless the C sector loop runs here.

        No key bytes: the loop uses the contexts as this object does, through the same C
        sector loop. They stay valid until :meth:`wipe`, which the caller must not run
        while the loop serves."""
        if self._evp is None or self._evp._loop is None:
            return None
        addresses = self._evp.addresses()
        if addresses is None:
            return None
        return (*addresses, self.iv_tweak, self._units_per_sector, self._mask)

    def tweak(self, sector: int) -> bytes:
        """The 16-byte XTS tweak of segment sector ``sector`` (in ``sector_size`` units)."""
        iv = (self.iv_tweak + sector * self._units_per_sector) & self._mask
        return iv.to_bytes(8, "little") + bytes(8)

    def _first_sector(self, offset: int, length: int) -> int:
        if offset < 0 or offset % self.sector_size or length % self.sector_size:
            raise ValueError("segment I/O must be whole sectors")
        return offset // self.sector_size

    def _alg(self) -> algorithms.AES:
        if self._aes is None:
            raise SegmentError("the segment key was wiped")
        return self._aes

    def _run(self, offset: int, data: Buffer, out: memoryview, encrypt: bool) -> None:
        src = memoryview(data).cast("B")
        sector = self._first_sector(offset, len(src))
        if len(out) < len(src):
            raise ValueError("output buffer is too small")
        alg, ss = self._alg(), self.sector_size
        if self._evp is not None:
            first_iv = self.iv_tweak + sector * self._units_per_sector
            n = len(src)
            self._evp.run(src, out[:n], first_iv, self._units_per_sector, self._mask, ss, encrypt)
            return
        new_ctx = _ENC_CTX if encrypt else _DEC_CTX
        if new_ctx is None:  # pragma: no cover - see _ENC_CTX
            for pos in range(0, len(src), ss):
                cipher = Cipher(alg, modes.XTS(self.tweak(sector)))
                ctx = cipher.encryptor() if encrypt else cipher.decryptor()
                out[pos : pos + ss] = ctx.update(src[pos : pos + ss])
                sector += 1
            return
        xts, units, mask, base = modes.XTS, self._units_per_sector, self._mask, self.iv_tweak
        for pos in range(0, len(src), ss):
            iv = (base + sector * units) & mask
            ctx = new_ctx(alg, xts(iv.to_bytes(16, "little")))
            out[pos : pos + ss] = ctx.update(src[pos : pos + ss])
            sector += 1

    def encrypt(self, offset: int, plaintext: Buffer) -> bytes:
        """Ciphertext of whole plaintext sectors starting at segment byte ``offset``."""
        out = bytearray(len(memoryview(plaintext).cast("B")))
        self._run(offset, plaintext, memoryview(out), True)
        return bytes(out)

    def decrypt(self, offset: int, ciphertext: Buffer) -> bytes:
        """Plaintext of whole ciphertext sectors starting at segment byte ``offset``."""
        out = bytearray(len(memoryview(ciphertext).cast("B")))
        self._run(offset, ciphertext, memoryview(out), False)
        return bytes(out)

    def encrypt_into(self, offset: int, plaintext: Buffer, out: Buffer) -> None:
        """Like ``encrypt`` into a caller's writable buffer (may be ``plaintext`` itself)."""
        self._run(offset, plaintext, memoryview(out).cast("B"), True)

    def decrypt_into(self, offset: int, ciphertext: Buffer, out: Buffer) -> None:
        """Like ``decrypt`` into a caller's writable buffer (may be ``ciphertext`` itself)."""
        self._run(offset, ciphertext, memoryview(out).cast("B"), False)

    def wipe(self) -> None:
        """Free the libcrypto contexts (OpenSSL cleanses their key schedules) and drop our
        reference to `cryptography`'s key (best effort: Python cannot scrub it)."""
        self._aes = None
        if self._evp is not None:
            self._evp.close()
