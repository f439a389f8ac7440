/* BiLLM's two searches (luq.quant.binsearch) row by row: the same closed forms as the torch
   version, from one sorted copy of each row and its prefix sums, in double precision, with no
   [rows, candidates, columns] temporaries. Hand-written because the torch form spends most of
   its time building and searching those temporaries (several times slower, timed by hand).

   below(t) over a sorted range: (count, sum) of its values < t, by binary search.

   Both return 0, or 1 where no memory was left for their row buffers.

   luq_split_errors: rows [r0, r1) of `sorted` ([rows][cols], each row ascending); for each
     break point t = splits[r * split_stride + k] (stride 0: shared by every row), the order-1
     error of the concentrated group (-t < w < t) plus the sparse group (the rest), added to
     out[k].
   luq_leading_split_errors: rows [r0, r1) of `x` ([rows][cols], columns in rank order) and the
     same rows sorted; for each count n = counts[k] (1 <= n < cols), the order-2 error of the
     first n columns plus that of the others, added to out[k]. The leading group is kept sorted
     as n grows (insertion), so each count costs a few binary searches. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const float *s;    /* sorted values */
    const double *p;   /* prefix sums, p[0] = 0 */
    int64_t n;
} sorted_range;

/* Branch-free binary searches (the compiler turns the loop's choice into a conditional move):
   the searched positions are unpredictable, and mispredicted branches cost more than the
   comparisons. */
static int64_t lower_bound(const float *s, int64_t n, double t) {  /* #{i : s[i] < t} */
    if (n == 0) return 0;
    const float *base = s;
    while (n > 1) {
        const int64_t half = n >> 1;
        base = ((double)base[half - 1] < t) ? base + half : base;
        n -= half;
    }
    return (base - s) + ((double)*base < t);
}

static int64_t upper_bound(const float *s, int64_t n, double t) {  /* #{i : s[i] <= t} */
    if (n == 0) return 0;
    const float *base = s;
    while (n > 1) {
        const int64_t half = n >> 1;
        base = ((double)base[half - 1] <= t) ? base + half : base;
        n -= half;
    }
    return (base - s) + ((double)*base <= t);
}

static void prefix(const float *s, int64_t n, double *p, double *q) {  /* sums and sums of squares */
    p[0] = 0.0;
    if (q) q[0] = 0.0;
    for (int64_t i = 0; i < n; i++) {
        p[i + 1] = p[i] + s[i];
        if (q) q[i + 1] = q[i] + (double)s[i] * s[i];
    }
}

/* sum_{lo <= i < hi} |s_i - t|, with `at` = #{i : s_i < t} */
static double abs_dev(const double *p, int64_t lo, int64_t hi, double t, int64_t at) {
    int64_t m = at < lo ? lo : at > hi ? hi : at;
    return t * (double)(m - lo) - (p[m] - p[lo]) + (p[hi] - p[m]) - t * (double)(hi - m);
}

/* order 1: S(c^2) - S(c)^2 / n - S(|c|)^2 / n with c = w - mean; 0 for an empty group */
static double order1(double n, double s1, double s2, double dev) {
    return n > 0 ? s2 - s1 * s1 / n - dev * dev / n : 0.0;
}

int luq_split_errors(const float *sorted, int64_t cols, const float *splits, int64_t split_stride,
                     int64_t n_splits, int64_t r0, int64_t r1, double *out) {
    double *p = malloc(sizeof(double) * (size_t)(cols + 1) * 2);
    if (!p) return 1;
    double *q = p + cols + 1;
    for (int64_t r = r0; r < r1; r++) {
        const float *s = sorted + r * cols;
        prefix(s, cols, p, q);
        for (int64_t k = 0; k < n_splits; k++) {
            const double t = splits[r * split_stride + k];
            const int64_t lo = upper_bound(s, cols, -t);            /* values <= -t: sparse, negative */
            int64_t hi = lower_bound(s, cols, t);                   /* values < t */
            if (hi < lo) hi = lo;
            const double n_c = (double)(hi - lo), s1_c = p[hi] - p[lo], s2_c = q[hi] - q[lo];
            const double m_c = n_c > 0 ? s1_c / n_c : 0.0;
            const double err_c = order1(n_c, s1_c, s2_c, abs_dev(p, lo, hi, m_c, lower_bound(s, cols, m_c)));
            const double n_s = (double)(lo + cols - hi);
            const double s1_s = p[lo] + p[cols] - p[hi], s2_s = q[lo] + q[cols] - q[hi];
            const double m_s = n_s > 0 ? s1_s / n_s : 0.0;
            const int64_t at = lower_bound(s, cols, m_s);
            const double dev_s = abs_dev(p, 0, lo, m_s, at) + abs_dev(p, hi, cols, m_s, at);
            out[k] += err_c + order1(n_s, s1_s, s2_s, dev_s);
        }
    }
    free(p);
    return 0;
}

