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
                               register_format, weight_from_state_dict)

__all__ = ["GPTQ", "RTN", "BiLLM", "CompactBiLLM", "Sign", "QuantizedWeight", "GPTQWeight", "BiLLMWeight",
           "CompactBiLLMWeight", "SignWeight",
           "HessianAccumulator", "relative_output_error", "QuantLinear", "weight_from_state_dict",
           "Format", "register_format", "get_format", "list_formats", "parse_formats",
           "reference_bits", "DEFAULT_MENU", "COMPACT_MENU", "GGML", "GGMLRTN", "GGMLWeight", "to_gguf_bytes"]
