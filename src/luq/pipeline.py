"""The stages that run a model layer by layer (the data flow of docs/architecture.md).

One pass over the decoder: for each layer, its full-precision forward on the
calibration batches gives the output activations (-> entropy) and, through hooks on
its linears, their Hessians (-> every linear in every format of the menu, into the
variant cache). The outputs feed the next layer.

Each pass returns a dataclass of numbers (`LayerPass`, `UnitPass`; `measure_entropy` an
`EntropySummary`); a run keeps them together as `Passes`, what its report is built from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from luq.capture import (IMAGE, PAD, TEXT, DiskActivations, capture_first_layer_inputs, layer_forward,
                         layerwise_hidden, move, offload, run_layerwise)
from luq.entropy import entropy_by_kind, entropy_ranking, kendall_distance, select_k
from luq.models import Adapter, Unit, quantizable_linears
from luq.models.streaming import StoredWeights, is_streamed, layer_digest, model_device
from luq.errors import LuqError
from luq.quant import HessianAccumulator, relative_output_error
from luq.quant.formats import Format, get_format
from luq.quant.linear import replace_linears, restore_linears
from luq.variants import UNITS, FormatResult, VariantCache, tensor_digest

# the K grid of the stability analysis (the paper settles on K = 100)
DEFAULT_K_GRID = (8, 16, 32, 50, 75, 100, 150, 200)


@dataclass
class EntropySummary:
    """The output-activation entropy of every decoder layer (paper Eq. 2-5) at the chosen K, over all,
    text and image tokens (None where a layer saw none of that kind), the ranking (Eq. 6), the
    Kendall distance between the rankings of consecutive Ks ([K, distance]), every K's entropies, the
    token counts (text, image, padding) and the subsample. `to_json()` is entropy.json's dict (these
    keys, in this order)."""

    kmeans_clusters: int
    entropy: list[float]
    text_entropy: list[float | None]
    image_entropy: list[float | None]
    ranking: list[int]
    kendall: list[list]
    entropy_by_k: dict[str, list[float]]
    tokens: dict[str, int]
    subsample: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LayerSummary:
    """One decoder layer of a quantizing pass, numbers only: per linear (by its name in the layer) its
    shape and per format its bytes, nominal bits and error ({"shape": [rows, cols], "formats": {format:
    {"bytes", "nominal_bits", "error"}}}), and each format's solver seconds."""

    index: int
    linears: dict[str, dict]
    seconds: dict[str, float]


@dataclass
class LayerPass:
    """What `layer_pass` measured: each layer's summary (empty where it quantized nothing) and the
    entropy (None where it measured none)."""

    layers: list[LayerSummary] = field(default_factory=list)
    entropy: EntropySummary | None = None


@dataclass
class UnitPass:
    """What `unit_pass` measured: per unit outside the decoder {"kind", "shape", "formats": {format:
    {"bytes", "nominal_bits", "error"}}}, and each format's solver seconds."""

    units: dict[str, dict]
    seconds: dict[str, float]


@dataclass
class Passes:
    """What a run's passes measured (a Session's `Measurement.passed`, the report's source): each decoder
    layer's summary (`layer_pass`), the entropy (None where the run measured none), the units outside the
    decoder (`unit_pass`; None where there are none) and, once the final pass is kept, its own
    per-layer summaries (their bytes and errors are the artifact's)."""

    layers: list[LayerSummary]
    entropy: EntropySummary | None = None
    unit_pass: UnitPass | None = None
    final_layers: list[LayerSummary] | None = None

    @classmethod
    def of(cls, passed: LayerPass, unit_pass: UnitPass | None = None) -> Passes:
        """From `layer_pass`'s result (and `unit_pass`'s)."""
        return cls(layers=passed.layers, entropy=passed.entropy, unit_pass=unit_pass)


