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
tests/test_sensitivity.py and bench/sensitivity.py check it against `output_kl`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from luq.capture import (PAD, LayerInput, capture_first_layer_inputs, layer_forward, layerwise_logits, move,
                         run_layerwise)
from luq.models import Adapter, adapter_for, quantizable_linears
from luq.models.streaming import is_streamed, layer_digest, layer_on, model_device
from luq.quant.formats import Format
from luq.variants import VariantCache, tensor_digest

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
    """On each linear of one layer: keep its input x and, when its output's gradient g arrives,
    add 1/2 sum_t (g_t . D_f x_t)^2 for every format f (D_f = W - Q_f)."""

    def __init__(self, layer: nn.Module, deltas: Mapping[str, Mapping[str, torch.Tensor]]):
        self.deltas = deltas
        self.costs = {name: {f: 0.0 for f in fmts} for name, fmts in deltas.items()}
        self.handles = [module.register_forward_hook(self._hook(name))
                        for name, module in quantizable_linears(layer).items() if name in deltas]

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
                        *, device: torch.device | str = "cpu", seed: int = 0, progress: bool = True,
                        ) -> list[dict[str, dict[str, float]]]:
    """Per decoder layer, per linear (relative name), per format: the predicted cost (nats per
    token, see the module docstring) of that linear alone in that format.

    `batches`: the sensitivity windows (held out from the calibration windows behind the
    Hessians). The formats' weights are read from `cache` (the variant pass filled it);
    costs are cached beside them, so a rerun, or a run that adds a format, measures only
    what is missing. Returns one {linear: {format: cost}} per layer.
    """
    layers = adapter.decoder_layers(model)
    settings = sensitivity_settings(batches_digest(batches), seed)
    digests = [layer_digest(layer) for layer in layers]
    costs: list[dict[str, dict[str, float]]] = [{} for _ in layers]
    todo: list[list[Format]] = []
    for i in range(len(layers)):
        missing = []
        for fmt in formats:
            saved = cache.load_json(i, f"cost-{fmt.name}-{fmt.digest}", settings, digests[i])
            if saved is None:
                missing.append(fmt)
            else:
                for name, value in saved.items():
                    costs[i].setdefault(name, {})[fmt.name] = value
        todo.append(missing)
    if not any(todo):
        return costs

    with torch.no_grad():
        first = capture_first_layer_inputs(model, adapter, batches)
        layer_inputs = []  # hidden states entering each layer, per batch
        hidden = [inp.hidden for inp in first]
        for _, _, outputs, _ in run_layerwise(layers, first, device):
            layer_inputs.append(hidden)
            hidden = list(outputs)
    generator = torch.Generator().manual_seed(seed)
    head_device = model_device(model)
    with layer_on(model.get_output_embeddings(), head_device):  # a streamed head is read from disk for this
        grads = [_score_gradient(model, adapter, h.to(head_device), inp.token_kind, generator).to("cpu")
                 for h, inp in zip(hidden, first)]
    n_tokens = sum(int((inp.token_kind != PAD).sum()) for inp in first)

    bar = tqdm(range(len(layers) - 1, -1, -1), desc="sensitivity", unit="layer", disable=not progress)
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
        hooks = _CostHooks(layer, deltas)
        requires = [p.requires_grad for p in layer.parameters()]
        for p in layer.parameters():
            p.requires_grad_(False)
        try:
            for b, inp in enumerate(first):
                x = layer_inputs[i][b].to(device).requires_grad_(True)
                with torch.enable_grad():
                    out = layer_forward(layer, replace(inp, hidden=x, kwargs=move(inp.kwargs, device)), device)
                    out.backward(grads[b].to(device, out.dtype))
                grads[b] = x.grad.detach().to("cpu")
        finally:
            hooks.remove()
            for p, r in zip(layer.parameters(), requires):
                p.requires_grad_(r)
            on_device.close()
        for fmt in todo[i]:
            per_linear = {name: hooks.costs[name][fmt.name] / n_tokens for name in hooks.costs
                          if fmt.name in hooks.costs[name]}
            cache.save_json(i, f"cost-{fmt.name}-{fmt.digest}", settings, per_linear, digests[i])
            for name, value in per_linear.items():
                costs[i].setdefault(name, {})[fmt.name] = value
        del deltas, hooks
    return costs


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
