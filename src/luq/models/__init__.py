"""Model families: where the language decoder layers are, and what stays in full precision.

A family differs from another only in its adapter; everything downstream (capture,
entropy, quantization, packing) works on `adapter.decoder_layers(model)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from luq.errors import LuqError


@dataclass(frozen=True)
class Adapter:
    """How to find the language decoder of one model family.

    family: the name users see. model_types: the `config.model_type` values it takes.
    decoder_path: attribute path from the top model to the module that holds `.layers`
    (its embeddings, rotary embedding and final norm live there too). multimodal:
    whether the model takes images. kept_in_full_precision: what is never quantized
    (documentation and the report; only decoder-layer linears are ever quantized).
    """

    family: str
    model_types: tuple[str, ...]
    decoder_path: str
    multimodal: bool
    kept_in_full_precision: tuple[str, ...]
    vision_paths: tuple[str, ...] = ()  # modules whose linears form the vision unit group (tower, projector)

    def decoder(self, model: nn.Module) -> nn.Module:
        module = model
        for name in self.decoder_path.split("."):
            module = getattr(module, name)
        return module

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def layer_prefix(self, index: int) -> str:
        """State-dict name prefix of decoder layer `index` (e.g. 'model.layers.3.')."""
        return f"{self.decoder_path}.layers.{index}."


def quantizable_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder layer (attention projections, MLP), by relative name."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


_TEXT_KEPT = ("embed_tokens", "norm", "lm_head", "layer norms")

ADAPTERS: tuple[Adapter, ...] = (
    Adapter("llava", ("llava",), "model.language_model", True,
            ("vision_tower", "multi_modal_projector") + _TEXT_KEPT, ("model.vision_tower", "model.multi_modal_projector")),
    Adapter("qwen2.5-vl", ("qwen2_5_vl",), "model.language_model", True, ("visual",) + _TEXT_KEPT, ("model.visual",)),
    Adapter("causal-lm", ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"),
            "model", False, _TEXT_KEPT),
)


UNIT_KINDS = ("embed", "head", "vision")


@dataclass(frozen=True)
class Unit:
    """A weight outside the decoder layers that the budget can quantize.

    kind: "embed" (the token embedding; with `tied_head` the output head shares it, and
    the one stored weight serves both), "head" (an untied output head) or "vision" (a
    linear of the vision tower or projector)."""

    name: str
    kind: str
    module: nn.Module
    tied_head: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.weight.shape)


def find_units(model: nn.Module, adapter: Adapter, kinds=UNIT_KINDS) -> dict[str, Unit]:
    """The units of `kinds` outside the decoder layers, by full module name. A head tied to
    the embedding is part of the embedding's unit, kept out when either kind is left out."""
    names = {id(m): n for n, m in model.named_modules()}
    units: dict[str, Unit] = {}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and (head.weight is embed.weight  # a streamed model's tie: one meta tensor
                                 or (not embed.weight.is_meta and head.weight.data_ptr() == embed.weight.data_ptr()))
    if tied and "embed" in kinds and "head" in kinds:
        units[names[id(embed)]] = Unit(names[id(embed)], "embed", embed, tied_head=names[id(head)])
    elif not tied:
        if "embed" in kinds:
            units[names[id(embed)]] = Unit(names[id(embed)], "embed", embed)
        if head is not None and "head" in kinds:
            units[names[id(head)]] = Unit(names[id(head)], "head", head)
    if "vision" in kinds:
        for path in adapter.vision_paths:
            for name, module in model.get_submodule(path).named_modules():
                if isinstance(module, nn.Linear):
                    units[f"{path}.{name}"] = Unit(f"{path}.{name}", "vision", module)
    return units


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_type) -> Adapter:
    """The adapter for a model (or a `config.model_type` string); one clear error if none."""
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", "?")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise LuqError(f"unsupported model family {model_type!r}; supported: {', '.join(supported_model_types())}")
