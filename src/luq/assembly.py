"""Putting a plan into the model: packed weights from the variant cache, and what they weigh.

`size_table` turns the variant pass's per-(linear, format) records into the exact bytes of
any plan; `Assembly` swaps every planned linear for its packed weight (or, for the many
evaluations of a search, for a plain nn.Linear holding the dequantized weight) and puts
the originals back.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from luq.artifact import stored_bytes
from luq.errors import LuqError
from luq.models import Adapter, Unit, quantizable_linears
from luq.models.streaming import is_streamed, stream_of
from luq.plan.sizes import KEEP, LinearSizes, Plan, SizeTable, layer_plan
from luq.quant.embedding import QuantEmbedding, TiedQuantHead
from luq.quant.formats import get_format
from luq.quant.linear import replace_linears, restore_linears
from luq.variants import UNITS, VariantCache

if TYPE_CHECKING:
    from luq.pipeline import LayerSummary, UnitPass


def linear_names(model: nn.Module, adapter: Adapter) -> list[list[str]]:
    """Per decoder layer, the full module names of its quantized linears."""
    return [[f"{adapter.layer_prefix(i)}{name}" for name in quantizable_linears(layer)]
            for i, layer in enumerate(adapter.decoder_layers(model))]


def _planned_weights(model, adapter, units) -> set[str]:
    """State-dict names of every weight a plan prices (the decoder's linears and `units`)."""
    return ({f"{n}.weight" for layer in linear_names(model, adapter) for n in layer}
            | {f"{name}.weight" for name in units})


def keep_bytes(unit: Unit, storage_dtype: torch.dtype) -> int:
    """What a unit outside the decoder weighs unquantized (a tied head's weight is stored once)."""
    return unit.module.weight.numel() * torch.empty((), dtype=storage_dtype).element_size()


def size_table(model: nn.Module, adapter: Adapter, layers: list[LayerSummary], storage_dtype: torch.dtype,
               unit_pass: UnitPass | None = None, units: dict[str, Unit] | None = None,
               vector_dtype: torch.dtype | None = None) -> SizeTable:
    """Exact artifact bytes of any plan, from the model and the variant pass's per-layer summaries
    (`layer_pass`'s `layers`; `unit_pass`: the summary of `units`, which then join the plan
    with KEEP as one more choice)."""
    units = units or {}
    base = stored_bytes(model, storage_dtype, exclude=_planned_weights(model, adapter, units), vector_dtype=vector_dtype)
    linears = {}
    for name, info in (unit_pass.units if unit_pass is not None else {}).items():
        rows, cols = info["shape"]
        linears[name] = LinearSizes(
            layer=None, n_weights=rows * cols,
            bytes={**{f: v["bytes"] for f, v in info["formats"].items()}, KEEP: keep_bytes(units[name], storage_dtype)},
            nominal_bits={**{f: v["nominal_bits"] for f, v in info["formats"].items()},
                          KEEP: 8.0 * torch.empty((), dtype=storage_dtype).element_size()})
    for record in layers:
        prefix = adapter.layer_prefix(record.index)
        for name, info in record.linears.items():
            rows, cols = info["shape"]
            linears[prefix + name] = LinearSizes(
                layer=record.index, n_weights=rows * cols,
                bytes={f: v["bytes"] for f, v in info["formats"].items()},
                nominal_bits={f: v["nominal_bits"] for f, v in info["formats"].items()})
    return SizeTable(base_bytes=base, linears=linears)


def size_bounds(model: nn.Module, adapter: Adapter, formats: list[str], storage_dtype: torch.dtype,
                units: dict[str, Unit] | None = None, unit_formats: list[str] = (),
                vector_dtype: torch.dtype | None = None) -> tuple[int, int] | None:
    """(least, most) artifact bytes any plan over `formats` (and `unit_formats` or KEEP for the
    `units` outside the decoder) can reach, before quantizing anything; None if some format
    cannot bound its size in advance."""
    units = units or {}
    least = most = stored_bytes(model, storage_dtype, exclude=_planned_weights(model, adapter, units),
                                vector_dtype=vector_dtype)
    shapes = [((linear.out_features, linear.in_features), formats, None)
              for layer in adapter.decoder_layers(model) for linear in quantizable_linears(layer).values()]
    shapes += [(u.shape, unit_formats, keep_bytes(u, storage_dtype)) for u in units.values()]
    for shape, fmts, kept in shapes:
        able = [get_format(f) for f in fmts if get_format(f).supports(shape)]
        if not able and not kept:
            raise LuqError(f"no format of {','.join(fmts)} can store a {shape[0]}x{shape[1]} weight (ggml's "
                           f"K-quants need columns that are a multiple of 256); add one that can, e.g. q8_0 or q4_0")
        bounds = [f.nbytes_bounds(shape) for f in able] + ([(kept, kept)] if kept else [])
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
                 dtype=None, dense: bool = False, units: dict[str, Unit] | None = None):
        self.model, self.adapter, self.device, self.dtype, self.dense = model, adapter, device, dtype, dense
        self.caches = caches if isinstance(caches, list) else [caches]
        self.units = units or {}
        self._replaced: dict[int, dict] = {}
        self._replaced_outside: dict[str, nn.Module] = {}

    def _weights(self, index: int | str, fmt_name: str, names: list[str]) -> dict:
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
        self._apply_outside(plan)

    def _apply_outside(self, plan: Plan) -> None:
        """The planned units outside the decoder: vision linears as in a layer; the embedding as a
        QuantEmbedding (a lookup is cheap either way), its tied head reading its packed tensors
        (dense: an nn.Linear holding the dequantized table)."""
        by_format: dict[str, list[str]] = defaultdict(list)
        for name in self.units:
            if plan.get(name, KEEP) != KEEP:
                by_format[plan[name]].append(name)
        weights = {}
        for fmt, names in by_format.items():
            weights.update(self._weights(UNITS, fmt, names))
        linears = {n: q for n, q in weights.items() if self.units[n].kind != "embed"}
        # packed weights stay in memory even in a streamed part (they are small); its other tensors stream
        self._replaced_outside = replace_linears(self.model, linears, dtype=self.dtype, dense=self.dense,
                                                 device=self.device if is_streamed(self.model) else None)
        for name, q in weights.items():
            unit = self.units[name]
            if unit.kind != "embed":
                continue
            embedding = QuantEmbedding.from_embedding(unit.module, q)  # a lookup unpacks only its rows
            self._swap(name, embedding)
            if unit.tied_head:
                head = self.model.get_submodule(unit.tied_head)
                if self.dense:
                    new_head = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                                         device=q.device, dtype=head.weight.dtype)
                    new_head.weight.data = q.dequantize(head.weight.dtype)
                    if head.bias is not None:
                        new_head.bias.data = head.bias.detach().clone()
                else:
                    new_head = TiedQuantHead(embedding, head.bias)
                self._swap(unit.tied_head, new_head)

    def _swap(self, name: str, new: nn.Module) -> None:
        owner, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(owner) if owner else self.model
        self._replaced_outside.setdefault(name, getattr(parent, attr))
        setattr(parent, attr, new)

    def _stream_source(self, stream, index: int, fmt: str, weights: dict) -> None:
        """A streamed layer holds only meta tensors: its swapped-in modules' values are read
        from the cache whenever the layer is read from disk."""
        dtype = self.dtype or stream.dtype
        provided = {f"{n}.{k}" for n, w in weights.items() for k in (("weight",) if self.dense else w.state_dict())}
        names = list(weights)  # only the names: holding the packed weights would keep every layer's in memory

        def fetch() -> dict[str, torch.Tensor]:
            loaded = self._weights(index, fmt, names)
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
        restore_linears(self.model, self._replaced_outside)
        self._replaced_outside = {}

