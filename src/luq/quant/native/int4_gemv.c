/* A few tokens times an int4 weight read in place from torch's CPU int4 packing: the few-token path of
   luq.quant.kernels.Int4Kernel on CPU, in place of torch's _weight_int4pack_mm_for_cpu (which on an AVX2
   CPU is slower than a float32 F.linear on small layers).

   packed: uint8, blocks of `block` weight rows: [N/block][kt][block/2]; byte j of a column holds two
           rows of its block, the first in the low nibble: rows (2j, 2j + 1) where `adjacent`, else
           (j, j + block/2) (as in expand_int4.c; kernels.CpuPacking); w = (q - 8) * scale + zero per
           group of `group` kernel columns.
   sz:     bfloat16 bits [kt/group][N][2] (scale, zero) of those groups.
   x:      float32 [T][kt], the input of each kernel column (the caller gathers it).
   Writes out[t * ld + n] = sum_k x[t][k] * w[n][k] for the T tokens and weight rows n0 <= n < n1 (multiples
   of `block`), in float32: per row and group, a = sum_k x_k q_k over the group's columns (q in 0..15) and
   y += s * a + (z - 8 s) * xs, xs = sum_k x_k over the group (one multiply per row and group, not per weight).

   A group wider than SPAN_MAX columns is taken in spans of SPAN_MAX (the same sums, xs per span).

   AVX2 + FMA (and block a multiple of 32): rows 32 at a time, 16 bytes of a column (the whole column of a
   32-row block, half of a 64-row one) broadcast to a 256-bit register, its nibbles split, spread to 32-bit
   lanes by byte shuffles (rows in order, 8 per vector) as floats (`codes32`) and multiplied into the
   tokens' accumulators: one token with two accumulator sets (even and odd columns, to hide the FMA
   latency), two tokens together (their accumulators fill the registers); from BUFFER_FROM_TOKENS tokens
   on, a span's codes are decoded once into a float buffer (16 KB at most) that tiles of 4 tokens x 16 rows
   then read (the last 1..3 tokens: x 32 rows). Elsewhere: plain C, the same sums.
   Returns 0, or 1 where its buffers could not be allocated. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "floatbits.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LUQ_GEMV_AVX2 1
#endif

#define SPAN_MAX 128
#define BUFFER_FROM_TOKENS 4  /* buffered, 3 tokens timed slower than direct, 4 and more faster (one-off run) */

/* the columns summed per epilogue: the group, halved while wider than SPAN_MAX */
static int64_t span_of(int64_t group) {
    int64_t span = group;
    while (span > SPAN_MAX && span % 2 == 0)
        span /= 2;
    return span;
}

/* xs[t * spans + i] = sum of the inputs of span i */
static void span_sums(const float *x, int64_t T, int64_t kt, int64_t span, float *xs) {
    const int64_t spans = kt / span;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < spans; i++) {
            const float *v = x + t * kt + i * span;
            float s = 0.0f;
            for (int64_t k = 0; k < span; k++)
                s += v[k];
            xs[t * spans + i] = s;
        }
}

#ifdef LUQ_GEMV_AVX2
/* The 32 codes q of 16 bytes (bytes 0..15 of a run of a column) as 4 vectors of 8 rows each, rows in order
   within each: split (not adjacent): low nibbles of bytes 0..7, 8..15, high nibbles of 0..7, 8..15;
   adjacent: rows 0..7, 8..15, 16..23, 24..31 of the 32 the bytes hold (byte i: rows 2i, 2i + 1).
   Each is the float 1 + q / 16, its bits built in place (q in mantissa bits 19..22, the exponent of 1.0
   or-ed in): no int -> float conversion, which runs on fewer ports than bit logic (timed faster, one-off). */
static inline __attribute__((always_inline)) void codes32(const uint8_t *p, int adjacent, __m256 v[4]) {
    const __m256i nib = _mm256_set1_epi8(0x78);
    const __m256i one = _mm256_set1_epi32(0x3F800000);
    /* byte b of a 128-bit lane to byte 2 of a 32-bit lane: bytes 0..3 (low lane) and 4..7 (high lane) */
    const __m256i first = _mm256_setr_epi8(-1, -1, 0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1,
                                           -1, -1, 4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1);
    const __m256i second = _mm256_setr_epi8(-1, -1, 8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1,
                                            -1, -1, 12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1);
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    /* q << 3 of each byte's low and high nibble */
    __m256i lo = _mm256_and_si256(_mm256_slli_epi16(b, 3), nib), hi = _mm256_and_si256(_mm256_srli_epi16(b, 1), nib);
    if (adjacent) {  /* interleave: bytes in row order */
        const __m256i l = _mm256_unpacklo_epi8(lo, hi), h = _mm256_unpackhi_epi8(lo, hi);
        lo = l;
        hi = h;
    }
    v[0] = _mm256_castsi256_ps(_mm256_or_si256(_mm256_shuffle_epi8(lo, first), one));
    v[1] = _mm256_castsi256_ps(_mm256_or_si256(_mm256_shuffle_epi8(lo, second), one));
    v[2] = _mm256_castsi256_ps(_mm256_or_si256(_mm256_shuffle_epi8(hi, first), one));
    v[3] = _mm256_castsi256_ps(_mm256_or_si256(_mm256_shuffle_epi8(hi, second), one));
}

