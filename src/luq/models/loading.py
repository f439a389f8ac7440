"""MODEL -> (model, tokenizer or processor, adapter): built-in offline names, local dirs, hub ids."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import torch

from luq.errors import LuqError
from luq.models import Adapter, adapter_for

# Built-in offline models: name -> "module:function" returning its local directory (built once into the
# cache). Named as strings and imported when asked for, so that this room imports nothing from the zoo of
# demo and test models; `register_builtin` adds one.
BUILTIN = {"smollm2": "luq.zoo.smollm2:smollm2_dir",
           "smollm2-offgrid": "luq.zoo.offgrid:smollm2_offgrid_dir",
           "tiny-vlm": "luq.zoo.tinyvlm:trained_dir",
           "tiny-vlm-offgrid": "luq.zoo.offgrid:tiny_vlm_offgrid_dir"}
DEFAULT_MODEL = "smollm2"


def register_builtin(name: str, target: str) -> None:
    """Let MODEL `name` stand for the directory `target` ("module:function") returns."""
    if ":" not in target:
        raise LuqError(f"a built-in model is registered as 'module:function', got {target!r}")
    BUILTIN[name] = target

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise LuqError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}") from None


def check_device(device: str | torch.device) -> torch.device:
    """The torch device `device` names, refused in one line where it is malformed or absent here."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LuqError(f"--device {device!r} is not a torch device ({str(e).splitlines()[0]}); "
                       "use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise LuqError(f"--device {device}: no CUDA GPU is available to this torch ({torch.__version__}); "
                           "use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise LuqError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise LuqError(f"--device {device}: MPS is not available here; use --device cpu")
    return parsed


def resolve(model: str | None) -> str:
    """The local directory or hub id behind MODEL (a built-in name maps to its offline copy)."""
    model = model or DEFAULT_MODEL
    target = BUILTIN.get(model)
    if target is None:
        return model
    module, _, function = target.partition(":")
    return str(getattr(import_module(module), function)())


def can_stream(model: str | None) -> bool:
    """Whether MODEL's decoder layers can be read from safetensors shards one at a time
    (a local directory with safetensors, or a hub id)."""
    from luq.models.streaming import has_safetensors

    return has_safetensors(resolve(model))


def load_model(model: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               stream: bool = False):
    """Load MODEL for calibration: (model in eval mode on device/dtype, tokenizer or processor, adapter).

    stream: build the model with its decoder layers left in the safetensors shards, each read
    when a stage reaches it (`luq.models.streaming`); memory then holds one layer at a time."""
    from transformers import AutoConfig

    device = check_device(device)
    source = resolve(model)
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_local and not Path(source).expanduser().is_dir():
        raise LuqError(f"model directory not found: {source}")
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        raise LuqError(f"cannot load model {model!r}: {str(e).splitlines()[0]}") from None
    adapter: Adapter = adapter_for(config.model_type)
    if adapter.multimodal:
        from transformers import AutoModelForImageTextToText as auto_model
        from transformers import AutoProcessor as auto_pre
    else:
        from transformers import AutoModelForCausalLM as auto_model
        from transformers import AutoTokenizer as auto_pre
    if stream:
        from luq.models.streaming import load_streaming

        net = load_streaming(source, config, auto_model, adapter, device, dtype)
    else:
        net = auto_model.from_pretrained(source, dtype=dtype).to(device).eval()
    return net, auto_pre.from_pretrained(source), adapter
