"""The solvers (pure functions of W and H) and their packed results."""

from luq.quant.base import QuantizedWeight
from luq.quant.baselines import Sign, SignWeight
from luq.quant.billm import BiLLM, BiLLMWeight
from luq.quant.billm_compact import CompactBiLLM, CompactBiLLMWeight
from luq.quant.ggml import GGML, GGMLRTN, GGMLWeight, to_gguf_bytes
from luq.quant.gptq import GPTQ, RTN, GPTQWeight
from luq.quant.hessian import HessianAccumulator, relative_output_error
from luq.quant.linear import QuantLinear
from luq.quant.formats import (COMPACT_MENU, DEFAULT_MENU, Format, get_format, list_formats, parse_formats, reference_bits,
                               register_format)

__all__ = ["GPTQ", "RTN", "BiLLM", "CompactBiLLM", "Sign", "QuantizedWeight", "GPTQWeight", "BiLLMWeight",
           "CompactBiLLMWeight", "SignWeight",
           "HessianAccumulator", "relative_output_error", "QuantLinear", "weight_from_state_dict",
           "register_weight_type", "Format", "register_format", "get_format", "list_formats", "parse_formats",
           "reference_bits", "DEFAULT_MENU", "COMPACT_MENU", "GGML", "GGMLRTN", "GGMLWeight", "to_gguf_bytes"]

_WEIGHT_TYPES = {cls.method: cls for cls in (GPTQWeight, BiLLMWeight, CompactBiLLMWeight, SignWeight, GGMLWeight)}


def register_weight_type(cls: type[QuantizedWeight]) -> type[QuantizedWeight]:
    """Let stored weights of another format (``cls.method``) be read back, e.g. a peer's in bench/."""
    known = _WEIGHT_TYPES.get(cls.method)
    if known is not None and known is not cls:
        raise ValueError(f"weight method {cls.method!r} is already taken by {known.__name__}")
    _WEIGHT_TYPES[cls.method] = cls
    return cls


def weight_from_state_dict(tensors, config) -> QuantizedWeight:
    """Rebuild any stored weight from its tensors and its config (which names the method)."""
    return _WEIGHT_TYPES[config["method"]].from_state_dict(tensors, config)
