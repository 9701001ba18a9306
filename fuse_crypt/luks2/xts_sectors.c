/*
 * The XTS sector loop of fuse_crypt/luks2/segment.py, in C: one call per request instead of
 * two calls into libcrypto per 4 KiB sector from Python.
 *
 * Why this exists (docs/block.md, "The sector loop in C"): each call from Python into C
 * costs ~2 us of glue and drops and re-takes the GIL, so a 1 MiB request made 512 such
 * calls and decrypted at ~1.8 GB/s on one core, where libcrypto alone does ~5.8 GB/s
 * (`openssl speed -evp aes-256-xts -bytes 4096`). Only the loop is here: the context, its
 * key and every check on the arguments stay in segment.py, which calls this through cffi
 * (ABI mode: no Python headers, and the GIL is released once for the whole request).
 *
 * No OpenSSL headers are needed: the two EVP functions are declared below with OpenSSL 3's
 * ABI, and segment.py loads this library only after it has loaded libcrypto.so.3 itself and
 * checked its version. The library is linked against that same soname, so both share one
 * libcrypto in the process.
 */
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const void *type, void *impl,
                      const unsigned char *key, const unsigned char *iv, int enc);
int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                     const unsigned char *in, int inl);

/*
 * Encrypt or decrypt (as ctx was keyed) n bytes of whole sectors of ss bytes from in to out
 * (equal pointers allowed, overlapping otherwise not). Sector k gets the tweak
 * LE64((iv + k * units) & mask) || 0^8: cryptsetup's plain64/plain IVs.
 * Returns 1 on success, 0 if the arguments are unusable or libcrypto failed a sector
 * (the caller then clears libcrypto's error queue and raises).
 */
int coco_xts_sectors(EVP_CIPHER_CTX *ctx, unsigned char *out, const unsigned char *in,
                     size_t n, size_t ss, uint64_t iv, uint64_t units, uint64_t mask)
{
    unsigned char tweak[16];
    int outl = 0;

    if (ctx == NULL || out == NULL || in == NULL || ss == 0 || ss > INT_MAX || n % ss != 0)
        return 0;
    memset(tweak, 0, sizeof tweak);
    for (size_t pos = 0; pos < n; pos += ss, iv += units) {
        uint64_t v = iv & mask;
        for (int i = 0; i < 8; i++)
            tweak[i] = (unsigned char)(v >> (8 * i));
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, tweak, -1) != 1)
            return 0;
        if (EVP_CipherUpdate(ctx, out + pos, &outl, in + pos, (int)ss) != 1 || outl != (int)ss)
            return 0;
    }
    return 1;
}
