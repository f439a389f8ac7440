"""luq: Layerwise Ultra-low-bit Quantization for (multimodal) LLMs.

    import luq
    report = luq.quantize("smollm2", "out/q", luq.LUQConfig(budget_gb=0.2))
    model, tokenizer, adapter = luq.load("out/q")
    luq.tune("out/q", "out/q-tuned", luq.TuneConfig(steps=50))   # scales trained against the original

After `import luq`, transformers' `AutoModelForCausalLM.from_pretrained("out/q")` (and
`AutoModelForImageTextToText` for vision-language artifacts) loads an artifact too (`luq.hf`).
"""

import sys

from luq.errors import LuqError
from luq.version import __version__
__all__ = ["LuqError", "LUQConfig", "MeasuredConfig", "EntropyConfig", "Session", "quantize", "load", "tune",
           "TuneConfig", "__version__"]


def __getattr__(name):  # the heavy imports (torch, transformers) only when asked for
    if name == "quantize":
        from luq.api import quantize
        return quantize
    if name == "load":
        from luq.artifact import load
        return load
    if name in ("tune", "TuneConfig"):
        import luq.tuning
        return getattr(luq.tuning, name)
    if name == "Session":
        from luq.session import Session
        return Session
    if name in ("LUQConfig", "MeasuredConfig", "EntropyConfig"):
        import luq.config
        return getattr(luq.config, name)
    raise AttributeError(f"module 'luq' has no attribute {name!r}")


class _RegisterWithTransformers:
    """Imports `luq.hf` (which registers luq's quantizer) right after transformers' quantizer
    registry is imported, so that `import luq` stays light: transformers and torch are imported
    only by those who use them."""

    target = "transformers.quantizers.auto"

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            import luq.hf  # noqa: F401

        spec.loader.exec_module = exec_then_register
        return spec


def _register_with_transformers() -> None:
    if "transformers.quantizers.auto" in sys.modules:
        import luq.hf  # noqa: F401
    elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWithTransformers())


_register_with_transformers()
