"""The stages that run a model layer by layer (DESIGN.md's data flow)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from luq.capture import IMAGE, PAD, TEXT, capture_first_layer_inputs, run_layerwise
from luq.entropy import entropy_by_kind, entropy_ranking, kendall_distance, select_k
from luq.models import Adapter

# the K grid of the stability analysis (the paper settles on K = 100)
DEFAULT_K_GRID = (8, 16, 32, 50, 75, 100, 150, 200)


@torch.no_grad()
def measure_entropy(model, adapter: Adapter, batches, *, k: int | None = None, k_grid=DEFAULT_K_GRID,
                    device: str | torch.device = "cpu", subsample: int | None = None, seed: int = 0,
                    progress: bool = True) -> dict:
    """Per-layer output-activation entropy (paper Eq. 2-5), its ranking (Eq. 6) and K.

    The layers run one at a time on the calibration batches; for every K of the grid
    (plus `k` if given) each layer's non-padding tokens are clustered once and the
    entropy is taken over all, text and image tokens. K is `k` if given, else the knee
    of the Kendall-distance curve between consecutive rankings (`k="auto"` upstream).
    """
    ks = sorted(set(k_grid) | ({k} if k else set()))
    first = capture_first_layer_inputs(model, adapter, batches)
    kinds = torch.cat([inp.token_kind.reshape(-1) for inp in first])
    keep = kinds != PAD
    ks = [K for K in ks if K <= int(keep.sum()) or K == k]  # the grid stops at the token count
    layers = adapter.decoder_layers(model)
    per_layer = []
    for i, _, outputs, _ in tqdm(run_layerwise(layers, first, device), total=len(layers), desc="entropy",
                                 unit="layer", disable=not progress):
        h = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])[keep]
        per_layer.append(entropy_by_kind(h.to(device), kinds[keep], ks, subsample=subsample, seed=seed))
    rankings = {K: entropy_ranking([layer[K]["all"] for layer in per_layer]) for K in ks}
    curve = [(b, kendall_distance(rankings[a], rankings[b])) for a, b in zip(ks, ks[1:])]
    chosen = k if k else select_k(curve)
    return {
        "k": chosen,
        "entropy": [layer[chosen]["all"] for layer in per_layer],
        "text_entropy": [layer[chosen]["text"] for layer in per_layer],
        "image_entropy": [layer[chosen]["image"] for layer in per_layer],
        "ranking": rankings[chosen],
        "kendall": [[K, d] for K, d in curve],
        "entropy_by_k": {str(K): [layer[K]["all"] for layer in per_layer] for K in ks},
        "tokens": {"text": int((kinds == TEXT).sum()), "image": int((kinds == IMAGE).sum()), "padding": int((~keep).sum())},
        "subsample": subsample,
    }