@dataclass
class _LayerHooks:
    """Hessian accumulators on one layer's linears, fed only the non-padding tokens.

    Linears that receive the same input tensor (a layer's q/k/v projections, gate/up) share
    one accumulator: the same sums, once. `self[name]` is a linear's Hessian, taken when
    the solver asks for it; an accumulator is freed once every linear sharing it has taken
    its Hessian, so a layer holds its float64 sums only until they are used."""

    keep_masks: list[torch.Tensor]                       # per batch, bool [batch, tokens]
    accumulators: dict[str, HessianAccumulator] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # linear -> the linear whose accumulator it reads
    handles: list = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    _last: tuple | None = None                           # (input tensor, owner) of the latest batch added
    _taken: dict[str, torch.Tensor] = field(default_factory=dict)

    def attach(self, layer: nn.Module) -> None:
        for name, linear in quantizable_linears(layer).items():
            self.calls[name] = 0
            self.handles.append(linear.register_forward_pre_hook(self._hook(name, linear)))

    def _hook(self, name: str, linear: nn.Linear):
        def add(module, args):
            x = args[0]
            call = self.calls[name]
            self.calls[name] += 1  # one call per batch, in order
            if call == 0:
                same = self._last is not None and self._last[0] is x
                self.owner[name] = self._last[1] if same else name
                if not same:
                    self.accumulators[name] = HessianAccumulator(linear.in_features, device=linear.weight.device)
            owner = self.owner[name]
            if owner != name:
                if self._last is None or self._last[0] is not x or self._last[1] != owner:
                    raise RuntimeError(f"{name} shared {owner}'s input on the first batch, not on batch {call}")
                return
            keep = self.keep_masks[call].to(x.device)
            self.accumulators[name].add_batch(x[keep] if keep.shape == x.shape[:-1] else x)
            self._last = (x, name)
        return add

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self._last = None

    def __getitem__(self, name: str) -> torch.Tensor:
        owner = self.owner[name]
        if owner not in self._taken:
            self._taken[owner] = self.accumulators.pop(owner).take()
        H = self._taken[owner]
        if not any(o == owner for n, o in self.owner.items() if n != name):
            del self._taken[owner]
        del self.owner[name]
        return H


def quantize_weights(weights: Mapping[str, torch.Tensor], hessians: Mapping[str, torch.Tensor],
                     needs: Mapping[str, Sequence[Format]], device: torch.device | str) -> dict[str, FormatResult]:
    """Each weight (by name) through each format it needs: format name -> its FormatResult
    (packed weights on the CPU, per-weight records, solver seconds)."""
    results: dict[str, FormatResult] = {}
    for name, formats in needs.items():
        W = weights[name].detach().to(device, torch.float32)
        H = hessians[name].to(device)
        for fmt in formats:
            t0 = time.perf_counter()
            q = fmt.quantize(W, H)
            result = results.setdefault(fmt.name, FormatResult(fmt.name))
            result.seconds += time.perf_counter() - t0
            result.records[name] = FormatResult.record_of(q, relative_output_error(W, q.dequantize().to(device), H))
            result.weights[name] = q.to("cpu")
    return results


def quantize_linears(layer: nn.Module, hessians: Mapping[str, torch.Tensor], needs: Mapping[str, Sequence[Format]],
                     device: torch.device | str) -> dict[str, FormatResult]:
    """`quantize_weights` over one decoder layer's linears (by relative name)."""
    return quantize_weights({name: m.weight for name, m in quantizable_linears(layer).items()}, hessians, needs, device)


def _entropy_summary(per_layer: list[dict], ks: list[int], k: int | None, kinds: torch.Tensor,
                     subsample: int | None) -> EntropySummary:
    rankings = {K: entropy_ranking([layer[K]["all"] for layer in per_layer]) for K in ks}
    curve = [(b, kendall_distance(rankings[a], rankings[b])) for a, b in zip(ks, ks[1:])]
    chosen = k if k else select_k(curve)
    return EntropySummary(
        kmeans_clusters=chosen,
        entropy=[layer[chosen]["all"] for layer in per_layer],
        text_entropy=[layer[chosen]["text"] for layer in per_layer],
        image_entropy=[layer[chosen]["image"] for layer in per_layer],
        ranking=rankings[chosen],
        kendall=[[K, d] for K, d in curve],
        entropy_by_k={str(K): [layer[K]["all"] for layer in per_layer] for K in ks},
        tokens={"text": int((kinds == TEXT).sum()), "image": int((kinds == IMAGE).sum()),
                "padding": int((kinds == PAD).sum())},
        subsample=subsample)


