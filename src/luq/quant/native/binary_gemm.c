/* Binarized weights (BiLLM, compact BiLLM) multiplied straight from two bit planes: the
   BinaryKernel of luq.quant.kernels. Hand-written because no torch op reads 1-bit planes; the
   decode path turns each 8-column byte into a few lookups of precomputed subset sums.

   Planes: uint8 [n_blocks][n_rows][block_bytes], block by block (a block's bytes of all rows are one
   stream: the decode path walks them so; the last block zero-padded), bit i of byte p (p < nbytes =
   in / 8, at [p / block_bytes][row][p % block_bytes]) is column 8p + i:
     s1  first sign; s2  second sign on salient columns, sparse (1) or concentrated (0) on the others:
         one plane, read through the salient mask (the bits BiLLM stores, 2 per weight).
   sal: uint8 [nbytes], the salient columns as bits.
   params: [rows][n_blocks][8], the scales of slots SALIENT_1, SALIENT_2, CONCENTRATED, SPARSE, then their
     means, as float32 (kind 0), float16 bits (kind 1) or uint8 codes (kind 2: compact BiLLM's log-grid
     scales, a = row_ref[row] * scale_table[code], m = a * mean_table[code]). A value is a * s + m, s = +-1. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "floatbits.h"
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float half_to_f32(uint16_t h) {  /* IEEE half to float: normals, subnormals, zeros */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 31u, man = h & 0x3FFu;
    uint32_t u;
    if (exp == 31)
        u = sign | 0x7F800000u | (man << 13);
    else if (exp)
        u = sign | ((exp + 112u) << 23) | (man << 13);
    else if (man) {  /* subnormal: man * 2^-24, exact in float */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&u, &f, 4);
        u |= sign;
    } else
        u = sign;
    return bits_to_f32(u);
}

/* the per-(row, block) parameters: their values or codes, and what decodes codes */
typedef struct {
    const void *values;
    int64_t kind;
    const float *row_ref, *scale_table, *mean_table;
} params_t;

/* the 8 parameters of (row, block) as float */
static inline void load_params(const params_t *P, int64_t row, int64_t index, float p[8]) {
    if (P->kind == 2) {
        const uint8_t *c = (const uint8_t *)P->values + index * 8;
        const float ref = P->row_ref[row];
        for (int i = 0; i < 4; i++) {
            p[i] = ref * P->scale_table[c[i]];
            p[4 + i] = p[i] * P->mean_table[c[4 + i]];
        }
    } else if (P->kind == 1) {
        const uint16_t *h = (const uint16_t *)P->values + index * 8;
#ifdef __F16C__  /* one instruction for the 8 (the scalar conversion cost a sizeable share of a decode, timed by hand) */
        _mm256_storeu_ps(p, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
#else
        for (int i = 0; i < 8; i++)
            p[i] = half_to_f32(h[i]);
#endif
    } else
        memcpy(p, (const float *)P->values + index * 8, sizeof(float) * 8);
}

/* tables[t][p][v] = sum of x[t][8p + i] over the bits i set in v (T tokens of `cols` = 8 * nbytes values) */
int luq_binary_tables(const float *x, int64_t T, int64_t nbytes, float *tables) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t p = 0; p < nbytes; p++) {
            const float *v = x + t * nbytes * 8 + p * 8;
            float *tab = tables + (t * nbytes + p) * 256;
            tab[0] = 0.0f;
            for (int i = 0; i < 8; i++)
                for (int j = 0; j < (1 << i); j++)
                    tab[(1 << i) + j] = tab[j] + v[i];
        }
    return 0;
}

/* out[t * ld + r] = sum over columns of w[r][c] * x[t][c] for rows r0 <= r < r1, from the tables of
   luq_binary_tables. Per row and block, five subset sums: S1 (sign1 on plain columns), S1s (on salient ones),
   Q (sparse), S1q (sign1 and sparse), S2 (sign2); with X (all columns) and Xs (salient ones):
     salient:      a1 (2 S1s - Xs) + a2 (2 S2 - Xs) + (m1 + m2) Xs
     sparse:       asp (2 S1q - Q) + msp Q
     concentrated: ac (2 (S1 - S1q) - (X - Xs - Q)) + mc (X - Xs - Q) */
