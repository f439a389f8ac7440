"""The stages that run a model layer by layer (DESIGN.md's data flow).

One pass over the decoder: for each layer, its full-precision forward on the
calibration batches gives the output activations (-> entropy) and, through hooks on
its linears, their Hessians (-> every quantized variant, into the variant cache). The
outputs feed the next layer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from luq.capture import (IMAGE, PAD, TEXT, DiskActivations, capture_first_layer_inputs, layer_forward, offload,
                         run_layerwise)
from luq.entropy import entropy_by_kind, entropy_ranking, kendall_distance, select_k
from luq.models import Adapter, quantizable_linears
from luq.quant import HessianAccumulator, relative_output_error
from luq.quant.linear import replace_linears, restore_linears
from luq.variants import LayerVariants, VariantCache, tensor_digest

# the K grid of the stability analysis (the paper settles on K = 100)
DEFAULT_K_GRID = (8, 16, 32, 50, 75, 100, 150, 200)


@dataclass
class _LayerHooks:
    """Hessian accumulators on one layer's linears, fed only the non-padding tokens."""

    keep_masks: list[torch.Tensor]                       # per batch, bool [batch, tokens]
    accumulators: dict[str, HessianAccumulator] = field(default_factory=dict)
    handles: list = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)

    def attach(self, layer: nn.Module) -> None:
        for name, linear in quantizable_linears(layer).items():
            self.accumulators[name] = HessianAccumulator(linear.in_features, device=linear.weight.device)
            self.calls[name] = 0
            self.handles.append(linear.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name: str):
        def add(module, args):
            x = args[0]
            keep = self.keep_masks[self.calls[name]].to(x.device)  # one call per batch, in order
            self.calls[name] += 1
            self.accumulators[name].add_batch(x[keep] if keep.shape == x.shape[:-1] else x)
        return add

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def quantize_layer(layer: nn.Module, hessians: Mapping[str, torch.Tensor], variants: Mapping[str, object],
                   device: torch.device | str) -> tuple[dict, dict, dict]:
    """Every linear of one layer through every variant's solver: (weights, errors, seconds)."""
    weights: dict = {v: {} for v in variants}
    errors: dict = {v: {} for v in variants}
    seconds = {v: 0.0 for v in variants}
    for name, linear in quantizable_linears(layer).items():
        W = linear.weight.detach().to(device, torch.float32)
        H = hessians[name].to(device)
        for variant, solver in variants.items():
            t0 = time.perf_counter()
            q = solver.quantize(W, H)
            seconds[variant] += time.perf_counter() - t0
            errors[variant][name] = relative_output_error(W, q.dequantize().to(device), H)
            weights[variant][name] = q.to("cpu")
    return weights, errors, seconds


def _entropy_summary(per_layer: list[dict], ks: list[int], k: int | None, kinds: torch.Tensor) -> dict:
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
        "tokens": {"text": int((kinds == TEXT).sum()), "image": int((kinds == IMAGE).sum()),
                   "padding": int((kinds == PAD).sum())},
    }


def entropy_grid(k: int | None, k_grid, n_tokens: int) -> list[int]:
    """The Ks to cluster with: the grid (stopping at the token count) plus a fixed `k`."""
    ks = sorted(set(k_grid) | ({k} if k else set()))
    return [K for K in ks if K <= n_tokens or K == k]


