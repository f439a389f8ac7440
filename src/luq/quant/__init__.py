"""The solvers (pure functions of W and H) and their packed results."""

from luq.quant.base import QuantizedWeight
from luq.quant.baselines import Sign, SignWeight
from luq.quant.billm import BiLLM, BiLLMWeight
from luq.quant.gptq import GPTQ, RTN, GPTQWeight
from luq.quant.hessian import HessianAccumulator, relative_output_error
from luq.quant.linear import QuantLinear

__all__ = ["GPTQ", "RTN", "BiLLM", "Sign", "QuantizedWeight", "GPTQWeight", "BiLLMWeight", "SignWeight",
           "HessianAccumulator", "relative_output_error", "QuantLinear", "weight_from_state_dict"]

_WEIGHT_TYPES = {cls.method: cls for cls in (GPTQWeight, BiLLMWeight, SignWeight)}


def weight_from_state_dict(tensors, config) -> QuantizedWeight:
    """Rebuild any stored weight from its tensors and its config (which names the method)."""
    return _WEIGHT_TYPES[config["method"]].from_state_dict(tensors, config)