int luq_binary_gemv(const uint8_t *s1, const uint8_t *s2, const uint8_t *sal, int64_t nbytes,
                    int64_t n_rows, const void *params, int64_t kind, const float *row_ref,
                    const float *scale_table, const float *mean_table, int64_t block_bytes, int64_t n_blocks,
                    const float *tables, int64_t T, int64_t r0, int64_t r1, float *out, int64_t ld) {
    const params_t P = {params, kind, row_ref, scale_table, mean_table};
    float *totals = malloc(sizeof(float) * 2 * (size_t)(T * n_blocks));   /* [t][b]: X, Xs */
    int64_t *ranges = malloc(sizeof(int64_t) * 2 * (size_t)n_blocks);      /* [b]: qa, qb */
    if (!totals || !ranges) {
        free(totals), free(ranges);
        return 1;
    }
    /* block b's bytes [q0, qa) are all salient columns and [qb, q1) none (BinaryKernel puts a block's
       salient columns first): the salient sums read [q0, qb), the plain ones [qa, q1) */
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t q0 = b * block_bytes, q1 = (b + 1) * block_bytes < nbytes ? (b + 1) * block_bytes : nbytes;
        int64_t qa = q0, qb = q0;
        while (qa < q1 && sal[qa] == 0xFF)
            qa++;
        for (int64_t q = q0; q < q1; q++)
            if (sal[q])
                qb = q + 1;
        ranges[2 * b] = qa, ranges[2 * b + 1] = qb;
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < n_blocks; b++) {
            const int64_t p1 = (b + 1) * block_bytes < nbytes ? (b + 1) * block_bytes : nbytes;
            float x = 0.0f, xs = 0.0f;
            for (int64_t p = b * block_bytes; p < p1; p++) {
                x += tables[(t * nbytes + p) * 256 + 255];
                xs += tables[(t * nbytes + p) * 256 + sal[p]];
            }
            totals[2 * (t * n_blocks + b)] = x;
            totals[2 * (t * n_blocks + b) + 1] = xs;
        }
    for (int64_t t = 0; t < T; t++)
        memset(out + t * ld + r0, 0, sizeof(float) * (size_t)(r1 - r0));
    /* block by block over all rows: the tables of one block stay in cache */
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t q0 = b * block_bytes, q1 = (b + 1) * block_bytes < nbytes ? (b + 1) * block_bytes : nbytes;
        for (int64_t r = r0; r < r1; r++) {
            /* indexed by the column byte q: this row's bytes of block b sit at (b n_rows + r) block_bytes */
            const int64_t at = (b * n_rows + r) * block_bytes - q0;
            const uint8_t *u1 = s1 + at, *u2 = s2 + at;
            float p[8];
            load_params(&P, r, r * n_blocks + b, p);
            for (int64_t t = 0; t < T; t++) {
                const float *tab = tables + t * nbytes * 256;
                /* two interleaved sets of sums: the float additions' latency, not the loads, bounds one set */
                float S1 = 0.0f, Q = 0.0f, S1q = 0.0f, S1s = 0.0f, S2 = 0.0f, S1b = 0.0f, Qb = 0.0f, S1qb = 0.0f;
                const int64_t qa = ranges[2 * b], qb = ranges[2 * b + 1];
                int64_t q = qa;
                for (; q + 1 < q1; q += 2) {
                    const unsigned a = u1[q] & ~sal[q], c = u2[q] & ~sal[q];
                    const unsigned a2 = u1[q + 1] & ~sal[q + 1], c2 = u2[q + 1] & ~sal[q + 1];
                    const float *tq = tab + q * 256;
                    S1 += tq[a];
                    Q += tq[c];
                    S1q += tq[a & c];
                    S1b += tq[256 + a2];
                    Qb += tq[256 + c2];
                    S1qb += tq[256 + (a2 & c2)];
                }
                if (q < q1) {
                    const unsigned a = u1[q] & ~sal[q], c = u2[q] & ~sal[q];
                    S1 += tab[q * 256 + a];
                    Q += tab[q * 256 + c];
                    S1q += tab[q * 256 + (a & c)];
                }
                S1 += S1b, Q += Qb, S1q += S1qb;
                for (q = q0; q < qb; q++) {
                    S1s += tab[q * 256 + (u1[q] & sal[q])];
                    S2 += tab[q * 256 + (u2[q] & sal[q])];
                }
                const float X = totals[2 * (t * n_blocks + b)], Xs = totals[2 * (t * n_blocks + b) + 1];
                const float Pc = X - Xs - Q, S1c = S1 - S1q;
                out[t * ld + r] += p[0] * (2.0f * S1s - Xs) + p[1] * (2.0f * S2 - Xs) + (p[4] + p[5]) * Xs
                                   + p[3] * (2.0f * S1q - Q) + p[7] * Q + p[2] * (2.0f * S1c - Pc) + p[6] * Pc;
            }
        }
    }
    free(totals), free(ranges);
    return 0;
}

