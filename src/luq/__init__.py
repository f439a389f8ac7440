"""luq: Layerwise Ultra-low-bit Quantization for (multimodal) LLMs."""

from luq.errors import LuqError

__version__ = "0.1.0"
__all__ = ["LuqError", "__version__"]
