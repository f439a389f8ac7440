/* Compact BiLLM multiplied straight from its stored tensors: the CompactBinaryKernel of
   luq.quant.kernels. Hand-written because no torch op reads 1-bit signs and bit-packed codes; the
   few-token path turns each 8-column byte into one lookup of precomputed subset sums.

   What it reads, in stored column order (act-order and column scales are applied to the input):
     signs     uint8, block by block      the first sign of every column: the stored `signs`, block b's
                                        bytes of all rows ([rows][its bytes]) from rows * b * block / 8, so
                                        that a block of all rows is one stream
     sal       uint8 [nbytes]           the salient columns (the stored `salient_cols`)
     resid     uint8 [rows][rbytes]     the second sign of each salient column, in salient order
                                        (the stored `residual_signs`)
     pos       uint8 [npos][rows]       the sparse group, block by block: block b's positions (column offsets
                                        in the block, blocks of at most 248 columns), [rows][pos_off[b + 1] -
                                        pos_off[b]] from rows * pos_off[b] (read as a stream, block by block);
                                        NO_POSITION where the stored code names a salient column or one past
                                        the block's end (not sparse: the solver's rule); or (spmap = 1) the sparse columns as bits, uint8 [rows][nbytes]
                                        (npos = nbytes), where that is smaller (8 or more per 64 columns)
     sal_start int64 [n_blocks + 1]     salient columns before block b (where its second signs start)
     scodes    uint8 [rows][srow]       the stored `scale_codes`: per block 4 codes (SALIENT_1, SALIENT_2,
                                        CONCENTRATED, SPARSE) of sbits bits, or 3 (no SALIENT_2) when the
                                        SALIENT_2 code is stored as a step below SALIENT_1 in dcodes
     dcodes    uint8 [rows][drow]       the stored `scale2_delta` (dbits bits per block), or unused
     mcodes    uint8 [rows][mrow]       the stored `mean_codes` (mbits bits, 4 per block), or unused
     ref       float [rows]             each row's scale reference; a = ref * stable[code],
                                        m = a * mtable[mean code] (m = 0 without mean codes): the
                                        decoding of CompactBiLLMWeight.parameters_rows, checked equal at build
   Codes are packed as luq.quant.packing packs them: code i of a row at bits [i * bits, (i + 1) * bits),
   little-endian. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "floatbits.h"
#ifdef __AVX2__
#include <immintrin.h>
#endif

/* the dimensions and tensors, in the order luq.quant.native.compact_layout writes them */
enum { ROWS, COLS, NBYTES, BLOCK, NBLOCKS, RBYTES, NPOS, SROW, SBITS, SPER, DROW, DBITS, MROW, MBITS, SPMAP, NDIMS };
enum { SIGNS, SAL, RESID, POS, POS_OFF, SAL_START, SCODES, DCODES, MCODES, REF, STABLE, MTABLE, NPTRS };

#define NO_POSITION 255

static inline unsigned code_at(const uint8_t *row, int64_t i, int64_t bits) {
    const int64_t at = i * bits, shift = at & 7;
    unsigned v = row[at >> 3] >> shift;
    if (shift + bits > 8)
        v |= (unsigned)row[(at >> 3) + 1] << (8 - shift);
    return v & ((1u << bits) - 1u);
}

static inline int bit_at(const uint8_t *bytes, int64_t c) { return (bytes[c >> 3] >> (c & 7)) & 1; }

/* the 4 scales and 4 means of (row r, block b), as float */
static inline __attribute__((always_inline)) void load_params(const int64_t *d, void *const *p, int64_t r, int64_t b, float a[8]) {
    const uint8_t *srow = (const uint8_t *)p[SCODES] + r * d[SROW];
    const float ref = ((const float *)p[REF])[r], *st = (const float *)p[STABLE];
    unsigned c[4];
    if (d[SPER] == 3) {
        c[0] = code_at(srow, 3 * b, d[SBITS]);
        c[2] = code_at(srow, 3 * b + 1, d[SBITS]);
        c[3] = code_at(srow, 3 * b + 2, d[SBITS]);
        c[1] = c[0] + code_at((const uint8_t *)p[DCODES] + r * d[DROW], b, d[DBITS]);
    } else
        for (int i = 0; i < 4; i++)
            c[i] = code_at(srow, 4 * b + i, d[SBITS]);
    for (int i = 0; i < 4; i++)
        a[i] = ref * st[c[i]];
    if (d[MBITS]) {
        const uint8_t *mrow = (const uint8_t *)p[MCODES] + r * d[MROW];
        const float *mt = (const float *)p[MTABLE];
        for (int i = 0; i < 4; i++)
            a[4 + i] = a[i] * mt[code_at(mrow, 4 * b + i, d[MBITS])];
    } else
        a[4] = a[5] = a[6] = a[7] = 0.0f;
}

