/* One pass from torch's CPU int4 packing to a bfloat16 W^T: the dense path of luq.quant.kernels.

   packed: uint8, blocks of 64 weight rows: [N/64][kt][32], row j of a block in the low nibble of
           byte j, row 32 + j in the high nibble; w = (q - 8) * scale + zero, per group of `group`
           kernel columns.
   sz:     bfloat16 bits [kt/group][N][2] (scale, zero) of those groups.
   starts, terms: the kernel columns k that add into input column c are terms[starts[c] .. starts[c+1]);
           both NULL: input column c is kernel column c alone.
   Writes out[(c - c0) * ld + (n - n0)] = bfloat16(sum over those k of w[n, k]) for input columns
   c0 <= c < c1 and weight rows n0 <= n < n1 (multiples of 64), summing in float32. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "floatbits.h"

int luq_expand_int4(const uint8_t *packed, const uint16_t *sz, int64_t kt, int64_t n_rows, int64_t group,
                    const int64_t *starts, const int64_t *terms, int64_t c0, int64_t c1,
                    int64_t n0, int64_t n1, uint16_t *out, int64_t ld) {
    const int64_t width = n1 - n0, blocks = width / 64;
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
                const uint8_t *p = packed + ((n0 / 64 + b) * kt + k) * 32;
                const uint32_t *wb = w + b * 64;
                float *a = acc + b * 64;
                for (int j = 0; j < 32; j++) {
                    a[j] += (float)((int)(p[j] & 15) - 8) * bits_to_f32(wb[j] << 16) + bits_to_f32(wb[j] & 0xFFFF0000u);
                    a[j + 32] += (float)((int)(p[j] >> 4) - 8) * bits_to_f32(wb[j + 32] << 16)
                                 + bits_to_f32(wb[j + 32] & 0xFFFF0000u);
                }
            }
        }
        uint16_t *o = out + (c - c0) * ld;
        for (int64_t n = 0; n < width; n++)
            o[n] = f32_to_bf16(acc[n]);
    }
    free(acc);
    return 0;
}