/* The dense prompt path's tile: out[(r - r0) * ld + c] = bfloat16(w[r][c]) for rows r0 <= r < r1, all
   columns (W, not W^T: each row is written contiguously). Per (row, block), the 8 possible values,
   computed as block_values adds them, are indexed by (salient, sign1, sign2 or sparse). */
static void row_values(const params_t *P, int64_t row, int64_t index, uint16_t v[8]) {
    float a[8];
    load_params(P, row, index, a);
    v[0] = f32_to_bf16(-a[2] + a[6]), v[1] = f32_to_bf16(-a[3] + a[7]);
    v[2] = f32_to_bf16(a[2] + a[6]), v[3] = f32_to_bf16(a[3] + a[7]);
    v[4] = f32_to_bf16((-a[0] + a[4]) + (-a[1] + a[5])), v[5] = f32_to_bf16((-a[0] + a[4]) + (a[1] + a[5]));
    v[6] = f32_to_bf16((a[0] + a[4]) + (-a[1] + a[5])), v[7] = f32_to_bf16((a[0] + a[4]) + (a[1] + a[5]));
}

int luq_binary_expand(const uint8_t *s1, const uint8_t *s2, const uint8_t *sal, int64_t nbytes,
                      int64_t n_rows, const void *params, int64_t kind, const float *row_ref,
                      const float *scale_table, const float *mean_table, int64_t block_bytes, int64_t n_blocks,
                      int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    const params_t P = {params, kind, row_ref, scale_table, mean_table};
#ifdef __AVX2__
    /* lane i of a 16-bit vector tests bit i; a lane's two byte indices into the 8 values are 2k, 2k + 1 */
    const __m128i bit = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128), odd = _mm_set1_epi16(0x0100);
#endif
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = out + (r - r0) * ld;
        for (int64_t b = 0; b < n_blocks; b++) {
            const int64_t at = (b * n_rows + r) * block_bytes - b * block_bytes;   /* indexed by column byte */
            const uint8_t *u1 = s1 + at, *u2 = s2 + at;
            uint16_t v[8];
            row_values(&P, r, r * n_blocks + b, v);
            const int64_t q1 = (b + 1) * block_bytes < nbytes ? (b + 1) * block_bytes : nbytes;
#ifdef __AVX2__
            const __m128i table = _mm_loadu_si128((const __m128i *)v);
            for (int64_t q = b * block_bytes; q < q1; q++) {
                const __m128i ms = _mm_cmpeq_epi16(_mm_and_si128(_mm_set1_epi16(sal[q]), bit), bit);
                const __m128i ma = _mm_cmpeq_epi16(_mm_and_si128(_mm_set1_epi16(u1[q]), bit), bit);
                const __m128i mc = _mm_cmpeq_epi16(_mm_and_si128(_mm_set1_epi16(u2[q]), bit), bit);
                __m128i k = _mm_or_si128(_mm_and_si128(ms, _mm_set1_epi16(0x0808)),
                                         _mm_or_si128(_mm_and_si128(ma, _mm_set1_epi16(0x0404)),
                                                      _mm_and_si128(mc, _mm_set1_epi16(0x0202))));
                _mm_storeu_si128((__m128i *)(o + 8 * q), _mm_shuffle_epi8(table, _mm_add_epi16(k, odd)));
            }
#else
            for (int64_t q = b * block_bytes; q < q1; q++) {
                const unsigned s = sal[q], a = u1[q], c = u2[q];
                for (int i = 0; i < 8; i++)
                    o[8 * q + i] = v[(((s >> i) & 1u) << 2) | (((a >> i) & 1u) << 1) | ((c >> i) & 1u)];
            }
#endif
        }
    }
    return 0;
}
