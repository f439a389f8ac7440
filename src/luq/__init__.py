"""luq: Layerwise Ultra-low-bit Quantization for (multimodal) LLMs.

    import luq
    report = luq.quantize("smollm2", "out/q", luq.LUQConfig(budget_gb=0.2))
    model, tokenizer, adapter = luq.load("out/q")
"""

from luq.errors import LuqError

__version__ = "0.1.0"
__all__ = ["LuqError", "LUQConfig", "quantize", "load", "__version__"]


def __getattr__(name):  # the heavy imports (torch, transformers) only when asked for
    if name == "quantize":
        from luq.api import quantize
        return quantize
    if name == "load":
        from luq.store import load
        return load
    if name == "LUQConfig":
        from luq.config import LUQConfig
        return LUQConfig
    raise AttributeError(f"module 'luq' has no attribute {name!r}")
