"""Dense stand-ins for packed modules: the same function, without unpacking at each forward."""

from __future__ import annotations

import torch
from torch import nn

from luq.quant.embedding import TiedQuantHead
from luq.quant.linear import QuantLinear


def dequantize_modules(model: nn.Module) -> int:
    """Swap every QuantLinear under `model` (and every head tied to a packed embedding) for an
    nn.Linear holding its dequantized weight (in the module's compute dtype or float32): the same
    function, without unpacking at each forward, at full-precision memory. For evaluating many
    configurations fast; returns the count."""
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantLinear, TiedQuantHead)):
            packed = module if isinstance(module, QuantLinear) else module.embedding
            weight = packed.quantized_weight.dequantize(packed.compute_dtype or torch.float32)
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device, dtype=weight.dtype)
            dense.weight.data = weight
            if module.bias is not None:
                dense.bias.data = module.bias.detach().to(weight.dtype)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, dense)
            swapped += 1
    return swapped
