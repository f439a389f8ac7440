"""What each (linear, format) choice costs the model's output: the sensitivity table.

The cost of giving one linear one format, alone, is the KL divergence of the model's
next-token distributions from full precision that it causes. Measuring it directly
takes one whole-model forward per (linear, format) (`output_kl`, used to validate and
to score a chosen plan). The estimate used for planning needs one backward pass:

  KL(p || p~) ~ 1/2 dz^T F dz,  F = E_{y~p}[g g^T],  g = d log p(y) / dz      (Fisher)

and for a weight change D = W - Q of one linear, its output moves by D x_t at token t,
so with g_t = d log p(y) / d(out_t) from one label y sampled from the model itself,

  cost(linear, format) = 1/(2T) * sum_t (g_t . D x_t)^2                      (per-token Fisher)

in nats per token. The backward runs layer by layer, last to first (each layer's
inputs were kept from a forward over the same windows), so memory stays one layer; at
each layer every linear's (x_t, g_t) meet every format's D from the variant cache.
tests/test_allocate.py and bench/sensitivity.py check it against `output_kl`.

Units outside the decoder get the same quantity from the same backward:
- an output head (or the embedding it is tied to) moves the logits by dz_t = D x_t; their
  Fisher is diag(p_t) - p_t p_t^T exactly, so no label is sampled:
    cost(head, f) = 1/(2T) * sum_t [ sum_v p_tv dz_tv^2 - (sum_v p_tv dz_tv)^2 ]      (logit Fisher)
- the token embedding moves layer 0's input at text token t by s * D[id_t] (s: the family's
  embedding scale), met by that input's gradient g0_t:
    cost(embed, f) = 1/(2T) * sum_t (g0_t . s D[id_t])^2
- a vision-tower or projector linear: the gradient g0 at the image tokens flows back through
  the projector and tower, and each linear's (x_t, g_t) meet as in a decoder layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from luq.capture import (PAD, TEXT, capture_first_layer_inputs, first_layer_hidden, layer_forward,
                         layerwise_logits, move, run_layerwise)
from luq.models import Adapter, Unit, adapter_for, quantizable_linears
from luq.models.streaming import StoredWeights, is_streamed, layer_digest, layer_on, model_device, parts_on
from luq.quant.formats import Format
from luq.variants import UNITS, VariantCache, tensor_digest

Costs = dict[str, dict[str, float]]  # full unit name -> format -> predicted cost (nats per token)
HEAD_TOKENS = 2048  # tokens the head's cost is averaged over (its [tokens, vocab] products dominate)

SENSITIVITY_FORMAT = 1


def _final_log_probs(model: nn.Module, adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """log p(next token) from the last decoder layer's output (final norm, output head)."""
    logits = model.get_output_embeddings()(adapter.decoder(model).norm(hidden))
    return torch.log_softmax(logits.float(), dim=-1)


def _score_gradient(model, adapter, hidden: torch.Tensor, kinds: torch.Tensor, generator: torch.Generator,
                    ) -> torch.Tensor:
    """d/d hidden of sum_t log p(y_t), y_t sampled from the model's own p_t (non-padding t)."""
    grads = torch.zeros_like(hidden, dtype=torch.float32)
    for b in range(hidden.shape[0]):  # one sequence at a time: [tokens, vocab] log-probs stay small
        h = hidden[b:b + 1].detach().float().requires_grad_(True)
        with torch.enable_grad():
            logp = _final_log_probs(model, adapter, h.to(hidden.dtype))[0]
            labels = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator).to(logp.device)
            keep = (kinds[b] != PAD).to(logp.device)
            score = logp.gather(1, labels)[:, 0][keep].sum()
            score.backward()
        grads[b] = h.grad[0]
    return grads


class _CostHooks:
    """On each linear of `modules` (by name): keep its input x and, when its output's gradient g
    arrives, add 1/2 sum_t (g_t . D_f x_t)^2 for every format f (D_f = W - Q_f)."""

    def __init__(self, modules: Mapping[str, nn.Module], deltas: Mapping[str, Mapping[str, torch.Tensor]]):
        self.deltas = deltas
        self.costs = {name: {f: 0.0 for f in fmts} for name, fmts in deltas.items()}
        self.handles = [module.register_forward_hook(self._hook(name))
                        for name, module in modules.items() if name in deltas]

    def _hook(self, name: str):
        def forward(module, args, output):
            x = args[0].detach()

            def backward(g):
                xf = x.reshape(-1, x.shape[-1]).float()
                gf = g.reshape(-1, g.shape[-1]).float()
                for fmt, D in self.deltas[name].items():
                    projected = ((xf @ D.T) * gf).sum(-1)
                    self.costs[name][fmt] += 0.5 * float(projected.double().pow(2).sum())
            if output.requires_grad:
                output.register_hook(backward)
        return forward

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def sensitivity_settings(batches_digest: str, seed: int) -> dict:
    return {"windows": batches_digest, "seed": seed, "version": SENSITIVITY_FORMAT}