def entropy_grid(k: int | None, k_grid, n_tokens: int) -> list[int]:
    """The Ks to cluster with: the grid (stopping at the token count) plus a fixed `k`."""
    ks = sorted(set(k_grid) | ({k} if k else set()))
    return [K for K in ks if K <= n_tokens or K == k]


def _layer_needs(layer: nn.Module, index: int, formats: Sequence[Format], plan_of_layer) -> dict[str, list[Format]]:
    """Per linear of the layer, the formats the pass must produce for it."""
    linears = quantizable_linears(layer)
    names = list(linears)
    if plan_of_layer is None:   # each in every format that can store its shape (ggml types: `Format.supports`)
        shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
        return {name: [f for f in formats if f.supports(shapes[name])] for name in names}
    chosen = plan_of_layer(index)
    missing = [n for n in names if n not in chosen]
    if missing:
        raise LuqError(f"the plan gives no format to layer {index}'s {', '.join(missing)}")
    return {name: [get_format(chosen[name])] for name in names}


@torch.no_grad()
def layer_pass(model, adapter: Adapter, batches, *, formats: Sequence[Format] = (),
               plan_of_layer: Callable[[int], Mapping[str, str]] | None = None, cache: VariantCache | None = None,
               hessians: str = "fp", chain_format: Format | None = None, k: int | None = None,
               k_grid=DEFAULT_K_GRID, device: str | torch.device = "cpu", subsample: int | None = None,
               seed: int = 0, progress: bool = True, desc: str = "layers", entropy: bool = True,
               offload_dir: str | None = None) -> LayerPass:
    """The one pass over the decoder layers (docs/architecture.md): the entropy of each layer's output
    (paper Eq. 2-5) and every linear quantized in every format of `formats` (or, with
    `plan_of_layer`, each linear in the one format its layer's plan gives it: the final
    pass), into `cache`; (layer, format) pairs already cached are read, not recomputed.

    hessians: "fp" feeds each layer the full-precision chain; "sequential" feeds it the
    outputs of the layers before it quantized (each linear in its planned format, or in
    `chain_format` when filling the menu). In "sequential" mode the entropy is that of each
    layer's full-precision forward on the quantized chain's inputs. Returns a `LayerPass`: the
    entropy summary (see `measure_entropy`; None unless `entropy`) and, when quantizing, per layer
    a `LayerSummary` (per linear its shape and per format its bytes, nominal bits and error; each
    format's seconds).
    offload_dir: keep the activations between layers in memory-mapped files there.
    """
    formats = list(formats)
    quantizing = bool(formats) or plan_of_layer is not None
    if hessians == "sequential" and quantizing and plan_of_layer is None and chain_format is None:
        chain_format = formats[0]
    disk = DiskActivations(offload_dir) if offload_dir else None
    first = capture_first_layer_inputs(model, adapter, batches, disk=disk)
    kinds = torch.cat([inp.token_kind.reshape(-1) for inp in first])
    keep = kinds != PAD
    keep_masks = [(inp.token_kind != PAD) for inp in first]
    ks = entropy_grid(k, k_grid, int(keep.sum()))
    entropy_settings = {"ks": ks, "k": k, "subsample": subsample, "seed": seed}
    layers = adapter.decoder_layers(model)

    def before(i: int, layer: nn.Module):
        digest = layer_digest(layer) if cache is not None else None
        needs = _layer_needs(layer, i, formats, plan_of_layer) if quantizing else {}
        cached, missing = {}, {}
        for name, fmts in needs.items():
            for fmt in fmts:
                if fmt.name not in cached and fmt.name not in missing:
                    record = cache.record(i, fmt, digest) if cache is not None else None
                    if record is not None and set(record.records) >= {n for n, f in needs.items() if fmt in f}:
                        cached[fmt.name] = record
                    else:
                        missing[fmt.name] = fmt
        layer_entropy = cache.load_json(i, "entropy", entropy_settings, digest) if entropy and cache else None
        hooks = None
        if missing:
            hooks = _LayerHooks(keep_masks)
            hooks.attach(layer)
        return digest, needs, cached, missing, layer_entropy, hooks

    per_layer, summaries = [], []
    inputs = first  # layer i's inputs, for recomputing its outputs in sequential mode
    bar = tqdm(run_layerwise(layers, first, device, before_layer=before, disk=disk), total=len(layers), desc=desc,
               unit="layer", disable=not progress)
    for i, layer, outputs, (digest, needs, cached, missing, layer_entropy, hooks) in bar:
        if hooks is not None:
            hooks.remove()
        if entropy and layer_entropy is None:
            h = torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])[keep]
            layer_entropy = entropy_by_kind(h.to(device), kinds[keep], ks, subsample=subsample, seed=seed)
            if cache is not None:
                cache.save_json(i, "entropy", entropy_settings, {str(K): v for K, v in layer_entropy.items()},
                                digest)
        if entropy:
            per_layer.append({int(K): v for K, v in layer_entropy.items()})
        results = dict(cached)
        if missing:
            bar.set_postfix_str(f"quantizing layer {i}")
            todo = {name: [f for f in fmts if f.name in missing] for name, fmts in needs.items()}
            fresh = quantize_linears(layer, hooks, {n: f for n, f in todo.items() if f}, device)
            del hooks
            for name, result in fresh.items():
                if cache is not None:
                    cache.save(i, missing[name], result, digest)
                results[name] = result
        if quantizing:
            summaries.append(_layer_summary(i, needs, results))
        if quantizing and hessians == "sequential":  # the next layer sees this one quantized
            chain = {name: (fmts[0] if plan_of_layer is not None else chain_format) for name, fmts in needs.items()}
            weights = {}
            for name, fmt in chain.items():
                result = results[fmt.name]
                if name not in result.weights:  # read from the cache: load the tensors now
                    results[fmt.name] = result = cache.load(i, fmt, digest)
                weights[name] = result.weights[name]
            swapped = replace_linears(layer, weights, dense=True)  # exact float32, as GPTQ's sequential mode
            outputs[:] = [offload(layer_forward(layer, inp, device), "cpu", disk) for inp in inputs]
            restore_linears(layer, swapped)
        inputs = [replace(inp, hidden=out) for inp, out in zip(inputs, outputs)]
    summary = _entropy_summary(per_layer, [K for K in ks if all(K in e for e in per_layer)], k, kinds,
                               subsample) if entropy else None
    return LayerPass(layers=summaries, entropy=summary)


