"""Activation entropy of decoder layers and the choice of K (LUQ paper, section 3.2).

For layer i with output activations h_i (N samples x L tokens, d channels each):

    C_i    = KMeans(h_i, K)                          (2)  `kmeans`, over all N*L token rows
    phi(h) = argmin_k ||h - c_k||_2                  (3)  `nearest_centroid`
    P_i(k) = |{j : phi(h_j) = k}| / (N*L)            (4)  `cluster_entropy`
    H_i    = -sum_k P_i(k) log P_i(k)                (5)  `cluster_entropy`, natural log (nats)
    layers ordered by ascending H_i                  (6)  `entropy_ranking`

`activation_entropy` chains (2)-(5) for one layer. K is chosen as in section 3.2 /
appendix B: rank the layers for increasing K (`k_stability`), measure the normalized
Kendall tau distance between consecutive rankings (`kendall_distance`) and take the
elbow of that curve with Kneedle (`select_k`).

Everything here is a pure function of tensors. Work happens on the input's device;
distances and centroids are float32 whatever the input dtype (bf16/fp16 rows are
converted one chunk at a time, so memory stays bounded by `chunk_size` rows).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from luq.capture import IMAGE, TEXT
from luq.errors import LuqError

# Auto chunk size: about this many float32 temporaries per chunk (~256 MiB).
_CHUNK_ELEMENTS = 2 ** 26
# Per-cluster row sums on CPU: serial index_put_ below this many elements per chunk.
_SERIAL_SUM_ELEMENTS = 2 ** 22
_NONFINITE = "the activations contain NaN or inf values"


class KMeansResult(NamedTuple):
    """Result of `kmeans`.

    centroids: [k, d] float32 on the input's device.
    labels:    [n] int64, index of the nearest centroid of each row (Eq. 3) for the
               returned centroids.
    inertia:   sum over rows of the squared distance to their centroid.
    n_iter:    Lloyd iterations run (assignment passes until convergence or `n_iter`).
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    inertia: float
    n_iter: int


# ---------------------------------------------------------------------------------
# distances