def batches_digest(batches) -> str:
    """Identifies the sensitivity windows (their token ids and image tensors)."""
    return tensor_digest({f"{i}/{k}": v for i, (inputs, _) in enumerate(batches) for k, v in inputs.items()
                          if isinstance(v, torch.Tensor)})[:16]


def measure_sensitivity(model: nn.Module, adapter: Adapter, batches, cache: VariantCache, formats: Sequence[Format],
                        *, units: Mapping[str, Unit] | None = None, unit_formats: Sequence[Format] = (),
                        device: torch.device | str = "cpu", seed: int = 0, progress: bool = True) -> Costs:
    """The cost table: per unit (full name) and format, the predicted cost (nats per token, see
    the module docstring) of that unit alone in that format. Units: every decoder linear in
    each of `formats`, and `units` outside the decoder in each of `unit_formats`.

    `batches`: the sensitivity windows (held out from the calibration windows behind the
    Hessians). The formats' weights are read from `cache` (the variant pass filled it);
    costs are cached beside them, so a rerun, or a run that adds a format, measures only
    what is missing.
    """
    layers = adapter.decoder_layers(model)
    units = dict(units or {})
    settings = sensitivity_settings(batches_digest(batches), seed)
    digests = [layer_digest(layer) for layer in layers]
    weights = StoredWeights(model, units)  # a streamed part's weights are read when asked
    unit_digest = tensor_digest(weights) if units else None
    costs: Costs = {}

    def cached(index, digest, fmts) -> list[Format]:
        missing = []
        for fmt in fmts:
            saved = cache.load_json(index, f"cost-{fmt.name}-{fmt.digest}", settings, digest)
            if saved is None:
                missing.append(fmt)
            else:
                prefix = adapter.layer_prefix(index) if isinstance(index, int) else ""
                for name, value in saved.items():
                    costs.setdefault(prefix + name, {})[fmt.name] = value
        return missing

    todo = [cached(i, digests[i], formats) for i in range(len(layers))]
    unit_todo = cached(UNITS, unit_digest, unit_formats) if units else []
    if not any(todo) and not unit_todo:
        return costs

    with torch.no_grad():
        first = capture_first_layer_inputs(model, adapter, batches)
        layer_inputs = []  # hidden states entering each layer, per batch
        hidden = [inp.hidden for inp in first]
        for _, _, outputs, _ in run_layerwise(layers, first, device):
            layer_inputs.append(hidden)
            hidden = list(outputs)
    n_tokens = sum(int((inp.token_kind != PAD).sum()) for inp in first)
    unit_costs: Costs = {name: {} for name in units}
    head_units = [u for u in units.values() if u.kind == "head" or u.tied_head]
    if unit_todo and head_units:
        for unit in head_units:
            unit_costs[unit.name].update(_head_costs(model, adapter, unit, weights[unit.name], hidden, first,
                                                        unit_todo, cache, unit_digest, device, seed))
    generator = torch.Generator().manual_seed(seed)
    head_device = model_device(model)
    with layer_on(model.get_output_embeddings(), head_device):  # a streamed head is read from disk for this
        grads = [_score_gradient(model, adapter, h.to(head_device), inp.token_kind, generator).to("cpu")
                 for h, inp in zip(hidden, first)]

    reach_layer0 = bool(unit_todo) and any(u.kind in ("embed", "vision") for u in units.values())
    lowest = 0 if reach_layer0 else min(i for i, t in enumerate(todo) if t)
    bar = tqdm(range(len(layers) - 1, lowest - 1, -1), desc="sensitivity", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i]
        on_device = ExitStack()
        on_device.enter_context(layer_on(layer, device))  # a streamed layer is read from disk here
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        linears = quantizable_linears(layer)
        for fmt in todo[i]:
            result = cache.load(i, fmt, digests[i], device=device)
            if result is None:
                raise RuntimeError(f"layer {i} has no {fmt.name} weights in {cache.dir}: run the variant pass first")
            for name, q in result.weights.items():
                deltas.setdefault(name, {})[fmt.name] = (linears[name].weight.detach().float()
                                                         - q.dequantize().to(device))
        hooks = _CostHooks(linears, deltas)
        with _frozen(layer):
            try:
                for b, inp in enumerate(first):
                    x = layer_inputs[i][b].to(device).requires_grad_(True)
                    with torch.enable_grad():
                        out = layer_forward(layer, replace(inp, hidden=x, kwargs=move(inp.kwargs, device)), device)
                        out.backward(grads[b].to(device, out.dtype))
                    grads[b] = x.grad.detach().to("cpu")
            finally:
                hooks.remove()
                on_device.close()
        for fmt in todo[i]:
            per_linear = {name: hooks.costs[name][fmt.name] / n_tokens for name in hooks.costs
                          if fmt.name in hooks.costs[name]}
            cache.save_json(i, f"cost-{fmt.name}-{fmt.digest}", settings, per_linear, digests[i])
            for name, value in per_linear.items():
                costs.setdefault(adapter.layer_prefix(i) + name, {})[fmt.name] = value
        del deltas, hooks

    if unit_todo:
        for unit in units.values():
            if unit.kind == "embed":
                for fmt, value in _embedding_costs(unit, weights[unit.name], batches, first, grads, unit_todo,
                                                   cache, unit_digest, device).items():
                    unit_costs[unit.name][fmt] = unit_costs[unit.name].get(fmt, 0.0) + value
        vision = {n: u for n, u in units.items() if u.kind == "vision"}
        if vision:
            with parts_on(model, adapter, model_device(model), head=False):  # the tower runs forward and backward
                for name, per_format in _vision_costs(model, adapter, vision, batches, grads, unit_todo, cache,
                                                      unit_digest, device).items():
                    unit_costs[name].update(per_format)
        for fmt in unit_todo:
            per_unit = {name: c[fmt.name] / n_tokens for name, c in unit_costs.items() if fmt.name in c}
            cache.save_json(UNITS, f"cost-{fmt.name}-{fmt.digest}", settings, per_unit, unit_digest)
            for name, value in per_unit.items():
                costs.setdefault(name, {})[fmt.name] = value
    return costs