@torch.no_grad()
def unit_hessians(model, adapter: Adapter, batches, units: Mapping[str, Unit]) -> dict[str, torch.Tensor]:
    """The Hessian (X^T X / n) of each unit outside the decoder, from one full-precision forward of
    the whole model over the calibration batches: a head (tied or not) sees the final norm's output
    on non-padding tokens, a vision linear its own inputs (every image token); an untied embedding
    is read by index, not multiplied, so it gets the identity (GPTQ reduces to round-to-nearest)."""
    head_units = [u for u in units.values() if u.kind == "head" or u.tied_head]
    home = model_device(model)  # a streamed unit's weight is on the meta device
    accumulators = {name: HessianAccumulator(u.shape[1], device=home if u.module.weight.is_meta
                                             else u.module.weight.device)
                    for name, u in units.items() if u.kind == "vision" or u in head_units}
    state = {"keep": None}
    handles = []
    if head_units:
        def head_input(module, args, output):
            keep = state["keep"].to(output.device)
            for u in head_units:
                accumulators[u.name].add_batch(output[keep])
        handles.append(adapter.decoder(model).norm.register_forward_hook(head_input))
    for name, u in units.items():
        if u.kind == "vision":
            handles.append(u.module.register_forward_pre_hook(
                lambda module, args, name=name: accumulators[name].add_batch(args[0].reshape(-1, args[0].shape[-1]))))
    try:
        if is_streamed(model):  # layer by layer: the same activations, one decoder layer in memory
            hidden = layerwise_hidden(model, adapter, batches)  # the vision linears' hooks fire at layer 0's input
            norm = adapter.decoder(model).norm
            where = next((p.device for p in norm.parameters()), None)   # the layers may have run elsewhere (a GPU)
            for h, (_, kinds) in zip(hidden, batches):
                state["keep"] = kinds != PAD
                norm(h if where is None else h.to(where))
        else:
            device = next(model.parameters()).device
            for inputs, kinds in batches:
                state["keep"] = kinds != PAD
                model(**move(inputs, device), use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = {name: acc.hessian for name, acc in accumulators.items()}
    for name, u in units.items():
        if name not in out:
            out[name] = torch.eye(u.shape[1], device=model_device(model))
    return out


def unit_pass(model, adapter: Adapter, batches, units: Mapping[str, Unit], formats: Sequence[Format],
              cache: VariantCache | None, device: str | torch.device = "cpu") -> UnitPass:
    """Every unit outside the decoder (embedding, head, vision tower, projector) in every format
    of `formats`, into `cache` (one file per format for the whole group; what is cached is read).
    Returns a `UnitPass`: units {name: {"kind", "shape", "formats": {fmt: bytes / nominal_bits /
    error}}}, seconds {fmt: solver seconds}."""
    weights = StoredWeights(model, units)  # a streamed part's weights are read one at a time
    digest = tensor_digest(weights) if cache is not None else None
    results: dict[str, FormatResult] = {}
    missing = []
    able = {f.name: {n for n, u in units.items() if f.supports(u.shape)} for f in formats}
    for fmt in formats:
        record = cache.record(UNITS, fmt, digest) if cache is not None else None
        if record is not None and set(record.records) >= able[fmt.name]:
            results[fmt.name] = record
        elif able[fmt.name]:
            missing.append(fmt)
    if missing:
        hessians = unit_hessians(model, adapter, batches, units)
        fresh = quantize_weights(weights, hessians, {n: [f for f in missing if n in able[f.name]] for n in units},
                                 device)
        for fmt in missing:
            if cache is not None:
                cache.save(UNITS, fmt, fresh[fmt.name], digest)
            results[fmt.name] = FormatResult(fmt.name, {}, fresh[fmt.name].records, fresh[fmt.name].seconds)
        del fresh
    summary = {name: {"kind": u.kind, "shape": list(u.shape),
                      "formats": {f: {k: results[f].records[name][k] for k in ("bytes", "nominal_bits", "error")}
                                  for f in results if name in results[f].records}} for name, u in units.items()}
    return UnitPass(units=summary, seconds={f: r.seconds for f, r in results.items()})


def _layer_summary(index: int, needs: Mapping[str, Sequence[Format]],
                   results: Mapping[str, FormatResult]) -> LayerSummary:
    """Numbers only: per linear its shape and, per format, bytes / nominal bits / error; per format seconds."""
    linears = {}
    for name, fmts in needs.items():
        some = results[fmts[0].name].records[name]
        linears[name] = {"shape": some["shape"],
                         "formats": {f.name: {k: results[f.name].records[name][k]
                                              for k in ("bytes", "nominal_bits", "error")} for f in fmts}}
    return LayerSummary(index=index, linears=linears, seconds={name: r.seconds for name, r in results.items()})


def measure_entropy(model, adapter: Adapter, batches, *, k: int | None = None, k_grid=DEFAULT_K_GRID,
                    device: str | torch.device = "cpu", subsample: int | None = None, seed: int = 0,
                    progress: bool = True, offload_dir: str | None = None) -> EntropySummary:
    """Per-layer output-activation entropy (paper Eq. 2-5), its ranking (Eq. 6) and K (an
    `EntropySummary`; `.to_json()` is entropy.json's dict).

    The layers run one at a time on the calibration batches; for every K of the grid
    (plus `k` if given) each layer's non-padding tokens are clustered once and the
    entropy is taken over all, text and image tokens. K is `k` if given, else the knee
    of the Kendall-distance curve between consecutive rankings (`k="auto"` upstream).
    """
    return layer_pass(model, adapter, batches, k=k, k_grid=k_grid, device=device, subsample=subsample, seed=seed,
                      progress=progress, desc="entropy", offload_dir=offload_dir).entropy