/* out[t * ld + r] = sum over columns c of w[r][c] x[t][c], rows r0 <= r < r1. x: float [T][cols] (stored
   order, column-scaled); tables [T][nbytes][256] its subset sums (luq_binary_tables of binary_gemm.c), rtables
   [T][rbytes][256] those of its salient columns gathered in order (zero-padded). Per row and block: S1 (sign1
   over all columns, one lookup a byte), S1s (on salient columns: bytes holding one), S2 (the second signs:
   the block's bytes of resid, masked at its two ends), Q and S1q (x and sign1 x on the sparse positions:
   one load each; or two lookups a byte of the
   sparse bits); with X (the block's columns) and Xs (its salient ones):
     salient:      a1 (2 S1s - Xs) + a2 (2 S2 - Xs) + (m1 + m2) Xs
     sparse:       asp (2 S1q - Q) + msp Q
     concentrated: ac (2 (S1 - S1s - S1q) - Pc) + mc Pc,  Pc = X - Xs - Q */
int luq_compact_gemv(const int64_t *d, void *const *p, const float *x, const float *tables, const float *rtables,
                     int64_t T, int64_t r0, int64_t r1, float *out, int64_t ld) {
    const int64_t cols = d[COLS], nbytes = d[NBYTES], bb = d[BLOCK] / 8, nb = d[NBLOCKS], rbytes = d[RBYTES];
    const uint8_t *signs = p[SIGNS], *sal = p[SAL], *resid = p[RESID], *pos = p[POS];
    const int64_t *pos_off = p[POS_OFF], *sal_start = p[SAL_START];
    float *totals = malloc(sizeof(float) * 2 * (size_t)(T * nb));      /* [t][b]: X, Xs */
    /* [t][b][256]: the block's inputs, zero past its end: a position reads its input with no test */
    float *xpad = d[SPMAP] ? NULL : calloc((size_t)(T * nb * 256), sizeof(float));
    int64_t *sbytes = malloc(sizeof(int64_t) * (size_t)(nbytes + nb + 1));  /* salient bytes; per block from */
    if (!totals || !sbytes || (!d[SPMAP] && !xpad)) {
        free(totals), free(sbytes), free(xpad);
        return 1;
    }
    int64_t *sfrom = sbytes + nbytes, n_sb = 0;
    for (int64_t b = 0; b < nb; b++) {
        sfrom[b] = n_sb;
        const int64_t q1 = (b + 1) * bb < nbytes ? (b + 1) * bb : nbytes;
        for (int64_t q = b * bb; q < q1; q++)
            if (sal[q])
                sbytes[n_sb++] = q;
    }
    sfrom[nb] = n_sb;
    for (int64_t t = 0; t < T; t++)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t c1 = (b + 1) * d[BLOCK] < cols ? (b + 1) * d[BLOCK] : cols;
            float X = 0.0f, Xs = 0.0f;
            for (int64_t c = b * d[BLOCK]; c < c1; c++)
                X += x[t * cols + c];
            for (int64_t i = sfrom[b]; i < sfrom[b + 1]; i++)
                Xs += tables[(t * nbytes + sbytes[i]) * 256 + sal[sbytes[i]]];
            totals[2 * (t * nb + b)] = X, totals[2 * (t * nb + b) + 1] = Xs;
            if (xpad)
                memcpy(xpad + (t * nb + b) * 256, x + t * cols + b * d[BLOCK], sizeof(float) * (size_t)(c1 - b * d[BLOCK]));
        }
    for (int64_t t = 0; t < T; t++)
        memset(out + t * ld + r0, 0, sizeof(float) * (size_t)(r1 - r0));
    for (int64_t b = 0; b < nb; b++) {   /* block by block over all rows: the tables of one block stay in cache */
        const int64_t q0 = b * bb, q1 = (b + 1) * bb < nbytes ? (b + 1) * bb : nbytes;
        const int64_t rs0 = sal_start[b], rs1 = sal_start[b + 1];
        const int64_t rq0 = rs0 >> 3, rq1 = rs1 > rs0 ? (rs1 - 1) >> 3 : rq0 - 1;
        const unsigned head = 0xFFu << (rs0 & 7), tail = 0xFFu >> (7 - ((rs1 - 1) & 7));
        const int64_t nbp = pos_off[b + 1] - pos_off[b];
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *u1 = signs + b * d[ROWS] * bb + r * (q1 - q0) - q0, *u2 = resid + r * rbytes;  /* by column byte */
            /* the sparse positions ([rows][nbp] from rows * pos_off[b]) or bits (as the signs) */
            const uint8_t *pr = d[SPMAP] ? pos + b * d[ROWS] * bb + r * (q1 - q0) - q0 : pos + d[ROWS] * pos_off[b] + r * nbp;
            float a[8];
            load_params(d, p, r, b, a);
            uint64_t w[4] = {0, 0, 0, 0};   /* the block's first signs as 256 bits (zero past its end) */
            if (!d[SPMAP]) {
                if (q1 - q0 == 16)   /* a constant size: inlined (a call per row and block cost measurable time here) */
                    memcpy(w, u1 + q0, 16);
                else
                    memcpy(w, u1 + q0, (size_t)(q1 - q0));
            }
            for (int64_t t = 0; t < T; t++) {
                const float *tab = tables + t * nbytes * 256, *rtab = rtables + t * rbytes * 256;
                /* two interleaved sets of sums: the float additions' latency, not the loads, bounds one set */
                float S1 = 0.0f, S1s = 0.0f, S2 = 0.0f, Q = 0.0f, S1q = 0.0f, S1b = 0.0f, Qb = 0.0f, S1qb = 0.0f;
                int64_t q = q0;
                if (d[SPMAP]) {
                    for (; q + 1 < q1; q += 2) {
                        const unsigned a1 = u1[q], c = pr[q], a2 = u1[q + 1], c2 = pr[q + 1];
                        const float *tq = tab + q * 256;
                        S1 += tq[a1], Q += tq[c], S1q += tq[a1 & c];
                        S1b += tq[256 + a2], Qb += tq[256 + c2], S1qb += tq[256 + (a2 & c2)];
                    }
                    if (q < q1)
                        S1 += tab[q * 256 + u1[q]], Q += tab[q * 256 + pr[q]], S1q += tab[q * 256 + (u1[q] & pr[q])];
                } else {
                    for (; q + 1 < q1; q += 2)
                        S1 += tab[q * 256 + u1[q]], S1b += tab[(q + 1) * 256 + u1[q + 1]];
                    if (q < q1)
                        S1 += tab[q * 256 + u1[q]];
                    /* no test and no branch on a sign (a random bit mispredicts half the time): NO_POSITION reads
                       a zero input, the sign selects by a mask */
                    const float *xb = xpad + (t * nb + b) * 256;
                    int64_t j = 0;
                    for (; j + 1 < nbp; j += 2) {
                        const unsigned c = pr[j], c2 = pr[j + 1];
                        const float v = xb[c], v2 = xb[c2];
                        Q += v, Qb += v2;
                        S1q += bits_to_f32(f32_bits(v) & (0u - (uint32_t)((w[c >> 6] >> (c & 63)) & 1u)));
                        S1qb += bits_to_f32(f32_bits(v2) & (0u - (uint32_t)((w[c2 >> 6] >> (c2 & 63)) & 1u)));
                    }
                    if (j < nbp) {
                        const unsigned c = pr[j];
                        Q += xb[c];
                        S1q += bits_to_f32(f32_bits(xb[c]) & (0u - (uint32_t)((w[c >> 6] >> (c & 63)) & 1u)));
                    }
                }
                S1 += S1b, Q += Qb, S1q += S1qb;
                for (int64_t i = sfrom[b]; i < sfrom[b + 1]; i++) {
                    const int64_t sb = sbytes[i];
                    S1s += tab[sb * 256 + (u1[sb] & sal[sb])];
                }
                for (int64_t rq = rq0; rq <= rq1; rq++) {
                    unsigned m = 0xFFu;
                    if (rq == rq0)
                        m &= head;
                    if (rq == rq1)
                        m &= tail;
                    S2 += rtab[rq * 256 + (u2[rq] & m)];
                }
                const float X = totals[2 * (t * nb + b)], Xs = totals[2 * (t * nb + b) + 1];
                const float Pc = X - Xs - Q, S1c = S1 - S1s - S1q;
                out[t * ld + r] += a[0] * (2.0f * S1s - Xs) + a[1] * (2.0f * S2 - Xs) + (a[4] + a[5]) * Xs
                                   + a[3] * (2.0f * S1q - Q) + a[7] * Q + a[2] * (2.0f * S1c - Pc) + a[6] * Pc;
            }
        }
    }
    free(totals), free(sbytes), free(xpad);
    return 0;
}

