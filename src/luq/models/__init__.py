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
            ("vision_tower", "multi_modal_projector") + _TEXT_KEPT),
    Adapter("qwen2.5-vl", ("qwen2_5_vl",), "model.language_model", True, ("visual",) + _TEXT_KEPT),
    Adapter("causal-lm", ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3"),
            "model", False, _TEXT_KEPT),
)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model_or_type) -> Adapter:
    """The adapter for a model (or a `config.model_type` string); one clear error if none."""
    model_type = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", "?")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise LuqError(f"unsupported model family {model_type!r}; supported: {', '.join(supported_model_types())}")
