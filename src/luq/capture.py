"""Layer-by-layer execution of a decoder (paper Eq. 1: h_i = f_i(h_{i-1})).

The model runs once up to decoder layer 0, and what that layer receives is kept: the
hidden states and every keyword argument the family passes (attention mask, position
ids, rotary position embeddings, Qwen's mRoPE ones, cache position, ...). Then the
layers run one at a time over those inputs, each one's outputs becoming the next
one's inputs, so peak memory is one layer plus the activations. Activations wait on
`offload_device` (the CPU by default) between layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from luq.models import Adapter
from luq.models.streaming import input_modules, layer_on, model_device

# token kinds, as counted in calibration and used for per-modality entropy
PAD, TEXT, IMAGE = 0, 1, 2


@dataclass
class LayerInput:
    """What one decoder layer receives for one calibration batch."""

    hidden: torch.Tensor          # [batch, tokens, width]
    kwargs: dict[str, Any]        # every other argument of the layer's forward
    token_kind: torch.Tensor      # int8 [batch, tokens]: PAD, TEXT or IMAGE


class DiskActivations:
    """Keeps activations in memory-mapped files under `folder` instead of RAM (for
    calibration sets larger than memory): the OS pages them in as a layer reads them.
    Each file is unlinked as soon as it is mapped, so nothing is left behind, even
    after a crash, and its disk space returns when the tensor is freed."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        path = self.folder / f".luq-activations-{os.getpid()}-{self._count}.bin"
        self._count += 1
        stored = torch.from_file(str(path), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        os.unlink(path)
        stored.copy_(t)
        return stored


def offload(t: torch.Tensor, offload_device: torch.device | str, disk: DiskActivations | None) -> torch.Tensor:
    """Where activations wait between layers: on `offload_device`, or in files when `disk`."""
    return disk.keep(t.to("cpu")) if disk is not None else t.to(offload_device)


class _ReachedFirstLayer(Exception):
    """Stops the model's forward once layer 0's inputs are captured."""


def move(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor inside (tuples, lists, dicts) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


def _run_to_first_layer(model: nn.Module, adapter: Adapter, inputs: dict) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run `model` on `inputs` up to decoder layer 0 (under the caller's grad mode): the hidden
    states and every other argument that layer receives."""
    seen: dict[str, Any] = {}

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        seen["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}
        raise _ReachedFirstLayer

    handle = adapter.decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs, use_cache=False)
    except _ReachedFirstLayer:
        pass
    else:  # pragma: no cover - a family whose forward never reaches layer 0
        raise RuntimeError("the model's forward did not reach decoder layer 0")
    finally:
        handle.remove()
    return seen["hidden"], seen["kwargs"]


def first_layer_hidden(model: nn.Module, adapter: Adapter, inputs: dict) -> torch.Tensor:
    """The hidden states decoder layer 0 receives for `inputs` (embeddings, with image features
    merged in), computed under the caller's grad mode: differentiable w.r.t. the vision tower."""
    return _run_to_first_layer(model, adapter, inputs)[0]


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, adapter: Adapter, batches: Iterable[tuple[dict, torch.Tensor]],
                               offload_device: torch.device | str = "cpu",
                               disk: DiskActivations | None = None) -> list[LayerInput]:
    """Run `model` on each (model inputs, token kinds) batch up to decoder layer 0 and keep
    that layer's inputs. The model's own embedding, vision tower, projector, masks and
    rotary embeddings produce them, so nothing family-specific is recomputed here."""
    device = model_device(model)
    captured = []
    with ExitStack() as streamed:  # a streamed model's embeddings (and vision tower) are read for this
        for module in input_modules(model, adapter):
            streamed.enter_context(layer_on(module, device))
        for inputs, token_kind in batches:
            hidden, kwargs = _run_to_first_layer(model, adapter, move(inputs, device))
            captured.append(LayerInput(hidden=offload(hidden, offload_device, disk),
                                       kwargs=move(kwargs, offload_device), token_kind=token_kind.to(torch.int8)))
    return captured


def layer_forward(layer: nn.Module, inp: LayerInput, device: torch.device | str) -> torch.Tensor:
    """One decoder layer on one captured batch, on `device`."""
    out = layer(inp.hidden.to(device), **move(inp.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layerwise(layers: nn.ModuleList, inputs: list[LayerInput], device: torch.device | str,
                  offload_device: torch.device | str = "cpu",
                  before_layer: Callable[[int, nn.Module], Any] | None = None,
                  disk: DiskActivations | None = None,
                  ) -> Iterator[tuple[int, nn.Module, list[torch.Tensor], Any]]:
    """Yield (index, layer, outputs per batch, context) for each decoder layer in turn.

    Each layer is moved to `device` for its forward and back to where it was after
    the consumer resumes the iterator. `before_layer(i, layer)` runs before the layer's
    forward and its return value is yielded as `context` (the hook point where, e.g.,
    Hessian accumulators are attached). The outputs yielded become the next layer's
    inputs (the full-precision chain); a consumer that quantizes a layer and wants the
    next layer fed by the quantized outputs recomputes them with `layer_forward` and
    writes them into the yielded list, which is what the next layer reads. With `disk`,
    the outputs wait in memory-mapped files instead of RAM.
    """
    for i, layer in enumerate(layers):
        with layer_on(layer, device):  # a streamed layer is read from disk here and freed after
            context = before_layer(i, layer) if before_layer is not None else None
            outputs = [offload(layer_forward(layer, inp, device), offload_device, disk) for inp in inputs]
            yield i, layer, outputs, context
        inputs = [replace(inp, hidden=out) for inp, out in zip(inputs, outputs)]


@torch.no_grad()
def layerwise_hidden(model: nn.Module, adapter: Adapter, batches, device: torch.device | str | None = None,
                     ) -> list[torch.Tensor]:
    """The last decoder layer's output on each batch (before the final norm), computed layer by
    layer (all batches through one layer, then the next): one decoder layer in memory at a time."""
    first = capture_first_layer_inputs(model, adapter, list(batches))
    hidden = [inp.hidden for inp in first]
    for _, _, outputs, _ in run_layerwise(adapter.decoder_layers(model), first, device or model_device(model)):
        hidden = outputs
    return hidden


def layerwise_logits(model: nn.Module, adapter: Adapter, batches, device: torch.device | str | None = None,
                     ) -> Iterator[torch.Tensor]:
    """The model's logits on each batch, computed layer by layer (all batches through one
    layer, then the next): what a whole-model forward gives, with one decoder layer in memory
    at a time, so it works on a streamed model. Final norm and output head as the decoder's;
    one batch's logits are made at a time, as the caller asks for them."""
    hidden = layerwise_hidden(model, adapter, batches, device)
    head, norm = model.get_output_embeddings(), adapter.decoder(model).norm
    where = model_device(model)
    with layer_on(head, where):
        for h in hidden:
            yield head(norm(h.to(where)))
