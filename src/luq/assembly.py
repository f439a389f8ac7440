"""Putting a plan into the model: packed weights from the variant cache, and what they weigh.

`size_table` turns the variant pass's per-(linear, format) records into the exact bytes of
any plan; `Assembly` swaps every planned linear for its packed weight (or, for the many
evaluations of a search, for a plain nn.Linear holding the dequantized weight) and puts
the originals back.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from luq.errors import LuqError
from luq.models import Adapter, quantizable_linears
from luq.models.streaming import stream_of
from luq.plan.sizes import LinearSizes, Plan, SizeTable, layer_plan
from luq.quant.formats import get_format
from luq.quant.linear import replace_linears, restore_linears
from luq.store import stored_bytes
from luq.variants import VariantCache


def linear_names(model: nn.Module, adapter: Adapter) -> list[list[str]]:
    """Per decoder layer, the full module names of its quantized linears."""
    return [[f"{adapter.layer_prefix(i)}{name}" for name in quantizable_linears(layer)]
            for i, layer in enumerate(adapter.decoder_layers(model))]


def size_table(model: nn.Module, adapter: Adapter, layers: list[dict], storage_dtype: torch.dtype) -> SizeTable:
    """Exact artifact bytes of any plan, from the model and the variant pass's records."""
    names = linear_names(model, adapter)
    base = stored_bytes(model, storage_dtype, exclude={f"{n}.weight" for layer in names for n in layer})
    linears = {}
    for record in layers:
        prefix = adapter.layer_prefix(record["index"])
        for name, info in record["linears"].items():
            rows, cols = info["shape"]
            linears[prefix + name] = LinearSizes(
                layer=record["index"], n_weights=rows * cols,
                bytes={f: v["bytes"] for f, v in info["formats"].items()},
                nominal_bits={f: v["nominal_bits"] for f, v in info["formats"].items()})
    return SizeTable(base_bytes=base, linears=linears)


def size_bounds(model: nn.Module, adapter: Adapter, formats: list[str], storage_dtype: torch.dtype,
                ) -> tuple[int, int] | None:
    """(least, most) artifact bytes any plan over `formats` can reach, before quantizing anything;
    None if some format cannot bound its size in advance."""
    names = linear_names(model, adapter)
    base = stored_bytes(model, storage_dtype, exclude={f"{n}.weight" for layer in names for n in layer})
    least = most = base
    for layer in adapter.decoder_layers(model):
        for linear in quantizable_linears(layer).values():
            bounds = [get_format(f).nbytes_bounds((linear.out_features, linear.in_features)) for f in formats]
            if any(b is None for b in bounds):
                return None
            least += min(b[0] for b in bounds)
            most += max(b[1] for b in bounds)
    return least, most


class Assembly:
    """Puts a plan into the model from variant caches, and takes it out.

    `caches`: one cache or several (each (layer, format) is read from the first cache
    holding it). dense=True puts in plain nn.Linear modules holding the dequantized
    weights instead of QuantLinear: the same weights without unpacking them at every
    forward (for the many evaluations of a search; the artifact always gets QuantLinear).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, caches: VariantCache | list[VariantCache], device,
                 dtype=None, dense: bool = False):
        self.model, self.adapter, self.device, self.dtype, self.dense = model, adapter, device, dtype, dense
        self.caches = caches if isinstance(caches, list) else [caches]
        self._replaced: dict[int, dict] = {}

    def _weights(self, index: int, fmt_name: str, names: list[str]) -> dict:
        fmt = get_format(fmt_name)
        for cache in self.caches:
            result = cache.load(index, fmt, device=self.device)
            if result is not None and all(n in result.weights for n in names):
                return {n: result.weights[n] for n in names}
        raise LuqError(f"layer {index} has no {fmt_name!r} weights for {', '.join(names)} in "
                       f"{', '.join(str(c.dir) for c in self.caches)}")

    def apply(self, plan: Plan) -> None:
        self.undo()
        for i, layer in enumerate(self.adapter.decoder_layers(self.model)):
            by_format: dict[str, list[str]] = defaultdict(list)
            for name, fmt in layer_plan(plan, self.adapter.layer_prefix(i)).items():
                by_format[fmt].append(name)
            weights = {}
            stream = stream_of(layer)
            for fmt, names in by_format.items():
                got = self._weights(i, fmt, names)
                weights.update(got)
                if stream is not None:
                    self._stream_source(stream, i, fmt, got)
            self._replaced[i] = replace_linears(layer, weights, dtype=self.dtype, dense=self.dense)

    def _stream_source(self, stream, index: int, fmt: str, weights: dict) -> None:
        """A streamed layer holds only meta tensors: its swapped-in modules' values are read
        from the cache whenever the layer is read from disk."""
        dtype = self.dtype or stream.dtype
        provided = {f"{n}.{k}" for n, w in weights.items() for k in (("weight",) if self.dense else w.state_dict())}

        def fetch() -> dict[str, torch.Tensor]:
            loaded = self._weights(index, fmt, list(weights))
            if self.dense:
                return {f"{n}.weight": w.dequantize(dtype) for n, w in loaded.items()}
            return {f"{n}.{k}": t for n, w in loaded.items() for k, t in w.state_dict().items()}
        stream.add_source(provided, fetch)

    def undo(self) -> None:
        layers = self.adapter.decoder_layers(self.model)
        for i, replaced in self._replaced.items():
            restore_linears(layers[i], replaced)
            if stream_of(layers[i]) is not None:
                stream_of(layers[i]).clear_sources()
        self._replaced = {}