/* The prompt path's tile: out[(r - r0) * ld + c] = bfloat16(w[r][c]) for rows r0 <= r < r1, all columns in
   stored order, before the column scales. Per (row, block): every column from its first sign and the
   concentrated (or, by the sparse bits, sparse) values, then the salient columns and the sparse
   positions overwritten. The 8 values are
   rounded from float sums written as the dequantization (block_values) adds them. */
int luq_compact_expand(const int64_t *d, void *const *p, int64_t r0, int64_t r1, uint16_t *out, int64_t ld) {
    const int64_t cols = d[COLS], nbytes = d[NBYTES], bb = d[BLOCK] / 8, nb = d[NBLOCKS], rbytes = d[RBYTES];
    const uint8_t *signs = p[SIGNS], *sal = p[SAL], *resid = p[RESID], *pos = p[POS];
    const int64_t *pos_off = p[POS_OFF], *sal_start = p[SAL_START];
#ifdef __AVX2__
    const __m128i bit = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128), odd = _mm_set1_epi16(0x0100);
#endif
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = out + (r - r0) * ld;
        const uint8_t *u2 = resid + r * rbytes;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t q0 = b * bb, q1 = (b + 1) * bb < nbytes ? (b + 1) * bb : nbytes;
            const int64_t c0 = b * d[BLOCK], c1 = q1 * 8 < cols ? q1 * 8 : cols;
            /* the block's first signs and sparse bits (spmap), indexed by column byte */
            const uint8_t *u1 = signs + b * d[ROWS] * bb + r * (q1 - q0) - q0;
            const uint8_t *pr = pos + b * d[ROWS] * bb + r * (q1 - q0) - q0;
            float a[8];
            load_params(d, p, r, b, a);
            const uint16_t vc[2] = {f32_to_bf16(-a[2] + a[6]), f32_to_bf16(a[2] + a[6])};
            const uint16_t vsp[2] = {f32_to_bf16(-a[3] + a[7]), f32_to_bf16(a[3] + a[7])};
            const uint16_t vsal[4] = {f32_to_bf16((-a[0] + a[4]) + (-a[1] + a[5])),
                                      f32_to_bf16((-a[0] + a[4]) + (a[1] + a[5])),
                                      f32_to_bf16((a[0] + a[4]) + (-a[1] + a[5])),
                                      f32_to_bf16((a[0] + a[4]) + (a[1] + a[5]))};
            const int spmap = (int)d[SPMAP];