@torch.no_grad()
def layer_pass(model, adapter: Adapter, batches, *, variants: Mapping[str, object] | None = None,
               cache: VariantCache | None = None, hessians: str = "fp", k: int | None = None,
               k_grid=DEFAULT_K_GRID, device: str | torch.device = "cpu", subsample: int | None = None,
               seed: int = 0, progress: bool = True, desc: str = "layers", assignment: list[str] | None = None,
               entropy: bool = True, offload_dir: str | None = None) -> dict:
    """The one pass of DESIGN.md over the decoder layers: entropy of each layer's output
    (paper Eq. 2-5) and, if `variants` are given, each layer quantized every way into
    `cache` (layers already in the cache are read, not recomputed).

    hessians: "fp" feeds each layer the full-precision chain; "sequential" feeds it the
    outputs of the layers before it quantized with the first variant (the high one),
    or with its variant in `assignment` (per layer, the one variant it gets: the
    final pass of a chosen configuration). In "sequential" mode the entropy is that of each layer's full-precision forward on
    the quantized chain's inputs. Returns the entropy summary (see `measure_entropy`)
    plus `layers`: per layer, its variants' bytes, nominal bits, errors and seconds.
    entropy=False skips the clustering (and returns only `layers`). offload_dir: keep the
    activations between layers in memory-mapped files there instead of RAM.
    """
    variants = dict(variants or {})
    disk = DiskActivations(offload_dir) if offload_dir else None
    first = capture_first_layer_inputs(model, adapter, batches, disk=disk)
    kinds = torch.cat([inp.token_kind.reshape(-1) for inp in first])
    keep = kinds != PAD
    keep_masks = [(inp.token_kind != PAD) for inp in first]
    ks = entropy_grid(k, k_grid, int(keep.sum()))
    layers = adapter.decoder_layers(model)

    def variants_of(i: int) -> dict:
        return {assignment[i]: variants[assignment[i]]} if assignment is not None else variants

    def before(i: int, layer: nn.Module):
        digest = tensor_digest(dict(layer.state_dict())) if variants else None
        cached = cache.load(i, digest) if cache is not None and variants else None
        hooks = None
        if variants and cached is None:
            hooks = _LayerHooks(keep_masks)
            hooks.attach(layer)
        return digest, cached, hooks

    per_layer, summaries = [], []
    inputs = first  # layer i's inputs, for recomputing its outputs in sequential mode
    bar = tqdm(run_layerwise(layers, first, device, before_layer=before, disk=disk), total=len(layers), desc=desc,
               unit="layer", disable=not progress)
    for i, layer, outputs, (digest, cached, hooks) in bar:
        if hooks is not None:
            hooks.remove()
        if cached is not None:
            result = cached
        else:
            layer_entropy = {}
            if entropy:
                h = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])[keep]
                layer_entropy = entropy_by_kind(h.to(device), kinds[keep], ks, subsample=subsample, seed=seed)
            result = LayerVariants(index=i, weights={}, entropy=layer_entropy)
            if variants:
                bar.set_postfix_str(f"quantizing layer {i}")
                hess = {name: acc.hessian for name, acc in hooks.accumulators.items()}
                result.weights, result.errors, result.seconds = quantize_layer(layer, hess, variants_of(i), device)
                del hess
                if cache is not None:
                    cache.save(result, digest)
        per_layer.append(result.entropy)
        if variants:
            summaries.append(result.summary())
        if variants and hessians == "sequential":  # the next layer sees this one quantized
            swapped = replace_linears(layer, result.weights[next(iter(variants_of(i)))])
            outputs[:] = [offload(layer_forward(layer, inp, device), "cpu", disk) for inp in inputs]
            restore_linears(layer, swapped)
        inputs = [replace(inp, hidden=out) for inp, out in zip(inputs, outputs)]
    out = {}
    if entropy:
        out = _entropy_summary(per_layer, [K for K in ks if all(K in e for e in per_layer)], k, kinds)
        out["subsample"] = subsample
    if variants:
        out["layers"] = summaries
    return out


def measure_entropy(model, adapter: Adapter, batches, *, k: int | None = None, k_grid=DEFAULT_K_GRID,
                    device: str | torch.device = "cpu", subsample: int | None = None, seed: int = 0,
                    progress: bool = True, offload_dir: str | None = None) -> dict:
    """Per-layer output-activation entropy (paper Eq. 2-5), its ranking (Eq. 6) and K.

    The layers run one at a time on the calibration batches; for every K of the grid
    (plus `k` if given) each layer's non-padding tokens are clustered once and the
    entropy is taken over all, text and image tokens. K is `k` if given, else the knee
    of the Kendall-distance curve between consecutive rankings (`k="auto"` upstream).
    """
    return layer_pass(model, adapter, batches, k=k, k_grid=k_grid, device=device, subsample=subsample, seed=seed,
                      progress=progress, desc="entropy", offload_dir=offload_dir)