/* acc = sum_k x_k (1 + q_k / 16) = xs + (sum_k x_k q_k) / 16 over a span, so that s * sum x q + (z - 8 s) * xs
   = 16 s * acc + (z - 24 s) * xs: y[t * y_stride + 0..7] += that for one run of 8 rows (pairs: their
   (scale, zero) words in the span's group) and `tokens` tokens (acc[t * acc_stride], xs[t * xs_stride]) */
static inline __attribute__((always_inline)) void apply_run(const uint32_t *pairs, int tokens, const __m256 *acc,
                                                            int acc_stride, const float *xs, int64_t xs_stride,
                                                            float *y, int64_t y_stride) {
    const __m256i w = _mm256_loadu_si256((const __m256i *)pairs);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    const __m256 s = _mm256_mul_ps(_mm256_set1_ps(16.0f), s1);
    const __m256 z = _mm256_fnmadd_ps(_mm256_set1_ps(24.0f), s1,
                                      _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32((int)0xFFFF0000u))));
    for (int t = 0; t < tokens; t++) {
        float *yr = y + t * y_stride;
        const __m256 c = _mm256_fmadd_ps(z, _mm256_set1_ps(xs[t * xs_stride]), _mm256_loadu_ps(yr));
        _mm256_storeu_ps(yr, _mm256_fmadd_ps(s, acc[t * acc_stride], c));
    }
}

/* one 32-row run (`p`: its first column's 16 bytes; columns `stride` bytes apart) over a span's `n` columns
   (even): one token (x) */
static inline __attribute__((always_inline)) void direct1(const uint8_t *p, int64_t stride, const float *x,
                                                          int64_t n, int adjacent, __m256 acc[4]) {
    __m256 a[4], b[4], v[4];
    for (int r = 0; r < 4; r++)
        a[r] = b[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 2) {
        codes32(p + k * stride, adjacent, v);
        const __m256 x0 = _mm256_broadcast_ss(x + k);
        for (int r = 0; r < 4; r++)
            a[r] = _mm256_fmadd_ps(x0, v[r], a[r]);
        codes32(p + (k + 1) * stride, adjacent, v);
        const __m256 x1 = _mm256_broadcast_ss(x + k + 1);
        for (int r = 0; r < 4; r++)
            b[r] = _mm256_fmadd_ps(x1, v[r], b[r]);
    }
    for (int r = 0; r < 4; r++)
        acc[r] = _mm256_add_ps(a[r], b[r]);
}

/* the same for two tokens (x, x + x_stride): acc[t * 4 + r] */
static inline __attribute__((always_inline)) void direct2(const uint8_t *p, int64_t stride, const float *x,
                                                          int64_t x_stride, int64_t n, int adjacent, __m256 acc[8]) {
    __m256 a[4], b[4], v[4];
    for (int r = 0; r < 4; r++)
        a[r] = b[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k++) {
        codes32(p + k * stride, adjacent, v);
        const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + x_stride + k);
        for (int r = 0; r < 4; r++) {
            a[r] = _mm256_fmadd_ps(x0, v[r], a[r]);
            b[r] = _mm256_fmadd_ps(x1, v[r], b[r]);
        }
    }
    for (int r = 0; r < 4; r++) {
        acc[r] = a[r];
        acc[4 + r] = b[r];
    }
}

/* a span's codes of one 32-row run decoded once: buf[32 k + 8 r + i] = vector r of column k */
static inline __attribute__((always_inline)) void decode_span(const uint8_t *p, int64_t stride, int64_t n,
                                                              int adjacent, float *buf) {
    __m256 v[4];
    for (int64_t k = 0; k < n; k++) {
        codes32(p + k * stride, adjacent, v);
        for (int r = 0; r < 4; r++)
            _mm256_storeu_ps(buf + 32 * k + 8 * r, v[r]);
    }
}

