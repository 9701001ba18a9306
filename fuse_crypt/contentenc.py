"""File contents: the 18-byte header, 4096-byte blocks, holes and size maths.

Layout (gocryptfs v2): ``00 02 || fileID(16)`` then blocks of ``nonce(16) || body``
where the body is AEAD(plain block) with AAD ``uint64_BE(blockNo) || fileID``.  Binding
the block number and file ID stops an attacker from moving blocks within or between
files.  An all-zero, full-length cipher block is a hole (sparse file) and reads as
4096 zero bytes.

The batch functions are the hot path of the FUSE daemon: one ``os.urandom`` for all
nonces of a request, AEAD writes straight into one preallocated buffer via
``encrypt_into``/``decrypt_into``, no per-block intermediate objects beyond the AAD.
The glibc tuning those I/O-sized buffers want is process-wide, so the mount daemon
does it (``fusefrontend.allocator``), not this class.
"""

from __future__ import annotations

import os
import struct
from typing import Protocol

from cryptography.exceptions import InvalidTag

from .cryptocore import CryptoCore
from .errors import CorruptDataError

HEADER_LEN = 18
CURRENT_VERSION = 2
FILE_ID_LEN = 16
PLAIN_BS = 4096
NONCE_LEN = 16
TAG_LEN = 16
BLOCK_OVERHEAD = NONCE_LEN + TAG_LEN
CIPHER_BS = PLAIN_BS + BLOCK_OVERHEAD  # 4128

_VERSION_BYTES = struct.pack(">H", CURRENT_VERSION)
_ZERO_NONCE = bytes(NONCE_LEN)
_ZERO_FILE_ID = bytes(FILE_ID_LEN)
_ZERO_CIPHER_BLOCK = bytes(CIPHER_BS)
_ZERO_PLAIN_BLOCK = bytes(PLAIN_BS)
_pack_q = struct.Struct(">Q").pack
_pack_q_into = struct.Struct(">Q").pack_into

#: Anything exposing the buffer protocol (bytes, bytearray, memoryview, ctypes arrays).
Buffer = bytes | bytearray | memoryview


def _checked_block_args(first_block: int, file_id: bytes) -> bytes:
    """Both directions refuse the same impossible arguments; returns the file ID as bytes."""
    if first_block < 0:
        raise ValueError("negative block number")
    if len(file_id) != FILE_ID_LEN:
        raise ValueError("file ID must be 16 bytes")
    return bytes(file_id)


class BlockObserver(Protocol):
    """What a caller may learn about block crypto as it happens: counts and sizes only.

    Why a hook: the mount daemon's metrics (``--metrics-addr``) count blocks and
    authentication failures; passing an observer in keeps that out of the crypto and
    leaves every other ContentEnc untouched (nothing is patched at run time). Called
    once per batch, from the FUSE worker threads, so it must be thread-safe and cheap.
    """

    def encrypted(self, blocks: int, plain_bytes: int) -> None: ...

    def decrypted(self, blocks: int, plain_bytes: int) -> None: ...

    def auth_failed(self) -> None:
        """A batch was refused with CorruptDataError (nothing of it was returned)."""


