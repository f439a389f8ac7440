"""transformers' `from_pretrained` on a luq artifact.

Registers a quantization config and an `HfQuantizer` under the name "luq" (the
`quant_method` of an artifact's `quantization_config`). `import luq` arranges for this
module to be imported as soon as transformers' quantizer registry is (see
`luq._register_with_transformers`), so after `import luq`:

    model = AutoModelForCausalLM.from_pretrained("out/q")            # or AutoModelForImageTextToText
    tokenizer = AutoTokenizer.from_pretrained("out/q")                # or AutoProcessor

While the model is still a skeleton on the meta device, the quantizer checks the artifact
(manifest, checksums, format version: `luq.store.verify_artifact`) and swaps every linear named
in `quantization_config["modules"]` for a `QuantLinear` (and each packed embedding for a
`QuantEmbedding`, a head tied to it for a `TiedQuantHead`) whose buffers have the stored tensors'
shapes and dtypes (read from the safetensors headers); transformers then fills those buffers
from the files like any other tensor. No dense copy of a quantized weight is ever made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from luq.errors import LuqError
from luq.quant import QuantLinear, weight_from_state_dict
from luq.quant.dense import dequantize_modules
from luq.store import FORMAT_VERSION, verify_artifact
from luq.tensorfile import TensorFiles

QUANT_METHOD = "luq"



class LuqQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a luq artifact, kept whole (`modules`, `plan`, `formats`, ...).

    A config from a newer artifact format is refused here, in one line, before any weight is read.
    """

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, format_version: int = FORMAT_VERSION,
                 **settings: Any):
        settings.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.modules = dict(modules or {})
        for key, value in settings.items():
            setattr(self, key, value)
        if self.format_version > FORMAT_VERSION:
            raise LuqError(f"this luq reads artifact formats up to {FORMAT_VERSION}; the model was written in "
                           f"format {self.format_version} by a newer luq: upgrade luq")


def stored_tensor_specs(folder: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    """Shape and dtype of every tensor an artifact stores, from the safetensors headers alone."""
    files = TensorFiles.in_dir(folder)
    return {name: (list(shape), dtype) for name in files.keys() for dtype, shape in [files.spec(name)]}


def _meta_weight(name: str, wconfig: dict[str, Any], specs: dict[str, tuple[list[int], torch.dtype]]):
    """The packed weight stored under `name`, as meta tensors of the stored shapes and dtypes."""
    prefix = name + "."
    own = {k[len(prefix):]: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in specs.items()
           if k.startswith(prefix) and "." not in k[len(prefix):] and k != prefix + "bias"}
    return weight_from_state_dict(own, wconfig)


def swap_in_packed_embeddings(model: torch.nn.Module, qconfig: Any,
                              specs: dict[str, tuple[list[int], torch.dtype]], dtype: torch.dtype) -> None:
    """Replace each packed embedding (`qconfig.embeddings`) by a QuantEmbedding on the meta device,
    and each head tied to one (`qconfig.tied_heads`) by a TiedQuantHead over it, as luq.load does."""
    from luq.quant.embedding import QuantEmbedding, TiedQuantHead, embed_scale

    tied_heads = getattr(qconfig, "tied_heads", None) or {}
    for name, wconfig in (getattr(qconfig, "embeddings", None) or {}).items():
        embedding = model.get_submodule(name)
        if tuple(embedding.weight.shape) != tuple(wconfig["shape"]):
            raise LuqError(f"the artifact's {name} is {wconfig['shape']}, the model expects "
                           f"{list(embedding.weight.shape)}")
        packed = QuantEmbedding(_meta_weight(name, wconfig, specs), embedding.padding_idx, embed_scale(embedding),
                                dtype)
        _set_module(model, name, packed)
        for head, source in tied_heads.items():
            if source == name:
                bias = torch.empty(packed.num_embeddings, dtype=dtype, device="meta") if head + ".bias" in specs else None
                _set_module(model, head, TiedQuantHead(packed, bias))
    # a tied head computes from the packed embedding: transformers has no weight left to tie for it
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for head in tied_heads:
        tied.pop(head + ".weight", None)


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def swap_in_quant_linears(model: torch.nn.Module, modules: dict[str, dict[str, Any]],
                          specs: dict[str, tuple[list[int], torch.dtype]], dtype: torch.dtype) -> int:
    """Replace each linear named in `modules` by a QuantLinear on the meta device whose buffers
    have the stored shapes and dtypes (`specs`); its bias, if stored, at `dtype`. Returns the count."""
    for name, wconfig in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise LuqError(f"the artifact quantizes {name}, which this {type(model).__name__} does not have") from None
        if (linear.out_features, linear.in_features) != tuple(wconfig["shape"]):
            raise LuqError(f"the artifact's {name} is {wconfig['shape']}, the model expects "
                           f"{[linear.out_features, linear.in_features]}")
        bias = torch.empty(linear.out_features, dtype=dtype, device="meta") if name + ".bias" in specs else None
        _set_module(model, name, QuantLinear(_meta_weight(name, wconfig, specs), bias))
    return len(modules)


class LuqHfQuantizer(HfQuantizer):
    """Loads a luq artifact (pre-quantized only: luq quantizes with `luq quantize`, not at load time)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if not checkpoint_files:
            raise LuqError("a luq model loads from its artifact directory (from_pretrained(DIR)), not a state dict")
        folder = Path(checkpoint_files[0]).parent
        verify_artifact(folder)
        specs = stored_tensor_specs(folder)
        swap_in_packed_embeddings(model, self.quantization_config, specs, dtype or torch.float32)
        swap_in_quant_linears(model, self.quantization_config.modules, specs, dtype or torch.float32)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def _dequantize(self, model, dtype=None):
        dequantize_modules(model)
        return model

    def is_serializable(self):
        return False  # luq.quantize writes artifacts (with their manifest); save_pretrained does not

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make "luq" known to transformers' quantizer registry (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LuqQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(LuqQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LuqHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(LuqHfQuantizer)


register()