/* 4 tokens (x + t * x_stride) times vectors (2 h, 2 h + 1) of the decoded span: acc[t * 2 + j] (8 accumulators) */
static inline __attribute__((always_inline)) void buffered4(const float *buf, int h, const float *x,
                                                            int64_t x_stride, int64_t n, __m256 acc[8]) {
    __m256 a[4][2];
    for (int t = 0; t < 4; t++)
        a[t][0] = a[t][1] = _mm256_setzero_ps();
    const float *b = buf + 16 * h;
    for (int64_t k = 0; k < n; k++) {
        const __m256 v0 = _mm256_loadu_ps(b + 32 * k), v1 = _mm256_loadu_ps(b + 32 * k + 8);
        for (int t = 0; t < 4; t++) {
            const __m256 xt = _mm256_broadcast_ss(x + t * x_stride + k);
            a[t][0] = _mm256_fmadd_ps(xt, v0, a[t][0]);
            a[t][1] = _mm256_fmadd_ps(xt, v1, a[t][1]);
        }
    }
    for (int t = 0; t < 4; t++) {
        acc[2 * t] = a[t][0];
        acc[2 * t + 1] = a[t][1];
    }
}

/* the last 1..3 tokens times all 4 vectors of the decoded span: acc[t * 4 + r] (one token: even and odd
   columns apart), so that 8 or more accumulators hide the FMA latency */
static inline __attribute__((always_inline)) void buffered_rest(const float *buf, const float *x, int64_t x_stride,
                                                                int64_t n, int tt, __m256 acc[12]) {
    __m256 a[3][4];
    for (int t = 0; t < 3; t++)
        for (int r = 0; r < 4; r++)
            a[t][r] = _mm256_setzero_ps();
    if (tt == 1) {
        for (int64_t k = 0; k < n; k += 2) {
            const __m256 x0 = _mm256_broadcast_ss(x + k), x1 = _mm256_broadcast_ss(x + k + 1);
            for (int r = 0; r < 4; r++) {
                a[0][r] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(buf + 32 * k + 8 * r), a[0][r]);
                a[1][r] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(buf + 32 * k + 32 + 8 * r), a[1][r]);
            }
        }
        for (int r = 0; r < 4; r++)
            acc[r] = _mm256_add_ps(a[0][r], a[1][r]);
        return;
    }
    for (int64_t k = 0; k < n; k++)
        for (int t = 0; t < tt; t++) {
            const __m256 xt = _mm256_broadcast_ss(x + t * x_stride + k);
            for (int r = 0; r < 4; r++)
                a[t][r] = _mm256_fmadd_ps(xt, _mm256_loadu_ps(buf + 32 * k + 8 * r), a[t][r]);
        }
    for (int t = 0; t < tt; t++)
        for (int r = 0; r < 4; r++)
            acc[4 * t + r] = a[t][r];
}

/* the rows of one block (`blk`: its packed bytes; `pairs`: its rows' (scale, zero) words of group 0) over all
   columns into y [T][block] */
static inline __attribute__((always_inline)) void block_avx2(const uint8_t *blk, const uint32_t *pairs,
                                                             const float *x, const float *xs, int64_t T,
                                                             int64_t kt, int64_t n_rows, int64_t group,
                                                             int64_t span, int64_t block, int adjacent,
                                                             float *y, float *buf) {
    const int64_t half = block / 2, spans = kt / span;
    for (int64_t u = 0; u < half / 16; u++) {  /* 16 bytes of each column: 32 rows */
        int run[4];  /* the first row of each vector of 8 */
        for (int r = 0; r < 4; r++)
            run[r] = (int)(adjacent ? 32 * u + 8 * r : (r >= 2 ? half : 0) + 16 * u + 8 * (r & 1));
        for (int64_t i = 0; i < spans; i++) {
            const uint8_t *p = blk + i * span * half + 16 * u;
            const uint32_t *pg = pairs + (i * span / group) * n_rows;
            const float *xi = x + i * span, *si = xs + i;
            __m256 acc[8];
            if (T < BUFFER_FROM_TOKENS) {
                for (int64_t t = 0; t < T; t += 2) {
                    const int tt = T - t < 2 ? 1 : 2;
                    if (tt == 2)
                        direct2(p, half, xi + t * kt, kt, span, adjacent, acc);
                    else
                        direct1(p, half, xi + t * kt, span, adjacent, acc);
                    for (int r = 0; r < 4; r++)
                        apply_run(pg + run[r], tt, acc + r, 4, si + t * spans, spans, y + t * block + run[r], block);
                }
            } else {
                decode_span(p, half, span, adjacent, buf);
                int64_t t = 0;
                for (; t + 4 <= T; t += 4)
                    for (int h = 0; h < 2; h++) {
                        buffered4(buf, h, xi + t * kt, kt, span, acc);
                        for (int j = 0; j < 2; j++)
                            apply_run(pg + run[2 * h + j], 4, acc + j, 2, si + t * spans, spans,
                                      y + t * block + run[2 * h + j], block);
                    }
                if (t < T) {
                    __m256 rest[12];
                    const int tt = (int)(T - t);
                    switch (tt) {  /* constant tile sizes: the accumulators stay in registers */
                        case 3: buffered_rest(buf, xi + t * kt, kt, span, 3, rest); break;
                        case 2: buffered_rest(buf, xi + t * kt, kt, span, 2, rest); break;
                        default: buffered_rest(buf, xi + t * kt, kt, span, 1, rest); break;
                    }
                    for (int r = 0; r < 4; r++)
                        apply_run(pg + run[r], tt, rest + r, 4, si + t * spans, spans, y + t * block + run[r], block);
                }
            }
        }
    }
}
#endif