class _frozen:
    """No parameter of `module` collects gradients inside the block (restored after)."""

    def __init__(self, module: nn.Module):
        self.params = list(module.parameters())

    def __enter__(self):
        self.requires = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.requires):
            p.requires_grad_(r)


def _deltas(unit_names, fmt: Format, cache: VariantCache, digest: str, device, weights) -> dict[str, torch.Tensor]:
    """D = W - Q for each unit in `fmt`, read from the variant cache (float32, on `device`)."""
    result = cache.load(UNITS, fmt, digest, device=device)
    if result is None:
        raise RuntimeError(f"no {fmt.name} weights outside the decoder in {cache.dir}: run the variant pass first")
    return {n: weights[n].detach().to(device, torch.float32) - result.weights[n].dequantize().to(device)
            for n in unit_names}


@torch.no_grad()
def _head_costs(model, adapter, unit: Unit, weight: torch.Tensor, hidden, first, formats, cache, digest, device,
                seed) -> dict[str, float]:
    """Summed logit-Fisher cost (module docstring) of the head weight of `unit` in each format, over
    up to HEAD_TOKENS non-padding tokens (seeded sample), scaled to all of them."""
    norm = adapter.decoder(model).norm
    x = torch.cat([norm(h.to(device))[inp.token_kind.to(device) != PAD] for h, inp in zip(hidden, first)]).float()
    n = x.shape[0]
    if n > HEAD_TOKENS:
        x = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:HEAD_TOKENS].to(device)]
    W = weight.detach().to(device, torch.float32)
    chunks = x.split(256)
    probs = [torch.softmax(c @ W.T, -1).to(torch.bfloat16) for c in chunks]
    out = {}
    for fmt in (f for f in formats if f.supports(unit.shape)):
        D = _deltas([unit.name], fmt, cache, digest, device, {unit.name: weight})[unit.name]
        Db, total = D.to(torch.bfloat16), 0.0
        for c, p in zip(chunks, probs):
            dz = (c.to(torch.bfloat16) @ Db.T).float()   # bfloat16 products: the [tokens, vocab] matmul dominates
            pf = p.float()
            total += 0.5 * float(((pf * dz * dz).sum(-1) - (pf * dz).sum(-1).pow(2)).sum())
        out[fmt.name] = total * n / x.shape[0]
    return out


