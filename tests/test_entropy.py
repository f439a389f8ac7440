"""Activation entropy (paper section 3.2): k-means, Eq. 4-5, ranking, Kendall distance, K choice."""

import math

import numpy as np
import pytest
import torch

from luq import LuqError
from luq.entropy import (
    KMeansResult,
    activation_entropy,
    cluster_entropy,
    entropy_ranking,
    k_stability,
    kendall_distance,
    kmeans,
    nearest_centroid,
    select_k,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: with several threads, OpenMP start-up and waits dominate
    (by 10x on a busy 2-core machine). Restored afterwards."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):  # scikit-learn's OpenMP/BLAS
        yield
    torch.set_num_threads(n)


def blobs(sizes, d=16, sep=50.0, std=1.0, seed=0):
    """Well-separated Gaussian blobs: rows [sum(sizes), d] and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), d, generator=g) * sep
    x = torch.cat([c + std * torch.randn(s, d, generator=g) for c, s in zip(centres, sizes)])
    y = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    return x, y


def exact_entropy(sizes):
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------
# k-means against scikit-learn


@pytest.mark.parametrize("problem", ["blobs", "uniform"])
def test_kmeans_inertia_within_1pct_of_sklearn(problem):
    """Best of 3 seeds each (k-means++ then Lloyd both sides): within 1% either way.

    On the blobs both reach the same optimum (to ~1e-6); on uniform noise the local
    optima differ by ~0.2-0.3% between seeds, on both sides.
    """
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs

    if problem == "blobs":
        x = make_blobs(2000, n_features=16, centers=8, random_state=0)[0].astype(np.float32)
        k = 8
    else:
        x = np.random.default_rng(0).random((2000, 16), dtype=np.float32)
        k = 10
    sk = min(KMeans(n_clusters=k, n_init=1, init="k-means++", random_state=s).fit(x).inertia_ for s in range(3))
    ours_runs = [kmeans(torch.from_numpy(x), k, seed=s) for s in range(3)]
    ours = min(r.inertia for r in ours_runs)
    assert abs(ours - sk) / sk < 0.01
    # the reported inertia is the one of the returned centroids and labels
    r = ours_runs[0]
    assert isinstance(r, KMeansResult) and r.n_iter >= 1
    direct = ((torch.from_numpy(x) - r.centroids[r.labels]) ** 2).sum().item()
    assert r.inertia == pytest.approx(direct, rel=1e-4)
    assert torch.equal(r.labels, nearest_centroid(torch.from_numpy(x), r.centroids))


def test_kmeans_recovers_blobs_and_centroids_are_means():
    x, y = blobs([300, 200, 100, 50])
    r = kmeans(x, 4, seed=0)
    # the same partition up to renaming
    pairs = set(zip(r.labels.tolist(), y.tolist()))
    assert len(pairs) == 4
    for j in range(4):
        assert torch.allclose(r.centroids[j], x[r.labels == j].mean(0), atol=1e-4)
    assert r.centroids.dtype == torch.float32 and r.labels.dtype == torch.int64


def test_kmeans_chunking_and_low_precision_input():
    x, _ = blobs([200, 150, 100], d=32)
    ref = kmeans(x, 3, seed=1)
    small = kmeans(x, 3, seed=1, chunk_size=7)
    assert torch.equal(ref.labels, small.labels)
    assert torch.allclose(ref.centroids, small.centroids, atol=1e-4)
    half = kmeans(x.to(torch.bfloat16), 3, seed=1, chunk_size=64)
    assert half.centroids.dtype == torch.float32
    assert len(set(zip(half.labels.tolist(), ref.labels.tolist()))) == 3


def test_kmeans_duplicate_rows_and_empty_clusters():
    base = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = base.repeat(20, 1)
    scale = float(((x - x.mean(0)) ** 2).sum())  # float32 rounding of the expanded distances
    r = kmeans(x, 3, seed=0)
    assert r.inertia <= 1e-6 * scale
    assert cluster_entropy(r.labels, 3) == pytest.approx(math.log(3))
    # more clusters than distinct rows: some stay empty, nothing breaks
    r = kmeans(x, 5, seed=0)
    assert r.inertia <= 1e-6 * scale
    assert int(r.labels.max()) < 5
    assert torch.isfinite(r.centroids).all()


def test_kmeans_large_offset_is_handled():
    x, y = blobs([100, 100], d=8, sep=5.0, std=0.5)
    r = kmeans(x + 1e4, 2, seed=0)
    assert len(set(zip(r.labels.tolist(), y.tolist()))) == 2


# ---------------------------------------------------------------------------------
# Eq. 4-5


def test_cluster_entropy_known_values():
    assert cluster_entropy(torch.tensor([0, 0, 1, 1]), 2) == pytest.approx(math.log(2))
    assert cluster_entropy(torch.tensor([3, 3, 3]), 4) == 0.0
    assert cluster_entropy(torch.tensor([0, 1, 2, 2]), 3) == pytest.approx(exact_entropy([1, 1, 2]))
    with pytest.raises(LuqError):
        cluster_entropy(torch.tensor([0, 2]), 2)


def test_equal_blobs_give_log_k():
    k = 5
    x, _ = blobs([400] * k)
    assert activation_entropy(x, k, seed=0) == pytest.approx(math.log(k), abs=1e-12)


def test_dominant_blob_gives_lower_entropy():
    sizes = [1700, 100, 100, 100]
    x, _ = blobs(sizes)
    h = activation_entropy(x, 4, seed=0)
    assert h == pytest.approx(exact_entropy(sizes), abs=1e-12)
    assert h < math.log(4) - 0.5


def test_entropy_deterministic_permutation_invariant_and_flattens_leading_dims():
    sizes = [500, 300, 150, 50]
    x, _ = blobs(sizes, d=24, seed=3)
    h = activation_entropy(x, 4, seed=7)
    assert activation_entropy(x, 4, seed=7) == h
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    assert activation_entropy(x[perm], 4, seed=7) == pytest.approx(h, abs=1e-12)
    # [N, L, d] activations: the N*L tokens are the rows of Eq. 2
    assert activation_entropy(x.reshape(10, 100, 24), 4, seed=7) == h
    assert h == pytest.approx(exact_entropy(sizes), abs=1e-12)


def test_subsampled_entropy_close_to_full():
    sizes = [2000, 1000, 600, 300, 100]
    x, _ = blobs(sizes, d=16, seed=5)
    full = activation_entropy(x, 5, seed=0)
    sub = activation_entropy(x, 5, subsample=400, seed=0)
    assert sub == pytest.approx(full, abs=1e-3)
    # unstructured data: still close, not identical
    noise = torch.rand(4000, 8, generator=torch.Generator().manual_seed(0))
    full = activation_entropy(noise, 6, seed=0)
    sub = activation_entropy(noise, 6, subsample=800, seed=0)
    assert abs(sub - full) < 0.02
    # a subsample at least as large as the data is the full computation
    assert activation_entropy(x, 5, subsample=10**6, seed=0) == activation_entropy(x, 5, seed=0)


def test_entropy_bad_input():
    x, _ = blobs([5, 5])
    with pytest.raises(LuqError, match=r"K=11 is larger than the 10 tokens available"):
        activation_entropy(x, 11)
    with pytest.raises(LuqError, match=r"K=4 is larger than the 3 tokens available"):
        activation_entropy(x, 4, subsample=3)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[3, 2] = bad
        with pytest.raises(LuqError, match="NaN or inf"):
            activation_entropy(y, 2)
        with pytest.raises(LuqError, match="NaN or inf"):
            activation_entropy(y, 2, subsample=4)
        with pytest.raises(LuqError, match="NaN or inf"):
            nearest_centroid(y, x[:2])
    with pytest.raises(LuqError):
        kmeans(x, 0)


# ---------------------------------------------------------------------------------
# Eq. 6, Kendall distance, choice of K


def test_entropy_ranking_ascending_ties_by_index():
    assert entropy_ranking([0.5, 0.1, 0.3, 0.1]) == [1, 3, 2, 0]
    assert entropy_ranking([]) == []


def test_kendall_distance():
    r = [2, 0, 3, 1]
    assert kendall_distance(r, r) == 0.0
    assert kendall_distance(r, r[::-1]) == pytest.approx(1.0)
    assert kendall_distance([0, 1, 2, 3], [1, 0, 2, 3]) == pytest.approx(1 / 6)
    assert kendall_distance([0, 1, 2, 3], [0, 2, 3, 1]) == pytest.approx(2 / 6)
    with pytest.raises(LuqError):
        kendall_distance([0, 1, 2], [0, 1, 3])


def test_select_k_finds_knee():
    # steep until K=100, then flat: the elbow is at 100
    ks = list(range(20, 220, 20))
    ds = [0.50, 0.38, 0.26, 0.14, 0.02, 0.015, 0.012, 0.01, 0.01, 0.008]
    assert select_k(list(zip(ks, ds))) == 100
    # a smooth convex decreasing curve: Kneedle's knee of exp(-K/40) on 10..300
    ks = list(range(10, 310, 10))
    curve = [(k, math.exp(-k / 40)) for k in ks]
    from kneed import KneeLocator

    expected = KneeLocator(ks, [c[1] for c in curve], curve="convex", direction="decreasing").knee
    assert select_k(curve) == expected and 40 <= expected <= 120


def test_select_k_fallback():
    assert select_k([(10, 0.2), (20, 0.1)]) == 20  # too short for Kneedle
    assert select_k([(10, 0.0), (20, 0.0), (30, 0.0)]) == 10  # flat: smallest distance, first
    with pytest.raises(LuqError):
        select_k([])


def test_k_stability_list_and_callable():
    # three layers with clearly different structure: 1, 2 and 4 well-separated blobs
    layers = [blobs([600], seed=0)[0], blobs([300, 300], seed=1)[0], blobs([150] * 4, seed=2)[0]]
    curve = k_stability(layers, [2, 4, 6], seed=0)
    assert [k for k, _ in curve] == [4, 6]
    assert all(0.0 <= v <= 1.0 for _, v in curve)
    assert k_stability(lambda i: layers[i], [2, 4, 6], n_layers=3, seed=0) == curve
    with pytest.raises(LuqError):
        k_stability(layers, [4, 2])
    with pytest.raises(LuqError):
        k_stability(lambda i: layers[i], [2, 4])
