/* One pass from torch's CPU int4 packing to a bfloat16 W^T: the dense path of luq.quant.kernels.

   packed: uint8, blocks of `block` weight rows: [N/block][kt][block/2]; byte j of a column holds two
           rows of its block, the first in the low nibble: rows (2j, 2j + 1) where `adjacent`, else
           (j, j + block/2) (torch's packing differs per CPU capability: kernels.CpuPacking);
           w = (q - 8) * scale + zero, per group of `group` kernel columns.
   sz:     bfloat16 bits [kt/group][N][2] (scale, zero) of those groups.
   starts, terms: the kernel columns k that add into input column c are terms[starts[c] .. starts[c+1]);
           both NULL: input column c is kernel column c alone.
   Writes out[(c - c0) * ld + (n - n0)] = sum over those k of w[n, k] for input columns c0 <= c < c1 and
   weight rows n0 <= n < n1 (multiples of `block`), summing in float32; `out` holds float32 where
   `float_out`, else bfloat16 (rounded once). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "floatbits.h"

static inline float weight(int code, uint32_t pair) {  /* (q - 8) * scale + zero */
    return (float)(code - 8) * bits_to_f32(pair << 16) + bits_to_f32(pair & 0xFFFF0000u);
}

int luq_expand_int4(const uint8_t *packed, const uint16_t *sz, int64_t kt, int64_t n_rows, int64_t group,
                    const int64_t *starts, const int64_t *terms, int64_t c0, int64_t c1,
                    int64_t n0, int64_t n1, void *out, int64_t ld, int64_t block, int64_t adjacent,
                    int64_t float_out) {
    const int64_t width = n1 - n0, blocks = width / block, half = block / 2;
    /* a (scale, zero) pair of bfloat16 is one little-endian 32-bit word: scale in the low half */
    const uint32_t *pairs = (const uint32_t *)sz;
    float *acc = malloc(sizeof(float) * (size_t)width);
    if (!acc)
        return 1;
    for (int64_t c = c0; c < c1; c++) {
        memset(acc, 0, sizeof(float) * (size_t)width);
        const int64_t t0 = starts ? starts[c] : c, t1 = starts ? starts[c + 1] : c + 1;
        for (int64_t t = t0; t < t1; t++) {  /* each term streams over the row blocks */
            const int64_t k = terms ? terms[t] : t;
            const uint32_t *w = pairs + (k / group) * n_rows + n0;
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *p = packed + ((n0 / block + b) * kt + k) * half;
                const uint32_t *wb = w + b * block;
                float *a = acc + b * block;
                if (adjacent) {
                    for (int64_t j = 0; j < half; j++) {
                        a[2 * j] += weight(p[j] & 15, wb[2 * j]);
                        a[2 * j + 1] += weight(p[j] >> 4, wb[2 * j + 1]);
                    }
                } else {
                    for (int64_t j = 0; j < half; j++) {
                        a[j] += weight(p[j] & 15, wb[j]);
                        a[j + half] += weight(p[j] >> 4, wb[j + half]);
                    }
                }
            }
        }
        if (float_out) {
            memcpy((float *)out + (c - c0) * ld, acc, sizeof(float) * (size_t)width);
        } else {
            uint16_t *o = (uint16_t *)out + (c - c0) * ld;
            for (int64_t n = 0; n < width; n++)
                o[n] = f32_to_bf16(acc[n]);
        }
    }
    free(acc);
    return 0;
}