/* plain C: the same sums for any even block */
static void block_plain(const uint8_t *blk, const uint32_t *pairs, const float *x, const float *xs, int64_t T,
                        int64_t kt, int64_t n_rows, int64_t group, int64_t span, int64_t block, int adjacent,
                        float *y, float *a) {
    const int64_t half = block / 2, spans = kt / span;
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < spans; i++) {
            memset(a, 0, sizeof(float) * (size_t)block);
            for (int64_t k = i * span; k < (i + 1) * span; k++) {
                const uint8_t *p = blk + k * half;
                const float xk = x[t * kt + k];
                if (adjacent)
                    for (int64_t j = 0; j < half; j++) {
                        a[2 * j] += xk * (float)(p[j] & 15);
                        a[2 * j + 1] += xk * (float)(p[j] >> 4);
                    }
                else
                    for (int64_t j = 0; j < half; j++) {
                        a[j] += xk * (float)(p[j] & 15);
                        a[j + half] += xk * (float)(p[j] >> 4);
                    }
            }
            const uint32_t *pg = pairs + (i * span / group) * n_rows;
            const float sum = xs[t * spans + i];
            for (int64_t r = 0; r < block; r++) {
                const float s = bits_to_f32(pg[r] << 16), z = bits_to_f32(pg[r] & 0xFFFF0000u);
                y[t * block + r] += s * a[r] + (z - 8.0f * s) * sum;
            }
        }
}

int luq_int4_gemv(const uint8_t *packed, const uint16_t *sz, const float *x, int64_t T, int64_t kt,
                  int64_t n_rows, int64_t group, int64_t n0, int64_t n1, float *out, int64_t ld, int64_t block,
                  int64_t adjacent) {
    const int64_t half = block / 2, span = span_of(group), spans = kt / span;
    /* a (scale, zero) pair of bfloat16 is one little-endian 32-bit word: scale in the low half */
    const uint32_t *pairs = (const uint32_t *)sz;
    /* xs [T][spans], y [T][block], the plain path's row sums [block], the decoded span [span][32] */
    float *xs = malloc(sizeof(float) * (size_t)(T * spans + T * block + block + 32 * span));
    if (!xs)
        return 1;
    float *y = xs + T * spans, *a = y + T * block, *buf = a + block;
    span_sums(x, T, kt, span, xs);
    for (int64_t nb = n0; nb < n1; nb += block) {
        const uint8_t *blk = packed + (nb / block) * kt * half;
        memset(y, 0, sizeof(float) * (size_t)(T * block));
#ifdef LUQ_GEMV_AVX2
        if (half % 16 == 0 && span % 2 == 0) {
            if (adjacent)
                block_avx2(blk, pairs + nb, x, xs, T, kt, n_rows, group, span, block, 1, y, buf);
            else
                block_avx2(blk, pairs + nb, x, xs, T, kt, n_rows, group, span, block, 0, y, buf);
        } else
#endif
            block_plain(blk, pairs + nb, x, xs, T, kt, n_rows, group, span, block, (int)adjacent, y, a);
        (void)buf;
        for (int64_t t = 0; t < T; t++)
            memcpy(out + t * ld + nb, y + t * block, sizeof(float) * (size_t)block);
    }
    free(xs);
    return 0;
}
