"""EME (ECB-Mix-ECB) wide-block encryption, as used by gocryptfs for file names.

gocryptfs encrypts names with the Halevi-Rogaway EME mode over AES-256 (the
``rfjakob/eme`` Go package), tweaked with the directory IV.  A wide-block mode makes
every ciphertext byte depend on every plaintext byte, so names sharing a prefix do
not share an encrypted prefix.  No maintained Python library implements EME, so the
mode is written here on top of ``cryptography``'s AES-ECB.

GF(2^128) doubling in EME treats the 16-byte block as a *little-endian* integer
(byte 0 least significant), unlike CMAC/SIV.  Mapping each block to a Python ``int``
with ``from_bytes(..., "little")`` turns doubling into a shift and a conditional XOR,
and lets the per-block XORs run as whole-buffer integer XORs.
"""

from __future__ import annotations

import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

BLOCK = 16
MAX_BLOCKS = 128  # EME is defined for 1..128 blocks (16..2048 bytes)
_MASK128 = (1 << 128) - 1
_GF_POLY = 0x87


def _mul2(x: int) -> int:
    """Double in GF(2^128) with the little-endian byte order of rfjakob/eme."""
    return ((x << 1) & _MASK128) ^ (_GF_POLY if x >> 127 else 0)


class EME:
    """AES-256-EME with a 16-byte tweak; one instance per key, safe across threads."""

    __slots__ = ("_enc", "_dec", "_lcat", "_lock")

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("EME key must be 32 bytes")
        cipher = Cipher(algorithms.AES(key), modes.ECB())
        # ECB contexts are stateless between 16-byte-aligned updates, so one pair can
        # be reused for every name; the lock keeps concurrent FUSE threads apart.
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        self._lock = threading.Lock()
        # The L table depends only on the key: L_0 = 2*E_K(0), L_j = 2*L_{j-1}.
        # Stored as one little-endian int covering all 128 blocks so that the
        # "xor with L_j" steps become a single integer XOR for the whole buffer.
        l_j = _mul2(int.from_bytes(self._enc.update(bytes(BLOCK)), "little"))
        lcat = 0
        for j in range(MAX_BLOCKS):
            lcat |= l_j << (128 * j)
            l_j = _mul2(l_j)
        self._lcat = lcat

    def __repr__(self) -> str:
        return "EME(key=<hidden>)"

    def encrypt(self, tweak: bytes, data: bytes) -> bytes:
        return self._transform(tweak, data, encrypt=True)

    def decrypt(self, tweak: bytes, data: bytes) -> bytes:
        return self._transform(tweak, data, encrypt=False)

    def _transform(self, tweak: bytes, data: bytes, *, encrypt: bool) -> bytes:
        if len(tweak) != BLOCK:
            raise ValueError("EME tweak must be 16 bytes")
        n = len(data)
        if n == 0 or n % BLOCK:
            raise ValueError("EME input must be a non-zero multiple of 16 bytes")
        m = n // BLOCK
        if m > MAX_BLOCKS:
            raise ValueError("EME input longer than 2048 bytes")
        lmask = self._lcat & ((1 << (128 * m)) - 1)
        t = int.from_bytes(tweak, "little")
        with self._lock:
            ctx = self._enc if encrypt else self._dec
            # Step 1: PPP_j = T_K(P_j xor L_j)
            ppp_b = ctx.update((int.from_bytes(data, "little") ^ lmask).to_bytes(n, "little"))
            ppp = [int.from_bytes(ppp_b[i : i + BLOCK], "little") for i in range(0, n, BLOCK)]
            # Step 2: MP = xor of all PPP_j, xor T
            mp = t
            for v in ppp:
                mp ^= v
            # Step 3: MC = T_K(MP); M = MP xor MC
            mc = int.from_bytes(ctx.update(mp.to_bytes(BLOCK, "little")), "little")
            mm = mp ^ mc
            # Step 4: CCC_j = PPP_j xor 2^j * M  (j >= 1)
            # Step 5: CCC_0 = MC xor T xor CCC_1 xor ... xor CCC_{m-1}
            ccc = 0
            c0 = mc ^ t
            for j in range(1, m):
                mm = _mul2(mm)
                cj = ppp[j] ^ mm
                c0 ^= cj
                ccc |= cj << (128 * j)
            ccc |= c0
            # Step 6: C_j = T_K(CCC_j) xor L_j
            out = ctx.update(ccc.to_bytes(n, "little"))
        return (int.from_bytes(out, "little") ^ lmask).to_bytes(n, "little")
