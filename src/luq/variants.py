"""The variant cache: every decoder linear quantized in every format of the menu, on disk.

During the layer-by-layer pass each layer's linears are quantized with each format and
stored in one safetensors file per (layer, format), named by the format and the hash
of its solver settings. A plan (linear -> format) is then assembled from these files
without quantizing again; a rerun of an interrupted pass finds the (layer, format)
pairs already done; adding a format to a run computes only that format.

A cache directory is named by the hash of what every file in it depends on (model
fingerprint, calibration, Hessian source); each file also records the hash of its
layer's own weights, and a file that is missing, unreadable or made from other weights
is simply recomputed. Small JSON records beside the weights hold what the pass measured
per layer (entropy, per-format sensitivity costs), each keyed by its own settings.
"""

from __future__ import annotations

import hashlib
import json
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from luq.models.streaming import layer_on, model_device
from luq.quant import QuantizedWeight, weight_from_state_dict
from luq.quant.formats import Format
from luq.store import atomic_write
from luq.tensorfile import tensor_digest  # noqa: F401 - re-exported: the cache's key of weights

CACHE_FORMAT = 2
UNITS = "outside"  # the group (in place of a layer index) of the units outside the decoder layers (the folder's
# name predates the constant's: kept so that existing caches stay valid)


def settings_digest(settings: Any) -> str:
    """Short hash of JSON-able settings (names cache files and records)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """Identifies a model's weights cheaply: its config, every parameter's name/shape/dtype,
    and the bytes of its input embedding (each layer file checks its own layer's bytes)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where the model was loaded from does not change its weights
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}|{p.dtype}|{tuple(p.shape)}".encode())
    with layer_on(model.get_input_embeddings(), model_device(model)):  # a streamed model reads it for this
        h.update(tensor_digest({"embed": model.get_input_embeddings().weight}).encode())
    return h.hexdigest()


@dataclass
class FormatResult:
    """One decoder layer's linears in one format, and what quantizing them measured.

    weights: linear name (relative to the layer) -> packed weight (empty when only the
    record was read). records: linear name -> {"shape", "bytes", "nominal_bits",
    "error" (relative output error ||WX - QX||^2 / ||WX||^2 on the calibration Hessian)}.
    seconds: solver wall time for the whole layer.
    """

    format: str
    weights: dict[str, QuantizedWeight] = field(default_factory=dict)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @staticmethod
    def record_of(weight: QuantizedWeight, error: float) -> dict[str, Any]:
        return {"shape": list(weight.shape), "bytes": weight.nbytes,
                "nominal_bits": weight.nominal_bits_per_weight, "error": error}


def solved_on() -> dict[str, Any]:
    """Where a cached result was solved. Not part of its key: the same settings solved at another thread
    count or on another CPU round differently (BiLLM's salient columns move; docs/results.md, section 3),
    and this says which it was."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "cpu": platform.processor() or platform.machine()}


class VariantCache:
    """A directory of per-(layer, format) files for one (model, calibration, Hessians) key."""

    def __init__(self, root: Path | str, key: dict[str, Any]):
        self.key = dict(key, cache_format=CACHE_FORMAT)
        self.dir = Path(root) / settings_digest(self.key)

    def _layer_dir(self, index: int | str) -> Path:
        """A decoder layer's folder (int index), or a named group's (the units outside the decoder)."""
        return self.dir / (f"layer_{index:04d}" if isinstance(index, int) else f"unit_{index}")

    def path(self, index: int, fmt: Format) -> Path:
        return self._layer_dir(index) / f"{fmt.name}-{fmt.digest}.safetensors"

    def _ensure_dir(self, index: int) -> None:
        self._layer_dir(index).mkdir(parents=True, exist_ok=True)
        if not (self.dir / "key.json").exists():
            atomic_write(self.dir / "key.json", lambda tmp: tmp.write_text(json.dumps(self.key, indent=1, default=str)))

    def save(self, index: int, fmt: Format, result: FormatResult, layer_digest: str) -> None:
        self._ensure_dir(index)
        tensors = {f"{name}/{tname}": t.detach().to("cpu").contiguous()
                   for name, weight in result.weights.items() for tname, t in weight.state_dict().items()}
        meta = {"index": index, "format": fmt.name, "settings": fmt.settings(), "layer_digest": layer_digest,
                "configs": {name: w.config() for name, w in result.weights.items()},
                "records": result.records, "seconds": result.seconds, "solved_on": solved_on()}
        atomic_write(self.path(index, fmt), lambda tmp: save_file(tensors, str(tmp), {"luq": json.dumps(meta)}))

    def _read(self, path: Path, layer_digest: str | None, device: torch.device | str | None = None,
              ) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """The file's metadata and, given a device, its tensors (else {}), in one open; None if the file
        is absent, unreadable (a torn or foreign file: one warning, recomputed) or made from other weights."""
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
                meta = json.loads(f.metadata()["luq"])
                if layer_digest is not None and meta["layer_digest"] != layer_digest:
                    return None
                tensors = {} if device is None else {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:
            warnings.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}); recomputing it", stacklevel=3)
            return None
        return meta, tensors

    def record(self, index: int, fmt: Format, layer_digest: str | None = None) -> FormatResult | None:
        """What the file measured (bytes, errors, seconds), without reading its tensors; None if absent."""
        read = self._read(self.path(index, fmt), layer_digest)
        if read is None:
            return None
        meta = read[0]
        return FormatResult(fmt.name, {}, meta["records"], meta["seconds"])

    def load(self, index: int, fmt: Format, layer_digest: str | None = None,
             device: torch.device | str = "cpu") -> FormatResult | None:
        """The layer's linears in `fmt`, or None if absent, unreadable, or made from other weights."""
        read = self._read(self.path(index, fmt), layer_digest, device)
        if read is None:
            return None
        meta, tensors = read
        weights = {}
        for name, config in meta["configs"].items():
            prefix = f"{name}/"
            weights[name] = weight_from_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                                    if k.startswith(prefix)}, config)
        return FormatResult(fmt.name, weights, meta["records"], meta["seconds"])

    # small JSON records per layer (entropy, sensitivity costs), keyed by their own settings
    def _json_path(self, index: int, kind: str, settings: Any) -> Path:
        return self._layer_dir(index) / f"{kind}-{settings_digest(settings)}.json"

    def save_json(self, index: int, kind: str, settings: Any, data: Any, layer_digest: str) -> None:
        self._ensure_dir(index)
        blob = json.dumps({"layer_digest": layer_digest, "settings": settings, "data": data}, default=str)
        atomic_write(self._json_path(index, kind, settings), lambda tmp: tmp.write_text(blob))

    def load_json(self, index: int, kind: str, settings: Any, layer_digest: str | None = None) -> Any | None:
        path = self._json_path(index, kind, settings)
        try:
            blob = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if layer_digest is not None and blob.get("layer_digest") != layer_digest:
            return None
        return blob["data"]