def _embedding_costs(unit: Unit, weight: torch.Tensor, batches, first, grads, formats, cache, digest, device,
                     ) -> dict[str, float]:
    """Summed cost of the embedding table in each format: layer 0's input gradient at each text
    token against the row's change (module docstring)."""
    from luq.quant.embedding import embed_scale

    scale = embed_scale(unit.module)
    ids = [inputs["input_ids"][inp.token_kind == TEXT] for (inputs, _), inp in zip(batches, first)]
    g0 = [g[inp.token_kind == TEXT].float() for g, inp in zip(grads, first)]
    out = {}
    for fmt in (f for f in formats if f.supports(unit.shape)):
        D = _deltas([unit.name], fmt, cache, digest, device, {unit.name: weight})[unit.name]
        out[fmt.name] = sum(0.5 * float(((g.to(device) * (scale * D[i.to(device)])).sum(-1)).double().pow(2).sum())
                            for i, g in zip(ids, g0))
    return out


def _vision_costs(model, adapter, units: Mapping[str, Unit], batches, grads, formats, cache, digest, device,
                  chunk_bytes: int = 2 ** 29) -> dict[str, dict[str, float]]:
    """Summed cost of each vision-tower / projector linear in each format: layer 0's input gradient
    flows back through the projector and tower (image batches only), formats a few at a time."""
    images = [b for b, (inputs, _) in enumerate(batches) if any(k in inputs for k in ("pixel_values",))]
    weights = {n: u.module.weight for n, u in units.items()}
    per_format = 4 * sum(w.numel() for w in weights.values())
    step = max(1, chunk_bytes // max(per_format, 1))
    out: dict[str, dict[str, float]] = {n: {} for n in units}
    for start in range(0, len(formats), step):
        deltas: dict[str, dict[str, torch.Tensor]] = {n: {} for n in units}
        for fmt in formats[start:start + step]:
            able = [n for n, u in units.items() if fmt.supports(u.shape)]
            for n, D in _deltas(able, fmt, cache, digest, device, weights).items():
                deltas[n][fmt.name] = D
        hooks = _CostHooks({n: u.module for n, u in units.items()}, deltas)
        with _frozen(model):
            try:
                for b in images:
                    inputs = move(batches[b][0], device)
                    inputs["pixel_values"] = inputs["pixel_values"].requires_grad_(True)
                    with torch.enable_grad():
                        h0 = first_layer_hidden(model, adapter, inputs)
                        h0.backward(grads[b].to(h0.device, h0.dtype))
            finally:
                hooks.remove()
        for n in units:
            out[n].update(hooks.costs[n])
        del deltas, hooks
    return out


@torch.no_grad()
def reference_log_probs(model: nn.Module, batches, dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """The model's next-token log-probabilities on `batches` (kept in `dtype` on the CPU)."""
    # one sequence at a time: the [tokens, vocab] temporaries stay one sequence's
    return [torch.stack([torch.log_softmax(row.float(), -1).to("cpu", dtype) for row in logits])
            for logits in _batch_logits(model, batches)]


def _batch_logits(model: nn.Module, batches):
    """Per batch, the model's logits: one whole-model forward each, or, for a streamed model,
    layer by layer over all batches (`layerwise_logits`)."""
    if is_streamed(model):
        yield from layerwise_logits(model, adapter_for(model), batches)
        return
    device = next(model.parameters()).device
    for inputs, _ in batches:
        yield model(**move(inputs, device), use_cache=False).logits


@torch.no_grad()
def output_kl(model: nn.Module, batches, reference: list[torch.Tensor]) -> float:
    """Mean KL(p_reference || p_model) per non-padding token, in nats: the measured cost."""
    total, count = 0.0, 0
    for (inputs, kinds), ref, logits in zip(batches, reference, _batch_logits(model, batches)):
        rows = []
        for row, ref_row in zip(logits, ref):  # one sequence at a time: [tokens, vocab] temporaries stay small
            logq = torch.log_softmax(row.float(), -1).cpu()
            logp = ref_row.float()
            rows.append((logp.exp() * (logp - logq)).sum(-1))
        kl = torch.stack(rows)
        keep = kinds != PAD
        total += float(kl[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)