class ContentEnc:
    """Block encryption for one master key (via its :class:`CryptoCore`).

    ``observer`` (default none) is told about every batch; see :class:`BlockObserver`.
    """

    def __init__(self, core: CryptoCore, observer: BlockObserver | None = None) -> None:
        self.core = core
        self.observer = observer

    def __repr__(self) -> str:
        return f"ContentEnc({self.core!r})"

    # -- header ---------------------------------------------------------------

    def new_header(self) -> tuple[bytes, bytes]:
        file_id = os.urandom(FILE_ID_LEN)
        return _VERSION_BYTES + file_id, file_id

    def parse_header(self, header: bytes) -> bytes:
        if len(header) != HEADER_LEN:
            raise CorruptDataError("file header has wrong length")
        header = bytes(header)
        if header[:2] != _VERSION_BYTES:
            raise CorruptDataError("file header: unsupported on-disk version")
        file_id = header[2:]
        if file_id == _ZERO_FILE_ID:
            raise CorruptDataError("file header: all-zero file ID")
        return file_id

    # -- blocks ---------------------------------------------------------------

    def encrypt_blocks(self, first_block: int, plaintext: bytes, file_id: bytes) -> bytes:
        """Encrypt consecutive plaintext blocks starting at ``first_block``.

        Every block gets a fresh random nonce, also when rewriting an existing block,
        so (key, nonce) pairs never repeat.
        """
        n = len(plaintext)
        if n == 0:
            return b""
        out = bytearray(n + BLOCK_OVERHEAD * -(-n // PLAIN_BS))
        self.encrypt_blocks_into(first_block, plaintext, file_id, out)
        return bytes(out)

    def decrypt_blocks(self, first_block: int, ciphertext: bytes, file_id: bytes) -> bytes:
        """Decrypt consecutive cipher blocks; holes become 4096 zero bytes.

        Raises CorruptDataError on any authentication failure, an all-zero nonce in a
        non-hole block, or a trailing block too short to hold any plaintext.
        """
        c = len(ciphertext)
        if c == 0:
            return b""
        # max(): a truncated last block is refused by decrypt_blocks_into.
        out = bytearray(max(0, c - BLOCK_OVERHEAD * -(-c // CIPHER_BS)))
        self.decrypt_blocks_into(first_block, ciphertext, file_id, out)
        return bytes(out)

    def encrypt_blocks_into(
        self, first_block: int, plaintext: Buffer, file_id: bytes, out: Buffer
    ) -> int:
        """:meth:`encrypt_blocks` into a caller-provided writable buffer (for example a
        recycled one, or libfuse's own); returns the ciphertext length written.

        Exists so the FUSE hot path needs no per-request allocation while the block
        rules stay here, in one place.  ``out`` must hold the whole ciphertext.
        """
        pv = memoryview(plaintext).cast("B")
        n = len(pv)
        if n == 0:
            return 0
        file_id = _checked_block_args(first_block, file_id)
        nblocks = -(-n // PLAIN_BS)
        total = n + BLOCK_OVERHEAD * nblocks
        outv = memoryview(out).cast("B")
        if len(outv) < total:
            raise ValueError("output buffer too small")
        nonces = os.urandom(NONCE_LEN * nblocks)
        # AES-GCM: the library's *_into methods write straight into our buffer.
        # AES-SIV has none and goes through the generic raw calls.  Looked up per
        # call (not cached) so that CryptoCore.wipe() takes effect here too.
        gcm = self.core.gcm
        enc = gcm.encrypt_into if gcm is not None else None
        p = 0
        o = 0
        k = 0
        for block_no in range(first_block, first_block + nblocks):
            chunk = pv[p : p + PLAIN_BS]
            nonce = nonces[k : k + NONCE_LEN]
            k += NONCE_LEN
            aad = _pack_q(block_no) + file_id
            outv[o : o + NONCE_LEN] = nonce
            o += NONCE_LEN
            end = o + len(chunk) + TAG_LEN
            if enc is not None:
                enc(nonce, chunk, aad, outv[o:end])
            else:
                outv[o:end] = self.core.encrypt_raw(nonce, bytes(chunk), aad)
            o = end
            p += PLAIN_BS
        if self.observer is not None:
            self.observer.encrypted(nblocks, n)
        return o

    def decrypt_blocks_into(
        self, first_block: int, ciphertext: Buffer, file_id: bytes, out: Buffer
    ) -> int:
        """:meth:`decrypt_blocks` into a caller-provided writable buffer (which may hold
        old data: holes are written as zeros); returns the plaintext length.

        On CorruptDataError ``out`` may hold a partial result that must not be used.
        """
        observer = self.observer
        if observer is None:
            return self._decrypt_blocks_into(first_block, ciphertext, file_id, out)
        try:
            n = self._decrypt_blocks_into(first_block, ciphertext, file_id, out)
        except CorruptDataError:
            observer.auth_failed()
            raise
        observer.decrypted(-(-memoryview(ciphertext).nbytes // CIPHER_BS), n)
        return n

    def _decrypt_blocks_into(
        self, first_block: int, ciphertext: Buffer, file_id: bytes, out: Buffer
    ) -> int:
        cv = memoryview(ciphertext).cast("B")
        c = len(cv)
        if c == 0:
            return 0
        file_id = _checked_block_args(first_block, file_id)
        nblocks = -(-c // CIPHER_BS)
        if c - (nblocks - 1) * CIPHER_BS <= BLOCK_OVERHEAD:
            raise CorruptDataError(f"block {first_block + nblocks - 1}: truncated cipher block")
        outv = memoryview(out).cast("B")
        if len(outv) < c - BLOCK_OVERHEAD * nblocks:
            raise ValueError("output buffer too small")
        gcm = self.core.gcm  # per call, see encrypt_blocks_into
        if gcm is None:
            return self._decrypt_blocks_raw(first_block, cv, file_id, outv)
        dec = gcm.decrypt_into
        # One AAD buffer per call, block number packed in place: no per-block
        # bytes objects.  Holes (all-zero blocks) and all-zero nonces are only
        # looked for once authentication has failed, which any such block must
        # (it carries no valid tag), so intact blocks pay for no comparison.
        aad = bytearray(8 + FILE_ID_LEN)
        aad[8:] = file_id
        s = 0
        o = 0
        for block_no in range(first_block, first_block + nblocks):
            e = s + CIPHER_BS
            if e > c:
                e = c
            plen = e - s - BLOCK_OVERHEAD
            _pack_q_into(aad, 0, block_no)
            try:
                dec(cv[s : s + NONCE_LEN], cv[s + NONCE_LEN : e], aad, outv[o : o + plen])
            except InvalidTag:
                if cv[s : s + NONCE_LEN] != _ZERO_NONCE:
                    raise CorruptDataError(f"block {block_no}: authentication failed") from None
                if e - s != CIPHER_BS or cv[s:e] != _ZERO_CIPHER_BLOCK:
                    raise CorruptDataError(f"block {block_no}: all-zero nonce") from None
                outv[o : o + PLAIN_BS] = _ZERO_PLAIN_BLOCK  # a hole
            s = e
            o += plen
        return o

    def _decrypt_blocks_raw(
        self, first_block: int, cv: memoryview, file_id: bytes, outv: memoryview
    ) -> int:
        """AES-SIV (no ``*_into`` method): the same block rules via the raw calls."""
        c = len(cv)
        s = 0
        o = 0
        block_no = first_block
        try:
            for block_no in range(first_block, first_block + -(-c // CIPHER_BS)):
                e = min(s + CIPHER_BS, c)
                plen = e - s - BLOCK_OVERHEAD
                nonce = cv[s : s + NONCE_LEN]
                if nonce == _ZERO_NONCE:
                    if e - s == CIPHER_BS and cv[s:e] == _ZERO_CIPHER_BLOCK:
                        outv[o : o + PLAIN_BS] = _ZERO_PLAIN_BLOCK
                        s = e
                        o += PLAIN_BS
                        continue
                    raise CorruptDataError(f"block {block_no}: all-zero nonce")
                aad = _pack_q(block_no) + file_id
                outv[o : o + plen] = self.core.decrypt_raw(
                    bytes(nonce), bytes(cv[s + NONCE_LEN : e]), aad
                )
                s = e
                o += plen
        except InvalidTag:
            raise CorruptDataError(f"block {block_no}: authentication failed") from None
        return o

    # -- size and offset maths ------------------------------------------------

    def cipher_size(self, plain_size: int) -> int:
        if plain_size < 0:
            raise ValueError("negative size")
        if plain_size == 0:
            return 0
        return HEADER_LEN + plain_size + BLOCK_OVERHEAD * (-(-plain_size // PLAIN_BS))

    def plain_size(self, cipher_size: int, *, strict: bool = True) -> int:
        """Plaintext size for a cipher file size.

        ``strict`` raises CorruptDataError for sizes no write can produce (a partial
        header, or a last block without room for one plaintext byte).  With
        ``strict=False`` it mirrors gocryptfs, which reports such torn files with a
        best-effort size instead of failing ``stat``.
        """
        if cipher_size < 0:
            raise ValueError("negative size")
        if cipher_size == 0:
            return 0
        if cipher_size < HEADER_LEN:
            if strict:
                raise CorruptDataError("file shorter than its header")
            return 0
        if cipher_size == HEADER_LEN:
            return 0
        body = cipher_size - HEADER_LEN
        rem = body % CIPHER_BS
        if 1 <= rem <= BLOCK_OVERHEAD:
            if strict:
                raise CorruptDataError("truncated last cipher block")
            body = body - rem + BLOCK_OVERHEAD + 1
        nblocks = -(-body // CIPHER_BS)
        return body - BLOCK_OVERHEAD * nblocks

    @staticmethod
    def block_range(offset: int, length: int) -> tuple[int, int]:
        """Blocks touched by ``[offset, offset+length)``: (first, last exclusive)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        first = offset // PLAIN_BS
        if length == 0:
            return first, first
        return first, -(-(offset + length) // PLAIN_BS)

    @staticmethod
    def cipher_offset(block_no: int) -> int:
        return HEADER_LEN + block_no * CIPHER_BS
