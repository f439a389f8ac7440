"""The per-layer variant cache: every decoder layer quantized each way, kept on disk.

During the layer-by-layer pass each layer's linears are quantized with every variant
(GPTQ-4 and BiLLM by default) and stored in one safetensors file per layer, with what
the layer's entropy was and what produced it. A candidate with any number of 1-bit
layers is then assembled from these files without quantizing again, and a rerun of an
interrupted pass finds the layers already done.

A cache directory is named by the hash of everything that determines its contents
(model fingerprint, calibration, solver settings, entropy settings, Hessian source);
each layer file also records the hash of the layer's own weights, and a layer whose
file is missing, unreadable or made from other weights is simply recomputed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from luq.quant import QuantizedWeight, weight_from_state_dict
from luq.store import atomic_write

CACHE_FORMAT = 1


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Identifies a model's weights cheaply: its config, every parameter's name/shape/dtype,
    and the bytes of its input embedding (each layer file checks its own layer's bytes)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where the model was loaded from does not change its weights
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
    h.update(tensor_digest({"embed": model.get_input_embeddings().weight}).encode())
    return h.hexdigest()


@dataclass
class LayerVariants:
    """One decoder layer quantized every way, plus what the pass measured on it.

    weights: variant name -> linear name (relative to the layer) -> packed weight.
    entropy: K -> {"all", "text", "image"} entropy of the layer's output (nats).
    errors: variant -> linear -> relative output error ||WX - QX||^2 / ||WX||^2.
    seconds: variant -> solver wall time for the whole layer.
    """

    index: int
    weights: dict[str, dict[str, QuantizedWeight]]
    entropy: dict[int, dict[str, float | None]]
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def nbytes(self, variant: str) -> int:
        """Stored bytes of the layer's quantized linears in `variant`."""
        return sum(w.nbytes for w in self.weights[variant].values())

    def n_weights(self) -> int:
        some = next(iter(self.weights.values()))
        return sum(w.shape[0] * w.shape[1] for w in some.values())

    def nominal_bits(self, variant: str) -> float:
        """The paper's bits per weight of the layer in `variant` (weighted over its linears)."""
        ws = self.weights[variant].values()
        return sum(w.nominal_bits_per_weight * w.shape[0] * w.shape[1] for w in ws) / self.n_weights()

    def summary(self) -> dict[str, Any]:
        """What the planner needs, without the tensors."""
        return {"index": self.index, "n_weights": self.n_weights(),
                "bytes": {v: self.nbytes(v) for v in self.weights},
                "nominal_bits": {v: self.nominal_bits(v) for v in self.weights},
                "entropy": self.entropy, "errors": self.errors, "seconds": self.seconds}


class VariantCache:
    """A directory of per-layer variant files for one (model, settings) key."""

    def __init__(self, root: Path | str, key: dict[str, Any]):
        self.key = dict(key, cache_format=CACHE_FORMAT)
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True, default=str).encode()).hexdigest()
        self.dir = Path(root) / digest[:20]

    def path(self, index: int) -> Path:
        return self.dir / f"layer_{index:04d}.safetensors"

    def save(self, layer: LayerVariants, layer_digest: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").exists():
            atomic_write(self.dir / "key.json",
                         lambda tmp: tmp.write_text(json.dumps(self.key, indent=1, default=str)))
        tensors, configs = {}, {}
        for variant, linears in layer.weights.items():
            for name, weight in linears.items():
                configs.setdefault(variant, {})[name] = weight.config()
                for tname, t in weight.state_dict().items():
                    tensors[f"{variant}/{name}/{tname}"] = t.detach().to("cpu").contiguous()
        meta = {"index": layer.index, "layer_digest": layer_digest, "configs": configs,
                "entropy": {str(k): v for k, v in layer.entropy.items()},
                "errors": layer.errors, "seconds": layer.seconds}
        atomic_write(self.path(layer.index), lambda tmp: save_file(tensors, str(tmp), {"luq": json.dumps(meta)}))

    def load(self, index: int, layer_digest: str | None = None,
             device: torch.device | str = "cpu") -> LayerVariants | None:
        """The cached layer, or None if absent, unreadable, or made from other weights."""
        path = self.path(index)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = json.loads(f.metadata()["luq"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # a torn or foreign file: recompute the layer
            warnings.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}); recomputing layer {index}",
                          stacklevel=2)
            return None
        if layer_digest is not None and meta["layer_digest"] != layer_digest:
            return None
        weights: dict[str, dict[str, QuantizedWeight]] = {}
        for variant, linears in meta["configs"].items():
            for name, config in linears.items():
                prefix = f"{variant}/{name}/"
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                weights.setdefault(variant, {})[name] = weight_from_state_dict(own, config)
        return LayerVariants(index=meta["index"], weights=weights,
                             entropy={int(k): v for k, v in meta["entropy"].items()},
                             errors=meta["errors"], seconds=meta["seconds"])