#ifdef __AVX2__
            /* lane i tests bit i of the sign (and of the sparse bits); its two byte indices into (vc, vsp) are
               2k, 2k + 1 with k = sign + 2 sparse */
            const __m128i table = _mm_setr_epi16((short)vc[0], (short)vc[1], (short)vsp[0], (short)vsp[1], 0, 0, 0, 0);
            for (int64_t q = q0; q < q1; q++) {
                const __m128i ma = _mm_cmpeq_epi16(_mm_and_si128(_mm_set1_epi16(u1[q]), bit), bit);
                const __m128i mc = _mm_cmpeq_epi16(_mm_and_si128(_mm_set1_epi16(spmap ? pr[q] : 0), bit), bit);
                const __m128i k = _mm_or_si128(_mm_and_si128(ma, _mm_set1_epi16(0x0202)),
                                               _mm_and_si128(mc, _mm_set1_epi16(0x0404)));
                _mm_storeu_si128((__m128i *)(o + 8 * q), _mm_shuffle_epi8(table, _mm_add_epi16(k, odd)));
            }
#else
            const uint16_t v4[4] = {vc[0], vc[1], vsp[0], vsp[1]};
            for (int64_t q = q0; q < q1; q++) {
                const unsigned sp = spmap ? pr[q] : 0u;
                for (int i = 0; i < 8; i++)
                    o[8 * q + i] = v4[((u1[q] >> i) & 1u) | (((sp >> i) & 1u) << 1)];
            }
#endif
            int64_t si = sal_start[b];
            for (int64_t q = q0; q < q1; q++)
                for (unsigned s = sal[q]; s; s &= s - 1) {
                    const int64_t c = 8 * q + __builtin_ctz(s);
                    o[c] = vsal[(bit_at(u1, c) << 1) | bit_at(u2, si++)];
                }
            if (!spmap)   /* the sparse bits were read above */
                for (int64_t j = pos_off[b]; j < pos_off[b + 1]; j++) {
                    const unsigned c = pos[d[ROWS] * pos_off[b] + r * (pos_off[b + 1] - pos_off[b]) + (j - pos_off[b])];
                    if (c != NO_POSITION)
                        o[c0 + c] = vsp[bit_at(u1, c0 + c)];
                }
        }
    }
    return 0;
}
