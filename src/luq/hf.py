"""transformers' `from_pretrained` on a luq artifact.

Registers a quantization config and an `HfQuantizer` under the name "luq" (the
`quant_method` of an artifact's `quantization_config`). `import luq` arranges for this
module to be imported as soon as transformers' quantizer registry is (see
`luq._register_with_transformers`), so after `import luq`:

    model = AutoModelForCausalLM.from_pretrained("out/q")            # or AutoModelForImageTextToText
    tokenizer = AutoTokenizer.from_pretrained("out/q")                # or AutoProcessor

While the model is still a skeleton on the meta device, the quantizer checks the artifact
(manifest, checksums, format version: `luq.artifact.verify_artifact`) and swaps in its packed modules
as `luq.load` does (`luq.artifact.rebuild_quantized_modules`: a `QuantLinear` for every linear named in
`quantization_config["modules"]`, a `QuantEmbedding` for each packed embedding, a `TiedQuantHead` for a
head tied to it) with buffers of the stored tensors' shapes and dtypes (read from the safetensors
headers) on the meta device; transformers then fills those buffers from the files like any other
tensor. No dense copy of a quantized weight is ever made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from luq.artifact import (FORMAT_VERSION, QUANT_METHOD, check_format_version, rebuild_quantized_modules,
                          stored_tensor_specs, verify_artifact)
from luq.errors import LuqError
from luq.quant.dense import dequantize_modules


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
        check_format_version(self.format_version, "the model")


class LuqHfQuantizer(HfQuantizer):
    """Loads a luq artifact (pre-quantized only: luq quantizes with `luq quantize`, not at load time)."""

    requires_calibration = True

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if not checkpoint_files:
            raise LuqError("a luq model loads from its artifact directory (from_pretrained(DIR)), not a state dict")
        folder = Path(checkpoint_files[0]).parent
        verify_artifact(folder)
        specs = stored_tensor_specs(folder)
        qconfig = vars(self.quantization_config)

        def meta(key: str, as_dtype: torch.dtype | None) -> torch.Tensor:
            shape, stored = specs[key]
            return torch.empty(shape, dtype=as_dtype or stored, device="meta")

        rebuild_quantized_modules(model, qconfig, specs, meta, dtype or torch.float32, folder)
        # a tied head computes from the packed embedding: transformers has no weight left to tie for it
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        for head in qconfig.get("tied_heads") or {}:
            tied.pop(head + ".weight", None)
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