/* (count, sum) of the values < t in a sorted range */
static void below(const sorted_range *g, double t, double *count, double *sum) {
    const int64_t i = lower_bound(g->s, g->n, t);
    *count = (double)i;
    *sum = g->p[i];
}

/* the order-2 error of a group of n values with sum s1 and sum of squares s2; `a` holds the
   group's values sorted, or (with `minus`) the group is `a` without the values of `minus` */
static double order2(double n, double s1, double s2, const sorted_range *a, const sorted_range *minus) {
    double c1, b1, cu, bu, cv, bv, c, b;
#define BELOW(t, cnt, sm)                                   \
    do {                                                    \
        below(a, (t), &(cnt), &(sm));                       \
        if (minus) {                                        \
            below(minus, (t), &c, &b);                      \
            (cnt) -= c;                                     \
            (sm) -= b;                                      \
        }                                                   \
    } while (0)
    const double m1 = s1 / n;
    BELOW(m1, c1, b1);
    const double d1 = m1 * c1 - b1 + (s1 - b1) - m1 * (n - c1);
    const double a1 = d1 / n;
    const double m2 = -a1 * (2.0 * (n - c1) - n) / n;
    const double c_lo = m1 - a1 + m2, c_hi = m1 + a1 + m2;
    BELOW(c_lo < m1 ? c_lo : m1, cu, bu);          /* values < m1 around c_lo */
    const double low = c_lo * cu - bu + (b1 - bu) - c_lo * (c1 - cu);
    BELOW(c_hi > m1 ? c_hi : m1, cv, bv);          /* values >= m1 around c_hi */
    const double high = c_hi * (cv - c1) - (bv - b1) + (s1 - bv) - c_hi * (n - cv);
#undef BELOW
    const double d2 = low + high;
    const double sr2 = s2 - s1 * m1 - d1 * d1 / n;  /* sum of squared order-1 residuals */
    return sr2 - n * m2 * m2 - d2 * d2 / n;
}

int luq_leading_split_errors(const float *x, const float *sorted, int64_t cols, const int64_t *counts,
                             int64_t n_counts, int64_t r0, int64_t r1, double *out) {
    int failed = 1;
    int64_t lead = 0;
    for (int64_t k = 0; k < n_counts; k++)
        if (counts[k] > lead) lead = counts[k];
    /* at[n]: the index in `counts` of count n, or -1 */
    int64_t *at = malloc(sizeof(int64_t) * (size_t)(lead + 1));
    float *head = malloc(sizeof(float) * (size_t)(lead + 1));
    double *p_all = malloc(sizeof(double) * (size_t)(cols + 1));
    double *p_head = malloc(sizeof(double) * (size_t)(lead + 2));
    if (!at || !head || !p_all || !p_head) goto done;
    for (int64_t n = 0; n <= lead; n++) at[n] = -1;
    for (int64_t k = 0; k < n_counts; k++) at[counts[k]] = k;
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * cols, *s = sorted + r * cols;
        prefix(s, cols, p_all, NULL);
        double sum_all = 0.0, sq_all = 0.0;
        for (int64_t i = 0; i < cols; i++) {
            sum_all += xr[i];
            sq_all += (double)xr[i] * xr[i];
        }
        const sorted_range all = {s, p_all, cols};
        double s1 = 0.0, s2 = 0.0;
        for (int64_t n = 1; n <= lead; n++) {
            const float v = xr[n - 1];
            int64_t i = n - 1;                         /* insert v into the sorted head */
            while (i > 0 && head[i - 1] > v) {
                head[i] = head[i - 1];
                i--;
            }
            head[i] = v;
            if (i == 0) p_head[0] = 0.0;
            for (int64_t j = i; j < n; j++) p_head[j + 1] = p_head[j] + head[j];
            s1 += v;
            s2 += (double)v * v;
            if (at[n] < 0) continue;
            const sorted_range a = {head, p_head, n};
            const double nb = (double)(cols - n);
            out[at[n]] += order2((double)n, s1, s2, &a, NULL)
                        + order2(nb, sum_all - s1, sq_all - s2, &all, &a);
        }
    }
    failed = 0;
done:
    free(at);
    free(head);
    free(p_all);
    free(p_head);
    return failed;
}
