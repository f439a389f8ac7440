"""Binarization errors of many candidate groupings at once, in closed form.

BiLLM's two searches score every candidate grouping of a block by the squared error of
binarizing each group per row (order 1: m = mean, a = mean|w - m|; order 2: the same
again on the residual). Looping over candidates re-binarizes the whole block each time.
Here each group's error comes from a few per-row sums instead:

    order 1:  err = S(c^2) - S(|c|)^2 / n,  c = w - m                    (a = S|c| / n)
    order 2:  the residual r = w - m1 -/+ a1 has mean m2 = -a1 (2P - n) / n (P = #{w >= m1})
              and S|r - m2| = S_{w<m1} |w - c_lo| + S_{w>=m1} |w - c_hi|,
              c_lo/hi = m1 -/+ a1 + m2; S(r^2) = S(c1^2) - S(|c1|)^2 / n.

Every sum of |w - t| over a group is read from the group's values sorted per row and
their prefix sums: (count, sum) of the values below t, found by binary search. So a
search costs one sort of the block per row, not one binarization per candidate. Per-row
sums are float32 like the loop's (row totals float64) but added in another order, so only
candidates whose errors tie to ~1e-6 can be ordered differently (none did on the 21
SmolLM2 linears and the synthetic 4096², tests/test_solvers_real.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from luq.quant import native

# rows scored at once (bounds the [rows, candidates, columns] temporaries)
ROW_CHUNK = 256
# dtype of the per-row sums (the loop summed in float32 too)
DT = torch.float32

Below = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sort_rows(x: torch.Tensor, indices: bool = False):
    """Each row of x sorted ascending (and, with `indices`, the sorting permutation). On the
    CPU by numpy, whose vectorised sort of short rows is many times faster than torch's."""
    if x.device.type != "cpu":
        return x.sort(dim=-1) if indices else x.sort(dim=-1).values
    a = x.detach().contiguous().numpy()
    if not indices:
        return torch.from_numpy(np.sort(a, axis=-1))
    order = np.argsort(a, axis=-1)
    return torch.from_numpy(np.take_along_axis(a, order, -1)), torch.from_numpy(order)