def _auto_chunk(d: int, k: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise LuqError(f"chunk_size must be positive, got {chunk_size}")
        return int(chunk_size)
    return max(256, _CHUNK_ELEMENTS // (d + 2 * k))


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of x as float32 (a view when x is float32 already)."""
    return x[start:stop].to(torch.float32)


def _dist_bias(cc: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Per-centroid constant of the expanded distance, see `_sq_dists`."""
    return (cc * cc).sum(1) + 2.0 * (cc @ mu)


def _sq_dists(xb: torch.Tensor, cc: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """||x - mu - cc||^2 - ||x - mu||^2 for a chunk of rows xb [m, d] (float32).

    With centred centroids cc = c - mu, ||x - c||^2 = ||x - mu||^2 - 2 (x . cc - mu . cc)
    + ||cc||^2: one matmul on the raw rows, no centred copy of x, and no catastrophic
    cancellation when the rows share a large offset (mu is their mean).
    """
    return torch.addmm(bias, xb, cc.T, alpha=-2.0)


def _column_sums(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Column sums of x, float32 within a chunk, float64 across chunks (a float64
    reduction is much slower on CPU). NaN/inf anywhere make them non-finite."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        total += _rows(x, s, s + chunk).sum(0)
    return total


def _check_finite(colsum: torch.Tensor) -> None:
    if not bool(torch.isfinite(colsum).all()):
        raise LuqError(_NONFINITE)


def _centred_sq_norms(x: torch.Tensor, mu: torch.Tensor, chunk: int) -> torch.Tensor:
    """||x_j - mu||^2 for every row, float32, chunked."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.linalg.vector_norm(_rows(x, s, s + chunk) - mu, dim=1).square_()
    return out


def _assign(x: torch.Tensor, xn: torch.Tensor | None, mu: torch.Tensor, cc: torch.Tensor,
            chunk: int, accumulate: bool):
    """One pass over x: nearest centroid of each row (Eq. 3 core).

    Returns (labels [n] int64, min squared distances [n] float32 or None when xn is
    None, sums of the raw rows per cluster [k, d] float64 or None, counts [k] int64,
    finite: False when a row had NaN/inf, which makes its distances non-finite).
    """
    n, d = x.shape
    k = cc.shape[0]
    dev = x.device
    bias = _dist_bias(cc, mu)
    labels = torch.empty(n, dtype=torch.int64, device=dev)
    mind = torch.empty(n, dtype=torch.float32, device=dev) if xn is not None else None
    sums = torch.zeros(k, d, dtype=torch.float64, device=dev) if accumulate else None
    finite = torch.ones((), dtype=torch.bool, device=dev)
    for s in range(0, n, chunk):
        xb = _rows(x, s, s + chunk)
        dist = _sq_dists(xb, cc, bias)
        mn, lab = dist.min(1)
        finite &= torch.isfinite(mn).all()
        labels[s:s + chunk] = lab
        if mind is not None:
            mind[s:s + chunk] = (mn + xn[s:s + chunk]).clamp_min_(0.0)
        if accumulate:
            part = torch.zeros(k, d, dtype=torch.float32, device=dev)
            if dev.type == "cpu" and xb.numel() < _SERIAL_SUM_ELEMENTS:
                part.index_put_((lab,), xb, accumulate=True)  # serial: no thread start-up cost
            elif dev.type == "cpu":
                part.index_add_(0, lab, xb)  # multi-threaded, but a fixed cost per call on a busy CPU
            else:  # a one-hot matmul: deterministic, unlike atomic index_add_ on GPUs
                onehot = torch.zeros(xb.shape[0], k, dtype=torch.float32, device=dev)
                onehot.scatter_(1, lab[:, None], 1.0)
                part = onehot.T @ xb
            sums += part
    counts = torch.bincount(labels, minlength=k)
    return labels, mind, sums, counts, bool(finite)


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Eq. 3: phi(h) = argmin_k ||h - c_k||_2 for every row of x [n, d] -> labels [n] int64.

    Chunked over rows (`chunk_size`, auto when None); float32 arithmetic on x's device;
    ties go to the lowest centroid index.
    """
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise LuqError(f"nearest_centroid needs x [n, d] and centroids [k, d], got {tuple(x.shape)} and {tuple(centroids.shape)}")
    c = centroids.to(device=x.device, dtype=torch.float32)
    mu = c.mean(0)  # distances are translation invariant; centring improves precision
    if not bool(torch.isfinite(c).all()):
        raise LuqError("the centroids contain NaN or inf values")
    chunk = _auto_chunk(x.shape[1], c.shape[0], chunk_size)
    labels, _, _, _, finite = _assign(x, None, mu, c - mu, chunk, accumulate=False)
    if not finite:
        raise LuqError(_NONFINITE)
    return labels


# ---------------------------------------------------------------------------------
# k-means (Eq. 2)


def _kmeans_plusplus(x, xn, mu, k, gen, chunk, n_local_trials):
    """Greedy k-means++ seeding (as scikit-learn): D^2 sampling with `n_local_trials`
    candidates per centre, keeping the one that lowers the potential most. Returns
    centred centroids [k, d] float32. No host synchronisation."""
    n, d = x.shape
    dev = x.device
    cc = torch.empty(k, d, dtype=torch.float32, device=dev)
    first = torch.randint(n, (1,), generator=gen, device=dev)
    cc[0] = x[first].to(torch.float32)[0] - mu

    def dists_to(cands: torch.Tensor) -> torch.Tensor:  # [n, t] squared distances
        bias = _dist_bias(cands, mu)
        out = torch.empty(n, cands.shape[0], dtype=torch.float32, device=dev)
        for s in range(0, n, chunk):
            out[s:s + chunk] = _sq_dists(_rows(x, s, s + chunk), cands, bias) + xn[s:s + chunk, None]
        return out.clamp_min_(0.0)

    closest = dists_to(cc[:1])[:, 0]
    for c in range(1, k):
        cum = torch.cumsum(closest, 0, dtype=torch.float64)
        r = torch.rand(n_local_trials, generator=gen, device=dev, dtype=torch.float64) * cum[-1]
        # right=True: only rows with positive mass can be drawn (r < total)
        cand = torch.searchsorted(cum, r, right=True).clamp_(max=n - 1)
        cand_c = x[cand].to(torch.float32) - mu
        dist = torch.minimum(dists_to(cand_c), closest[:, None])
        best = dist.sum(0, dtype=torch.float64).argmin()
        closest = dist.index_select(1, best.view(1))[:, 0]
        cc[c] = cand_c.index_select(0, best.view(1))[0]
    return cc


def kmeans(x: torch.Tensor, k: int, *, n_iter: int = 50, tol: float = 1e-4, seed: int = 0,
           chunk_size: int | None = None, n_local_trials: int | None = None) -> KMeansResult:
    """Eq. 2: K-means of the rows of x [n, d] (any float dtype; any device).

    - Initialisation: greedy k-means++ (D^2 sampling, `n_local_trials` candidates per
      centre, default 2 + int(ln k) as scikit-learn; 1 gives plain k-means++), drawn
      from a torch.Generator on x's device seeded with `seed`.
    - Lloyd iterations, at most `n_iter`. Stops when no label changes, or when the
      total squared centroid shift is <= tol * (mean per-feature variance of x)
      (scikit-learn's relative tolerance); labels are then recomputed once so they
      match the returned centroids.
    - A cluster left empty is re-seeded with the row farthest from its centroid.
    - Distances ||x||^2 - 2 x.c + ||c||^2 by float32 matmul over chunks of
      `chunk_size` rows (auto: ~256 MiB of temporaries), on data centred by its mean.

    Raises LuqError when k < 1, k > n, or x has NaN/inf.
    """
    if x.dim() != 2:
        raise LuqError(f"kmeans needs a 2-D tensor [n, d], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise LuqError(f"kmeans needs floating-point data, got {x.dtype}")
    n, d = x.shape
    k = int(k)
    if k < 1:
        raise LuqError(f"K must be at least 1, got {k}")
    if k > n:
        raise LuqError(f"K={k} is larger than the {n} tokens available")
    if d < 1:
        raise LuqError("kmeans needs at least one feature (d = 0)")
    if n_iter < 1:
        raise LuqError(f"n_iter must be at least 1, got {n_iter}")
    trials = 2 + int(math.log(k)) if n_local_trials is None else int(n_local_trials)
    if trials < 1:
        raise LuqError(f"n_local_trials must be at least 1, got {n_local_trials}")
    chunk = _auto_chunk(d, k, chunk_size)
    dev = x.device

    colsum = _column_sums(x, chunk)
    _check_finite(colsum)
    mu = (colsum / n).to(torch.float32)
    xn = _centred_sq_norms(x, mu, chunk)
    if not bool(torch.isfinite(xn).all()):
        raise LuqError("the activations are too large to cluster in float32 (squared norms overflow)")
    tol_abs = float(tol) * float(xn.sum(dtype=torch.float64)) / (n * d)

    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    cc = _kmeans_plusplus(x, xn, mu, k, gen, chunk, trials)  # centred centroids

    prev = None
    consistent = False  # do `labels`/`mind` belong to the current `cc`?
    it = 0
    for it in range(1, n_iter + 1):
        labels, mind, sums, counts, _ = _assign(x, xn, mu, cc, chunk, accumulate=True)
        if prev is not None and torch.equal(labels, prev):
            consistent = True  # cc is the mean of its own clusters: a fixed point
            break
        prev = labels
        empty = counts == 0
        n_empty = int(empty.sum())
        if n_empty:
            # re-seed each empty cluster with one of the farthest rows, moving that row
            # out of its old cluster (as scikit-learn)
            far = torch.topk(mind, n_empty).indices
            far_rows = x[far].to(torch.float64)
            sums.index_add_(0, labels[far], -far_rows)
            counts = counts.index_add(0, labels[far], -torch.ones_like(far))
            empty_idx = empty.nonzero()[:, 0]
            sums[empty_idx] = far_rows
            counts[empty_idx] = 1
        keep = counts > 0  # only possible with duplicate rows: keep the old centre
        means = (sums / counts.clamp_min(1)[:, None].to(torch.float64) - mu.to(torch.float64)).to(torch.float32)
        new = torch.where(keep[:, None], means, cc)
        shift = float(((new - cc) ** 2).sum(dtype=torch.float64))
        cc = new
        if shift <= tol_abs:
            break
    if not consistent:
        labels, mind, _, _, _ = _assign(x, xn, mu, cc, chunk, accumulate=False)
    inertia = float(mind.sum(dtype=torch.float64))
    return KMeansResult(centroids=cc + mu, labels=labels, inertia=inertia, n_iter=it)


# ---------------------------------------------------------------------------------
# entropy (Eq. 4-5) and the layer ranking (Eq. 6)


def cluster_entropy(labels: torch.Tensor, k: int) -> float:
    """Eq. 4-5: Shannon entropy, in nats (natural log), of the cluster occupancy.

    P(k) = (rows labelled k) / (all rows); H = -sum_k P(k) ln P(k), empty clusters
    contributing 0. Ranges from 0 (one cluster) to ln k (uniform occupancy).
    """
    labels = labels.reshape(-1)
    if labels.numel() == 0:
        raise LuqError("cluster_entropy needs at least one label")
    if labels.is_floating_point() or labels.is_complex():
        raise LuqError(f"labels must be integers, got {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise LuqError(f"labels must lie in [0, {k}), got [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels.to(torch.int64), minlength=k).to(torch.float64)  # Eq. 4 numerator
    p = counts[counts > 0] / labels.numel()  # Eq. 4
    return float(-(p * p.log()).sum())  # Eq. 5 (nats)


def activation_entropy(h: torch.Tensor, k: int, *, subsample: int | None = None, seed: int = 0,
                       n_iter: int = 50, tol: float = 1e-4, chunk_size: int | None = None,
                       n_local_trials: int | None = None) -> float:
    """H_i of one layer's output activations h [..., d], in nats (Eq. 2-5).

    All leading dims are flattened into tokens (the N*L rows of Eq. 2). K-means is fit
    on every token, or, with `subsample`, on `subsample` tokens drawn without
    replacement (seeded by `seed`); ALL tokens are then assigned to their nearest
    centroid (Eq. 3) and the occupancy entropy is returned (Eq. 4-5). Other keywords
    go to `kmeans`. Deterministic for a fixed seed on a given device.

    Raises LuqError when K exceeds the tokens available or h has NaN/inf.
    """
    if h.dim() < 1 or h.shape[-1] < 1:
        raise LuqError(f"activations need a channel dimension, got shape {tuple(h.shape)}")
    x = h.reshape(-1, h.shape[-1])  # Eq. 2: N*L token rows of d channels
    n = x.shape[0]
    if int(k) > n:
        raise LuqError(f"K={int(k)} is larger than the {n} tokens available")
    km = dict(n_iter=n_iter, tol=tol, seed=seed, chunk_size=chunk_size, n_local_trials=n_local_trials)
    if subsample is None or int(subsample) >= n:
        return cluster_entropy(kmeans(x, k, **km).labels, k)
    subsample = int(subsample)
    if int(k) > subsample:
        raise LuqError(f"K={int(k)} is larger than the {subsample} tokens available (subsample={subsample})")
    chunk = _auto_chunk(x.shape[1], int(k), chunk_size)
    _check_finite(_column_sums(x, chunk))  # before the fit: the subsample may miss a bad row
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen, device=x.device)[:subsample]
    fit = kmeans(x[idx], k, **km)
    labels = nearest_centroid(x, fit.centroids, chunk_size=chunk)  # Eq. 3 on all tokens
    return cluster_entropy(labels, k)


def entropy_ranking(entropies: Sequence[float]) -> list[int]:
    """Eq. 6: layer indices sorted by ascending entropy (ties by index; deterministic)."""
    values = [float(e) for e in entropies]
    if any(math.isnan(v) for v in values):
        raise LuqError("cannot rank layers: an entropy is NaN")
    return sorted(range(len(values)), key=lambda i: (values[i], i))


# ---------------------------------------------------------------------------------
# choice of K (section 3.2, appendix B)


def kendall_distance(rank_a: Sequence[int], rank_b: Sequence[int]) -> float:
    """Normalized Kendall tau distance in [0, 1] between two rankings of the same layers.

    Rankings are lists of layer indices, best first (as `entropy_ranking`). The result
    is the fraction of layer pairs ordered differently by the two rankings: 0 for equal
    rankings, 1 for reversed ones. Computed as (1 - tau) / 2 with tau from
    `scipy.stats.kendalltau` on the layers' positions, which is exact because
    rankings (permutations) have no ties.
    """
    from scipy.stats import kendalltau

    a = [int(i) for i in rank_a]
    b = [int(i) for i in rank_b]
    if len(set(a)) != len(a) or sorted(a) != sorted(b):
        raise LuqError("kendall_distance needs two rankings of the same layers, each layer once")
    if len(a) < 2:
        return 0.0
    pos_b = {layer: p for p, layer in enumerate(b)}
    tau = kendalltau(range(len(a)), [pos_b[layer] for layer in a]).statistic
    return min(1.0, max(0.0, (1.0 - float(tau)) / 2.0))


def k_stability(layer_activations: Sequence[torch.Tensor] | Callable[[int], torch.Tensor], ks: Sequence[int], *,
                n_layers: int | None = None, **entropy_kw) -> list[tuple[int, float]]:
    """Stability of the entropy ranking as K grows: [(K_j, kendall_distance(r_{j-1}, r_j))].

    `layer_activations` is a list of per-layer activation tensors [..., d], or a
    callable(layer_index) -> tensor together with `n_layers` (each layer is fetched once;
    all K are computed for it before moving on). `ks` must be strictly increasing, at
    least two values. For each K every layer's `activation_entropy(h, K, **entropy_kw)`
    gives the ranking r_j (`entropy_ranking`); the returned list has len(ks) - 1 entries,
    one for each K_j with j >= 1.
    """
    ks = [int(k) for k in ks]
    if len(ks) < 2 or any(b <= a for a, b in zip(ks, ks[1:])):
        raise LuqError(f"ks must be at least two strictly increasing values, got {ks}")
    if callable(layer_activations):
        if n_layers is None:
            raise LuqError("k_stability needs n_layers when layer_activations is a callable")
        get, count = layer_activations, int(n_layers)
    else:
        layers = list(layer_activations)
        get, count = layers.__getitem__, len(layers)
    if count < 2:
        raise LuqError(f"k_stability needs at least two layers, got {count}")
    entropies = []  # [layer][j]
    for i in range(count):
        h = get(i)
        entropies.append([activation_entropy(h, k, **entropy_kw) for k in ks])
        del h
    rankings = [entropy_ranking([entropies[i][j] for i in range(count)]) for j in range(len(ks))]
    return [(ks[j], kendall_distance(rankings[j - 1], rankings[j])) for j in range(1, len(ks))]


def select_k(curve: Sequence[tuple[int, float]], *, sensitivity: float = 1.0) -> int:
    """The K at the elbow of a stability curve [(K, distance)], K strictly increasing.

    Kneedle via `kneed.KneeLocator(K, distance, S=sensitivity, curve="convex",
    direction="decreasing")`. When it finds no knee (fewer than 3 points, a flat curve,
    or no elbow), falls back to the K with the smallest distance, the smallest such K
    on ties.
    """
    pts = [(int(k), float(v)) for k, v in curve]
    if not pts:
        raise LuqError("select_k needs a non-empty curve")
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise LuqError(f"select_k needs strictly increasing K, got {xs}")
    knee = None
    if len(pts) >= 3 and max(ys) > min(ys):
        from kneed import KneeLocator

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kneed warns when it finds no knee
            knee = KneeLocator(xs, ys, S=sensitivity, curve="convex", direction="decreasing").knee
    if knee is not None:
        return int(knee)
    return min(pts, key=lambda p: (p[1], p[0]))[0]


def entropy_by_kind(h: torch.Tensor, kinds: torch.Tensor, ks: Sequence[int], *, subsample: int | None = None,
                    seed: int = 0, **kmeans_kw) -> dict[int, dict[str, float | None]]:
    """One layer's entropy for each K, over all its tokens and over each kind of token.

    h: [tokens, d] activations; kinds: int [tokens] (luq.capture.TEXT / IMAGE; padding
    already removed). For each K, K-means is fit once (on a seeded subsample of
    `subsample` tokens if given), every token is assigned (Eq. 3), and the occupancy
    entropy (Eq. 4-5) is taken over all tokens, the text tokens and the image tokens
    (None where a kind has no token), so the kinds share one discretization (paper Fig. 2).
    """
    x = h.reshape(-1, h.shape[-1])
    n = x.shape[0]
    gen = torch.Generator(device=x.device)
    gen.manual_seed(int(seed))
    fit_rows = x if subsample is None or int(subsample) >= n else \
        x[torch.randperm(n, generator=gen, device=x.device)[:int(subsample)]]
    out = {}
    for k in ks:
        if int(k) > fit_rows.shape[0]:
            raise LuqError(f"K={int(k)} is larger than the {fit_rows.shape[0]} tokens available")
        labels = nearest_centroid(x, kmeans(fit_rows, int(k), seed=seed, **kmeans_kw).centroids)
        per_kind = {"all": cluster_entropy(labels, int(k))}
        for name, kind in (("text", TEXT), ("image", IMAGE)):
            chosen = labels[kinds.to(labels.device) == kind]
            per_kind[name] = cluster_entropy(chosen, int(k)) if chosen.numel() else None
        out[int(k)] = per_kind
    return out