def sorted_prefix(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x sorted ascending (float32) and their prefix sums [rows, n + 1] (leading 0)."""
    s = sort_rows(x.to(DT))
    return s, torch.nn.functional.pad(s.cumsum(-1), (1, 0))


def below_in_sorted(s: torch.Tensor, prefix: torch.Tensor) -> Below:
    """(count, sum) of the values < t in each row of `s` (sorted), for t [rows, K]."""
    def below(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = torch.searchsorted(s, t.contiguous())
        return p.to(DT), prefix.gather(-1, p)
    return below


def abs_dev_range(prefix: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, t: torch.Tensor,
                  at: torch.Tensor) -> torch.Tensor:
    """sum_{lo <= i < hi} |s_i - t| per row and candidate (prefix: the prefix sums of sorted
    rows s; lo, hi, t [rows, K]; `at`: the position of t in s)."""
    p = torch.maximum(torch.minimum(at, hi), lo)
    g = lambda i: prefix.gather(-1, i)  # noqa: E731
    return t * (p - lo).to(DT) - (g(p) - g(lo)) + (g(hi) - g(p)) - t * (hi - p).to(DT)


def order1_error(n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, abs_dev: torch.Tensor) -> torch.Tensor:
    """Squared error of the order-1 binarization of a group with n values, sum s1, sum of
    squares s2 and sum |w - mean| = abs_dev (0 for an empty group)."""
    n1 = n.clamp_min(1)
    err = s2 - s1 * s1 / n1 - abs_dev * abs_dev / n1
    return torch.where(n > 0, err, torch.zeros_like(err))


def order2_error(n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, below: Below) -> torch.Tensor:
    """Squared error of the order-2 residual binarization of a group (n > 0 values, sum s1,
    sum of squares s2; `below(t)` gives (count, sum) of its values < t)."""
    m1 = s1 / n
    c1, b1 = below(m1)
    d1 = m1 * c1 - b1 + (s1 - b1) - m1 * (n - c1)
    a1 = d1 / n
    m2 = -a1 * (2 * (n - c1) - n) / n
    c_lo, c_hi = m1 - a1 + m2, m1 + a1 + m2
    cu, bu = below(torch.minimum(c_lo, m1))   # values < m1 around c_lo
    low = c_lo * cu - bu + (b1 - bu) - c_lo * (c1 - cu)
    cv, bv = below(torch.maximum(c_hi, m1))   # values >= m1 around c_hi
    high = c_hi * (cv - c1) - (bv - b1) + (s1 - bv) - c_hi * (n - cv)
    d2 = low + high
    sr2 = s2 - s1 * m1 - d1 * d1 / n          # sum of squared order-1 residuals
    return sr2 - n * m2 * m2 - d2 * d2 / n


def use_native(x: torch.Tensor) -> bool:
    """The compiled searches (luq.quant.native, binsearch.c) serve CPU tensors where they build."""
    return x.device.type == "cpu" and native.available("binsearch")


def split_errors(plain: torch.Tensor, splits: torch.Tensor) -> torch.Tensor:
    """Order-1 error of the concentrated (|w| < t) plus the sparse (|w| >= t) group, per row
    binarized separately, summed over rows, for each break point t of `splits`: [K] (one
    per candidate) or [rows, K] (one per row and candidate; inf: no sparse group)."""
    t_all = splits.to(DT)
    if use_native(plain):
        return native.split_errors(sort_rows(plain.to(DT)), t_all.cpu(), ROW_CHUNK)
    return over_row_chunks(plain.shape[0], lambda r0, r1: _split_errors_rows(
        plain[r0:r1], t_all if t_all.dim() == 1 else t_all[r0:r1]))


def _split_errors_rows(plain: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`split_errors` of a few rows, summed over them: float64 [K]."""
    s, pre = sorted_prefix(plain)
    sq = torch.nn.functional.pad((s * s).cumsum(-1), (1, 0))
    rows, cols = s.shape
    if t.dim() == 1:  # the same break points on every row: count by bucket, not by search
        lo = _count_at_most(s, -t)                                      # values <= -t: sparse, negative
        hi = torch.maximum(cols - _count_at_least(s, t), lo)             # values < t
    else:
        lo = torch.searchsorted(s, (-t).contiguous(), right=True)
        hi = torch.maximum(torch.searchsorted(s, t.contiguous()), lo)
    end = torch.full_like(lo, cols)
    zero = torch.zeros_like(lo)
    g = lambda p, i: p.gather(-1, i)  # noqa: E731
    n_c, s1_c, s2_c = (hi - lo).to(DT), g(pre, hi) - g(pre, lo), g(sq, hi) - g(sq, lo)
    m_c = s1_c / n_c.clamp_min(1)
    err = order1_error(n_c, s1_c, s2_c, abs_dev_range(pre, lo, hi, m_c, torch.searchsorted(s, m_c.contiguous())))
    n_s = (lo + cols - hi).to(DT)
    s1_s = g(pre, lo) + pre[:, -1:] - g(pre, hi)
    s2_s = g(sq, lo) + sq[:, -1:] - g(sq, hi)
    m_s = s1_s / n_s.clamp_min(1)
    # the sparse mean mostly lies between the two tails (-t < m_s < t): then every negative
    # sparse value is below it and every positive one above, whatever its exact position
    at = lo.clone()
    r, k = ((m_s <= -t) | (m_s >= t)).nonzero(as_tuple=True)
    if len(r):
        at[r, k] = torch.searchsorted(s[r], m_s[r, k, None].contiguous())[:, 0]
    dev_s = abs_dev_range(pre, zero, lo, m_s, at) + abs_dev_range(pre, hi, end, m_s, at)
    return (err + order1_error(n_s, s1_s, s2_s, dev_s)).sum(0, dtype=torch.float64)


def _count_at_most(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """#{j : x[r, j] <= bounds[k]} -> int64 [rows, K], for bounds shared by every row."""
    order = bounds.argsort()
    b = bounds[order].contiguous()
    bucket = torch.bucketize(x, b)                   # #{i : b_i < x}: x <= b_i exactly for i >= bucket
    hist = torch.zeros(x.shape[0], len(b) + 1, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, bucket, torch.ones_like(bucket))
    counts = hist.cumsum(1)[:, :-1]
    return torch.empty_like(counts).index_copy_(1, order, counts)


def _count_at_least(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """#{j : x[r, j] >= bounds[k]} -> int64 [rows, K]."""
    return _count_at_most(-x, -bounds)


def leading_split_errors(ranked: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Order-2 error of the first n columns of `ranked` plus that of the other columns (each
    group binarized per row), summed over rows, for each n of `counts` [K] (1 <= n < cols)."""
    counts = counts.to(ranked.device)
    if use_native(ranked):
        x = ranked.to(DT)
        return native.leading_split_errors(x, sort_rows(x), counts.to(torch.int64), ROW_CHUNK)
    return over_row_chunks(ranked.shape[0], lambda r0, r1: _leading_split_errors_rows(ranked[r0:r1], counts))


def _leading_split_errors_rows(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`leading_split_errors` of a few rows, summed over them: float64 [K]."""
    x = x.to(DT)
    rows, cols = x.shape
    lead = int(counts.max())
    n_a = counts.to(DT)[None, :]
    n_b = cols - n_a
    head = x[:, :lead]
    s1_a, s2_a = head.cumsum(-1)[:, counts - 1], (head * head).cumsum(-1)[:, counts - 1]
    s1_b, s2_b = x.sum(-1, keepdim=True) - s1_a, (x * x).sum(-1, keepdim=True) - s2_a
    # for every n, the count and the sum of the first n columns' values below the i-th
    # smallest leading value: [rows, lead, lead + 1] tables, added up column by column
    # (torch's cumulative sum over a short axis of a 3-D tensor is several times slower)
    s_lead, order = sort_rows(head, indices=True)
    rank = torch.empty(rows, lead, dtype=DT, device=x.device)
    rank.scatter_(-1, order, torch.arange(lead, dtype=DT, device=x.device).expand(rows, -1))
    tab = torch.empty(rows, lead, 2, lead + 1, dtype=DT, device=x.device)   # counts, sums
    torch.clamp(torch.arange(lead + 1, dtype=DT, device=x.device) - rank[:, :, None], 0, 1, out=tab[:, :, 0])
    torch.mul(tab[:, :, 0], head[:, :, None], out=tab[:, :, 1])
    for c in range(1, lead):
        tab[:, c] += tab[:, c - 1]
    if not torch.equal(counts, torch.arange(1, lead + 1, device=counts.device)):
        tab = tab[:, counts - 1]
    cnt_tab, sum_tab = tab[:, :, 0], tab[:, :, 1]

    def below_a(t):
        p = torch.searchsorted(s_lead, t.contiguous())[..., None]
        return cnt_tab.gather(-1, p)[..., 0], sum_tab.gather(-1, p)[..., 0]

    below_all = below_in_sorted(*sorted_prefix(x))

    def below_b(t):
        ca, sa = below_a(t)
        c, s = below_all(t)
        return c - ca, s - sa

    return (order2_error(n_a, s1_a, s2_a, below_a) + order2_error(n_b, s1_b, s2_b, below_b)).sum(0, dtype=torch.float64)


def over_row_chunks(rows: int, score: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """sum of score(r0, r1) over the chunks [r0, r1) of ROW_CHUNK rows, in chunk order. The
    chunks are scored on torch's threads at once (most of the searches' ops use one thread
    each), so the sum is the same whatever the thread count."""
    bounds = [(r0, min(r0 + ROW_CHUNK, rows)) for r0 in range(0, rows, ROW_CHUNK)]
    workers = min(torch.get_num_threads(), len(bounds))
    if workers <= 1:
        parts = [score(*b) for b in bounds]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda b: score(*b), bounds))
    total = torch.zeros_like(parts[0])
    for part in parts:
        total += part
    return total
